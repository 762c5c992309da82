"""Dump sources: turn a filesystem object into NAR events.

:func:`dump_events` walks a path without following symlinks, lists directories in byte
order and reads files with large reads. Two hooks plug in adapters without touching the
codec:

* ``names`` — a :class:`NameCodec` that maps on-disk names to logical NAR names and decides
  their order (the case-hack adapter undoes ``~nix~case~hack~N`` suffixes this way);
* ``exclude`` — ``exclude(relpath, is_dir) -> bool`` drops entries before they are read
  (gitignore-style filters).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from typing import Protocol

from ..errors import FsError
from ..nar.events import END, Directory, Event, File, Symlink

SMALL_FILE = 1 << 18
READ_CHUNK = 1 << 20
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOATIME", 0)
_O_READ_NOATIME_FREE = _O_READ & ~getattr(os, "O_NOATIME", 0)


class NameCodec(Protocol):
    """Maps between logical (NAR) names and on-disk names, one directory at a time."""

    def dump_names(self, dir_path: bytes, disk_names: list[bytes]) -> list[tuple[bytes, bytes]]:
        """Given the on-disk names of one directory, return ``(logical, disk)`` pairs sorted
        by logical name (raise :class:`FsError` for inconsistent names)."""
        ...

    def restore_namer(self, dir_path: bytes) -> DirNamer:
        """A fresh per-directory namer for a restore."""
        ...


class DirNamer(Protocol):
    def disk_name(self, logical: bytes) -> bytes:
        """The on-disk name for the next entry (entries arrive in NAR order)."""
        ...


Exclude = Callable[[bytes, bool], bool]


def _open_file(path: bytes) -> int:
    try:
        return os.open(path, _O_READ)
    except PermissionError:
        # O_NOATIME needs ownership of the file
        return os.open(path, _O_READ_NOATIME_FREE)


def _file_event(path: bytes, name: bytes) -> File:
    fd = _open_file(path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FsError("not a regular file any more", path=path, rule="changed")
        size = st.st_size
        executable = bool(st.st_mode & stat.S_IXUSR)
        if size > SMALL_FILE:
            # reopened lazily so that huge trees never hold many fds
            return File(name, executable, size, _big_chunks(path, size))
        data = os.read(fd, size) if size else b""
        while len(data) < size:  # short reads (rare on regular files)
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        return File(name, executable, size, (data,) if data else ())
    finally:
        os.close(fd)


def _big_chunks(path: bytes, size: int) -> Iterator[bytes]:
    fd = _open_file(path)
    try:
        left = size
        while left:
            data = os.read(fd, min(left, READ_CHUNK))
            if not data:
                return  # shrank: the writer reports the size mismatch
            left -= len(data)
            yield data
    finally:
        os.close(fd)


def _leaf(path: bytes, name: bytes, mode: int) -> Event:
    if stat.S_ISREG(mode):
        return _file_event(path, name)
    if stat.S_ISLNK(mode):
        return Symlink(name, os.readlink(path))
    raise FsError(f"file has an unsupported type ({_type_name(mode)})", path=path, rule="unsupported-type")


def _type_name(mode: int) -> str:
    for test, n in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISBLK, "block device"),
                    (stat.S_ISCHR, "character device")):
        if test(mode):
            return n
    return "unknown"


def dump_events(
    path: str | bytes | os.PathLike[str],
    *,
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
) -> Iterator[Event]:
    """Events of the filesystem object at ``path`` (never following symlinks)."""
    root = os.fsencode(path)
    try:
        st = os.lstat(root)
    except OSError as e:
        raise FsError(f"cannot read: {e.strerror}", path=root, rule="io") from e
    if not stat.S_ISDIR(st.st_mode):
        try:
            leaf = _leaf(root, b"", st.st_mode)
        except OSError as e:
            raise FsError(f"cannot read: {e.strerror}", path=root, rule="io") from e
        yield leaf
        return
    yield Directory(b"")
    # explicit stack of (disk path, relative logical path, iterator of pending entries)
    stack: list[tuple[bytes, bytes, Iterator[tuple[bytes, bytes, int]]]] = [
        (root, b"", iter(_list_dir(root, b"", names, exclude)))
    ]
    while stack:
        dpath, rel, it = stack[-1]
        for logical, disk, kind in it:
            cpath = dpath + b"/" + disk
            try:
                if kind == _OTHER:
                    mode = os.lstat(cpath).st_mode
                    kind = _DIR if stat.S_ISDIR(mode) else _OTHER
                if kind == _DIR:
                    crel = rel + b"/" + logical if rel else logical
                    children = _list_dir(cpath, crel, names, exclude)
                elif kind == _REG:
                    ev: Event = _file_event(cpath, logical)
                elif kind == _LNK:
                    ev = Symlink(logical, os.readlink(cpath))
                else:
                    ev = _leaf(cpath, logical, mode)
            except OSError as e:
                raise FsError(f"cannot read: {e.strerror}", path=cpath, rule="io") from e
            if kind == _DIR:
                yield Directory(logical)
                stack.append((cpath, crel, iter(children)))
                break
            yield ev
        else:
            stack.pop()
            yield END


_REG, _DIR, _LNK, _OTHER = 0, 1, 2, 3


def _list_dir(
    dpath: bytes, rel: bytes, names: NameCodec | None, exclude: Exclude | None
) -> list[tuple[bytes, bytes, int]]:
    """(logical name, disk name, kind) for each member, in logical byte order."""
    kinds: dict[bytes, int] = {}
    try:
        with os.scandir(dpath) as it:
            for e in it:
                try:
                    if e.is_symlink():
                        k = _LNK
                    elif e.is_file(follow_symlinks=False):
                        k = _REG
                    elif e.is_dir(follow_symlinks=False):
                        k = _DIR
                    else:
                        k = _OTHER
                except OSError:
                    k = _OTHER
                kinds[e.name] = k
    except OSError as e:
        raise FsError(f"cannot list directory: {e.strerror}", path=dpath, rule="io") from e
    if names is not None:
        pairs = names.dump_names(dpath, list(kinds))
    else:
        pairs = [(n, n) for n in sorted(kinds)]
    out = []
    for logical, disk in pairs:
        k = kinds[disk]
        if exclude is not None:
            crel = rel + b"/" + logical if rel else logical
            is_dir = k == _DIR or (k == _OTHER and stat.S_ISDIR(os.lstat(dpath + b"/" + disk).st_mode))
            if exclude(crel, is_dir):
                continue
        out.append((logical, disk, k))
    return out
