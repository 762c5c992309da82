"""Small OS helpers: no-replace rename, syncfs, fd-relative tree removal, temp names.

Linux-only calls (``renameat2``, ``syncfs``, ``copy_file_range``, ``sendfile`` into files,
``/proc``) are used only when :data:`LINUX`; macOS's equivalents (``renameatx_np`` with
``RENAME_EXCL``, ``F_FULLFSYNC``) only when :data:`DARWIN`; every other platform takes the
portable fallbacks. ``NARTOOL_PORTABLE=1`` in the environment (read once, at import) turns both
off, so that the fallbacks that macOS and the BSDs run can be tested on Linux.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..nar.source import write_all

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

#: ``NARTOOL_PORTABLE=1``: no platform-specific calls, only the portable fallbacks
PORTABLE = os.environ.get("NARTOOL_PORTABLE", "") == "1"
#: use Linux's own calls (renameat2, syncfs, copy_file_range, sendfile to files, /proc)
LINUX = sys.platform.startswith("linux") and not PORTABLE
#: use macOS's own calls (renameatx_np, F_FULLFSYNC)
DARWIN = sys.platform == "darwin" and not PORTABLE

_libc: object = False  # loaded on first use (ctypes costs start-up time)


def _libc_fn(name: str) -> object:
    global _libc
    if _libc is False:
        _libc = None
        if LINUX or DARWIN:
            import ctypes

            try:
                if not LINUX:
                    raise OSError
                _libc = ctypes.CDLL("libc.so.6", use_errno=True)  # (no ctypes.util: it loads subprocess)
            except OSError:  # not glibc
                import ctypes.util

                try:
                    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
                except (OSError, TypeError):
                    _libc = None
    return getattr(_libc, name, None) if _libc is not None else None


AT_FDCWD = -100
RENAME_NOREPLACE = 1
_DARWIN_AT_FDCWD = -2
_DARWIN_RENAME_EXCL = 0x4


def rename_noreplace(src: bytes, dst: bytes, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    Atomic on Linux (``renameat2(RENAME_NOREPLACE)``) and macOS (``renameatx_np(RENAME_EXCL)``)
    where the filesystem supports it; elsewhere a check then a rename.
    """
    fn: Any = _libc_fn("renameat2") if LINUX else _libc_fn("renameatx_np") if DARWIN else None
    if fn is not None:
        cwd, flag = (AT_FDCWD, RENAME_NOREPLACE) if LINUX else (_DARWIN_AT_FDCWD, _DARWIN_RENAME_EXCL)
        r = fn(cwd if src_dir_fd is None else src_dir_fd, src, cwd if dst_dir_fd is None else dst_dir_fd, dst, flag)
        if r == 0:
            return
        import ctypes

        e = ctypes.get_errno()
        if e not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), os.fsdecode(dst))
    try:
        os.lstat(dst, dir_fd=dst_dir_fd)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(dst))


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding ``fd`` (one call instead of one fsync per file):
    ``syncfs`` on Linux; elsewhere ``sync()``, and on macOS then ``F_FULLFSYNC``, which also
    empties the drive's cache."""
    fn: Any = _libc_fn("syncfs") if LINUX else None
    if fn is not None and fn(fd) == 0:
        return
    os.sync()
    if DARWIN:
        _full_fsync(fd)


def _full_fsync(fd: int) -> bool:
    import fcntl

    op = getattr(fcntl, "F_FULLFSYNC", None)
    if op is None:
        return False
    try:
        fcntl.fcntl(fd, op)
    except OSError:
        return False
    return True


def fsync(fd: int) -> None:
    """``fsync``; on macOS ``F_FULLFSYNC`` (its ``fsync`` leaves the data in the drive's cache),
    falling back to ``fsync`` where the filesystem refuses it."""
    if DARWIN and _full_fsync(fd):
        return
    os.fsync(fd)


_fsync = fsync  # for functions whose ``fsync`` parameter hides it


_O_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class DirChain:
    """A path of nested directories, each opened relative to its parent (``openat`` with
    ``O_NOFOLLOW``), for walking arbitrarily deep trees without recursion.

    At most about ``depth / stride + window`` descriptors stay open: levels that are neither
    among the last ``window`` nor a multiple of ``stride`` are closed as the walk goes deeper,
    and reopened (from the nearest open ancestor, one ``openat`` per level, each checked to be
    the same directory by device and inode) when the walk climbs back to them. The base
    descriptor is borrowed, never closed."""

    def __init__(self, base_fd: int | None, *, window: int = 64, stride: int = 64) -> None:
        self.base_fd = base_fd
        self.window = max(window, stride)
        self.stride = stride
        self.names: list[bytes] = []
        self.fds: list[int] = []
        self.ids: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.names)

    def fd(self, level: int = -1) -> int | None:
        """The open descriptor of ``level`` (default: the deepest), reopened if needed; -1 past
        the top means the base."""
        if not self.names:
            return self.base_fd
        k = level % len(self.names)
        if self.fds[k] < 0:
            i = k
            while i >= 0 and self.fds[i] < 0:
                i -= 1
            for j in range(i + 1, k + 1):
                parent = self.fds[j - 1] if j else self.base_fd
                fd = os.open(self.names[j], _O_DIR_NOFOLLOW, dir_fd=parent)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self.ids[j]:
                    os.close(fd)
                    raise OSError(errno.ESTALE, "directory replaced during the walk", os.fsdecode(self.names[j]))
                self.fds[j] = fd
        return self.fds[k]

    def push(self, name: bytes, *, writable: bool = False) -> int:
        """Open directory ``name`` in the deepest level and make it the deepest; with
        ``writable``, give its owner full access first (for removing its entries)."""
        parent = self.fd()
        try:
            fd = os.open(name, _O_DIR_NOFOLLOW, dir_fd=parent)
        except PermissionError:
            if not writable:
                raise
            # unreadable (e.g. mode 0): make it accessible without following a symlink
            try:
                os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)
            except (NotImplementedError, ValueError):
                raise PermissionError(errno.EACCES, "cannot open directory", os.fsdecode(name)) from None
            fd = os.open(name, _O_DIR_NOFOLLOW, dir_fd=parent)
        try:
            st = os.fstat(fd)
            if writable and st.st_mode & 0o700 != 0o700:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
        except BaseException:
            os.close(fd)
            raise
        self.names.append(name)
        self.fds.append(fd)
        self.ids.append((st.st_dev, st.st_ino))
        old = len(self.names) - 1 - self.window
        if old > 0 and old % self.stride and self.fds[old] >= 0:
            os.close(self.fds[old])
            self.fds[old] = -1
        return fd

    def pop(self) -> bytes:
        """Leave the deepest level (closing it); returns its name."""
        fd = self.fds.pop()
        self.ids.pop()
        if fd >= 0:
            os.close(fd)
        return self.names.pop()

    def close(self) -> None:
        while self.names:
            self.pop()


def _list_names(fd: int) -> list[tuple[bytes, bool]]:
    """``(name, is a directory)`` for the entries of the open directory ``fd``."""
    out = []
    with os.scandir(fd) as it:
        for e in it:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            out.append((os.fsencode(e.name), is_dir))
    return out


def remove_at(dir_fd: int | None, name: bytes, *, count: bool = False) -> int:
    """Remove ``name`` (file, symlink or whole tree) relative to ``dir_fd``; never follows symlinks.
    Nothing there is fine.

    Iterative, however deep the tree (see :class:`DirChain`): every entry is removed relative
    to its directory's descriptor (``unlinkat``/``rmdir`` at a descriptor), never by a path.
    Read-only directories (as in canonicalised store paths) are made writable first.

    Returns the bytes freed when ``count`` (else 0), counted as Nix does: the sizes of the
    removed non-directories that had no other hard link."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return 0
        return st.st_size if count and st.st_nlink == 1 else 0
    freed = 0
    chain = DirChain(dir_fd)
    try:
        try:
            top = chain.push(name, writable=True)
        except FileNotFoundError:
            return 0
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            os.unlink(name, dir_fd=dir_fd)  # replaced by a file or symlink meanwhile
            return 0
        todo = [_list_names(top)]
        while todo:
            entries = todo[-1]
            fd = chain.fd()
            while entries:
                child, is_dir = entries.pop()
                if not is_dir:
                    try:
                        if count:
                            cst = os.lstat(child, dir_fd=fd)
                            if not stat.S_ISDIR(cst.st_mode):
                                os.unlink(child, dir_fd=fd)
                                freed += cst.st_size if cst.st_nlink == 1 else 0
                                continue
                        else:
                            os.unlink(child, dir_fd=fd)
                            continue
                    except FileNotFoundError:
                        continue
                    except IsADirectoryError:
                        pass  # became a directory since it was listed
                try:
                    top = chain.push(child, writable=True)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    os.unlink(child, dir_fd=fd)  # replaced by a file or symlink meanwhile
                    continue
                todo.append(_list_names(top))
                break
            else:
                todo.pop()
                done = chain.pop()
                try:
                    os.rmdir(done, dir_fd=chain.fd())
                except FileNotFoundError:
                    pass
    finally:
        chain.close()
    return freed


def temp_name(base: bytes, tag: bytes = b"tmp") -> bytes:
    """A hidden sibling name for ``base``: ``.<base>.nartool-<tag>-<pid>-<random>`` (≤ 255
    bytes). The owner's process id lets a later run tell a temporary left behind by a process
    that died (see :func:`temp_owner`)."""
    rnd = os.urandom(6).hex().encode()
    return temp_prefix(base, tag) + str(os.getpid()).encode() + b"-" + rnd


def temp_prefix(base: bytes, tag: bytes = b"tmp") -> bytes:
    """What every :func:`temp_name` of ``base`` and ``tag`` starts with."""
    return b"." + base[:200] + b".nartool-" + tag + b"-"


def temp_owner(name: bytes, prefix: bytes) -> int | None:
    """The process id in ``name`` if it is a temporary name with this ``prefix``, else None."""
    if not name.startswith(prefix):
        return None
    pid, sep, rnd = name[len(prefix):].partition(b"-")
    if not sep or not pid.isdigit() or len(rnd) != 12 or len(pid) > 10:
        return None
    return int(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (as far as this process can see: another PID namespace's
    processes are invisible)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


class FdOutput:
    """Writes a stream to a file descriptor, copying whole files' contents inside the kernel
    (no trip through Python's memory) where the platform allows it: ``copy_file_range`` into a
    regular file (a reflink on filesystems that share extents), ``sendfile`` into anything else
    (pipes, sockets), plain reads and writes otherwise (e.g. an ``O_APPEND`` output)."""

    _FALLBACK = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EBADF)

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.total = 0
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        self._copy_range = LINUX and regular and hasattr(os, "copy_file_range")
        self._sendfile = LINUX and hasattr(os, "sendfile")

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

    The result looks like a file written in place: an existing file's permission bits are
    kept (without set-user/group-ID, which a write clears too) and so are its owner and group
    as far as this process may set them; a new file gets ``0666`` less the umask. A symlink
    is written through, as a shell's ``>`` does: the file it finally leads to (possibly new,
    for a dangling link) is the one replaced, in that file's directory; the link stays.
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
    if os.path.islink(dest):
        dest = os.path.realpath(dest)
    parent, base = os.path.split(dest)
    # tagged apart from restore temporaries, which a restore of the same name may clean up
    tmp = os.path.join(parent, temp_name(base, b"out"))
    # an existing file's contents are never readable by more than the owner before its
    # mode is copied (which happens before anything is written)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666 if st is None else 0o600)
    try:
        try:
            if st is not None:
                _take_over(fd, st)
            f = open(fd, "wb")  # noqa: SIM115 - closed by the with below
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            if fsync:
                f.flush()
                _fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _take_over(fd: int, st: os.stat_result) -> None:
    """Give the new file ``fd`` the owner, group and permission bits of ``st`` (the file it
    replaces) as far as allowed."""
    if st.st_uid != os.geteuid() or st.st_gid != os.getegid():
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            try:
                os.fchown(fd, -1, st.st_gid)  # a group this user belongs to
            except PermissionError:
                pass
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
