"""Small OS helpers: no-replace rename, syncfs, fd-relative tree removal, temp names."""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from ..nar.source import write_all

_libc: object = False  # loaded on first use (ctypes costs start-up time)


def _libc_fn(name: str) -> object:
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                _libc = ctypes.CDLL("libc.so.6", use_errno=True)
            except OSError:  # pragma: no cover - not glibc
                import ctypes.util

                try:
                    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
                except OSError:
                    _libc = None
    return getattr(_libc, name, None) if _libc is not None else None


AT_FDCWD = -100
RENAME_NOREPLACE = 1


def rename_noreplace(src: bytes, dst: bytes, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    Atomic on Linux (``renameat2(RENAME_NOREPLACE)``); elsewhere a check then a rename.
    """
    fn: Any = _libc_fn("renameat2")
    if fn is not None:
        r = fn(
            AT_FDCWD if src_dir_fd is None else src_dir_fd, src,
            AT_FDCWD if dst_dir_fd is None else dst_dir_fd, dst, RENAME_NOREPLACE,
        )
        if r == 0:
            return
        import ctypes

        e = ctypes.get_errno()
        if e not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(e, os.strerror(e), os.fsdecode(dst))
    try:
        os.lstat(dst, dir_fd=dst_dir_fd)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(dst))


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding ``fd`` (one call instead of one fsync per file)."""
    fn: Any = _libc_fn("syncfs")
    if fn is not None and fn(fd) == 0:
        return
    os.sync()


def remove_at(dir_fd: int | None, name: bytes) -> None:
    """Remove ``name`` (file, symlink or whole tree) relative to ``dir_fd``; never follows symlinks.

    Read-only directories (as in canonicalised store paths) are made writable first.
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if st.st_mode & 0o700 != 0o700:
        os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False) if dir_fd is not None else os.chmod(name, 0o700)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as it:
            children = [os.fsencode(e.name) for e in it]
        for child in children:
            remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def temp_name(base: bytes, tag: bytes = b"tmp") -> bytes:
    """A hidden sibling name for ``base``: ``.<base>.nartool-<tag>-<random>`` (≤ 255 bytes)."""
    rnd = os.urandom(6).hex().encode()
    head = base[:200]
    return b"." + head + b".nartool-" + tag + b"-" + rnd


class FdOutput:
    """Writes a stream to a file descriptor, copying whole files' contents inside the kernel
    (no trip through Python's memory) where the platform allows it: ``copy_file_range`` into a
    regular file (a reflink on filesystems that share extents), ``sendfile`` into anything else
    (pipes, sockets), plain reads and writes otherwise (e.g. an ``O_APPEND`` output)."""

    _FALLBACK = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EBADF)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.total = 0
        linux = sys.platform.startswith("linux")
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        self._copy_range = linux and regular and hasattr(os, "copy_file_range")
        self._sendfile = linux and hasattr(os, "sendfile")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        write_all(self.fd, data)
        self.total += len(data)

    def copy_from(self, fd: int, size: int, path: bytes) -> None:
        """Append ``size`` bytes of the regular file ``fd`` (from its start); raises
        :class:`~nartool.errors.FsError` if it has fewer."""
        from ..errors import FsError

        done = 0
        while done < size:
            want = min(size - done, 1 << 30)
            try:
                if self._copy_range:
                    n = os.copy_file_range(fd, self.fd, want, done)
                elif self._sendfile:
                    n = os.sendfile(self.fd, fd, done, want)
                else:
                    data = os.pread(fd, min(want, 1 << 20), done)
                    n = len(data)
                    write_all(self.fd, data)
            except OSError as e:
                if e.errno not in self._FALLBACK or not (self._copy_range or self._sendfile):
                    raise
                # refused for this pair of descriptors: step down (nothing was written)
                if self._copy_range:
                    self._copy_range = False
                else:
                    self._sendfile = False
                continue
            if n == 0:
                raise FsError("file changed size while being read", expected=size, got=done, path=path,
                              rule="size-changed")
            done += n
        self.total += size


@contextmanager
def output_file(path: str | bytes | os.PathLike[str], *, fsync: bool = False) -> Iterator[BinaryIO]:
    """Open ``path`` for writing a complete result.

    A regular file (new or existing) is written under a temporary sibling and renamed into
    place only when the block succeeds, so readers never see half a result and a failure
    leaves the old file alone. Anything else that exists (``/dev/null``, ``/dev/stdout``, a
    named pipe, a terminal) is written directly: renaming over it would replace the device.
    """
    from ..errors import FsError

    dest = os.fsencode(path)
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise FsError("output is a directory", path=dest, rule="bad-destination")
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(dest, "wb") as f:
            yield f
        return
    parent, base = os.path.split(dest)
    tmp = os.path.join(parent, temp_name(base))
    try:
        with open(tmp, "xb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
