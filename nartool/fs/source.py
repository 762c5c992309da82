"""Dump sources: turn a filesystem object into NAR events or straight into NAR bytes.

Both walks never follow symlinks: every member is opened relative to its parent's directory
descriptor (``openat`` with ``O_NOFOLLOW``), so swapping a directory for a symlink while a
dump runs cannot lead it outside the tree. Files are opened without blocking and checked with
``fstat``, so one swapped for a named pipe fails the dump ("changed type") instead of hanging it.
Directories are listed in byte order and files read with large reads.

* :func:`dump_events` yields the flat event stream (for adapters and transforms);
* :func:`dump_nar` yields the NAR bytes directly, with the same checks as
  :func:`nartool.nar.writer.write_nar` but without an event object per node — the fast path
  for dumping, exporting and serving;
* :func:`hash_nar` hashes the NAR as :func:`dump_nar` would make it (same bytes, checks and
  errors), built in place in two reused buffers by two threads in turn (see docs/speed.md).

Two hooks plug in adapters without touching the codec:

* ``names`` — a :class:`NameCodec` that maps on-disk names to logical NAR names and decides
  their order (the case-hack adapter undoes ``~nix~case~hack~N`` suffixes this way);
* ``exclude`` — ``exclude(relpath, is_dir) -> bool`` drops entries before they are read
  (gitignore-style filters).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Generator, Iterator
from itertools import repeat

from ..errors import FsError, NarError
from ..nar import format as F
from ..nar.events import END, Directory, Event, File, Symlink
from ..nar.limits import DEFAULT_LIMITS, Limits
from ..nar.writer import FLUSH_SIZE, write_nar

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any, Protocol

    from ..hashes import Hash

#: files up to this size are read in one go and copied into the output buffer; larger ones
#: are passed on in ``READ_CHUNK`` pieces without copying
SMALL_FILE = 1 << 16
READ_CHUNK = 1 << 20
# O_NONBLOCK: a member swapped for a named pipe (or a device) after it was listed must not
# block the open; the type is checked with fstat right after (and O_NONBLOCK does nothing to
# reads of regular files). O_NOCTTY: nor may a swapped-in terminal become ours.
_O_READ = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
           | getattr(os, "O_NOATIME", 0))
_O_READ_NOATIME_FREE = _O_READ & ~getattr(os, "O_NOATIME", 0)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


if TYPE_CHECKING:
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
else:
    # At run time the two interfaces are only names (a codec is any object with these methods:
    # see nartool.fs.casehack); their definitions above are for the type checker, so that
    # typing, ~2 ms of start-up, is not loaded for them.
    NameCodec = DirNamer = object


Exclude = Callable[[bytes, bool], bool]

_REG, _DIR, _LNK, _OTHER = 0, 1, 2, 3


def _open_at(name: bytes, dir_fd: int | None) -> int:
    try:
        return os.open(name, _O_READ, dir_fd=dir_fd)
    except PermissionError:
        # O_NOATIME needs ownership of the file
        return os.open(name, _O_READ_NOATIME_FREE, dir_fd=dir_fd)


def _io_error(e: OSError, path: bytes) -> FsError:
    return FsError(f"cannot read: {e.strerror}", path=path, rule="io")


def _size_changed(path: bytes, size: int, got: int) -> FsError:
    return FsError("file changed size while being read", expected=size, got=got, path=path, rule="size-changed")


def _read_exact(fd: int, size: int, path: bytes, data: bytes | None = None) -> bytes:
    """The ``size`` bytes of ``fd`` (``data``: those read already, if any)."""
    if data is None:
        data = os.read(fd, size)
    while len(data) < size:  # short reads (rare on regular files)
        more = os.read(fd, size - len(data))
        if not more:
            raise _size_changed(path, size, len(data))
        data += more
    return data


def _chunks(fd: int, size: int, path: bytes, read_chunk: int = READ_CHUNK) -> Iterator[bytes]:
    left = size
    while left:
        data = os.read(fd, read_chunk if left > read_chunk else left)
        if not data:
            raise _size_changed(path, size, size - left)
        left -= len(data)
        yield data


class OpenFile:
    """A regular file a dump hands over instead of reading it (``dump_nar(hand_off=True)``):
    the NAR goes on with exactly ``size`` bytes of the descriptor ``fd`` (from its start), which
    the consumer reads (e.g. with :func:`read_open_file`) and then closes with :meth:`close`.
    One dropped unread is closed when collected."""

    __slots__ = ("fd", "size", "path")

    def __init__(self, fd: int, size: int, path: bytes) -> None:
        self.fd = fd
        self.size = size
        self.path = path

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def read_open_file(f: OpenFile, consume: Callable[[memoryview], object], buf: bytearray) -> int:
    """Pass the ``f.size`` bytes of ``f`` to ``consume`` in pieces read into ``buf`` (reused:
    ``consume`` must not keep the views), then close ``f``; returns ``f.size``. Raises
    :class:`FsError` if the file has fewer bytes or cannot be read."""
    view = memoryview(buf)
    n = len(buf)
    left = f.size
    readv = os.readv
    try:
        while left:
            k = readv(f.fd, [view[:n] if left >= n else view[:left]])
            if not k:
                raise _size_changed(f.path, f.size, f.size - left)
            consume(view[:k])
            left -= k
    except OSError as e:
        raise _io_error(e, f.path) from e
    finally:
        f.close()
    return f.size


def _regular_fstat(fd: int, path: bytes) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _changed_type(st.st_mode, path)
    return st


def _changed_type(mode: int, path: bytes) -> FsError:
    """A member listed as a regular file turned out to be something else once opened."""
    kind = "directory" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else _kind_name(mode)
    return FsError(f"file changed type during the dump (now a {kind})", path=path, rule="changed")


def _kind_name(mode: int) -> str:
    for test, n in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISBLK, "block device"),
                    (stat.S_ISCHR, "character device")):
        if test(mode):
            return n
    return "unknown"


def _file_event(name: bytes, dir_fd: int | None, disk: bytes, path: bytes) -> File:
    fd = _open_at(disk, dir_fd)
    try:
        st = _regular_fstat(fd, path)
        size = st.st_size
        executable = bool(st.st_mode & stat.S_IXUSR)
        if size > SMALL_FILE:
            # reopened (by path, without following a symlink at the end) when consumed, so
            # that buffered events never hold descriptors
            return File(name, executable, size, _big_chunks(path, size))
        data = _read_exact(fd, size, path) if size else b""
        return File(name, executable, size, (data,) if data else ())
    finally:
        os.close(fd)


def _big_chunks(path: bytes, size: int) -> Iterator[bytes]:
    try:
        fd = _open_at(path, None)
        try:
            _regular_fstat(fd, path)
            yield from _chunks(fd, size, path)
        finally:
            os.close(fd)
    except OSError as e:
        raise _io_error(e, path) from e


def _unsupported(mode: int, path: bytes) -> FsError:
    return FsError(f"file has an unsupported type ({_kind_name(mode)})", path=path, rule="unsupported-type")


def _kind(mode: int, path: bytes) -> int:
    if stat.S_ISREG(mode):
        return _REG
    if stat.S_ISDIR(mode):
        return _DIR
    if stat.S_ISLNK(mode):
        return _LNK
    raise _unsupported(mode, path)


def _kind_at(disk: bytes, dir_fd: int | None, path: bytes) -> int:
    return _kind(os.stat(disk, dir_fd=dir_fd, follow_symlinks=False).st_mode, path)


def _root_kind(root: bytes) -> int:
    try:
        mode = os.lstat(root).st_mode
    except OSError as e:
        raise _io_error(e, root) from e
    return _kind(mode, root)


def _open_dir(root: bytes) -> int:
    try:
        return os.open(root, _O_DIR)
    except OSError as e:
        raise _io_error(e, root) from e


def dump_events(
    path: str | bytes | os.PathLike[str],
    *,
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
) -> Iterator[Event]:
    """Events of the filesystem object at ``path`` (never following symlinks)."""
    root = os.fsencode(path)
    kind = _root_kind(root)
    if kind != _DIR:
        try:
            leaf: Event = (_file_event(b"", None, root, root) if kind == _REG
                           else Symlink(b"", os.readlink(root)))
        except OSError as e:
            raise _io_error(e, root) from e
        yield leaf
        return
    fds = [_open_dir(root)]
    try:
        yield Directory(b"")
        stack: list[tuple[int, bytes, bytes, Iterator[tuple[bytes, bytes, int]]]] = [
            (fds[0], root, b"", iter(_list_dir(fds[0], root, b"", names, exclude)))
        ]
        while stack:
            dfd, dpath, rel, it = stack[-1]
            for logical, disk, kind in it:
                cpath = dpath + b"/" + disk
                try:
                    if kind == _OTHER:
                        kind = _kind_at(disk, dfd, cpath)
                    if kind == _DIR:
                        crel = rel + b"/" + logical if rel else logical
                        cfd = os.open(disk, _O_DIR, dir_fd=dfd)
                        fds.append(cfd)
                        children = _list_dir(cfd, cpath, crel, names, exclude)
                    elif kind == _REG:
                        ev: Event = _file_event(logical, dfd, disk, cpath)
                    else:
                        ev = Symlink(logical, os.readlink(disk, dir_fd=dfd))
                except OSError as e:
                    raise _io_error(e, cpath) from e
                if kind == _DIR:
                    yield Directory(logical)
                    stack.append((cfd, cpath, crel, iter(children)))
                    break
                yield ev
            else:
                stack.pop()
                os.close(fds.pop())
                yield END
    finally:
        for fd in fds:
            os.close(fd)


def dump_nar(
    path: str | bytes | os.PathLike[str],
    *,
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
    limits: Limits = DEFAULT_LIMITS,
    flush_size: int = FLUSH_SIZE,
    small_file: int = SMALL_FILE,
    read_chunk: int = READ_CHUNK,
    copy_file: Callable[[int, int, bytes], None] | None = None,
) -> Iterator[bytes | bytearray | memoryview]:
    """The NAR of the filesystem object at ``path``, as chunks of at least ``flush_size``
    bytes; the contents of files above ``small_file`` bytes are passed on as read, in
    pieces of ``read_chunk`` bytes (fewer, larger chunks suit a consumer in another thread).

    ``copy_file(fd, size, path)``, when given, is called instead of yielding those contents: it
    must append ``size`` bytes of the open file ``fd`` to the output, after the chunks yielded
    so far (see :class:`nartool.fs.osutil.FdOutput`, which copies them inside the kernel).

    :func:`dump_nar_handing_off` yields those files as open :class:`OpenFile` objects instead.

    Equal to ``write_nar(dump_events(path, ...))`` with the same checks (name and target
    limits, depth, files changing size), in about two thirds of the time.
    """
    return _dump_nar(path, names, exclude, limits, flush_size, small_file, read_chunk,  # type: ignore[return-value]
                     copy_file, False)


def dump_nar_handing_off(
    path: str | bytes | os.PathLike[str],
    *,
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
    limits: Limits = DEFAULT_LIMITS,
    flush_size: int = FLUSH_SIZE,
    small_file: int = SMALL_FILE,
) -> Iterator[bytes | bytearray | memoryview | OpenFile]:
    """As :func:`dump_nar`, but the files above ``small_file`` bytes are yielded as
    :class:`OpenFile` objects, unread: the consumer reads and closes them, possibly in another
    thread than the dump's (this is how :func:`dump_to_fd` spreads the walk and the copying over
    two threads)."""
    return _dump_nar(path, names, exclude, limits, flush_size, small_file, READ_CHUNK, None, True)


def _dump_nar(
    path: str | bytes | os.PathLike[str],
    names: NameCodec | None,
    exclude: Exclude | None,
    limits: Limits,
    flush_size: int,
    small_file: int,
    read_chunk: int,
    copy_file: Callable[[int, int, bytes], None] | None,
    hand_off: bool,
) -> Iterator[bytes | bytearray | memoryview | OpenFile]:
    root = os.fsencode(path)
    kind = _root_kind(root)
    if kind == _REG:
        yield from _dump_file_root(root, small_file, read_chunk, copy_file, hand_off)
        return
    if kind != _DIR:
        yield from write_nar(dump_events(root, names=names, exclude=exclude), limits=limits, flush_size=flush_size)
        return
    max_name, max_target, max_depth = limits.max_name, limits.max_target, limits.max_depth
    ENTRY_OPEN, NODE, PAD, CLOSE2 = F.ENTRY_OPEN, F.NODE, F.PAD, F.CLOSE2
    HDR_REGULAR, HDR_EXECUTABLE, HDR_SYMLINK = F.HDR_REGULAR, F.HDR_EXECUTABLE, F.HDR_SYMLINK
    _open, _fstat, _read, _close, _readlink = os.open, os.fstat, os.read, os.close, os.readlink
    o_read = _O_READ
    S_ISREG, S_IXUSR = stat.S_ISREG, stat.S_IXUSR
    out = bytearray(F.TOK_MAGIC + F.HDR_DIRECTORY)
    stack = [_root_frame(root, names, exclude)]
    try:
        depth = 1
        while stack:
            dfd, dpath, rel, it = stack[-1]
            for logical, disk, kind in it:
                n = len(logical)
                if n > max_name or depth >= max_depth:
                    _entry_limits(logical, dpath, disk, depth, limits)
                out += ENTRY_OPEN
                out += n.to_bytes(8, "little")
                out += logical
                out += PAD[-n & 7]
                out += NODE
                try:
                    if kind == _OTHER:
                        kind = _kind_at(disk, dfd, dpath + b"/" + disk)
                    if kind == _REG:
                        try:
                            fd = _open(disk, o_read, dir_fd=dfd)
                        except PermissionError:
                            if o_read == _O_READ_NOATIME_FREE:
                                raise
                            # O_NOATIME needs ownership: files of others (a store's, say) are
                            # opened without it from now on, not tried twice each
                            fd = _open(disk, _O_READ_NOATIME_FREE, dir_fd=dfd)
                            o_read = _O_READ_NOATIME_FREE
                        try:
                            st = _fstat(fd)
                            if not S_ISREG(st.st_mode):
                                _regular_fstat(fd, dpath + b"/" + disk)
                            size = st.st_size
                            out += HDR_EXECUTABLE if st.st_mode & S_IXUSR else HDR_REGULAR
                            out += size.to_bytes(8, "little")
                            if size <= small_file:
                                if size:
                                    data = _read(fd, size)
                                    if len(data) != size:
                                        data = _read_exact(fd, size, dpath + b"/" + disk, data)
                                    out += data
                            else:
                                yield out
                                out = bytearray()
                                if hand_off:
                                    handed, fd = OpenFile(fd, size, dpath + b"/" + disk), -1
                                    yield handed
                                elif copy_file is not None:
                                    copy_file(fd, size, dpath + b"/" + disk)
                                else:
                                    yield from _chunks(fd, size, dpath + b"/" + disk, read_chunk)
                        finally:
                            if fd >= 0:
                                _close(fd)
                        out += PAD[-size & 7]
                        out += CLOSE2
                    elif kind == _LNK:
                        target = _readlink(disk, dir_fd=dfd)
                        n = len(target)
                        if n > max_target or not n or b"\0" in target:
                            raise NarError(F.validate_target(target, max_target) or "invalid target",
                                           rule="invalid-target", got=target, path=dpath + b"/" + disk)
                        out += HDR_SYMLINK
                        out += n.to_bytes(8, "little")
                        out += target
                        out += PAD[-n & 7]
                        out += CLOSE2
                    else:
                        stack.append(_descend(dfd, disk, dpath, rel, logical, names, exclude))
                        depth += 1
                        out += F.HDR_DIRECTORY
                        break
                except OSError as e:
                    raise _io_error(e, dpath + b"/" + disk) from e
                if len(out) >= flush_size:
                    yield out
                    out = bytearray()
            else:
                stack.pop()
                _close(dfd)
                depth -= 1
                out += CLOSE2 if stack else F.CLOSE
        yield out
    finally:
        for dfd, *_ in stack:
            _close(dfd)


def _dump_file_root(root: bytes, small_file: int, read_chunk: int,
                    copy_file: Callable[[int, int, bytes], None] | None,
                    hand_off: bool = False) -> Iterator[bytes | bytearray | OpenFile]:
    try:
        fd = _open_at(root, None)
        try:
            st = _regular_fstat(fd, root)
            size = st.st_size
            head = F.TOK_MAGIC + (F.HDR_EXECUTABLE if st.st_mode & stat.S_IXUSR else F.HDR_REGULAR)
            head += size.to_bytes(8, "little")
            if size <= small_file:
                yield head + _read_exact(fd, size, root) + F.PAD[-size & 7] + F.CLOSE
                return
            yield head
            if hand_off:
                handed, fd = OpenFile(fd, size, root), -1
                yield handed
            elif copy_file is not None:
                copy_file(fd, size, root)
            else:
                yield from _chunks(fd, size, root, read_chunk)
        finally:
            if fd >= 0:
                os.close(fd)
    except OSError as e:
        raise _io_error(e, root) from e
    yield F.PAD[-size & 7] + F.CLOSE


def _entry_limits(logical: bytes, dpath: bytes, disk: bytes, depth: int, limits: Limits) -> None:
    if len(logical) > limits.max_name:
        raise NarError(f"entry name longer than {limits.max_name} bytes", rule="invalid-name", got=logical,
                       path=dpath)
    raise NarError(f"nesting deeper than {limits.max_depth} levels", rule="too-deep",
                   expected=f"<= {limits.max_depth}", got=depth + 1, path=dpath + b"/" + disk)


def _root_frame(root: bytes, names: NameCodec | None,
                exclude: Exclude | None) -> tuple[int, bytes, bytes, Iterator[tuple[bytes, bytes, int]]]:
    """The walks' first frame: the root directory's descriptor and listing."""
    rfd = _open_dir(root)
    try:
        children = _list_dir(rfd, root, b"", names, exclude)
    except BaseException:
        os.close(rfd)
        raise
    return rfd, root, b"", iter(children)


def _descend(dfd: int, disk: bytes, dpath: bytes, rel: bytes, logical: bytes, names: NameCodec | None,
             exclude: Exclude | None) -> tuple[int, bytes, bytes, Iterator[tuple[bytes, bytes, int]]]:
    """The walks' next frame for the directory entry ``disk`` of ``dfd``: its descriptor
    (``O_NOFOLLOW``, relative to its parent), path on disk, logical path and listing."""
    cpath = dpath + b"/" + disk
    crel = rel + b"/" + logical if rel else logical
    cfd = os.open(disk, _O_DIR, dir_fd=dfd)
    try:
        children = _list_dir(cfd, cpath, crel, names, exclude)
    except BaseException:
        os.close(cfd)
        raise
    return cfd, cpath, crel, iter(children)


def _list_dir(
    dfd: int, dpath: bytes, rel: bytes, names: NameCodec | None, exclude: Exclude | None
) -> Iterator[tuple[bytes, bytes, int]]:
    """(logical name, disk name, kind) for each member of the open directory ``dfd``, in
    logical byte order; logical names from a codec are checked like NAR entry names.

    Lean for huge directories: one sorted list of names, plus a dict of the members that
    are not regular files (a million entries cost ~60 MB, not three times that)."""
    # Listed by path for ``bytes`` names (a descriptor would give ``str``); members are
    # still opened relative to ``dfd``, so a directory swapped meanwhile cannot lead out.
    disk_names: list[bytes] = []
    special: dict[bytes, int] = {}
    try:
        with os.scandir(dpath) as it:
            for e in it:
                name = e.name
                disk_names.append(name)
                try:
                    if e.is_file(follow_symlinks=False):
                        continue
                    if e.is_dir(follow_symlinks=False):
                        k = _DIR
                    elif e.is_symlink():
                        k = _LNK
                    else:
                        k = _OTHER
                except OSError:
                    k = _OTHER
                special[name] = k
    except OSError as e:
        raise FsError(f"cannot list directory: {e.strerror}", path=dpath, rule="io") from e
    get = special.get
    if names is None:
        disk_names.sort()
        if exclude is None:
            return zip(disk_names, disk_names, map(get, disk_names, repeat(_REG)), strict=True)
        return _excluded(((n, n) for n in disk_names), get, dfd, dpath, rel, exclude)
    pairs = names.dump_names(dpath, disk_names)
    del disk_names
    last = None
    for logical, _ in pairs:
        why = F.validate_name(logical, 1 << 30)
        if why is None and last is not None and logical <= last:
            why = "duplicate entry name" if logical == last else "entry names out of order"
        if why:
            raise FsError(f"name codec produced a bad name: {why}", path=dpath, got=logical, rule="invalid-name")
        last = logical
    if exclude is None:
        return ((logical, disk, get(disk, _REG)) for logical, disk in pairs)
    return _excluded(iter(pairs), get, dfd, dpath, rel, exclude)


def _excluded(pairs: Iterator[tuple[bytes, bytes]], kind_of: Callable[[bytes, int], int], dfd: int, dpath: bytes,
              rel: bytes, exclude: Exclude) -> Iterator[tuple[bytes, bytes, int]]:
    for logical, disk in pairs:
        k = kind_of(disk, _REG)
        crel = rel + b"/" + logical if rel else logical
        is_dir = k == _DIR
        if k == _OTHER:
            try:
                is_dir = stat.S_ISDIR(os.stat(disk, dir_fd=dfd, follow_symlinks=False).st_mode)
            except OSError as e:
                raise _io_error(e, dpath + b"/" + disk) from e
        if not exclude(crel, is_dir):
            yield logical, disk, k


# --- hashing: the NAR's digest with two threads ---------------------------------------------

#: size of the two buffers (one per thread) that the NAR is built in, in turn, for hashing (about
#: a core's L2 cache: measured best between 512 KiB and 8 MiB on a 2 MiB-L2 machine)
HASH_BATCH = 2 << 20
#: (the pieces in which big files are read for hashing: a buffer's worth)
HASH_PIECE = HASH_BATCH
#: a file root up to this size is hashed in this thread alone (a second one would cost more than
#: it brings); trees always use both once their NAR outgrows one buffer
SHARED_FILE = 2 << 20
#: how long a thread waits for the other before it checks whether the hash was abandoned (s)
_POLL = 0.05


def hash_nar(
    path: str | bytes | os.PathLike[str],
    algo: str = "sha256",
    *,
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[Hash, int]:
    """``(hash, nar_size)`` of the NAR of ``path`` (what ``nix-hash --type ALGO`` computes),
    with the checks of :func:`dump_nar` (the same order and errors).

    The NAR is built in place in buffers of :data:`HASH_BATCH` bytes (framing copied in, file
    contents read straight into them) and hashed, with two threads taking turns: while one
    hashes the buffer it has just filled (without the GIL, on the core whose cache still holds
    the bytes), the other goes on with the walk in its own buffer. A thread starts its walk only
    once the other has started hashing, and the turns are passed once per buffer, so the two
    rarely wait for each other or for the GIL. Memory: two buffers.

    An error of the walk (in whichever thread met it) is raised here once the other thread has
    stopped; no thread or descriptor is left behind."""
    import hashlib

    from ..hashes import Hash

    h = hashlib.new(algo)
    root = os.fsencode(path)
    kind = _root_kind(root)
    if kind == _DIR:
        fill: Generator[int, memoryview, None] = _tree_batches(root, names, exclude, limits)
        total = _hash_batches(fill, h.update, HASH_BATCH)
    elif kind == _REG:
        fill = _file_batches(root)
        total = _hash_batches(fill, h.update, HASH_BATCH)
    else:  # a symlink
        total = 0
        for c in dump_nar(root, names=names, exclude=exclude, limits=limits):
            h.update(c)
            total += len(c)
    return Hash(algo, h.digest()), total


class _Relay:
    """What the two threads of :func:`_hash_batches` share."""

    __slots__ = ("walk", "turn", "started", "end", "abort", "error", "total")

    def __init__(self) -> None:
        import threading

        # walk[x]: thread x may fill its next buffer; turn[x]: it may hash it; started[x]: it
        # has begun hashing (the other waits for that before walking on)
        self.walk = (threading.Lock(), threading.Lock())
        self.turn = (threading.Lock(), threading.Lock())
        self.started = (threading.Lock(), threading.Lock())
        # (thread 0 has filled the first buffer before the helper starts: the walk is the helper's)
        for lock in (*self.walk, self.turn[1], *self.started):
            lock.acquire()
        self.end = False  # the walk is over (done or failed)
        self.abort = False  # stop at once: an exception in the caller's thread, or the helper failed
        self.error: BaseException | None = None
        self.total = 0


def _hash_batches(fill: Generator[int, memoryview, None], update: Callable[[memoryview], object], size: int) -> int:
    """Hash what ``fill`` writes into buffers of ``size`` bytes (``fill.send(buf)`` returns how
    many bytes of ``buf`` it filled, fewer than ``size`` only at the end); returns the total.

    ``next(fill)`` gives the NAR's size if known in advance (a file), else -1. The first
    buffer is filled and hashed here; if more follow, a helper thread and this one take turns
    (see :func:`hash_nar`), unless the NAR is known to be at most :data:`SHARED_FILE` bytes."""
    import threading

    try:
        known = next(fill)  # up to the first buffer: errors of the root itself are raised here
        buf = memoryview(bytearray(size if known < 0 else max(1, min(size, known))))
        n = fill.send(buf)
    except StopIteration:
        n = known = 0
    except BaseException:
        fill.close()
        raise
    if n < size or 0 <= known <= SHARED_FILE:
        total = 0
        try:
            while True:
                update(buf[:n])
                total += n
                if n < size:
                    return total
                try:
                    n = fill.send(buf)
                except StopIteration:
                    return total
        finally:
            fill.close()
    r = _Relay()
    helper = threading.Thread(target=_relay_helper, args=(r, fill, update, size), name="nartool-hash",
                              daemon=True)
    helper.start()
    try:
        _relay(r, 0, fill, update, size, buf, n)
    except BaseException:
        r.abort = True
        raise
    finally:
        helper.join()
        fill.close()  # releases the walk's descriptors if it was abandoned
    if r.error is not None:
        raise r.error
    return r.total


def _relay(r: _Relay, x: int, fill: Generator[int, memoryview, None], update: Callable[[memoryview], object],
           size: int, buf: memoryview | None, n: int) -> None:
    """Thread ``x``'s part of :func:`_hash_batches`: fill a buffer when the walk is ours, hash it
    when the hash is ours, and pass both on. Thread 0 comes with the first buffer, filled."""
    y = 1 - x
    my_walk, my_turn, my_start = r.walk[x], r.turn[x], r.started[x]
    other_walk, other_turn, other_start = r.walk[y], r.turn[y], r.started[y]
    if buf is None:
        buf = memoryview(bytearray(size))
    first = x == 0  # the first buffer: filled already, and nobody waits for its start
    while True:
        if not first:
            if not _take(r, my_walk):
                return
            if r.end:
                other_walk.release()  # let the other one see it too
                return
            try:
                n = fill.send(buf)
            except StopIteration:
                n = 0
            except BaseException as e:  # noqa: BLE001 - raised by _hash_batches in the caller's thread
                r.error = e
                n = -1
        last = n < size
        if last:
            r.end = True
        other_walk.release()
        if not _take(r, my_turn):
            return
        if not first:
            my_start.release()
        first = False
        if n > 0 and r.error is None:
            update(buf[:n] if n != size else buf)
            r.total += n
        if last:
            return
        other_turn.release()
        if not _take(r, other_start):
            return


def _relay_helper(r: _Relay, fill: Generator[int, memoryview, None], update: Callable[[memoryview], object],
                  size: int) -> None:
    """The helper thread's :func:`_relay`; anything unexpected stops both threads."""
    try:
        _relay(r, 1, fill, update, size, None, 0)
    except BaseException as e:  # noqa: BLE001 - raised by _hash_batches in the caller's thread
        if r.error is None:
            r.error = e
        r.abort = True


def _take(r: _Relay, lock: Any) -> bool:
    """Wait for ``lock`` (released by the other thread); False if the hash was abandoned."""
    while not lock.acquire(timeout=_POLL):
        if r.abort:
            return False
    return not r.abort


def _fill_put(buf: memoryview, pos: int, data: bytes) -> Generator[int, memoryview, tuple[memoryview, int]]:
    """Append ``data`` at ``pos`` of ``buf``, yielding each buffer filled up and receiving the
    next; returns the buffer being filled and the position in it."""
    i, n = 0, len(data)
    while i < n:
        cap = len(buf)
        if pos == cap:
            buf = yield cap
            pos, cap = 0, len(buf)
        k = min(cap - pos, n - i)
        buf[pos:pos + k] = data[i:i + k]
        pos += k
        i += k
    return buf, pos


def _fill_read(buf: memoryview, pos: int, fd: int, size: int, path: bytes,
               done: int = 0) -> Generator[int, memoryview, tuple[memoryview, int]]:
    """As :func:`_fill_put`, with the rest of the ``size`` bytes of ``fd`` (``done`` of them
    already read). Raises ``OSError``, or :class:`FsError` ("size-changed") if the file has
    fewer bytes."""
    left = size - done
    readv = os.readv
    while left:
        cap = len(buf)
        if pos == cap:
            buf = yield cap
            pos, cap = 0, len(buf)
        end = pos + left if left < cap - pos else cap
        k = readv(fd, [buf[pos:end]])
        if not k:
            raise _size_changed(path, size, size - left)
        pos += k
        left -= k
    return buf, pos


def _file_batches(root: bytes) -> Generator[int, memoryview, None]:
    """The NAR of the regular file ``root``, written into the buffers sent in (see
    :func:`_hash_batches`); yields its size first."""
    try:
        fd = _open_at(root, None)
        try:
            st = _regular_fstat(fd, root)
            size = st.st_size
            head = (F.TOK_MAGIC + (F.HDR_EXECUTABLE if st.st_mode & stat.S_IXUSR else F.HDR_REGULAR)
                    + size.to_bytes(8, "little"))
            tail = F.PAD[-size & 7] + F.CLOSE
            buf = yield len(head) + size + len(tail)
            buf, pos = yield from _fill_put(buf, 0, head)
            buf, pos = yield from _fill_read(buf, pos, fd, size, root)
        finally:
            os.close(fd)
    except OSError as e:
        raise _io_error(e, root) from e
    buf, pos = yield from _fill_put(buf, pos, tail)
    yield pos


def _tree_batches(root: bytes, names: NameCodec | None, exclude: Exclude | None,
                  limits: Limits) -> Generator[int, memoryview, None]:
    """The NAR of the directory ``root`` as :func:`dump_nar` makes it (same order, same checks,
    same errors), written into the buffers sent in (see :func:`_hash_batches`)."""
    max_name, max_target, max_depth = limits.max_name, limits.max_target, limits.max_depth
    ENTRY_OPEN, NODE, PAD, CLOSE2 = F.ENTRY_OPEN, F.NODE, F.PAD, F.CLOSE2
    HDR_REGULAR, HDR_EXECUTABLE, HDR_SYMLINK, HDR_DIRECTORY = (F.HDR_REGULAR, F.HDR_EXECUTABLE, F.HDR_SYMLINK,
                                                               F.HDR_DIRECTORY)
    _open, _fstat, _readv, _close, _readlink = os.open, os.fstat, os.readv, os.close, os.readlink
    S_IFMT, S_IFREG, S_IXUSR = stat.S_IFMT(0o177777), stat.S_IFREG, stat.S_IXUSR
    o_read = _O_READ
    join = b"".join
    # framing by name length (an entry's opening) and by padding (after a name; after contents
    # or a target, with the entry's closing)
    short = min(max_name, 255)  # (longer names, where limits allow them, extend the table)
    entry_heads = [ENTRY_OPEN + n.to_bytes(8, "little") for n in range(short + 1)]
    name_tails = [PAD[-n & 7] + NODE for n in range(8)]
    file_tails = [PAD[-n & 7] + CLOSE2 for n in range(8)]
    stack = [_root_frame(root, names, exclude)]
    try:
        buf = yield -1
        cap = len(buf)
        buf, pos = yield from _fill_put(buf, 0, F.TOK_MAGIC + HDR_DIRECTORY)
        depth = 1
        # the end of the last regular file's entry (padding, ``) )``): written with whatever comes
        # next, one copy into the buffer fewer per file
        pend = b""
        while stack:
            dfd, dpath, rel, it = stack[-1]
            for logical, disk, kind in it:
                n = len(logical)
                if n > short or depth >= max_depth:
                    if n > max_name or depth >= max_depth:
                        _entry_limits(logical, dpath, disk, depth, limits)
                    while len(entry_heads) <= n:
                        entry_heads.append(ENTRY_OPEN + len(entry_heads).to_bytes(8, "little"))
                try:
                    if kind == _OTHER:
                        kind = _kind_at(disk, dfd, dpath + b"/" + disk)
                    if kind == _REG:
                        try:
                            fd = _open(disk, o_read, dir_fd=dfd)
                        except PermissionError:
                            if o_read == _O_READ_NOATIME_FREE:
                                raise
                            fd = _open(disk, _O_READ_NOATIME_FREE, dir_fd=dfd)
                            # O_NOATIME needs ownership: files of others (a store's, say) are
                            # opened without it from now on, not tried twice each
                            o_read = _O_READ_NOATIME_FREE
                        try:
                            st = _fstat(fd)
                            mode = st.st_mode
                            if mode & S_IFMT != S_IFREG:
                                _regular_fstat(fd, dpath + b"/" + disk)
                            size = st.st_size
                            head = join((pend, entry_heads[n], logical, name_tails[n & 7],
                                         HDR_EXECUTABLE if mode & S_IXUSR else HDR_REGULAR, size.to_bytes(8, "little")))
                            end = pos + len(head)
                            if end + size <= cap:  # the common case: all of it in this buffer
                                buf[pos:end] = head
                                pos = end
                                if size:
                                    k = _readv(fd, (buf[pos:end + size],))
                                    pos += k
                                    if k != size:
                                        buf, pos = yield from _fill_read(buf, pos, fd, size, dpath + b"/" + disk, k)
                            else:
                                buf, pos = yield from _fill_put(buf, pos, head)
                                buf, pos = yield from _fill_read(buf, pos, fd, size, dpath + b"/" + disk)
                        finally:
                            _close(fd)
                        pend = file_tails[size & 7]
                        continue
                    elif kind == _LNK:
                        target = _readlink(disk, dir_fd=dfd)
                        t = len(target)
                        if t > max_target or not t or b"\0" in target:
                            raise NarError(F.validate_target(target, max_target) or "invalid target",
                                           rule="invalid-target", got=target, path=dpath + b"/" + disk)
                        tail = join((pend, entry_heads[n], logical, name_tails[n & 7], HDR_SYMLINK,
                                     t.to_bytes(8, "little"), target, file_tails[t & 7]))
                        pend = b""
                    else:
                        stack.append(_descend(dfd, disk, dpath, rel, logical, names, exclude))
                        depth += 1
                        tail = join((pend, entry_heads[n], logical, name_tails[n & 7], HDR_DIRECTORY))
                        pend = b""
                        end = pos + len(tail)
                        if end <= cap:
                            buf[pos:end] = tail
                            pos = end
                        else:
                            buf, pos = yield from _fill_put(buf, pos, tail)
                        break
                except OSError as e:
                    raise _io_error(e, dpath + b"/" + disk) from e
                end = pos + len(tail)
                if end <= cap:
                    buf[pos:end] = tail
                    pos = end
                else:
                    buf, pos = yield from _fill_put(buf, pos, tail)
            else:
                stack.pop()
                _close(dfd)
                depth -= 1
                buf, pos = yield from _fill_put(buf, pos, pend + (CLOSE2 if stack else F.CLOSE))
                pend = b""
        yield pos
    finally:
        for dfd, *_ in stack:
            _close(dfd)


def dump_to_fd(
    path: str | bytes | os.PathLike[str],
    fd: int,
    *,
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Write the NAR of ``path`` to the descriptor ``fd``; returns the bytes written.

    The contents of files above :data:`SMALL_FILE` go from file to output inside the kernel where
    the platform allows (see :class:`nartool.fs.osutil.FdOutput`). For a tree, the walk runs in
    a producer thread while this one writes (writes, ``sendfile`` and ``copy_file_range`` release
    the GIL), handed the big files open (:func:`dump_nar_handing_off`)."""
    from ..pipeline import pipelined
    from .osutil import FdOutput

    sink = FdOutput(fd)
    root = os.fsencode(path)
    try:
        is_dir = stat.S_ISDIR(os.lstat(root).st_mode)
    except OSError:
        is_dir = False  # the dump reports it
    if not is_dir:
        for c in dump_nar(root, names=names, exclude=exclude, limits=limits, copy_file=sink.copy_from):
            sink.write(c)
        return sink.total
    write, copy_from = sink.write, sink.copy_from
    for item in pipelined(dump_nar_handing_off(root, names=names, exclude=exclude, limits=limits), depth=32):
        if item.__class__ is OpenFile:
            assert isinstance(item, OpenFile)
            try:
                copy_from(item.fd, item.size, item.path)
            except OSError as e:
                raise _io_error(e, item.path) from e
            finally:
                item.close()
        else:
            write(item)  # type: ignore[arg-type]
    return sink.total
