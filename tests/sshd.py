"""A real, throwaway OpenSSH server for end-to-end tests (``ssh://`` copies, ``serve``).

Usage::

    with Sshd(tmp_path / "sshd") as server:
        key = server.add_key("echo hello")            # a client key with a forced command
        out = subprocess.run(server.ssh_command(key), capture_output=True).stdout
        env = {"NIX_SSHOPTS": server.nix_sshopts(key)}  # for nix-copy-closure --to server.host

or the pytest fixtures ``sshd`` (one started server) and ``make_sshd`` (a factory). Everything
lives in the given directory: host key, client keys, ``authorized_keys``, ``sshd_config``, pid
file and log (``LogLevel VERBOSE``; shown in every error). The server listens on a free port of
127.0.0.1 and accepts public keys only, for the current user (``root`` when run as root).

Without ``/usr/sbin/sshd`` (Debian: ``openssh-server``) or the ``ssh``/``ssh-keygen`` clients,
the fixtures skip — unless ``NARTOOL_REQUIRE_SSH=1``, which makes them fail.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType

import pytest

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
KEY_RESTRICTIONS = "no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SshdError(RuntimeError):
    """The server could not be set up or started; the message ends with its log."""


def sshd_available() -> tuple[bool, str]:
    """Whether this machine can run the harness, and if not, why."""
    if not os.access(SSHD, os.X_OK):
        return False, f"{SSHD} not found: install Debian's openssh-server for the sshd tests"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found: install Debian's openssh-client for the sshd tests"
    return True, ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def keygen(path: Path, comment: str) -> Path:
    """Create an unencrypted ed25519 key pair ``path`` / ``path.pub``."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def _quote_option(value: str) -> str:
    """``value`` inside an authorized_keys ``command="…"`` option."""
    if "\n" in value or "\r" in value or value.endswith("\\"):
        raise ValueError(f"cannot put this command in authorized_keys: {value!r}")
    return '"' + value.replace('"', '\\"') + '"'


def _with_environment(command: str | None, environment: Mapping[str, str] | None) -> str | None:
    """The forced command that sets ``environment`` and then runs ``command`` (or, when None,
    what the client asked for). sshd runs forced commands with the user's shell (``sh -c``)
    and, with ``PermitUserEnvironment no``, ignores ``environment=`` options: hence ``env``."""
    if not environment:
        return command
    for name in environment:
        if not _ENV_NAME.match(name):
            raise ValueError(f"invalid environment variable name: {name!r}")
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in environment.items())
    if command is None:
        return f'exec env {assignments} sh -c "$SSH_ORIGINAL_COMMAND"'
    return f"exec env {assignments} sh -c {shlex.quote(command)}"


class Sshd:
    """An sshd on 127.0.0.1 with its own host key and authorized_keys, started on ``__enter__``
    (or :meth:`start`) and stopped with SIGTERM on ``__exit__`` (or :meth:`stop`)."""

    def __init__(self, workdir: Path, *, start_timeout: float = 15.0) -> None:
        self.dir = Path(workdir).absolute()
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = self.dir / "sshd_config"
        self.log_file = self.dir / "sshd.log"
        self.pid_file = self.dir / "sshd.pid"
        self.authorized_keys = self.dir / "authorized_keys"
        self.host_key = self.dir / "host_ed25519"
        self._nkeys = 0

    # -- addresses and client options

    @property
    def host(self) -> str:
        """``user@127.0.0.1``: the login to pass to ssh, nix-copy-closure, ``ssh://`` URLs."""
        return f"{self.user}@127.0.0.1"

    def ssh_args(self, key: Path) -> list[str]:
        """Client options for logging in with ``key`` (place them before :attr:`host`)."""
        return ["-p", str(self.port), "-i", str(key), "-F", "/dev/null",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]

    def ssh_command(self, key: Path, *remote: str) -> list[str]:
        """A complete ``ssh`` argv (``remote`` is ignored by keys with a forced command)."""
        return ["ssh", *self.ssh_args(key), self.host, *remote]

    def nix_sshopts(self, key: Path) -> str:
        """:meth:`ssh_args` as a ``NIX_SSHOPTS`` value (Nix 2.8 splits it on whitespace)."""
        args = self.ssh_args(key)
        if any(not a or any(c.isspace() for c in a) for a in args):
            raise ValueError(f"NIX_SSHOPTS cannot carry arguments with whitespace: {args}")
        return " ".join(args)

    # -- keys

    def add_key(self, forced_command: str | None = None,
                environment: Mapping[str, str] | None = None) -> Path:
        """Create a client key and authorize it; returns the private key's path.

        With ``forced_command`` every login with this key runs that command (the client's
        command is then in ``$SSH_ORIGINAL_COMMAND``); give each key its own to offer several
        commands. ``environment`` is set for the command (or for the client's command).
        Remote commands get sshd's default PATH: use absolute paths or set ``PATH`` here.
        Works before and after :meth:`start`.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._nkeys += 1
        key = keygen(self.dir / f"client{self._nkeys}_ed25519", f"nartool-test-client{self._nkeys}")
        command = _with_environment(forced_command, environment)
        options = KEY_RESTRICTIONS if command is None else f"command={_quote_option(command)},{KEY_RESTRICTIONS}"
        public = key.with_name(key.name + ".pub").read_text().strip()
        with open(self.authorized_keys, "a") as fh:
            fh.write(f"{options} {public}\n")
        os.chmod(self.authorized_keys, 0o600)
        return key

    # -- lifecycle

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"

    def _fail(self, message: str) -> SshdError:
        return SshdError(f"{message}\n--- sshd log ({self.log_file}) ---\n{self.log()}")

    def _write_config(self, penalties: bool) -> None:
        lines = [
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin yes",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AuthenticationMethods publickey",
            "PermitUserEnvironment no",
            "UseDNS no",
            "PrintMotd no",
            "LogLevel VERBOSE",
        ]
        if penalties:  # OpenSSH 9.8+ would lock out 127.0.0.1 after a few failed tests
            lines.append("PerSourcePenalties no")
        self.config.write_text("\n".join(lines) + "\n")

    def _check_config(self) -> None:
        """Validate with ``sshd -t``, dropping options this OpenSSH does not know."""
        self._write_config(penalties=True)
        r = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True)
        if r.returncode != 0 and "PerSourcePenalties" in r.stderr:
            self._write_config(penalties=False)
            r = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True)
        if r.returncode != 0:
            raise self._fail(f"sshd rejected its configuration: {r.stderr.strip()}")

    def start(self) -> Sshd:
        """Create keys and config, start ``sshd -D`` and wait until it answers."""
        from .conftest import require

        ok, why = sshd_available()
        require("SSH", ok, why)
        self.dir.mkdir(parents=True, exist_ok=True)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd refuses to start without it
        if not self.host_key.exists():
            keygen(self.host_key, "nartool-test-host")
        self.authorized_keys.touch()
        for _attempt in range(3):  # the free port may be taken before sshd binds it
            self.port = free_port()
            self._check_config()
            self.log_file.write_bytes(b"")
            self.proc = subprocess.Popen([SSHD, "-D", "-f", str(self.config), "-E", str(self.log_file)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            if self._wait_ready():
                return self
            if "Address already in use" not in self.log():
                break
        code = self.proc.poll() if self.proc else None
        self.stop()
        if code is not None:
            raise self._fail(f"sshd did not start on 127.0.0.1:{self.port}: it exited with status {code}")
        raise self._fail(f"sshd did not answer on 127.0.0.1:{self.port} within {self.start_timeout}s")

    def _wait_ready(self) -> bool:
        """True once the port answers with an SSH banner; False if sshd exits or time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """SIGTERM the server (then its leftover session processes); SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        sessions = _children(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (sshd's per-connection processes), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the fields after the parenthesised command name: state, ppid, …
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry))
    return out


@pytest.fixture
def make_sshd(tmp_path: Path) -> Iterator[Callable[[], Sshd]]:
    """A factory of started servers, each in its own directory; all stopped at teardown."""
    servers: list[Sshd] = []

    def make() -> Sshd:
        server = Sshd(tmp_path / f"sshd{len(servers)}")
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def sshd(make_sshd: Callable[[], Sshd]) -> Sshd:
    """One started server."""
    return make_sshd()
