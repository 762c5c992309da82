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
from collections.abc import Callable, Iterable

from ..errors import FsError, NarError
from ..nar import format as F
from ..nar.events import Directory, EndDirectory, Event, File, Symlink
from ..nar.reader import FileSink, NarReader
from ..nar.source import write_all
from .canonical import DIR_MODE, TIMES_NS, file_mode
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
        # open directories: (fd, relative path, namer)
        self.stack: list[tuple[int, bytes, DirNamer | None]] = []
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
        return FileSink(self.dir_fd, 0o666, 0o777, self._file_error)

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
        fd, rel, namer = self.stack[-1]
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
            fd, rel, _ = self.stack.pop()
            self.dir_fd[0] = self.stack[-1][0] if self.stack else -1
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
                self.stack.append((fd, rel, namer))
                self.dir_fd[0] = fd
            else:
                raise TypeError(f"not a NAR event: {ev!r}")
        except FileExistsError as e:
            raise FsError("entry already exists (name collision)", path=rel or self.shown_root,
                          rule="exists") from e
        except OSError as e:
            if isinstance(e, FsError):
                raise
            raise FsError(f"cannot create: {e.strerror}", path=rel or self.shown_root, rule="io") from e

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


def restore_events(
    events: Iterable[Event],
    dest: str | bytes | os.PathLike[str],
    *,
    names: NameCodec | None = None,
    canonical: bool = False,
    fsync: bool = False,
) -> None:
    """Restore ``events`` at ``dest``, which must not exist. All or nothing."""
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
    try:
        try:
            for ev in (events.events(files) if files is not None else events):  # type: ignore[attr-defined]
                b.feed(ev)
            if not b.done:
                raise NarError("event stream ended before the root node did", rule="truncated")
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
