"""The ``file:///DIR`` backend: a binary cache in a local directory (Nix's ``LocalBinaryCacheStore``).

Every file is written to a hidden temporary sibling, flushed to disk and renamed into place,
so a reader (or a crash) sees either nothing or the whole file. Keys are checked
(:func:`~nartool.cache.backend.check_key`) and the last component is opened without following
symlinks, so nothing a narinfo names reaches outside the directory.
"""

from __future__ import annotations

import errno
import os
import secrets
from typing import BinaryIO

from ..errors import StoreError
from .backend import UploadData, check_key, iter_upload


class FileBackend:
    """A cache directory. ``create``: make it (and ``nar/``) on the first write."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))

    def describe(self) -> str:
        return "file://" + self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def file_exists(self, key: str) -> bool:
        try:
            st = os.stat(self._path(key), follow_symlinks=False)
        except OSError:
            return False
        import stat

        return stat.S_ISREG(st.st_mode)

    def get_file(self, key: str) -> BinaryIO | None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StoreError("cache file is a symlink", path=path, rule="bad-key") from None
            if e.errno == errno.ENOTDIR:
                return None
            raise StoreError(f"cannot read cache file: {e.strerror}", path=path, rule="io-error") from None
        return os.fdopen(fd, "rb")

    def upsert_file(self, key: str, data: UploadData, *, mime: str) -> None:
        path = self._path(key)
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create cache directory: {e.strerror}", path=parent, rule="io-error") from None
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise StoreError(f"cannot write to the cache: {e.strerror}", path=tmp, rule="io-error") from None
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in iter_upload(data):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise StoreError(f"cannot write to the cache: {e.strerror}", path=path, rule="io-error") from None
            raise


__all__ = ["FileBackend"]
