"""Byte pipes to a serve-protocol server: ssh, a local process, or an in-process thread.

A transport offers ``read(n)`` (the server's stdout), ``sink`` (a ``write``/``flush`` pair on
the server's stdin), ``close_input()`` (half-close: the server sees EOF), ``close()`` (finish:
half-close, wait briefly, then kill) and ``stderr_tail()`` (the last lines the server wrote
to its stderr, for error messages). The server's stderr is also passed through to ours.

``SshTransport`` builds ssh's argv like Nix 2.8 (``ssh HOST -x -a [NIX_SSHOPTS words] [opts]``)
with the remote command as one argument after ``--``; ``NIX_SSHOPTS`` is split on whitespace
with no quoting rules, as in Nix 2.8. For the host ``localhost`` Nix runs ``bash -c COMMAND``
without ssh; :func:`open_transport` does the same.
"""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from ..config import Config
    from ..store.types import Store

TAIL_LINES = 20


class FdSink:
    """``write``/``flush`` on a raw file descriptor, retrying partial writes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        mv = memoryview(data)
        n = len(mv)
        while mv:
            k = os.write(self.fd, mv)
            mv = mv[k:]
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass


class _Tail:
    """Keeps the last lines of a stream and passes the stream through to ``out``."""

    def __init__(self, out: BinaryIO | None, prefix: bytes = b"") -> None:
        self.lines: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
        self.out = out
        self.prefix = prefix
        self._partial = b""
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self.out is not None:
                try:
                    self.out.write(data)
                    self.out.flush()
                except (OSError, ValueError):
                    pass
            data = self._partial + data
            *complete, self._partial = data.split(b"\n")
            self.lines.extend(complete)

    def text(self) -> str:
        with self._lock:
            lines = list(self.lines) + ([self._partial] if self._partial else [])
        return "\n".join(ln.decode("utf-8", "replace") for ln in lines if ln.strip())


def _stderr_bin() -> BinaryIO | None:
    try:
        return sys.stderr.buffer
    except AttributeError:
        return None


class Transport:
    """Base class; see the module docstring."""

    name: str = "?"
    #: whether the server's stderr is copied to ours as it arrives
    passthrough: bool = False
    sink: Any
    tail: _Tail
    #: the server's stdout, read end
    _out_fd: int

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes from the server (``b""`` at its end)."""
        try:
            return os.read(self._out_fd, n)
        except OSError:
            return b""

    def stderr_tail(self) -> str:
        return self.tail.text()

    def close_input(self) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> int | None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessTransport(Transport):
    """A subprocess speaking the protocol on its stdin/stdout."""

    def __init__(self, argv: Sequence[str], *, name: str | None = None, env: Mapping[str, str] | None = None,
                 passthrough: bool = True, stderr_to: Any = None) -> None:
        self.argv = list(argv)
        self.name = name or self.argv[0]
        self.passthrough = passthrough
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0,
                                     env=dict(env) if env is not None else None)
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self.sink = FdSink(os.dup(self.proc.stdin.fileno()))
        self.proc.stdin.close()
        self._out_fd = self.proc.stdout.fileno()
        # ``stderr_to``: where the server's stderr goes instead of ours (an object with
        # ``write(bytes)``/``flush()``, e.g. a remote build's log sink)
        self.tail = _Tail(stderr_to if stderr_to is not None else _stderr_bin() if passthrough else None)
        self._err_thread = threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True,
                                            name="nartool-remote-stderr")
        self._err_thread.start()
        self._closed = False

    def _pump(self, f: BinaryIO) -> None:
        fd = f.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                break
            if not data:
                break
            self.tail.feed(data)

    def close_input(self) -> None:
        self.sink.close()

    def wait_stderr(self, timeout: float = 2.0) -> None:
        self._err_thread.join(timeout)

    def close(self, timeout: float = 5.0) -> int | None:
        """Half-close, give the server ``timeout`` seconds to exit, then kill it."""
        if self._closed:
            return self.proc.returncode
        self._closed = True
        self.close_input()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._err_thread.join(2.0)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


class LocalTransport(ProcessTransport):
    """A local process, e.g. ``["bash", "-c", "nartool serve --write"]`` for host ``localhost``."""


def split_nix_sshopts(value: str | None) -> list[str]:
    """``NIX_SSHOPTS`` as Nix 2.8 splits it: on whitespace, no quoting."""
    return (value or "").split()


def ssh_argv(host: str, remote_command: str, ssh_opts: Sequence[str] = (),
             env: Mapping[str, str] | None = None, ssh: str = "ssh") -> list[str]:
    env = os.environ if env is None else env
    return [ssh, host, "-x", "-a", *split_nix_sshopts(env.get("NIX_SSHOPTS")), *ssh_opts, "--", remote_command]


class SshTransport(ProcessTransport):
    """``ssh HOST -x -a [NIX_SSHOPTS words] [ssh_opts] -- "COMMAND"``."""

    def __init__(self, host: str, ssh_opts: Sequence[str] = (), remote_command: str = "nartool serve --write", *,
                 env: Mapping[str, str] | None = None, passthrough: bool = True, ssh: str = "ssh",
                 stderr_to: Any = None) -> None:
        self.host = host
        super().__init__(ssh_argv(host, remote_command, ssh_opts, env, ssh), name=host, env=env,
                         passthrough=passthrough, stderr_to=stderr_to)


class PipeTransport(Transport):
    """Runs :func:`~nartool.remote.serve.serve_command` over OS pipes in a thread (fast tests)."""

    def __init__(self, store: Store, *, write: bool = True, trusted: bool | None = None,
                 config: Config | None = None, compress: str | None = None, passthrough: bool = False,
                 name: str = "in-process", **kw: Any) -> None:
        from .serve import serve_command

        self.name = name
        self.passthrough = passthrough
        c2s_r, c2s_w = os.pipe()
        s2c_r, s2c_w = os.pipe()
        self.sink = FdSink(c2s_w)
        self._out_fd = s2c_r
        self.tail = _Tail(_stderr_bin() if passthrough else None)
        self.exit_code: int | None = None
        tail = self.tail

        class _Log:
            def write(self, s: str) -> int:
                tail.feed(s.encode())
                return len(s)

            def flush(self) -> None:
                pass

        def run() -> None:
            inf = os.fdopen(c2s_r, "rb", buffering=0)
            outf = os.fdopen(s2c_w, "wb", buffering=0)
            try:
                self.exit_code = serve_command(store, inf, outf, write=write, trusted=trusted,
                                               config=config, log=_Log(), compress=compress, **kw)
            finally:
                inf.close()
                try:
                    outf.close()
                except OSError:
                    pass

        self._thread = threading.Thread(target=run, daemon=True, name="nartool-serve")
        self._thread.start()
        self._closed = False

    def close_input(self) -> None:
        self.sink.close()

    def close(self, timeout: float = 5.0) -> int | None:
        if not self._closed:
            self._closed = True
            self.close_input()
            self._thread.join(timeout)
            try:
                os.close(self._out_fd)
            except OSError:
                pass
        return self.exit_code

    def kill(self) -> None:
        self.close_input()
        try:
            os.close(self._out_fd)
        except OSError:
            pass

    @property
    def returncode(self) -> int | None:
        return self.exit_code if not self._thread.is_alive() else None


def serve_command_line(remote_program: str, remote_store: str | None = None, compress: str | None = None) -> str:
    """The remote command for ``remote_program``: ``PROG serve --write`` for nartool's CLI, Nix's
    ``PROG --serve --write`` for anything else (``nartool serve`` accepts and ignores ``--serve``,
    so a wrapper running ``nartool serve "$@"`` works for both clients); plus ``--store DIR``
    (shell-escaped) and, towards nartool's CLI only, ``--compress zstd``."""
    words = shlex.split(remote_program) or ["nartool"]
    if is_nartool_program(remote_program):
        cmd = remote_program + ("" if "serve" in words[1:] else " serve") + " --write"
        if compress:
            cmd += f" --compress {shlex.quote(compress)}"
    else:
        cmd = remote_program + " --serve --write"
    if remote_store:
        cmd += " --store " + shlex.quote(remote_store)
    return cmd


def is_nartool_program(remote_program: str) -> bool:
    """Whether ``remote_program`` is nartool's CLI (``…/nartool`` or ``PYTHON -m nartool``), which
    takes ``serve --write``; anything else (``nix-store``, a wrapper) gets Nix's ``--serve --write``."""
    words = shlex.split(remote_program) or ["nartool"]
    return os.path.basename(words[0]) == "nartool" or (len(words) > 2 and words[1:3] == ["-m", "nartool"])


def open_transport(host: str, remote_command: str, ssh_opts: Sequence[str] = (),
                   env: Mapping[str, str] | None = None, *, stderr_to: Any = None) -> ProcessTransport:
    """Like Nix: ``localhost`` runs ``bash -c COMMAND`` locally, anything else goes through ssh.
    ``stderr_to`` receives the server's stderr instead of our own stderr."""
    if host == "localhost":
        return LocalTransport(["bash", "-c", remote_command], name=host, env=env, stderr_to=stderr_to)
    return SshTransport(host, ssh_opts, remote_command, env=env, stderr_to=stderr_to)
