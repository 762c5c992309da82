"""The click-free fast path of ``nartool nar hash`` / ``nar restore`` (nartool/cli/fastnar.py):
which command lines it takes, and that it behaves exactly as the click commands do (output,
errors, exit status, the case hack's environment), and that it does not load click."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nartool.cli.fastnar import parse
from nartool.nar import nar_bytes

from .helpers import UNSET, cli_argv, cli_env
from .test_nar_property import events_of

# the click command tree, whatever the command line
CLICK = [sys.executable, "-c", "from nartool.cli.main import main; main()"]


@pytest.mark.parametrize(("args", "want"), [
    (["nar", "hash", "p"], ("hash", ["p"], "sri", "sha256", False)),
    (["nar", "hash", "--base16", "p"], ("hash", ["p"], "base16", "sha256", False)),
    (["nar", "hash", "p", "--base32", "--type", "sha512"], ("hash", ["p"], "base32", "sha512", False)),
    (["--debug", "nar", "hash", "--type=md5", "--sri", "p"], ("hash", ["p"], "sri", "md5", True)),
    (["nar", "restore", "d"], ("restore", ["d"], "sri", "sha256", False)),
    (["nar", "restore", "d", "x.nar"], ("restore", ["d", "x.nar"], "sri", "sha256", False)),
])
def test_plain_command_lines_taken(args: list[str], want: tuple[object, ...]) -> None:
    a = parse(args)
    assert a is not None
    assert (a.command, a.args, a.fmt, a.algo, a.debug) == want


@pytest.mark.parametrize("args", [
    [], ["nar"], ["nar", "hash"], ["nar", "ls", "x"], ["nar", "dump", "p"], ["build", "x"],
    ["nar", "hash", "--help"], ["nar", "hash", "p", "q"], ["nar", "hash", "--base16", "--base32", "p"],
    ["nar", "hash", "--type", "crc32", "p"], ["nar", "hash", "--type"], ["nar", "hash", "--type=sha3", "p"],
    ["nar", "hash", "--case-hack", "p"], ["nar", "hash", "--exclude", "x", "p"], ["nar", "hash", "--", "p"],
    ["nar", "hash", "-"], ["nar", "restore"], ["nar", "restore", "a", "b", "c"],
    ["nar", "restore", "--no-case-hack", "d"], ["nar", "restore", "--base16", "d"],
    ["--store", "x", "nar", "hash", "p"], ["nar", "--help"], ["--version"],
])
def test_everything_else_goes_to_click(args: list[str]) -> None:
    assert parse(args) is None


def _both(args: list[str], tmp: Path, *, stdin: bytes | None = None, env: dict[str, str] | None = None,
          fresh: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
    """The command line through the entry point (fast path) and through click; the paths in
    ``fresh`` (restore destinations) are given a separate name for the second run."""
    runs = []
    for argv0, suffix in ((cli_argv(), ""), (CLICK, "-click")):
        a = [x + suffix if x in fresh else x for x in args]
        runs.append(subprocess.run(argv0 + a, input=stdin, capture_output=True, cwd=tmp,
                                   env=cli_env(env, (*UNSET, "NARTOOL_CASE_HACK"))))
    return runs[0], runs[1]


def _same(fast: subprocess.CompletedProcess[bytes], slow: subprocess.CompletedProcess[bytes]) -> None:
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    (t / "a").write_bytes(b"hello\n")
    (t / "sub" / "run").write_bytes(b"#!/bin/sh\n")
    (t / "sub" / "run").chmod(0o755)
    (t / "ln").symlink_to("a")
    return t


@pytest.mark.parametrize("flags", [[], ["--base16"], ["--base32"], ["--sri"], ["--type", "sha512", "--base16"],
                                   ["--type=md5"], ["--type", "sha1", "--base32"]])
@pytest.mark.parametrize("what", ["t", "t/a", "t/ln", "missing"])
def test_hash_as_click(tree: Path, flags: list[str], what: str) -> None:
    fast, slow = _both(["nar", "hash", *flags, what], tree.parent)
    _same(fast, slow)
    assert fast.returncode == (1 if what == "missing" else 0)


def test_restore_as_click(tree: Path) -> None:
    tmp = tree.parent
    good = nar_bytes(events_of({b"a": b"x", b"d": {b"e": ("x", b"run")}, b"l": ("l", b"a")}))
    (tmp / "in.nar").write_bytes(good)
    for args, stdin in ((["nar", "restore", "r1", "in.nar"], None), (["nar", "restore", "r2"], good),
                        (["nar", "restore", "r3", "-"], good), (["nar", "restore", "t"], good),
                        (["nar", "restore", "r4"], good[:-9]), (["nar", "restore", "r5", "nothere.nar"], None),
                        (["--debug", "nar", "restore", "r6"], b"garbage")):
        fast, slow = _both(args, tmp, stdin=stdin, fresh=("r1", "r2", "r3", "r4", "r5", "r6"))
        if args[0] == "--debug":  # the tracebacks name the entry points; the last line is the error
            assert fast.returncode == slow.returncode == 1
            assert fast.stderr.splitlines()[-1] == slow.stderr.splitlines()[-1]
            assert b"Traceback" in fast.stderr
            continue
        _same(fast, slow)
    for name in ("r1", "r2", "r3"):
        assert sorted(os.listdir(tmp / name)) == ["a", "d", "l"]
        assert sorted(os.listdir(tmp / (name + "-click"))) == ["a", "d", "l"]
    assert not (tmp / "r4").exists() and not (tmp / "r5").exists()


@pytest.mark.parametrize("value", ["1", "0", "yes"])
def test_case_hack_environment_as_click(tree: Path, value: str) -> None:
    tmp = tree.parent
    nar = nar_bytes(events_of({b"A": b"1", b"a": b"2"}))
    for args, stdin in ((["nar", "hash", "--base16", "t"], None), (["nar", "restore", "r"], nar)):
        fast, slow = _both(args, tmp, stdin=stdin, env={"NARTOOL_CASE_HACK": value}, fresh=("r",))
        _same(fast, slow)
    if value == "1":  # the second of two names that differ in case gets the suffix
        assert sorted(os.listdir(tmp / "r")) == ["A", "a~nix~case~hack~1"]


def test_fast_path_does_not_load_click(tree: Path) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nartool", "nar", "hash", "--base16", str(tree)],
                       capture_output=True, env=cli_env())
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit(b"|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith(b"import time")}
    assert b"nartool.cli.fastnar" in imported
    assert b"click" not in imported and b"nartool.cli.main" not in imported
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nartool", "nar", "hash", "--case-hack",
                        str(tree)], capture_output=True, env=cli_env())
    assert b"click" in {line.rsplit(b"|", 1)[-1].strip() for line in r.stderr.splitlines()}
