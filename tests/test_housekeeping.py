"""Test infrastructure and library hygiene: the shared CLI runner, real Nix isolated from the
host's configuration, library diagnostics through ``logging``."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nartool.store.local import LocalStore

from .helpers import REPO, cli_argv, cli_env, nix_env, run_cli

Nix = Callable[..., subprocess.CompletedProcess[bytes]]


def test_run_cli(tmp_path: Path) -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and isinstance(r.stdout, bytes) and r.stdout.strip()
    t = run_cli("--version", text=True)
    assert isinstance(t.stdout, str) and t.stdout == r.stdout.decode()
    (tmp_path / "f").write_bytes(b"x")
    assert run_cli("nar", "dump", tmp_path / "f").stdout.startswith(b"\x0d\0\0\0\0\0\0\0nix-archive-1")
    with pytest.raises(subprocess.CalledProcessError):
        run_cli("no-such-command", check=True)
    # a developer's default store does not leak in; env= adds to the environment
    os.environ["NARTOOL_STORE"] = "/nonexistent-default-store"
    try:
        assert "NARTOOL_STORE" not in cli_env()
        assert cli_env({"NARTOOL_STORE": "x"})["NARTOOL_STORE"] == "x"
    finally:
        del os.environ["NARTOOL_STORE"]
    assert cli_env()["PYTHONPATH"].split(os.pathsep)[0] == os.fspath(REPO)
    assert cli_argv("a", tmp_path) == [sys.executable, "-m", "nartool", "a", os.fspath(tmp_path)]


def _hostile(tmp_path: Path) -> dict[str, str]:
    """An environment whose every Nix configuration source breaks Nix or changes a setting."""
    bad = "this line is not a setting\n"
    etc = tmp_path / "hostile-etc"
    etc.mkdir()
    (etc / "nix.conf").write_text("substituters = http://hostile.invalid\n" + bad)
    xdg = tmp_path / "hostile-xdg"
    (xdg / "nix").mkdir(parents=True)
    (xdg / "nix" / "nix.conf").write_text(bad)
    (tmp_path / "hostile-user.conf").write_text(bad)
    return {"NIX_CONF_DIR": os.fspath(etc), "XDG_CONFIG_HOME": os.fspath(xdg), "XDG_CONFIG_DIRS": os.fspath(xdg),
            "NIX_USER_CONF_FILES": os.fspath(tmp_path / "hostile-user.conf"),
            "NIX_CONFIG": "substituters = http://hostile-env.invalid"}


def test_host_nix_conf_has_no_effect(tmp_path: Path, nix: Nix, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    hostile = _hostile(tmp_path)
    # the hostile configuration does break real Nix when it is read...
    r = subprocess.run(["nix-store", "--dump", f], env=dict(os.environ, **hostile), capture_output=True)
    assert r.returncode != 0 and b"illegal configuration line" in r.stderr
    # ...but the tests' Nix (the `nix` fixture, nix_env) does not read it
    for k, v in hostile.items():
        monkeypatch.setenv(k, v)
    assert nix("nix-store", "--dump", f).stdout == run_cli("nar", "dump", f).stdout
    conf = nix("nix", "show-config").stdout.decode()
    assert "hostile" not in conf
    assert "\nsubstituters = \n" in "\n" + conf and "\nsandbox = false\n" in "\n" + conf
    r = subprocess.run(["nix-store", "--dump", f], env=nix_env(), capture_output=True)
    assert r.returncode == 0, r.stderr


def test_library_diagnostics_are_logged_not_printed(tmp_path: Path) -> None:
    """The collector's "waiting for the big garbage collector lock..." goes to the
    ``nartool.store.locks`` logger: silent for a library user (no handler configured)."""
    LocalStore(tmp_path / "st").close()
    script = f"""
import fcntl, logging, os, threading
from nartool.store.locks import gc_lock
records = []
class H(logging.Handler):
    def emit(self, r): records.append((r.name, r.levelname, r.getMessage()))
fd = os.open({os.fspath(tmp_path / "st/nix/var/nix/gc.lock")!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_SH)
def collect():
    with gc_lock({os.fspath(tmp_path / "st/nix/var/nix")!r}, exclusive=True, waiting="waiting for it..."):
        pass
t = threading.Thread(target=collect)
t.start()
t.join(1.0)
assert t.is_alive()  # waiting for our shared lock
os.close(fd)
t.join()
# again, with a handler and level of the library user's own: the message is an INFO record
logging.getLogger("nartool").addHandler(H())
logging.getLogger("nartool").setLevel(logging.INFO)
fd = os.open({os.fspath(tmp_path / "st/nix/var/nix/gc.lock")!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_SH)
t = threading.Thread(target=collect)
t.start()
t.join(1.0)
os.close(fd)
t.join()
print(records)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # nothing printed by the library
    assert r.stdout.strip() == "[('nartool.store.locks', 'INFO', 'waiting for it...')]"


def test_cli_shows_library_diagnostics(tmp_path: Path) -> None:
    """The CLI shows the library's INFO diagnostics on stderr, as plain lines."""
    root = tmp_path / "st"
    LocalStore(root).close()
    fd = os.open(root / "nix/var/nix/gc.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # as a process making roots holds it
        p = subprocess.Popen(cli_argv("--store", root, "store", "gc"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=cli_env())
        assert p.stderr is not None
        line = p.stderr.readline()
        assert line == b"waiting for the big garbage collector lock...\n"
        time.sleep(0.2)
        assert p.poll() is None  # still waiting
    finally:
        os.close(fd)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err


# -- configuration settings: one declarative table


def test_settings_table_drives_parsing_and_docs() -> None:
    import nartool.config as config
    from nartool.config import Config, settings_doc

    table = Config.settings()
    assert list(table)[:5] == ["allowed-users", "trusted-users", "trusted-public-keys", "secret-key-files",
                               "require-sigs"]
    assert {"sandbox", "sandbox-paths", "max-jobs", "build-users-group"} <= set(table)  # the build settings
    # every field but the bookkeeping one is a setting, with the field's default
    assert set(Config._fields) - {st.field for st in table.values()} == {"sources"}
    for st in table.values():
        assert getattr(Config(), st.field) == st.default and st.doc and isinstance(st.trust, bool)
    # who may connect, which keys and substituters are trusted and how builds run: trust settings
    # (serve reads them from the system file only); client-side tuning is not
    trust = {"allowed-users", "trusted-users", "trusted-public-keys", "secret-key-files", "require-sigs",
             "substituters", "sandbox", "sandbox-paths", "build-users-group", "pre-build-hook", "builders"}
    assert {n for n, st in table.items() if st.trust} >= trust
    assert not table["connect-timeout"].trust and not table["narinfo-cache-negative-ttl"].trust
    doc = settings_doc()
    assert config.__doc__ is not None and doc in config.__doc__ and "{settings}" not in config.__doc__
    for name in table:
        assert f"``{name}`` (default" in doc
    assert "``allowed-users`` (default ``*``)" in doc and "``require-sigs`` (default ``true``)" in doc
    assert "``trusted-public-keys`` (default: empty)" in doc


def test_a_new_setting_is_one_field(tmp_path: Path) -> None:
    """A setting added to the table (here in a subclass) is parsed, validated, documented and
    — when it is not a trust setting — honoured from a user's file by serve."""
    from nartool.config import BOOL, STRINGS, Config, setting, settings_doc
    from nartool.errors import NartoolError

    class More(Config):
        fancy: bool = setting("fancy", BOOL, False, "Whether to be fancy.", trust=False)
        mirrors: tuple[str, ...] = setting("mirrors", STRINGS, ("a",), "Where to look.", trust=False)

    c = More.from_text("fancy = yes\nextra-mirrors = b c\n")
    assert c.fancy is True and c.mirrors == ("a", "b", "c") and c.trusted_users == ("root",)
    with pytest.raises(NartoolError) as e:
        More.from_text("fancy = maybe\n", "f.conf")
    assert e.value.rule == "bad-boolean" and "line 1" in e.value.message
    with pytest.raises(NartoolError) as e:
        More.from_text("extra-fancy = true\n")
    assert e.value.rule == "unknown-setting"
    with pytest.raises(NartoolError) as e:  # the base class does not know it
        Config.from_text("fancy = true\n")
    assert e.value.rule == "unknown-setting"
    doc = settings_doc(More.settings().values())
    assert "``fancy`` (default ``false``)\n    Whether to be fancy.\n``mirrors`` (default ``a``)" in doc

    # serve, not as root: a user's file gives its other settings, never its trust settings
    system = tmp_path / "system.conf"
    system.write_text("trusted-users = root\n")
    user = tmp_path / "user.conf"
    user.write_text("fancy = true\ntrusted-users = *\nextra-allowed-users = mallory\n")
    warnings: list[str] = []
    me = os.geteuid()
    s = More.load_for_serve({"NARTOOL_CONFIG": str(user)}, euid=me + 1, root_uid=me, system=system,
                            warn=warnings.append)
    assert s.fancy is True and s.trusted_users == ("root",) and s.allowed_users == ("*",)
    assert s.sources == (str(system), str(user))
    assert len(warnings) == 1 and "ignoring trusted-users, extra-allowed-users in" in warnings[0]
    # the built-in table: a user's file gives e.g. connect-timeout, never trusted-users
    warnings.clear()
    user.write_text("connect-timeout = 7\ntrusted-users = *\n")
    c = Config.load_for_serve({"NARTOOL_CONFIG": str(user)}, euid=me + 1, root_uid=me, system=system,
                              warn=warnings.append)
    assert c.sources == (str(system), str(user)) and c.connect_timeout == 7 and c.trusted_users == ("root",)
    assert len(warnings) == 1 and "ignoring trusted-users in" in warnings[0]


def test_serve_config_warnings_are_logged(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    """load_for_serve's default warnings are log records of ``nartool.config`` (the CLI shows
    them on stderr: test_config's serve tests), not writes to stderr."""
    import logging

    from nartool.config import Config

    user = tmp_path / "user.conf"
    user.write_text("trusted-users = *\n")
    me = os.geteuid()
    with caplog.at_level(logging.WARNING, logger="nartool.config"):
        c = Config.load_for_serve({"NARTOOL_CONFIG": str(user)}, euid=me + 1, root_uid=me,
                                  system=tmp_path / "absent.conf")
    assert c.trusted_users == ("root",)
    assert [(r.name, r.levelname) for r in caplog.records] == [("nartool.config", "WARNING")]
    assert caplog.records[0].getMessage().startswith(f"warning: ignoring trusted-users in '{user}' for serve")
    assert capfd.readouterr().err == ""


def test_cli_diagnostics_levels(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's handler: INFO and up as plain lines, DEBUG too with --debug; set up once
    however often main() runs in a process."""
    import logging

    from nartool.cli.process import _show_diagnostics

    logger = logging.getLogger("nartool")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        _show_diagnostics(False)
        logging.getLogger("nartool.x").debug("not shown")
        logging.getLogger("nartool.x").info("shown")
        assert capsys.readouterr().err == "shown\n"
        _show_diagnostics(True)
        logging.getLogger("nartool.x").debug("details")
        assert capsys.readouterr().err == "details\n"
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
