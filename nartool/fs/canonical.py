"""Canonical store metadata, and making a tree built in place canonical.

What "canonical" means (as Nix's ``canonicalisePathMetaData``), the one definition that both
store-bound restores (:mod:`nartool.fs.sink` with ``canonical=True``) and
:func:`canonicalise_tree` use:

* regular files: mode :data:`FILE_MODE` (``0444``), or :data:`EXEC_MODE` (``0555``) when any
  execute bit was set; directories :data:`DIR_MODE` (``0555``); so no set-user-ID, set-group-ID
  or sticky bit survives;
* modification (and access) time :data:`MTIME_NS` (1 s after the epoch), symlinks included;
* no extended attributes on files and directories (a NAR carries none);
* ownership untouched, except that a process running as root may give ``owner=(uid, gid)``.

:func:`canonicalise_tree` walks without recursion (however deep the tree) and relative to
directory descriptors, never following a symlink. Before changing any file it checks the
whole tree (a first pass, which only gives the owner access to directories it cannot open)
and refuses, with an :class:`~nartool.errors.FsError` naming the entry:

* anything a NAR cannot hold: FIFOs, sockets, character and block devices (rule
  ``unsupported-type``);
* a regular file with hard links outside the tree: its link count is larger than the number
  of its names inside the tree (rule ``outside-hard-link``). Changing its metadata would change
  a file elsewhere (e.g. one of another store path). This is how "not the builder's own file"
  is detected; unlike Nix, file ownership is not checked (there is no build user here).

A tree modified concurrently during the walk may escape these checks; the caller (a builder's
output) is expected to be quiescent.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from ..errors import FsError
from .osutil import DirChain
from .xattrs import strip_fd

#: mode of a canonical non-executable regular file
FILE_MODE = 0o444
#: mode of a canonical executable regular file
EXEC_MODE = 0o555
#: mode of a canonical directory
DIR_MODE = 0o555
#: canonical modification time, in nanoseconds since the epoch (Nix: 1 second)
MTIME_NS = 1_000_000_000
#: ``(atime, mtime)`` for ``os.utime(ns=...)``
TIMES_NS = (MTIME_NS, MTIME_NS)

_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


def file_mode(executable: bool) -> int:
    """The canonical mode of a regular file."""
    return EXEC_MODE if executable else FILE_MODE


def _kind(st: os.stat_result) -> str | None:
    """None for what a NAR holds, else a description of what it cannot."""
    m = st.st_mode
    if stat.S_ISREG(m) or stat.S_ISDIR(m) or stat.S_ISLNK(m):
        return None
    if stat.S_ISFIFO(m):
        return "FIFO"
    if stat.S_ISSOCK(m):
        return "socket"
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return "device"
    return "special file"


# walk events: (kind, fd, entry name, shown path, lstat); kind "entry" (a non-directory; fd is
# its directory's) or "leave" (a directory, after all its entries; fd is its own)


def _walk(parent_fd: int, name: bytes, shown: bytes) -> Iterator[tuple[str, int, bytes, bytes, os.stat_result]]:
    """Iterate over the tree ``name`` in ``parent_fd``: non-directories as ``entry``,
    directories as ``leave`` after their contents (post-order). No recursion."""
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except OSError as e:
        raise FsError(f"cannot stat: {e.strerror}", path=shown, rule="io") from e
    if not stat.S_ISDIR(st.st_mode):
        yield "entry", parent_fd, name, shown, st
        return
    chain = DirChain(parent_fd)
    try:
        try:
            top = chain.push(name, writable=True)
        except OSError as e:
            raise FsError(f"cannot open directory: {e.strerror}", path=shown, rule="io") from e
        stack: list[tuple[list[bytes], bytes, os.stat_result]] = [(_names(top, shown), shown, st)]
        while stack:
            entries, rel, dst = stack[-1]
            fd = chain.fd()
            assert fd is not None
            descended = False
            while entries:
                child = entries.pop()
                crel = rel + b"/" + child
                try:
                    cst = os.lstat(child, dir_fd=fd)
                except OSError as e:
                    raise FsError(f"cannot stat: {e.strerror}", path=crel, rule="io") from e
                if not stat.S_ISDIR(cst.st_mode):
                    yield "entry", fd, child, crel, cst
                    continue
                try:
                    cfd = chain.push(child, writable=True)
                except OSError as e:
                    raise FsError(f"cannot open directory: {e.strerror}", path=crel, rule="io") from e
                stack.append((_names(cfd, crel), crel, cst))
                descended = True
                break
            if descended:
                continue
            stack.pop()
            dname = chain.names[-1]
            own = chain.fd()
            assert own is not None
            yield "leave", own, dname, rel, dst
            chain.pop()
    finally:
        chain.close()


def _names(fd: int, shown: bytes) -> list[bytes]:
    try:
        with os.scandir(fd) as it:
            return sorted((os.fsencode(e.name) for e in it), reverse=True)
    except OSError as e:
        raise FsError(f"cannot list directory: {e.strerror}", path=shown, rule="io") from e


def check_tree(path: str | bytes | os.PathLike[str]) -> None:
    """Refuse (:class:`~nartool.errors.FsError`) a tree :func:`canonicalise_tree` would refuse,
    changing nothing (except giving the owner access to unreadable directories)."""
    top = os.fsencode(path).rstrip(b"/") or b"/"
    parent, base = os.path.split(top)
    pfd = os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        _check(pfd, base, top)
    finally:
        os.close(pfd)


def _check(pfd: int, base: bytes, shown: bytes) -> None:
    links: dict[tuple[int, int], tuple[int, int, bytes]] = {}  # inode -> (names seen, link count, path)
    for kind, _fd, _name, rel, st in _walk(pfd, base, shown):
        if kind != "entry":
            continue
        what = _kind(st)
        if what is not None:
            raise FsError(f"a NAR cannot hold a {what}", path=rel, rule="unsupported-type")
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            count, _, first = links.get(key, (0, st.st_nlink, rel))
            links[key] = (count + 1, st.st_nlink, first)
    for count, nlink, rel in links.values():
        if count != nlink:
            raise FsError("file has hard links outside the tree", path=rel, rule="outside-hard-link",
                          expected=nlink, got=count)


def canonicalise_tree(path: str | bytes | os.PathLike[str], *, owner: tuple[int, int] | None = None) -> None:
    """Make the tree at ``path`` (a file, symlink or directory) canonical in place (see the
    module docstring); refuses, before changing any file (a first pass only gives the owner
    access to directories it could not open), what no NAR can hold and files with hard links
    outside the tree. ``owner``: ``(uid, gid)`` to give every entry, only when
    running as root (else :class:`~nartool.errors.FsError`, rule ``not-root``)."""
    if owner is not None and os.geteuid() != 0:
        raise FsError("changing ownership needs root", path=os.fsencode(path), rule="not-root")
    top = os.fsencode(path).rstrip(b"/") or b"/"
    parent, base = os.path.split(top)
    if not base or base in (b".", b".."):
        raise FsError("cannot canonicalise this path", path=top, rule="bad-destination")
    try:
        pfd = os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FsError(f"cannot open parent: {e.strerror}", path=parent or b".", rule="io") from e
    try:
        _check(pfd, base, top)
        for kind, fd, name, rel, st in _walk(pfd, base, top):
            try:
                if kind == "leave":
                    _dir(fd, owner)
                elif stat.S_ISLNK(st.st_mode):
                    if owner is not None:
                        os.chown(name, owner[0], owner[1], dir_fd=fd, follow_symlinks=False)
                    os.utime(name, ns=TIMES_NS, dir_fd=fd, follow_symlinks=False)
                else:
                    _file(fd, name, st, owner)
            except FsError:
                raise
            except OSError as e:
                raise FsError(f"cannot canonicalise: {e.strerror}", path=rel, rule="io") from e
    finally:
        os.close(pfd)


def _file(dfd: int, name: bytes, st: os.stat_result, owner: tuple[int, int] | None) -> None:
    try:
        fd = os.open(name, _O_FILE, dir_fd=dfd)
    except PermissionError:
        # unreadable (e.g. mode 0): a mode change needs no read access, but must not follow a
        # symlink swapped in meanwhile; where that is not possible, refuse
        _make_readable(dfd, name, st)
        fd = os.open(name, _O_FILE, dir_fd=dfd)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise FsError("file replaced during canonicalisation", path=os.fsdecode(name), rule="changed")
        strip_fd(fd)
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
        os.fchmod(fd, file_mode(bool(st.st_mode & 0o111)))
        os.utime(fd, ns=TIMES_NS)
    finally:
        os.close(fd)


def _make_readable(dfd: int, name: bytes, st: os.stat_result) -> None:
    """Give the owner read access to the regular file ``name`` without following a symlink:
    through an ``O_PATH`` descriptor (Linux), checked to be the same file."""
    o_path = getattr(os, "O_PATH", 0)
    if not o_path or not os.path.isdir("/proc/self/fd"):
        raise PermissionError(errno.EACCES, "cannot open file", os.fsdecode(name))
    fd = os.open(name, o_path | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dfd)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise PermissionError(errno.EACCES, "file replaced during canonicalisation", os.fsdecode(name))
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(fst.st_mode) | 0o400)
    finally:
        os.close(fd)


def _dir(fd: int, owner: tuple[int, int] | None) -> None:
    strip_fd(fd)
    if owner is not None:
        os.fchown(fd, owner[0], owner[1])
    os.fchmod(fd, DIR_MODE)
    os.utime(fd, ns=TIMES_NS)
