"""The real-sshd harness works: forced commands, binary-clean stdin/stdout, clean shutdown."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .sshd import Sshd, SshdError, make_sshd, sshd  # noqa: F401

pytestmark = pytest.mark.ssh


def run(server: Sshd, key: Path, *remote: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(server.ssh_command(key, *remote), input=input, capture_output=True, timeout=60)


def test_forced_command_runs(sshd: Sshd) -> None:  # noqa: F811
    key = sshd.add_key("echo hello")
    r = run(sshd, key, "echo", "something-else")
    assert r.returncode == 0, r.stderr.decode() + sshd.log()
    assert r.stdout == b"hello\n"


def test_cat_round_trips_binary_stdin(sshd: Sshd) -> None:  # noqa: F811
    key = sshd.add_key("cat")
    data = os.urandom(1 << 20) + bytes(range(256)) + b"\r\n\x00\x1a\x03\x04"
    r = run(sshd, key, input=data)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == data


def test_each_key_has_its_own_command_and_environment(sshd: Sshd) -> None:  # noqa: F811
    a = sshd.add_key("echo a")
    b = sshd.add_key('printf "%s|%s" "$GREETING" "$SSH_ORIGINAL_COMMAND"', {"GREETING": "hi there; $x"})
    free = sshd.add_key(None, {"FROM_KEY": "yes"})
    assert run(sshd, a).stdout == b"a\n"
    assert run(sshd, b, "the", "request").stdout == b"hi there; $x|the request"
    assert run(sshd, free, 'echo "$FROM_KEY" "$USER"').stdout == f"yes {sshd.user}\n".encode()


def test_unauthorized_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:  # noqa: F811
    from .sshd import keygen

    stranger = keygen(tmp_path / "stranger", "stranger")
    r = run(sshd, stranger, "true")
    assert r.returncode == 255
    assert b"Permission denied" in r.stderr


def test_nix_sshopts_is_whitespace_separated(sshd: Sshd) -> None:  # noqa: F811
    key = sshd.add_key("echo via-nix-sshopts")
    opts = sshd.nix_sshopts(key)
    r = subprocess.run(["ssh", *opts.split(), sshd.host], capture_output=True, timeout=60)
    assert r.stdout == b"via-nix-sshopts\n", r.stderr.decode()


def test_server_is_gone_after_exit(tmp_path: Path) -> None:
    with Sshd(tmp_path / "s") as server:
        key = server.add_key("echo up")
        assert run(server, key).stdout == b"up\n"
        assert server.proc is not None
        pid, port = server.proc.pid, server.port
        assert server.pid_file.read_text().strip() == str(pid)
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert "Accepted publickey" in server.log()


def test_factory_gives_independent_servers(make_sshd: Callable[[], Sshd]) -> None:  # noqa: F811
    one, two = make_sshd(), make_sshd()
    assert one.port != two.port and one.dir != two.dir
    k1 = one.add_key("echo one")
    assert run(one, k1).stdout == b"one\n"
    assert run(two, k1).returncode == 255  # keys are per server


def _require_sshd() -> None:
    from .conftest import require
    from .sshd import sshd_available

    require("SSH", *sshd_available())


def test_bad_configuration_is_reported(tmp_path: Path) -> None:
    _require_sshd()
    server = Sshd(tmp_path / "bad", start_timeout=3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "host_ed25519").write_text("not a key\n")
    with pytest.raises(SshdError) as e:
        server.start()
    assert "rejected its configuration" in str(e.value) and "host_ed25519" in str(e.value)
    assert not server.running


def test_start_failure_shows_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that stays taken: three attempts, then an error carrying sshd's log."""
    _require_sshd()
    import tests.sshd as harness

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(harness, "free_port", lambda: taken.getsockname()[1])
        server = Sshd(tmp_path / "busy", start_timeout=5)
        with pytest.raises(SshdError) as e:
            server.start()
    assert "did not start" in str(e.value)
    assert str(e.value).count("Address already in use") >= 1
    assert not server.running
