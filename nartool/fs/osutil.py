"""Small OS helpers: no-replace rename, syncfs, fd-relative tree removal, temp names."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import sys

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover
        _libc = None

AT_FDCWD = -100
RENAME_NOREPLACE = 1


def rename_noreplace(src: bytes, dst: bytes, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    Atomic on Linux (``renameat2(RENAME_NOREPLACE)``); elsewhere a check then a rename.
    """
    fn = getattr(_libc, "renameat2", None) if _libc is not None else None
    if fn is not None:
        r = fn(
            AT_FDCWD if src_dir_fd is None else src_dir_fd, src,
            AT_FDCWD if dst_dir_fd is None else dst_dir_fd, dst, RENAME_NOREPLACE,
        )
        if r == 0:
            return
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
    fn = getattr(_libc, "syncfs", None) if _libc is not None else None
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
