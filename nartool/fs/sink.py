"""Restore sinks: turn NAR events into a filesystem object, safely.

* Everything is created relative to directory file descriptors with ``O_NOFOLLOW`` and
  ``O_EXCL``: a name from the input can never escape the destination, and an existing
  symlink is never followed.
* The object is built under a temporary hidden sibling of the destination and renamed
  into place (without replacing anything) only when the stream completed; on any error,
  including ``KeyboardInterrupt`` (the CLI turns SIGTERM and SIGHUP into one), the
  temporary is removed and nothing is left at the destination.
* A process killed outright (SIGKILL, a crash) cannot clean up: its temporary's name carries
  its process id, and its root stays locked (``flock``) while the restore runs. The next
  :func:`restore_events` of the same destination removes such temporaries whose process is
  gone and whose lock is free — never one of a live restore.
* ``canonical=True`` gives store-path metadata while creating (files 0444/0555,
  directories 0555, mtime 1); ``fsync=True`` flushes every file and directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from collections.abc import Callable, Iterable

from ..errors import FsError, NarError
from ..nar import format as F
from ..nar.events import Directory, EndDirectory, Event, File, Symlink
from ..nar.reader import EVERY, ORDER_BATCH, FileSink, NarReader
from ..nar.source import write_all
from .canonical import DIR_MODE, TIMES_NS, file_mode
from .forked import can_fork, helper_processes, read_to_end, report, reported
from .osutil import fsync as fsync_fd
from .osutil import pid_alive, remove_at, rename_noreplace, temp_name, temp_owner, temp_prefix
from .source import DirNamer, NameCodec
from .xattrs import strip_fd

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


class _Builder:
    """Creates the events' tree as ``name`` inside the directory ``parent_fd``."""

    def __init__(
        self,
        parent_fd: int,
        name: bytes,
        *,
        names: NameCodec | None,
        canonical: bool,
        fsync: bool,
        on_file: Callable[[bytes, int], None] | None = None,
        lock_root: bool = False,
        shown_root: bytes | None = None,
    ) -> None:
        self.parent_fd = parent_fd
        self.root_name = name
        # what errors about the root itself name (the destination, not a hidden temporary)
        self.shown_root = shown_root if shown_root is not None else name
        self.names = names
        self.canonical = canonical
        self.fsync = fsync
        self.on_file = on_file
        self.umask = _umask()
        # open directories: (fd, relative path, namer, process making its entries: 0 is this one)
        self.stack: list[tuple[int, bytes, DirNamer | None, int]] = []
        # a restore whose files are split across processes (see :class:`_Split`): planned, then
        # started once it is due
        self.planned: _Split | None = None
        self.split: _Split | None = None
        # files and symlinks so far (the reader counts those it handles itself)
        self.count = [0]
        # the orders for the helper that makes the innermost directory's files (see _Split)
        self.orders: list[list[tuple[object, ...]] | None] = [None]
        self.done = False
        # with ``lock_root``: a descriptor of the root (directory or file), flock'ed until
        # :meth:`unlock`, so that no stale-temporary clean-up takes it for abandoned
        self.lock_root = lock_root
        self.lock_fd = -1
        # the innermost open directory's descriptor, shared with a reader's FileSink
        self.dir_fd = [-1]
        # an executable's mode as Nix makes it: the created mode (after umask) plus all three
        # x bits; given to open when the umask keeps every x bit, else set by fchmod
        self.exe_at_open = not self.umask & 0o111

    def file_sink(self) -> FileSink | None:
        """A :class:`FileSink` creating files as :meth:`_file` does, when this builder's
        small files need nothing more than open, write, close (no name codec, no canonical
        metadata, no fsync, no per-file callback)."""
        if self.names is not None or self.canonical or self.fsync or self.on_file is not None or \
                not self.exe_at_open:
            return None
        return FileSink(self.dir_fd, 0o666, 0o777, self._file_error, self.count, self.orders, self._flush,
                        self._rebalance)

    def _flush(self) -> None:
        assert self.split is not None and self.orders[0] is not None
        self.split.send(self.orders[0])

    def _rebalance(self) -> None:
        """In a split restore, the rest of the innermost directory's files may go to another
        process (the least busy): a big directory is shared out too. (Called every EVERY files:
        a planned split that is due starts here too.)"""
        if self.split is None:
            self._start_split_if_due()
            return
        if not self.stack:
            return
        fd, rel, namer, owner = self.stack[-1]
        new = self.split.least_busy(owner)
        if new != owner:
            self.stack[-1] = (fd, rel, namer, new)
            self._enter(fd, new)

    def _start_split_if_due(self) -> None:
        p = self.planned
        if p is not None and self.stack and p.due():
            self.planned = None
            p.start()

    def _file_error(self, e: OSError, rel: bytes) -> BaseException:
        if isinstance(e, FileExistsError):
            return FsError("entry already exists (name collision)", path=rel, rule="exists")
        return FsError(f"cannot create: {e.strerror}", path=rel, rule="io")

    def _lock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.lock_fd = os.dup(fd)  # shares the lock, and outlives ``fd``

    def unlock(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def close_all(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[0])
        self.dir_fd[0] = -1

    def _place(self, ev_name: bytes) -> tuple[int, bytes, bytes]:
        """(dir fd, on-disk name, relative path) for the next node."""
        if self.done:
            raise NarError("events continue after the root node", rule="trailing-data")
        if not self.stack:
            return self.parent_fd, self.root_name, b""
        fd, rel, namer, _ = self.stack[-1]
        if not ev_name or b"/" in ev_name or b"\0" in ev_name or ev_name in (b".", b".."):
            raise NarError(F.validate_name(ev_name, 1 << 30) or "invalid entry name", rule="invalid-name",
                           got=ev_name, path=rel)
        disk = namer.disk_name(ev_name) if namer is not None else ev_name
        return fd, disk, (rel + b"/" + ev_name if rel else ev_name)

    def feed(self, ev: Event) -> None:
        cls = ev.__class__
        if cls is EndDirectory:
            if not self.stack:
                raise NarError("end of directory without a directory", rule="token")
            fd, rel, _, owner = self.stack.pop()
            if self.split is not None:
                self.split.left(owner)
            if self.stack:
                self._enter(self.stack[-1][0], self.stack[-1][3])
            else:
                self.dir_fd[0] = -1
            try:
                if self.canonical:
                    strip_fd(fd)
                    os.utime(fd, ns=TIMES_NS)
                    os.fchmod(fd, DIR_MODE)
                if self.fsync:
                    fsync_fd(fd)
            finally:
                os.close(fd)
            if not self.stack:
                self.done = True
            return
        dfd, disk, rel = self._place(ev.name)  # type: ignore[union-attr]
        if cls is not Directory:
            k = self.count[0] = self.count[0] + 1
            if not k & (EVERY - 1):
                self._rebalance()
            if self.stack and self.stack[-1][3]:
                # a helper of a split restore makes it (a file's contents are skipped here)
                assert self.split is not None and self.orders[0] is not None
                if cls is Symlink:
                    assert isinstance(ev, Symlink)
                    self.split.order(self.orders[0], (disk, ev.target))
                    return
                assert isinstance(ev, File) and ev.offset is not None
                if not self.split.inline:
                    self.split.order(self.orders[0], (disk, ev.executable, self.split.reader_start + ev.offset, ev.size))
                    return
                if ev.chunks.__class__ is tuple:  # (read whole: sent with the order)
                    self.split.order(self.orders[0], (disk, ev.executable, b"".join(ev.chunks)))
                    return
                dfd = self.stack[-1][0]  # a big file from a stream: made here, as it is read
        try:
            if cls is File:
                assert isinstance(ev, File)
                self._file(dfd, disk, rel, ev)
                if not self.stack:
                    self.done = True
            elif cls is Symlink:
                assert isinstance(ev, Symlink)
                os.symlink(ev.target, disk, dir_fd=dfd)
                if self.canonical:
                    os.utime(disk, ns=TIMES_NS, dir_fd=dfd, follow_symlinks=False)
                if not self.stack:
                    self.done = True
            elif cls is Directory:
                os.mkdir(disk, 0o777, dir_fd=dfd)
                fd = os.open(disk, _O_DIR, dir_fd=dfd)
                if self.lock_root and not self.stack:
                    try:
                        self._lock(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                namer = self.names.restore_namer(rel) if self.names is not None else None
                owner = self.split.entered(disk, self.stack[-1][3]) if self.split is not None else 0
                self.stack.append((fd, rel, namer, owner))
                self._enter(fd, owner)
                if self.planned is not None:
                    self._start_split_if_due()
            else:
                raise TypeError(f"not a NAR event: {ev!r}")
        except FileExistsError as e:
            raise FsError("entry already exists (name collision)", path=rel or self.shown_root,
                          rule="exists") from e
        except OSError as e:
            if isinstance(e, FsError):
                raise
            raise FsError(f"cannot create: {e.strerror}", path=rel or self.shown_root, rule="io") from e

    def _enter(self, fd: int, owner: int) -> None:
        """The innermost directory is now ``fd``, whose files ``owner`` makes."""
        if owner:
            assert self.split is not None
            self.dir_fd[0] = -1
            self.orders[0] = self.split.queues[owner]
        else:
            self.dir_fd[0] = fd
            self.orders[0] = None
            if self.split is not None:
                self.split.flush()

    def _file(self, dfd: int, disk: bytes, rel: bytes, ev: File) -> None:
        mode = file_mode(ev.executable) if self.canonical else 0o666
        # (the final mode at open where it can be: no fchmod)
        fd = os.open(disk, _O_NEWFILE, 0o600 if self.canonical else 0o777 if ev.executable and self.exe_at_open
                     else 0o666, dir_fd=dfd)
        try:
            if self.lock_root and not self.stack:
                self._lock(fd)
            chunks = ev.chunks
            copy_to = None if chunks.__class__ is tuple else getattr(chunks, "copy_to", None)
            if copy_to is not None:  # straight from the NAR's file where the kernel can
                written = copy_to(fd)
            else:
                written = 0
                for chunk in chunks:
                    write_all(fd, chunk)
                    written += len(chunk)
            if written != ev.size:
                raise NarError("file contents shorter than declared", expected=ev.size, got=written, path=rel,
                               rule="truncated")
            if self.canonical:
                strip_fd(fd)
                os.fchmod(fd, mode)
                os.utime(fd, ns=TIMES_NS)
            elif ev.executable and not self.exe_at_open:
                # as Nix: the created mode (after umask) plus all three x bits
                os.fchmod(fd, (0o666 & ~self.umask) | 0o111)
            if self.fsync:
                fsync_fd(fd)
        finally:
            os.close(fd)
        if self.on_file is not None:
            self.on_file(rel, written)


#: a restore splits its file creation across processes only for a NAR file with at least this
#: much left to read (a fork costs about a millisecond)
SPLIT_MIN_BYTES = 8 << 20
#: the balance of a split restore, in bytes of the NAR: making a file or symlink costs as much
#: as copying this many bytes ...
SPLIT_FILE_BYTES = 16 << 10
#: ... and the parent's reading and checking of one, this many
SPLIT_PARSE_BYTES = 12 << 10


class _Split:
    """A restore whose files are made by several processes (docs/speed.md, "Restore").

    This process (number 0) reads and checks the NAR and makes every directory, as always.
    Once the split is due (a NAR file: as soon as the root directory is made and locked; any
    other input: once :data:`SPLIT_MIN_BYTES` of it were read, at the next directory or the
    next :data:`~nartool.nar.reader.EVERY` files) it forks helpers (1, 2, ...), which start
    in the directory it is in, and gives each new directory's files and symlinks to the
    process with the least work so far. A helper gets orders on a pipe, in batches, in stream
    order: enter a subdirectory (already made), leave it, make a symlink, make a file. From a
    NAR file the order gives the size and the offset of the contents, which the helper copies
    itself (``pread`` or, for big files, ``copy_file_range``); from any other input ("inline")
    small contents come with the order, and big ones are made here as they are read. The
    parent closes the pipes at the end and waits for every helper before the tree is renamed
    into place; a helper reports its error on a second pipe and the parent raises it; on any
    error the parent kills the helpers before it removes the tree."""

    def __init__(self, b: _Builder, reader: NarReader, jobs: int, nar_fd: int, origin: int,
                 due_at: int) -> None:
        self.b = b
        self.jobs = jobs
        self.nar_fd = nar_fd  # -1: inline
        self.inline = nar_fd < 0
        self.due_at = due_at  # (stream offset)
        self.origin = origin  # the NAR file's offset of the source's first byte
        self.reader_start = reader.start  # (events' offsets are counted from the reader's start)
        src = reader.src
        self.offset: Callable[[], int] = lambda: src.offset
        # per process (index 0: this one): its orders not sent yet, its pipes, its work
        self.queues: list[list[tuple[object, ...]]] = []
        self.pids: list[int] = []
        self.order_w: list[int] = []
        self.report_r: list[int] = []
        self.work: list[float] = []
        self.counted = (0, 0)  # (offset, files) when work was last counted

    @classmethod
    def plan(cls, b: _Builder, reader: NarReader, jobs: int) -> _Split | None:
        """A split when it may pay and is safe: more than one job, and a process that may fork
        (see :func:`nartool.fs.forked.can_fork`). From a NAR file with less than
        :data:`SPLIT_MIN_BYTES` left, none; from a big one, due at once; from any other input,
        due once that much was read (a small NAR from a pipe never pays for a fork)."""
        if jobs < 2 or not can_fork():
            return None
        where = reader.src.file_position()
        if where is None:
            return cls(b, reader, jobs, -1, 0, reader.src.offset + SPLIT_MIN_BYTES)
        fd, origin = where
        try:
            if os.fstat(fd).st_size - os.lseek(fd, 0, os.SEEK_CUR) < SPLIT_MIN_BYTES:
                return None
        except OSError:
            return None
        return cls(b, reader, jobs, fd, origin, 0)

    def due(self) -> bool:
        return self.offset() >= self.due_at

    def start(self) -> None:
        """Fork the helpers; they start in the directory this process is in."""
        b = self.b
        fds = [e[0] for e in b.stack]
        paths = [e[1] for e in b.stack]
        modes = (0o666, 0o777)
        self.queues.append([])
        self.pids.append(os.getpid())
        self.order_w.append(-1)
        self.report_r.append(-1)
        for _ in range(1, self.jobs):
            try:
                order_r, order_w = os.pipe()
            except OSError:
                break
            try:
                report_r, report_w = os.pipe()
            except OSError:
                os.close(order_r)
                os.close(order_w)
                break
            try:  # room for the parent to run ahead of a busy helper
                fcntl.fcntl(order_w, fcntl.F_SETPIPE_SZ, 1 << 20)
            except (AttributeError, OSError):
                pass
            try:
                pid = os.fork()
            except OSError:
                for fd in (order_r, order_w, report_r, report_w):
                    os.close(fd)
                break
            if pid == 0:
                # (the write ends must go: a helper sees the end of its orders when the
                # parent closes its pipe, and every copy of the pipe's write end counts)
                for fd in (order_w, report_r, *self.order_w[1:], *self.report_r[1:]):
                    os.close(fd)
                _helper(fds, paths, self.nar_fd, self.origin, modes, order_r, report_w, b._file_error)
            os.close(order_r)
            os.close(report_w)
            self.queues.append([])
            self.pids.append(pid)
            self.order_w.append(order_w)
            self.report_r.append(report_r)
        if len(self.pids) < 2:
            return
        self.work = [0.0] * len(self.pids)
        self.counted = (self.offset(), b.count[0])
        b.split = self

    def _count(self, owner: int) -> None:
        """Add what was read since the last count to the work of the directory's ``owner``
        (and this process's reading of it)."""
        off, n = self.offset(), self.b.count[0]
        files = n - self.counted[1]
        self.work[owner] += (off - self.counted[0]) + files * SPLIT_FILE_BYTES
        self.work[0] += files * SPLIT_PARSE_BYTES
        self.counted = (off, n)

    def entered(self, name: bytes, outer: int) -> int:
        """A new directory ``name`` was made in the innermost one (``outer``'s): every helper
        enters it, and its files go to the least busy process (returned)."""
        for q in self.queues[1:]:
            self.order(q, (name,))
        return self.least_busy(outer)

    def least_busy(self, owner: int) -> int:
        """The least busy process, counting the work of the directory (``owner``'s) so far."""
        self._count(owner)
        work = self.work
        return work.index(min(work))

    def left(self, owner: int) -> None:
        """The innermost directory (``owner``'s) ends: every helper leaves it."""
        self._count(owner)
        for q in self.queues[1:]:
            self.order(q, ())

    def order(self, q: list[tuple[object, ...]], op: tuple[object, ...]) -> None:
        q.append(op)
        if len(q) >= ORDER_BATCH:
            self.send(q)

    def send(self, q: list[tuple[object, ...]]) -> None:
        """Send the orders of queue ``q`` to its helper."""
        import marshal

        i = next(i for i, x in enumerate(self.queues) if x is q)  # (by identity: equal lists happen)
        data = marshal.dumps(q)
        q.clear()
        try:
            write_all(self.order_w[i], len(data).to_bytes(4, "little") + data)
        except BrokenPipeError:
            self._raise_failed(i)

    def flush(self) -> None:
        """Send the helpers what they have waiting (when this process turns to files of its
        own: the helpers should not wait for a full batch meanwhile)."""
        for q in self.queues[1:]:
            if len(q) >= _FLUSH_MIN:
                self.send(q)

    def _raise_failed(self, i: int) -> None:
        """Helper ``i`` stopped reading (it failed): raise what it reported."""
        fd = self.order_w[i]
        self.order_w[i] = -1
        os.close(fd)
        self._wait(i)
        raise FsError("a helper process stopped", rule="io")  # (when it reported nothing)

    def _wait(self, i: int) -> None:
        """Wait for helper ``i``; raise its error."""
        fd = self.report_r[i]
        self.report_r[i] = -1
        try:
            data = read_to_end(fd)
        finally:
            os.close(fd)
        pid = self.pids[i]
        self.pids[i] = -1
        _, status = os.waitpid(pid, 0)
        if data or status != 0:
            raise reported(data, status)

    def finish(self) -> None:
        """Send what is left, tell the helpers the end, wait for them; raise the first error
        one of them reported."""
        for i in range(1, len(self.pids)):
            if self.queues[i] and self.order_w[i] >= 0:
                self.send(self.queues[i])
        for i in range(1, len(self.pids)):
            if self.order_w[i] >= 0:
                os.close(self.order_w[i])
                self.order_w[i] = -1
        for i in range(1, len(self.pids)):
            if self.pids[i] >= 0:
                self._wait(i)

    def kill(self) -> None:
        """Stop every helper and wait for it (before the tree is removed)."""
        for i in range(1, len(self.pids)):
            if self.pids[i] >= 0:
                try:
                    os.kill(self.pids[i], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for i in range(1, len(self.pids)):
            for fd in (self.order_w[i], self.report_r[i]):
                if fd >= 0:
                    os.close(fd)
            self.order_w[i] = self.report_r[i] = -1
            if self.pids[i] >= 0:
                try:
                    os.waitpid(self.pids[i], 0)
                except ChildProcessError:
                    pass
                self.pids[i] = -1


def _helper(fds: list[int], paths: list[bytes], nar_fd: int, origin: int, modes: tuple[int, int], order_r: int,
            report_w: int, error: Callable[[OSError, bytes], BaseException]) -> None:
    """A split restore's helper process: carry out the orders, report any error, exit."""
    code = 1
    try:
        try:
            _carry_out(fds, paths, nar_fd, origin, modes, order_r, error)
            code = 0
        except BaseException as e:
            try:
                write_all(report_w, report(e))
            except BaseException:
                pass
    finally:
        os._exit(code)


def _carry_out(stack: list[int], paths: list[bytes], nar_fd: int, origin: int, modes: tuple[int, int],
               order_r: int, error: Callable[[OSError, bytes], BaseException]) -> None:
    """The orders (see :class:`_Split`), from the directories ``stack`` (descriptors, the
    innermost last; their paths in ``paths``)."""
    import marshal

    orders = os.fdopen(order_r, "rb", buffering=1 << 16)
    mode_reg, mode_exe = modes
    os_open, os_close, pread = os.open, os.close, os.pread
    while True:
        head = orders.read(4)
        if not head:
            return
        n = int.from_bytes(head, "little")
        batch = marshal.loads(orders.read(n))
        for op in batch:
            k = len(op)
            if k == 4:
                name, exe, off, size = op
                try:
                    fd = os_open(name, _O_NEWFILE, mode_exe if exe else mode_reg, dir_fd=stack[-1])
                    try:
                        if size:
                            if size <= _PREAD_MAX:
                                data = pread(nar_fd, size, origin + off)
                                if len(data) != size:
                                    raise OSError(errno.EIO, "the NAR file is shorter than it was read")
                                write_all(fd, data)
                            else:
                                _copy_range(nar_fd, origin + off, size, fd)
                    finally:
                        os_close(fd)
                except OSError as e:
                    raise error(e, paths[-1] + b"/" + name if paths[-1] else name) from e
            elif k == 3:  # inline: the contents come with the order
                name, exe, data = op
                try:
                    fd = os_open(name, _O_NEWFILE, mode_exe if exe else mode_reg, dir_fd=stack[-1])
                    try:
                        if data:
                            write_all(fd, data)
                    finally:
                        os_close(fd)
                except OSError as e:
                    raise error(e, paths[-1] + b"/" + name if paths[-1] else name) from e
            elif k == 1:
                name = op[0]
                path = paths[-1] + b"/" + name if paths[-1] else name
                try:
                    stack.append(os_open(name, _O_DIR, dir_fd=stack[-1]))
                except OSError as e:
                    raise error(e, path) from e
                paths.append(path)
            elif k == 0:
                os_close(stack.pop())
                paths.pop()
            else:
                name, target = op
                try:
                    os.symlink(target, name, dir_fd=stack[-1])
                except OSError as e:
                    raise error(e, paths[-1] + b"/" + name if paths[-1] else name) from e


#: orders sent early (see _Split.flush) when at least this many wait
_FLUSH_MIN = 16
#: a helper reads files up to this size with one ``pread``; bigger ones are copied in the kernel
_PREAD_MAX = 65536


def _copy_range(src_fd: int, off: int, size: int, out_fd: int) -> None:
    """Copy ``size`` bytes at ``off`` of ``src_fd`` to ``out_fd``: ``copy_file_range`` where the
    kernel copies between the two, else reads and writes."""
    done = 0
    kernel = True
    while done < size:
        want = min(size - done, 1 << 30)
        if kernel:
            try:
                k = os.copy_file_range(src_fd, out_fd, want, off + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                kernel = False
                continue
        else:
            data = os.pread(src_fd, min(want, 1 << 20), off + done)
            if data:
                write_all(out_fd, data)
            k = len(data)
        if not k:
            raise OSError(errno.EIO, "the NAR file is shorter than it was read")
        done += k


def restore_events(
    events: Iterable[Event],
    dest: str | bytes | os.PathLike[str],
    *,
    names: NameCodec | None = None,
    canonical: bool = False,
    fsync: bool = False,
    jobs: int | None = None,
) -> None:
    """Restore ``events`` at ``dest``, which must not exist. All or nothing.

    Given a :class:`NarReader` (rather than its events) of a NAR file, the restore may split
    its file creation across up to ``jobs`` processes (default
    :func:`nartool.fs.forked.helper_processes`)."""
    dest_b = os.fsencode(dest).rstrip(b"/") or b"/"
    parent, base = os.path.split(dest_b)
    if not base or base in (b".", b".."):
        raise FsError("destination must name a new entry", path=dest_b, rule="bad-destination")
    if os.path.lexists(dest_b):
        raise FsError("destination already exists", path=dest_b, rule="exists")
    try:
        pfd = os.open(parent or b".", _O_DIR & ~os.O_NOFOLLOW)
    except OSError as e:
        raise FsError(f"cannot open destination's parent: {e.strerror}", path=parent or b".", rule="io") from e
    remove_stale_temps(pfd, base)
    tmp = temp_name(base)
    b = _Builder(pfd, tmp, names=names, canonical=canonical, fsync=fsync, lock_root=True, shown_root=dest_b)
    files = b.file_sink() if isinstance(events, NarReader) else None
    split = None
    if files is not None:
        assert isinstance(events, NarReader)
        split = b.planned = _Split.plan(b, events, helper_processes() if jobs is None else jobs)
        files.inline = split is not None and split.inline
    try:
        try:
            it = events.events(files) if files is not None else iter(events)  # type: ignore[attr-defined]
            for ev in it:
                b.feed(ev)
            if not b.done:
                raise NarError("event stream ended before the root node did", rule="truncated")
            if b.split is not None:
                b.split.finish()
        finally:
            b.close_all()
        try:
            rename_noreplace(tmp, base, src_dir_fd=pfd, dst_dir_fd=pfd)
        except FileExistsError as e:
            raise FsError("destination already exists", path=dest_b, rule="exists") from e
        if fsync:
            fsync_fd(pfd)
    except BaseException:
        try:
            if split is not None:  # (also helpers forked by a start() that did not finish)
                split.kill()
            remove_at(pfd, tmp)
        finally:
            b.unlock()
            os.close(pfd)
        raise
    b.unlock()
    os.close(pfd)


def remove_stale_temps(dir_fd: int, base: bytes) -> None:
    """Remove the restore temporaries of ``base`` in ``dir_fd`` that were left behind by
    processes killed outright: those whose process id names no live process and whose root
    is not locked. Best effort: what cannot be removed stays, silently.

    Both checks are needed: the process id may have been reused by an unrelated process
    (then the temporary stays until that one ends), and a live restore in another PID
    namespace sharing the directory looks dead (its lock tells)."""
    prefix = temp_prefix(base)
    try:
        listed = os.listdir(dir_fd)
    except OSError:
        return
    lead = os.fsdecode(prefix)
    me = os.getpid()
    for n in listed:
        if not n.startswith(lead):
            continue
        name = os.fsencode(n)
        pid = temp_owner(name, prefix)
        if pid is None or pid == me or pid_alive(pid):
            continue
        try:
            _remove_unlocked(dir_fd, name)
        except OSError:
            pass


def _remove_unlocked(dir_fd: int, name: bytes) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            # a symlink root: created and renamed at once, never locked
            os.unlink(name, dir_fd=dir_fd)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live restore holds it
        remove_at(dir_fd, name)
    finally:
        os.close(fd)
