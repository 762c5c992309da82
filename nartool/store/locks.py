"""Nix-compatible store locks (all ``flock(2)``, as Nix 2.8 uses them).

* per-path locks ``<physical path>.lock``: exclusive; a releasing holder unlinks the file and
  writes one byte ``d`` into it so that a waiter that locked the unlinked file retries;
* temporary roots ``<state>/temproots/<pid>``: NUL-terminated full store paths appended by
  the owning process, which holds an exclusive lock on the file for its lifetime;
* ``<state>/gc.lock``: taken shared (non-blocking) while adding a temp root, exclusive by
  the collector; when a collector runs, new temp roots are announced to it over
  ``<state>/gc-socket/socket`` (``<path>\\n`` → ``1``) so it cannot miss them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StoreError


def _open_lock_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextmanager
def gc_lock(state_dir: str, *, exclusive: bool, waiting: str) -> Iterator[None]:
    """Hold ``<state>/gc.lock``: exclusive for a collection, shared to keep one from running
    (making roots). Says ``waiting`` on stderr when it has to wait."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    fd = _open_lock_file(os.path.join(state_dir, "gc.lock"))
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


class PathLock:
    """An exclusive lock on ``<physical path>.lock`` (blocking unless ``wait=False``)."""

    def __init__(self, physical: str, *, wait: bool = True) -> None:
        self.lock_path = physical + ".lock"
        self.fd = -1
        while True:
            fd = _open_lock_file(self.lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise StoreError("path is locked by another process", path=physical, rule="locked") from None
            except BaseException:
                os.close(fd)
                raise
            if os.fstat(fd).st_size != 0:
                # the previous holder deleted it after we opened it: try again on a fresh file
                os.close(fd)
                continue
            self.fd = fd
            return

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


class TempRoots:
    """This process's temporary GC roots in ``<state>/temproots/<pid>``."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "temproots")
        self.gc_lock_path = os.path.join(state_dir, "gc.lock")
        self.socket_path = os.path.join(state_dir, "gc-socket", "socket")
        self._fd = -1
        self._pid = -1
        self._mutex = threading.Lock()
        self._paths: set[str] = set()

    def _open(self) -> int:
        pid = os.getpid()
        if self._fd >= 0 and self._pid == pid:
            return self._fd
        if self._pid != pid:  # forked: the roots file belongs to the parent
            self._fd, self._paths = -1, set()
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, str(pid))
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_nlink == 0 or st.st_size != 0 and not self._paths:
                # a collector deleted a stale file of a previous process with our pid
                os.close(fd)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            break
        self._fd, self._pid = fd, pid
        return fd

    def add(self, path: str) -> None:
        """Make ``path`` a temporary root; returns once any running collector knows it."""
        with self._mutex:
            if path in self._paths and self._pid == os.getpid():
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
            self._paths.add(path)

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0 and self._pid == os.getpid():
                try:
                    os.unlink(os.path.join(self.dir, str(self._pid)))
                except OSError:
                    pass
                os.close(self._fd)
            self._fd, self._paths = -1, set()


def _tell_collector(socket_path: str, path: str) -> bool:
    """Announce ``path`` to a running collector; False when none answers (retry)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(600)
        s.connect(socket_path)
        s.sendall(path.encode() + b"\n")
        return s.recv(1) == b"1"
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EPIPE, errno.ECONNRESET):
            return False
        raise
    finally:
        s.close()


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
