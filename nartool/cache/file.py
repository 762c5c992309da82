"""The ``file:///DIR`` backend: a binary cache in a local directory (Nix's ``LocalBinaryCacheStore``).

Every file is written to a hidden temporary sibling, flushed to disk and renamed into place,
so a reader (or a crash) sees either nothing or the whole file. Keys are checked
(:func:`~nartool.cache.backend.check_key`) and the last component is opened without following
symlinks, so nothing a narinfo names reaches outside the directory.

Inside :meth:`FileBackend.deferred` (a copy's batch) the per-file ``fsync`` is replaced by one
``syncfs`` per batch: files are written to their temporaries, and at the end of the batch (or
:meth:`FileBackend.flush`) the filesystem is synced, the NARs and listings are renamed into
place, synced again, and only then the narinfos — so a narinfo is never visible, even after a
crash, before the NAR it names is complete on disk.
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from ..errors import StoreError
from ..fs.osutil import fsync, syncfs
from .backend import UploadData, check_key, iter_upload


class FileBackend:
    """A cache directory. ``create``: make it (and ``nar/``) on the first write."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self._lock = threading.Lock()
        #: inside :meth:`deferred`: (temporary, final path, key) of the files written, in order
        self._pending: list[tuple[str, str, str]] | None = None
        self._pending_finals: set[str] = set()
        self._depth = 0
        self._temps: dict[int, str] = {}  # id(file) -> name of the temporaries handed out

    def describe(self) -> str:
        return "file://" + self.root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def file_exists(self, key: str) -> bool:
        path = self._path(key)
        with self._lock:
            if path in self._pending_finals:
                return True
        try:
            st = os.stat(path, follow_symlinks=False)
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
                with self._lock:
                    if self._pending is not None:  # synced and renamed by flush()
                        self._pending.append((tmp, path, key))
                        self._pending_finals.add(path)
                        return
                fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise StoreError(f"cannot write to the cache: {e.strerror}", path=path, rule="io-error") from None
            raise


    def temporary(self, subdir: str) -> BinaryIO:
        """A new hidden temporary file in ``subdir`` (created if needed), for :meth:`adopt_file`
        or :meth:`drop_temporary`."""
        d = os.path.join(self.root, *check_key(subdir).split("/"))
        try:
            os.makedirs(d, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".nartool-", suffix=".tmp", dir=d)
        except OSError as e:
            raise StoreError(f"cannot write to the cache: {e.strerror}", path=d, rule="io-error") from None
        os.fchmod(fd, 0o644)
        f = os.fdopen(fd, "w+b")
        self._temps[id(f)] = name
        return f

    def adopt_file(self, key: str, f: BinaryIO) -> None:
        """Make the temporary ``f`` (from :meth:`temporary`, on the same filesystem) the file
        ``key``: renamed into place, never copied (synced as :meth:`upsert_file` does)."""
        path = self._path(key)
        tmp = self._temps[id(f)]
        f.flush()
        with self._lock:
            if self._pending is not None:
                self._pending.append((tmp, path, key))
                self._pending_finals.add(path)
                self._temps.pop(id(f))
                return
        try:
            fsync(f.fileno())
            os.rename(tmp, path)
        except OSError as e:
            raise StoreError(f"cannot write to the cache: {e.strerror}", path=path, rule="io-error") from None
        self._temps.pop(id(f))

    def drop_temporary(self, f: BinaryIO) -> None:
        """Close ``f``; remove it unless it was adopted."""
        f.close()
        name = self._temps.pop(id(f), None)
        if name is not None:
            _unlink(name)

    @contextmanager
    def deferred(self, *, keep_on_error: bool = True) -> Iterator[None]:
        """Writes inside the block become visible at its end (or at :meth:`flush`) with one sync
        for all of them; on an error, what was written is published (``keep_on_error``: each
        narinfo names a complete NAR) or dropped. Nests (the outermost block publishes)."""
        with self._lock:
            self._depth += 1
            if self._pending is None:
                self._pending = []
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._depth -= 1
                outer = self._depth == 0
            if outer:
                try:
                    if ok or keep_on_error:
                        self.flush()
                finally:
                    with self._lock:
                        left, self._pending = self._pending or [], None
                        self._pending_finals = set()
                    for tmp, _, _ in left:
                        _unlink(tmp)

    def flush(self) -> list[str]:
        """Publish what the current :meth:`deferred` block wrote: sync, rename the NARs and
        listings, sync, rename the narinfos (in the order written), sync. Returns their keys."""
        with self._lock:
            pending, self._pending = self._pending or [], ([] if self._pending is not None else None)
            self._pending_finals = set()
        if not pending:
            return []
        try:
            dfd = os.open(self.root, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"cannot open the cache directory: {e.strerror}", path=self.root, rule="io-error") from None
        try:
            syncfs(dfd)
            narinfos = [t for t in pending if t[2].endswith(".narinfo")]
            for tmp, final, _ in pending:
                if not final.endswith(".narinfo"):
                    os.rename(tmp, final)
            if narinfos:
                syncfs(dfd)
                for tmp, final, _ in narinfos:
                    os.rename(tmp, final)
            syncfs(dfd)
        except OSError as e:
            for tmp, _, _ in pending:
                _unlink(tmp)
            raise StoreError(f"cannot write to the cache: {e.strerror}", path=self.root, rule="io-error") from None
        finally:
            os.close(dfd)
        return [k for _, _, k in pending]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["FileBackend"]
