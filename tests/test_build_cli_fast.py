"""``nartool build``'s click-free fast path (nartool/cli/fastbuild.py): which command lines it
takes (everything else goes to click), and that a build run through it prints, logs and exits
exactly as the click command does, also when things go wrong before the build (no local store,
the sandbox helper failing to start, a store the user cannot write)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nartool.cli.fastbuild import parse
from nartool.cli.process import hoist_store_option
from nartool.store.local import LocalStore

from .buildkit import nartool_store, static_busybox, write_drv
from .conftest import require
from .helpers import cli_env

# --- which command lines take the fast path --------------------------------------------------


def _parsed(*args: str) -> dict[str, object] | None:
    a = parse(hoist_store_option(list(args)))
    return None if a is None else {k: getattr(a, k) for k in a.__slots__}


def test_plain_command_lines_are_parsed() -> None:
    a = _parsed("--store", "S", "--store-dir=/x/store", "--debug", "build", "-k", "--option", "sandbox", "false",
                "-j", "2", "--cores=3", "D1", "--max-silent-time", "5", "--timeout=9", "--json", "D2",
                "--option", "cores", "")
    assert a == {"store": "S", "store_dir": "/x/store", "debug": True, "targets": ["D1", "D2"],
                 "options": [("sandbox", "false"), ("cores", "")], "keep_going": True, "max_jobs": "2",
                 "cores": "3", "max_silent_time": "5", "timeout": "9", "as_json": True}
    # --store after the subcommand is the global option; the last one wins, as with click
    a = _parsed("--store", "A", "build", "D!out,dev", "--store", "B", "--keep-going", "--cores", "1", "--cores", "2")
    assert a is not None and a["store"] == "B" and a["targets"] == ["D!out,dev"] and a["cores"] == "2"
    a = _parsed("build", "D")
    assert a is not None and a["store"] is None and a["store_dir"] is None and not a["keep_going"]


@pytest.mark.parametrize("args", [
    (), ("build",), ("build", "--help"), ("build", "-h", "D"), ("--help", "build", "D"), ("--version",),
    ("--refresh", "build", "D"), ("build", "--", "D"), ("build", "-kj2", "D"), ("build", "-j2", "D"),
    ("build", "--cores", "-1", "D"), ("build", "--cores"), ("build", "D", "--cores"), ("build", "--option", "a"),
    ("build", "--option", "a", "-b", "D"), ("build", "D", "--unknown"), ("build", "-", "D"),
    ("build", "--json=1", "D"), ("build", "--keep-going=yes", "D"), ("store", "build"), ("nar", "build"),
    ("--store", "build"), ("--store", "-x", "build", "D"), ("--store-dir", "build", "D"), ("--debug=1", "build", "D"),
    ("-x", "build", "D"), ("log", "build"),
])
def test_everything_else_goes_to_click(args: tuple[str, ...]) -> None:
    assert _parsed(*args) is None


# --- the same outcome through either path ----------------------------------------------------

#: runs the entry point (as the nartool command does) and then says whether click was loaded, and
#: whether the click command tree was (the fast path loads click only to report an error)
_RUN = ("import atexit, os, sys\n"
        "atexit.register(lambda: os.write(2, b'\\nCLICK=%d%d\\n' % ('click' in sys.modules, "
        "'nartool.cli.main' in sys.modules)))\n"
        "{setup}"
        "sys.argv = ['nartool', *sys.argv[1:]]\n"
        "from nartool.cli.entry import main\n"
        "main()\n")


def _run(*args: str, setup: str = "", env: dict[str, str] | None = None,
         prefix: tuple[str, ...] = ()) -> tuple[int, str, str, str]:
    """(exit status, stdout, stderr, flags): flags is "CT", C and T "1" when click and when the
    command tree were loaded. ``prefix`` runs the command (e.g. in a namespace)."""
    r = subprocess.run([*prefix, sys.executable, "-c", _RUN.format(setup=setup), *args], capture_output=True,
                       env=cli_env(env), timeout=120, cwd="/")
    err = r.stderr.decode()
    err, _, flags = err.rpartition("\nCLICK=")
    err = re.sub(r"/temproots/\d+", "/temproots/PID", err)  # (each process's own file)
    return r.returncode, r.stdout.decode(), err, flags.strip()


def _both(*args: str, targets: int = 1, setup: str = "", env: dict[str, str] | None = None,
          prefix: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Run ``nartool ARGS`` (ending with ``targets`` targets) through the fast path and through
    click (the same command line with ``--`` before the targets); both must give the same
    outcome."""
    fast = _run(*args, setup=setup, env=env, prefix=prefix)
    slow = _run(*args[:-targets], "--", *args[-targets:], setup=setup, env=env, prefix=prefix)
    assert fast[3][1:] == "0", "the fast path loaded the click command tree"
    assert fast[0] != 0 or fast[3] == "00", "the fast path loaded click (only an error message may)"
    assert slow[3] == "11", "the command line with -- did not go through click"
    assert fast[:3] == slow[:3]
    return fast[:3]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Path, Path, LocalStore]]:
    """Two stores holding busybox (one per path, so each builds from scratch); the first open."""
    require("SANDBOX", static_busybox(), "no static busybox (install busybox-static)")
    from nartool.build.sandbox import sandbox_unavailable_reason

    reason = sandbox_unavailable_reason()
    require("SANDBOX", reason is None, f"the build sandbox cannot run here: {reason}")
    a, _ = nartool_store(tmp_path / "a", tmp_path)
    b, _ = nartool_store(tmp_path / "b", tmp_path)
    b.close()
    try:
        yield tmp_path / "a", tmp_path / "b", a
    finally:
        a.close()


def _same_drv(st: LocalStore, other: Path, name: str, script: str) -> str:
    drv = write_drv(st, name, script)
    o = LocalStore(other)
    try:
        assert write_drv(o, name, script) == drv
    finally:
        o.close()
    return drv


def test_build_outcome_is_the_same(stores: tuple[Path, Path, LocalStore]) -> None:
    a, b, st = stores
    ok = _same_drv(st, b, "fast-ok", "echo some log; echo hi > $out")
    bad = _same_drv(st, b, "fast-bad", "echo going wrong; exit 3")
    out = st.query_derivation_outputs(ok)["out"]
    # success: the output path on stdout, the log on stderr
    fast = _run("--store", str(a), "build", ok)
    slow = _run("--store", str(b), "build", "--", ok)
    assert (fast[3], slow[3]) == ("00", "11")
    assert fast[:2] == slow[:2] == (0, out + "\n")
    assert fast[2] == slow[2] and "some log" in fast[2]
    # already valid: nothing built, the same path
    assert _both("--store", str(a), "build", ok)[:2] == (0, out + "\n")
    # a failing builder: Nix's status and messages, also as JSON; -k and options on the way
    code, stdout, stderr = _both("--store", str(a), "build", "-k", "--option", "max-silent-time", "60", bad, ok,
                                 targets=2)
    assert code == 100 and stdout == "" and "going wrong" in stderr and "failed with exit code 3" in stderr
    code, stdout, _ = _both("--store", str(a), "build", "--json", bad)
    assert code == 100 and json.loads(stdout)[0]["status"] == "PERMANENT_FAILURE"


def test_errors_before_the_build_are_the_same(stores: tuple[Path, Path, LocalStore], tmp_path: Path) -> None:
    a, _, st = stores
    drv = write_drv(st, "fast-err", "echo hi > $out")
    # not a local store
    code, _, err = _both("--store", "memory://", "build", drv)
    assert code == 1 and "builds (they need a local store)" in err
    # a derivation the store does not have
    code, _, err = _both("--store", str(a), "build", drv.replace("fast-err", "fast-nix"))
    assert code == 1 and "error: cannot build missing derivation" in err
    # the sandbox helper cannot start: reported as an error, nothing built
    code, out, err = _both("--store", str(a), "build", drv,
                           setup="import nartool.build.zygote as z\nz.helper_argv = lambda mode: ['/nonexistent/python']\n")
    assert code == 1 and out == "" and "/nonexistent/python" in err
    assert not st.is_valid(st.query_derivation_outputs(drv)["out"])
    # a read-only store: bind-mounted read-only in a mount namespace of the command's own (as
    # root), or a copy with read-only directories (as another user)
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("no unshare(1) for a read-only bind mount")
        ro = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(a))
        code, _, err = _both("--store", str(a), "build", drv, prefix=ro)
        assert code == 1 and err.startswith("error: ") and ("Read-only file system" in err
                                                           or "unable to open database file" in err)
    else:
        ro_copy = tmp_path / "ro"
        shutil.copytree(a, ro_copy, symlinks=True)
        for d, _, _ in os.walk(ro_copy):
            os.chmod(d, 0o555)
        try:
            code, _, err = _both("--store", str(ro_copy), "build", drv)
            assert code == 1 and err.startswith("error: ")
        finally:
            for d, _, _ in os.walk(ro_copy):
                os.chmod(d, 0o755)
    assert not st.is_valid(st.query_derivation_outputs(drv)["out"])


# --- leaving without the interpreter's finalization -----------------------------------------


def test_exit_skips_finalization_only_when_nothing_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import atexit
    import threading

    from nartool.cli import fastbuild

    class Exited(Exception):
        pass

    def fake_exit(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(atexit, "_ncallbacks", lambda: 0, raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    with pytest.raises(Exited) as e:
        fastbuild._exit(100)
    assert e.value.args == (100,)
    # a handler registered, or another thread running: the usual exit, which runs or waits for them
    monkeypatch.setattr(atexit, "_ncallbacks", lambda: 1, raising=False)
    with pytest.raises(SystemExit) as s:
        fastbuild._exit(1)
    assert s.value.code == 1
    monkeypatch.setattr(atexit, "_ncallbacks", lambda: 0, raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    with pytest.raises(SystemExit):
        fastbuild._exit(0)


def test_output_reaches_a_file_and_a_closed_pipe_is_quiet(stores: tuple[Path, Path, LocalStore],
                                                         tmp_path: Path) -> None:
    """The plain command (no atexit handler: the fast exit): buffered output to a file is all
    written; a reader that went away early gives status 141 without a message."""
    from .helpers import cli_argv

    a, _, st = stores
    drv = write_drv(st, "fast-exit", "echo hi > $out")
    out = st.query_derivation_outputs(drv)["out"]
    with open(tmp_path / "stdout", "wb") as f:
        r = subprocess.run(cli_argv("--store", a, "build", drv), stdout=f, stderr=subprocess.PIPE, env=cli_env(),
                           timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "stdout").read_text() == out + "\n"
    rd, wr = os.pipe()
    os.close(rd)
    try:
        r = subprocess.run(cli_argv("--store", a, "build", drv), stdout=wr, stderr=subprocess.PIPE, env=cli_env(),
                           timeout=120)
    finally:
        os.close(wr)
    assert r.returncode == 141 and b"Traceback" not in r.stderr  # (as nartool.cli.main means it)


# --- what a build's start loads ----------------------------------------------------------------

#: modules a build command no longer loads: ``dataclasses`` (which loads ``inspect``, ``ast``,
#: ``dis``, ``tokenize``), ``typing``, the remote layer (the results are the store layer's),
#: ``json`` (loaded when first used: nartool._json), ``queue`` (for threaded hashing), the case
#: hack and the NAR restorer (a build registers its outputs in place), ``subprocess`` (with
#: ``locale`` and ``selectors``: the zygote is started with fork and exec), ``importlib`` (and
#: ``warnings``: the packages' lazy names are not used), ``base64``, the ``sqlite3`` package
#: (``_sqlite3`` without ``datetime``), click and what earlier start-up work removed
NOT_LOADED_BY_A_BUILD = ("dataclasses", "typing", "inspect", "ast", "dis", "tokenize", "nartool.remote",
                         "nartool.remote.messages", "json", "queue", "nartool.fs.casehack", "unicodedata",
                         "nartool.fs.sink", "subprocess", "locale", "selectors", "importlib", "warnings", "base64",
                         "sqlite3", "datetime", "click", "nartool.cli.main", "pathlib", "urllib.parse", "platform",
                         "secrets", "socket")

#: runs the entry point (as the nartool command does), then lists the modules loaded
_AUDIT = ("import atexit, os, sys\n"
          "atexit.register(lambda: os.write(2, ('\\nMODULES=' + ','.join(sorted(sys.modules))).encode()))\n"
          "sys.argv = ['nartool', *sys.argv[1:]]\n"
          "{setup}"
          "from nartool.cli.entry import main\n"
          "main()\n")


def _modules_of_a_build(store: Path, drv: str, setup: str = "") -> set[str]:
    # (-S: this interpreter's site, with its editable install, loads typing and pathlib itself;
    # an installed nartool's does not)
    r = subprocess.run([sys.executable, "-S", "-c", _AUDIT.format(setup=setup), "--store", str(store), "build", drv],
                       capture_output=True, env=cli_env(), timeout=120, cwd="/")
    err, _, modules = r.stderr.decode().rpartition("\nMODULES=")
    assert r.returncode == 0, err
    loaded = set(modules.split(","))
    assert {"nartool.build.goal", "nartool.store.local", "nartool.config", "_sqlite3"} <= loaded  # (the audit works)
    return loaded


def test_a_build_loads_neither_dataclasses_nor_typing(stores: tuple[Path, Path, LocalStore]) -> None:
    a, _, st = stores
    drv = write_drv(st, "fast-imports", "echo hi > $out")
    built = _modules_of_a_build(a, drv)  # a build
    assert st.is_valid(st.query_derivation_outputs(drv)["out"])
    valid = _modules_of_a_build(a, drv)  # and a target already valid
    assert "nartool.build.sandbox" in built
    assert sorted(set(NOT_LOADED_BY_A_BUILD) & (built | valid)) == []
    # a target already valid: no log written, no output moved into place, no chroot removed
    assert {"bz2", "ctypes"} <= built and not {"bz2", "ctypes"} & valid
    # (the audit sees such a module when something loads it)
    assert "typing" in _modules_of_a_build(a, drv, setup="import nartool.build.goal, typing\n")
