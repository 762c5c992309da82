"""CLI behaviour: interruption leaves nothing, destinations are never clobbered, help texts."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nartool.nar import write_nar

from .helpers import cli_argv, run_cli
from .test_nar_memory import big_file_events

_cli = run_cli


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_restore_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    work = tmp_path / "w"
    work.mkdir()
    p = subprocess.Popen(cli_argv("nar", "restore", work / "dest"), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    sent = 0
    for chunk in write_nar(big_file_events(1 << 30)):
        p.stdin.write(chunk)
        sent += len(chunk)
        if sent > 64 << 20:
            break
    p.stdin.flush()
    # the partial tree exists by now (in the hidden temporary)
    deadline = time.time() + 10
    while not os.listdir(work) and time.time() < deadline:
        time.sleep(0.05)
    assert os.listdir(work), "restore did not start"
    p.send_signal(sig)
    try:
        p.stdin.close()
    except BrokenPipeError:
        pass
    assert p.wait(timeout=30) == 130
    assert os.listdir(work) == [], "an interrupted restore left files behind"


def test_restore_refuses_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("mine")
    data = b"".join(write_nar(big_file_events(10)))
    r = _cli("nar", "restore", str(tmp_path / "d"), input=data)
    assert r.returncode == 1 and b"already exists" in r.stderr
    assert os.listdir(tmp_path / "d") == ["keep"]
    os.symlink("elsewhere", tmp_path / "link")
    r = _cli("nar", "restore", str(tmp_path / "link"), input=data)
    assert r.returncode == 1 and not (tmp_path / "elsewhere").exists()


def test_dump_refuses_too_deep_and_special_files(tmp_path: Path) -> None:
    d = tmp_path / "t"
    p = d
    for _ in range(64):
        p = p / "d"
    p.mkdir(parents=True)
    r = _cli("nar", "dump", str(d), "-o", str(tmp_path / "x.nar"))
    assert r.returncode == 1 and b"deeper than 64" in r.stderr
    assert not (tmp_path / "x.nar").exists()
    os.mkfifo(tmp_path / "fifo")
    r = _cli("nar", "dump", str(tmp_path / "fifo"), "-o", str(tmp_path / "y.nar"))
    assert r.returncode == 1 and b"unsupported type" in r.stderr


def test_dump_to_terminal_refused_and_help() -> None:
    r = _cli("nar", "--help")
    assert r.returncode == 0
    for cmd in (b"dump", b"restore", b"hash", b"ls", b"cat"):
        assert cmd in r.stdout
    for cmd in ("dump", "restore", "hash", "ls", "cat"):
        r = _cli("nar", cmd, "--help")
        assert r.returncode == 0 and len(r.stdout) > 200


def test_dump_does_not_leak_file_descriptors(tmp_path: Path) -> None:
    import resource

    import nartool

    t = tmp_path / "many"
    t.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 300
    for i in range(n):
        (t / f"f{i}").write_bytes(b"x" * i)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 128), hard))
    try:
        nartool.hash_path(t)
        nartool.dump(t, tmp_path / "out.nar")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("args", [
    ["-R", "-d", ""], ["-R", "-d", "/"], ["-Rd", "/sub"], ["-Rdl", ""], ["-Rdl", "/sub/deeper"],
    ["-Rd", "/a"], ["-Rd", "/link"], ["-d", ""], ["-Rl", "/sub"],
])
def test_ls_recursive_directory_lists_whole_tree(tmp_path: Path, args: list[str], nix) -> None:  # type: ignore[no-untyped-def]
    """``nix nar ls -R -d`` prints the directory itself and everything below it (as
    ``find . | sort`` does), not just ``.``."""
    from .test_nar_diff import _utf8_tree

    t = _utf8_tree(tmp_path)
    nar = tmp_path / "t.nar"
    nar.write_bytes(nix("nix-store", "--dump", t).stdout)
    theirs = nix("nix", "nar", "ls", *args[:-1], nar, args[-1]).stdout
    ours = _cli("nar", "ls", str(nar), *args)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs
    if args[:2] == ["-R", "-d"]:
        found = subprocess.run(["find", ".", "-print0"], cwd=t, capture_output=True, check=True).stdout
        first, *rest = ours.stdout[:-1].split(b"\n./")  # a name may hold a newline
        assert first == b"." and {first, *(b"./" + r for r in rest)} == set(found.split(b"\0")[:-1])
