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

import array
import os
import socket
import subprocess
import sys
import threading

HELPER_DIR = os.path.dirname(os.path.abspath(__file__))
#: ``python -I -S -c LAUNCHER MODE`` runs the helper: imported as a module (from the end of the
#: path, after the standard library), its compiled form is cached, unlike a script's
LAUNCHER = f"import sys; sys.path.append({HELPER_DIR!r}); import _sandbox_helper; _sandbox_helper.main()"


def helper_argv(mode: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", LAUNCHER, mode]


class ZygoteError(OSError):
    pass


class Zygote:
    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(helper_argv("zygote"), stdin=child.fileno(),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                         cwd="/", start_new_session=True)
        finally:
            child.close()
        parent.set_inheritable(False)
        self.sock = parent
        self.owner = os.getpid()
        self.lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, kind: bytes, body: bytes, fds: list[int]) -> None:
        head = kind + len(body).to_bytes(8, "little")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        n = self.sock.sendmsg([head], anc)
        if n < len(head):
            self.sock.sendall(head[n:])
        self.sock.sendall(body)

    def start(self, body: bytes, fds: list[int]) -> None:
        """Fork a build helper child; ``body`` is the marshalled {"mode", "plan"}; ``fds`` are
        control (read end), report (write end), stderr (write end), pty slave, error pipe."""
        with self.lock:
            self._send(b"B", body, fds)

    def prepare_spare(self) -> None:
        """Have a spare helper forked (for the next build), if there is none."""
        with self.lock:
            self._send(b"S", b"", [])

    def kill_user(self, uid: int) -> str:
        """Kill every process of ``uid``; "ok" or "error <reason>"."""
        with self.lock:
            self._send(b"K", str(uid).encode(), [])
            line = b""
            while not line.endswith(b"\n"):
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ZygoteError("the sandbox zygote exited")
                line += chunk
        return line.decode("utf-8", "replace").strip()

    def close(self) -> None:
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
                z.sock.close()
                z.proc.wait()
            z = _zygote = Zygote()
        return z


def prestart() -> None:
    """Start this process's zygote now if there is none (its start-up then overlaps with the
    caller's own preparations)."""
    get()


def start_build(body: bytes, fds: list[int]) -> None:
    _call("start", body, fds)


def prepare_spare() -> None:
    """Ask this process's zygote for a spare helper now (see :func:`_sandbox_helper.zygote`);
    harmless when it fails: the next build then forks its helper itself."""
    try:
        _call("prepare_spare")
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
                z.sock.close()
                z.proc.wait()
    raise AssertionError("unreachable")
