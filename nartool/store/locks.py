"""Nix-compatible store locks (all ``flock(2)``, as Nix 2.8 uses them).

* per-path locks ``<physical path>.lock``: exclusive; a releasing holder unlinks the file and
  writes one byte ``d`` into it so that a waiter that locked the unlinked file retries;
* temporary roots ``<state>/temproots/<pid>``: NUL-terminated full store paths appended by
  the owning process, which holds an exclusive lock on the file for its lifetime;
* ``<state>/gc.lock``: taken shared (non-blocking) while adding a temp root, exclusive by
  the collector; when a collector runs, new temp roots are announced to it over
  ``<state>/gc-socket/socket`` (``<path>\\n`` → ``1``) so it cannot miss them. As Nix's clients
  do, a process keeps one connection to a running collector and sends all its roots over it.

Within one process, all users of one state dir share one temp-roots file (with its lock) and
one collector connection; a forked child gets its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .._log import get_logger
from ..errors import StoreError

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    import socket

log = get_logger(__name__)


def _open_lock_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextmanager
def gc_lock(state_dir: str, *, exclusive: bool, waiting: str) -> Iterator[None]:
    """Hold ``<state>/gc.lock``: exclusive for a collection, shared to keep one from running
    (making roots). Logs ``waiting`` (at INFO, on ``nartool.store.locks``) when it has to wait:
    the CLI shows it on stderr."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fd = _open_lock_file(os.path.join(state_dir, "gc.lock"))
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(waiting)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


_DEFERRED_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP for a few steps that must not be torn apart (taking a
    lock and recording that we hold it): they are delivered, and their handlers run, right after
    the block. Where the platform cannot block signals, nothing is deferred."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    old = mask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


class PathLock:
    """An exclusive lock on ``<physical path>.lock`` (blocking unless ``wait=False``).

    Interrupt-safe: a signal (Ctrl-C, SIGTERM) at any point while the lock is being taken leaves
    no lock file behind and no lock held. Callers that must release what they took even when
    interrupted right after taking it create the object first (``acquire=False``), keep it, then
    call :meth:`acquire`: once the lock is held, :attr:`fd` is set before any signal handler can
    run."""

    def __init__(self, physical: str, *, wait: bool = True, acquire: bool = True) -> None:
        self.lock_path = physical + ".lock"
        self.fd = -1
        if acquire:
            self.acquire(wait=wait)

    def acquire(self, *, wait: bool = True) -> None:
        while True:
            with signals_deferred():
                fd = _open_lock_file(self.lock_path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got = True
                except BlockingIOError:
                    got = False
                if got:
                    if os.fstat(fd).st_size != 0:  # the previous holder deleted it: a fresh file
                        os.close(fd)
                        continue
                    self.fd = fd
                    return
                if not wait:
                    os.close(fd)
                    raise StoreError("path is locked by another process", path=self.lock_path[:-5],
                                     rule="locked")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # the wait: signals are delivered here
                with signals_deferred():
                    if os.fstat(fd).st_size != 0:
                        os.close(fd)
                        continue
                    self.fd = fd
                    return
            except BaseException:
                if self.fd != fd:
                    with signals_deferred():
                        self._abandon(fd)
                raise

    def _abandon(self, fd: int) -> None:
        """Close ``fd`` of a lock attempt that was interrupted, releasing the lock as its holder
        would if the attempt had in fact got it (the lock file then goes too)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours, or free: now ours
            if os.fstat(fd).st_size == 0:
                os.unlink(self.lock_path)
                os.write(fd, b"d")
        except OSError:
            pass  # held by someone else: theirs to remove
        os.close(fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.unlink(self.lock_path)
            os.write(fd, b"d")
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> PathLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Shared:
    """One process's temp-roots file for one state dir, shared by all its :class:`TempRoots`.

    ``flock`` locks belong to open file descriptions: two descriptions of ``temproots/<pid>``
    in one process would block each other. So the file is opened once per process and state
    dir, and closed (and removed) when its last user closes."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "temproots")
        self.gc_lock_path = os.path.join(state_dir, "gc.lock")
        self.socket_path = os.path.join(state_dir, "gc-socket", "socket")
        self.fd = -1
        self.pid = os.getpid()
        self.mutex = threading.Lock()
        self.paths: set[str] = set()
        self.users = 0

    def _open(self) -> int:
        if self.fd >= 0:
            return self.fd
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, str(self.pid))
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_nlink == 0 or st.st_size != 0 and not self.paths:
                # a collector deleted a stale file of a previous process with our pid
                os.close(fd)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            break
        self.fd = fd
        return fd

    def add(self, path: str) -> None:
        with self.mutex:
            if path in self.paths:
                return
            fd = self._open()
            # Into the file first: a collector that starts from now on reads it. One that is
            # already running may have read the file before: it is told through its socket.
            # (Telling first and writing after would miss a collector that starts in between,
            # after the one told has finished.)
            os.write(fd, path.encode() + b"\0")
            gfd = _open_lock_file(self.gc_lock_path)
            try:
                while True:
                    try:
                        fcntl.flock(gfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        break  # no collector running
                    except BlockingIOError:
                        if _tell_collector(self.socket_path, path):
                            break
                        time.sleep(0.05)  # collector starting or ending: retry
            finally:
                os.close(gfd)
            self.paths.add(path)

    def close(self) -> None:
        """Remove the file and drop the collector connection (the last user is gone)."""
        with self.mutex:
            if self.fd >= 0:
                try:
                    os.unlink(os.path.join(self.dir, str(self.pid)))
                except OSError:
                    pass
                os.close(self.fd)
            self.fd, self.paths = -1, set()
        _drop_connection(self.socket_path)


# Per process: real state dir → its shared temp roots; socket path → collector connection.
# A forked child starts with empty tables (the parent's file and connection stay the parent's).
_registry_lock = threading.Lock()
_registry: dict[str, _Shared] = {}
_connections: dict[str, _Connection] = {}
_registry_pid = os.getpid()


def _forget_after_fork() -> None:
    global _registry_lock, _registry, _connections, _registry_pid
    # Only drop our references: the parent still owns its file (and its lock), and closing the
    # child's copies of descriptors would not release anything of the parent's anyway.
    _registry_lock = threading.Lock()
    _registry, _connections, _registry_pid = {}, {}, os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _check_pid() -> None:
    if _registry_pid != os.getpid():  # forked without the fork hook (should not happen)
        _forget_after_fork()


def _acquire(state_dir: str) -> _Shared:
    _check_pid()
    key = os.path.realpath(state_dir)
    with _registry_lock:
        sh = _registry.get(key)
        if sh is None:
            sh = _registry[key] = _Shared(key)
        sh.users += 1
        return sh


def _release(sh: _Shared) -> None:
    _check_pid()
    with _registry_lock:
        if sh.pid != os.getpid():
            return
        sh.users -= 1
        if sh.users > 0:
            return
        key = os.path.dirname(sh.dir)
        if _registry.get(key) is sh:
            del _registry[key]
    sh.close()


class TempRoots:
    """This process's temporary GC roots in ``<state>/temproots/<pid>``.

    All ``TempRoots`` of one process on one state dir (e.g. several :class:`LocalStore` objects
    on one store) share one file, one lock and one collector connection; the file is removed
    when the last of them closes. After a ``fork`` the child has its own."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "temproots")
        self._shared: _Shared | None = None
        self._pid = -1
        self._mutex = threading.Lock()

    def _get(self) -> _Shared:
        with self._mutex:
            pid = os.getpid()
            if self._shared is None or self._pid != pid:  # first use, after close, or forked
                self._shared, self._pid = _acquire(self.state_dir), pid
            return self._shared

    @property
    def _fd(self) -> int:
        return self._shared.fd if self._shared is not None and self._pid == os.getpid() else -1

    def add(self, path: str) -> None:
        """Make ``path`` a temporary root; returns once any running collector knows it."""
        self._get().add(path)

    def close(self) -> None:
        with self._mutex:
            sh, self._shared = self._shared, None
            if sh is None or self._pid != os.getpid():
                return
        _release(sh)


class _Connection:
    """A persistent connection to a running collector's ``gc-socket/socket``.

    Nix's clients keep one connection per process and send every new temp root over it; a
    connection per root makes Nix 2.8's collector abort (it mishandles quickly reused
    descriptors). The connection is remade when it breaks, or when the socket file was
    replaced (a new collector; a finished one may still answer on the old connection)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.mutex = threading.Lock()
        self.sock: socket.socket | None = None
        self.ident: tuple[int, int, int] | None = None

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.ident = None, None

    def tell(self, path: str) -> bool:
        with self.mutex:
            try:
                st = os.stat(self.socket_path)
            except FileNotFoundError:
                self.drop()
                return False  # collector starting (no socket yet) or ending
            import socket  # here, only when a collector runs (its import would cost every command)

            ident = (st.st_dev, st.st_ino, st.st_ctime_ns)
            while True:
                fresh = False
                if self.sock is None or self.ident != ident:
                    self.drop()
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inherited (PEP 446)
                    s.settimeout(600)
                    try:
                        s.connect(self.socket_path)
                    except OSError as e:
                        s.close()
                        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                            return False
                        raise
                    self.sock, self.ident, fresh = s, ident, True
                assert self.sock is not None
                try:
                    # EPIPE rather than SIGPIPE where available
                    self.sock.sendall(path.encode() + b"\n", getattr(socket, "MSG_NOSIGNAL", 0))
                    ack = self.sock.recv(1)
                except OSError as e:
                    if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                        self.drop()
                        raise
                    ack = b""
                if ack == b"1":
                    return True
                self.drop()
                if ack:
                    raise StoreError("unexpected answer from the garbage collector", path=self.socket_path,
                                     rule="gc-protocol", expected=b"1", got=ack)
                if fresh:
                    return False  # the collector went away: retry after checking the lock
                # an old connection (of a collector that has ended): try a new one once


def _connection(socket_path: str) -> _Connection:
    _check_pid()
    with _registry_lock:
        c = _connections.get(socket_path)
        if c is None:
            c = _connections[socket_path] = _Connection(socket_path)
        return c


def _drop_connection(socket_path: str) -> None:
    with _registry_lock:
        c = _connections.pop(socket_path, None)
    if c is not None:
        with c.mutex:
            c.drop()


def _tell_collector(socket_path: str, path: str) -> bool:
    """Announce ``path`` to a running collector over this process's connection to it; False
    when none answers (retry)."""
    return _connection(socket_path).tell(path)


def read_temp_roots(state_dir: str) -> tuple[set[str], list[str]]:
    """Paths in the temp-root files of live processes; stale files are removed.

    Returns ``(paths, problems)``. A file whose lock can be taken belongs to a dead process.
    """
    d = os.path.join(state_dir, "temproots")
    roots: set[str] = set()
    problems: list[str] = []
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return roots, problems
    me = str(os.getpid())
    for name in names:
        if name.startswith("."):
            continue
        p = os.path.join(d, name)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as e:
            problems.append(f"{p}: {e.strerror}")
            continue
        try:
            if name != me:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # owner is gone; remove its file, unless it is gone too and the name is now a
                    # new file (of a process that reopened its store, or reused the pid): that
                    # one is live (its owner locked it after we opened this one)
                    try:
                        ours = os.path.samestat(os.fstat(fd), os.stat(p))
                    except FileNotFoundError:
                        ours = False
                    if ours:
                        os.unlink(p)
                    os.write(fd, b"d")
                    continue
                except BlockingIOError:
                    pass
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            for item in data.split(b"\0"):
                if item:
                    roots.add(item.decode("utf-8", "replace"))
        finally:
            os.close(fd)
    return roots, problems
