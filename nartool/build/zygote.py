"""The sandbox zygote: one freshly exec'd, single-threaded helper process
(``_sandbox_helper.py zygote``) per nartool process, started at the first build, that forks a
child per build and kills build users' processes — so a build costs a ``fork`` of a small
process instead of the start of a new interpreter.

nartool's own process has threads, so it never forks a builder or calls ``unshare``/``setuid``
itself; the zygote, exec'd once and never running a thread, forks safely. Requests go over a
``socketpair`` (descriptors passed with ``SCM_RIGHTS``); the zygote exits when its end of the
socket reaches EOF, i.e. when the nartool process that started it is gone. A forked nartool
process (different pid) starts its own zygote.
"""

from __future__ import annotations

import _socket  # not ``socket``: it imports enum, selectors & co., start-up time
import array
import functools
import os
import signal
import sys
import threading

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any

HELPER_DIR = os.path.dirname(os.path.abspath(__file__))
#: ``python -I -S -c LAUNCHER MODE`` runs the helper: imported as a module (from the end of the
#: path, after the standard library), its compiled form is cached, unlike a script's
LAUNCHER = f"import sys; sys.path.append({HELPER_DIR!r}); import _sandbox_helper; _sandbox_helper.main()"


def helper_argv(mode: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, mode]


class ZygoteError(OSError):
    pass


class _Child:
    """A process started by :func:`_fork_exec`: what the zygote uses of a ``Popen``."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # (reaped elsewhere: as Popen, 0)
                self.returncode = 0
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int | None:
        return self._reap(0)


def _fork_exec(argv: list[str], stdin: int) -> _Child:
    """Start ``argv`` as ``Popen(argv, stdin=stdin, stdout=DEVNULL, stderr=DEVNULL,
    close_fds=True, cwd="/", start_new_session=True)`` does (the dispositions Python ignores
    restored, nothing else changed), with ``fork`` and ``exec``: importing ``subprocess``
    costs a build command ~3 ms of its start. Only for the main thread of a process that runs
    no other thread (the child runs Python until it execs), and a ``stdin`` above 2. A failed
    exec raises the ``OSError`` Popen raises."""
    r, w = os.pipe()  # (close-on-exec: EOF once the program runs; else the exec's errno)
    if min(r, w) < 3:  # (0, 1 or 2 was closed: keep the pipe out of the child's way)
        import fcntl

        r2, w2 = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 3), fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(r)
        os.close(w)
        r, w = r2, w2
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setsid()
                os.chdir("/")
                if stdin != 0:
                    os.dup2(stdin, 0)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 1)
                os.dup2(null, 2)
                for fd in (0, 1, 2):
                    os.set_inheritable(fd, True)
                _close_fds_but(w)
                for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):  # (Popen's restore_signals)
                    if hasattr(signal, name):
                        signal.signal(getattr(signal, name), signal.SIG_DFL)
                os.execv(argv[0], argv)
            except BaseException as e:  # noqa: BLE001 (reported to the parent, whatever it is)
                os.write(w, str(getattr(e, "errno", None) or 0).encode())
            finally:
                os._exit(255)
        os.close(w)
        w = -1
        err = b""
        while chunk := os.read(r, 32):
            err += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if err:
        os.waitpid(pid, 0)
        code = int(err)
        if code == 0:
            raise ZygoteError(f"cannot start {argv[0]}")
        raise OSError(code, os.strerror(code), argv[0])
    return _Child(pid)


def _close_fds_but(keep: int) -> None:
    """Close every descriptor above 2 but ``keep``: those listed in ``/proc/self/fd`` (as Popen's
    child does: a loop up to a high descriptor limit is slow without ``close_range``)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:  # (no /proc)
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        return
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:  # (listdir's own, closed already)
                pass


class Zygote:
    def __init__(self) -> None:
        parent, child = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM, 0)
        try:
            self.proc: _Child | Any
            if (threading.active_count() == 1 and threading.current_thread() is threading.main_thread()
                    and child.fileno() > 2):
                # (the usual case, a command's first build: without subprocess)
                self.proc = _fork_exec(helper_argv("zygote"), child.fileno())
            else:  # (posix_spawn would be cheaper, but glibc's leaves its two internal signals
                # ignored in the new program, and so in every builder; Popen's child does not)
                import subprocess

                self.proc = subprocess.Popen(helper_argv("zygote"), stdin=child.fileno(),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                             cwd="/", start_new_session=True)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent  # (close-on-exec, as every socket Python makes)
        self.owner = os.getpid()
        self.lock = threading.Lock()
        #: our end of the socket of a spare helper (see prepare_spare), and how many replies to
        #: ``S`` requests are still to be read
        self.spare: _socket.socket | None = None
        self.pending = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, kind: bytes, body: bytes, fds: list[int], sock: _socket.socket | None = None) -> None:
        sock = sock or self.sock
        head = kind + len(body).to_bytes(8, "little")
        anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        n = sock.sendmsg([head], anc)
        if n < len(head):
            sock.sendall(head[n:])
        sock.sendall(body)

    def _collect(self) -> None:
        """Read the zygote's pending replies to ``S``: one byte each, ``S`` with the spare's
        socket or ``N`` (none)."""
        while self.pending:
            msg, anc, _, _ = self.sock.recvmsg(1, _socket.CMSG_SPACE(4))
            if not msg:
                raise ZygoteError("the sandbox zygote exited")
            self.pending -= 1
            fds = [fd for level, kind, data in anc if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
                   for fd in array.array("i", data[: len(data) - len(data) % 4])]
            for fd in fds[1:] if msg == b"S" else fds:
                os.close(fd)
            if msg == b"S" and fds:
                os.set_inheritable(fds[0], False)
                spare = _socket.socket(fileno=fds[0])
                if self.spare is not None:
                    self.spare.close()
                self.spare = spare

    def start(self, body: bytes, fds: list[int], spare_ok: bool = False) -> int | None:
        """Start a build helper: ``body`` is the marshalled {"mode", "plan"}; ``fds`` are
        control (read end), report (write end), stderr (write end), pty slave, error pipe.
        With ``spare_ok`` (the plan wants the spare's kind of sandbox: a private network, a user
        namespace allowed) the request goes straight to the spare helper when there is one;
        otherwise the zygote forks a helper. Returns the spare's pid when it took the build and
        made a user namespace (its id maps can be written now), else None."""
        with self.lock:
            if spare_ok:
                self._collect()
                spare, self.spare = self.spare, None
                if spare is not None:
                    try:
                        ready = b""
                        while not ready.endswith(b"\n"):  # (its namespaces are made by now)
                            chunk = spare.recv(64)
                            if not chunk:
                                raise ConnectionResetError("the spare helper is gone")
                            ready += chunk
                        pid, userns = (int(x) for x in ready.split())
                        self._send(b"B", body, fds, spare)
                        return pid if userns == 1 else None
                    except (OSError, ValueError):
                        pass  # it died: a fresh helper instead
                    finally:
                        spare.close()
            self._send(b"B", body, fds)
            return None

    def prepare_spare(self, seccomp: str = "") -> None:
        """Have a spare helper forked (for the next build) if there is none; ``seccomp``: the
        hex of the BPF program builds install, prepared once in the zygote."""
        with self.lock:
            if self.spare is None and not self.pending:
                self._send(b"S", seccomp.encode(), [])
                self.pending += 1

    def kill_user(self, uid: int) -> str:
        """Kill every process of ``uid``; "ok" or "error <reason>"."""
        with self.lock:
            self._collect()
            self._send(b"K", str(uid).encode(), [])
            line = b""
            while not line.endswith(b"\n"):
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ZygoteError("the sandbox zygote exited")
                line += chunk
        return line.decode("utf-8", "replace").strip()

    def close(self) -> None:
        if self.spare is not None:
            self.spare.close()
            self.spare = None
        self.sock.close()
        self.proc.wait()


_zygote: Zygote | None = None
_zlock = threading.Lock()


def get() -> Zygote:
    """This process's zygote (started now if there is none or it is dead)."""
    global _zygote
    with _zlock:
        z = _zygote
        if z is None or z.owner != os.getpid() or z.proc.poll() is not None:
            if z is not None and z.owner == os.getpid():
                z.close()
            z = _zygote = Zygote()
            z.prepare_spare(seccomp_program())
        return z


def prestart() -> None:
    """Start this process's zygote now if there is none (its start-up then overlaps with the
    caller's own preparations)."""
    get()


def start_build(body: bytes, fds: list[int], spare_ok: bool = False) -> int | None:
    """See :meth:`Zygote.start`."""
    res = _call("start", body, fds, spare_ok)
    return res if isinstance(res, int) else None


@functools.lru_cache(maxsize=1)
def seccomp_program() -> str:
    """The hex of the BPF program builds install on this machine ("" when it has none)."""
    from . import seccomp

    try:
        return seccomp.filter_program().hex()
    except ValueError:
        return ""


def prepare_spare(seccomp: str = "") -> None:
    """Ask this process's zygote for a spare helper now (see :func:`_sandbox_helper.zygote`);
    harmless when it fails: the next build then has its helper forked."""
    try:
        _call("prepare_spare", seccomp)
    except OSError:
        pass


def kill_user(uid: int) -> str:
    return str(_call("kill_user", uid))


def _call(fn_name: str, *args: object) -> object:
    """Run a request, restarting the zygote once if it died (e.g. killed) since the last use."""
    for attempt in (0, 1):
        z = get()
        try:
            return getattr(z, fn_name)(*args)
        except (BrokenPipeError, ConnectionResetError, ZygoteError):
            if attempt:
                raise
            global _zygote
            with _zlock:
                if _zygote is z:
                    _zygote = None
                z.close()
    raise AssertionError("unreachable")
