"""Filesystem hardening: members swapped for named pipes, signals while a producer thread is
stuck, ``-o`` outputs that keep modes and write through symlinks, temporaries of killed
restores, and huge declared sizes read from files."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import nartool
from nartool.errors import FsError, NartoolError, TruncatedError
from nartool.fs.osutil import output_file, temp_name, temp_owner, temp_prefix
from nartool.fs.source import dump_events, dump_nar
from nartool.nar import format as F
from nartool.nar import write_nar

from .helpers import cli_argv, run_cli
from .test_nar_memory import big_file_events

# ---------------------------------------------------------------------------------------------
# a member swapped for a named pipe between listing and opening


def _swap_for_fifo_on_open(monkeypatch: pytest.MonkeyPatch, victim: bytes, nth: int = 1) -> list[bytes]:
    """Patch ``os.open`` so that the ``nth`` open of a name ending in ``victim`` first replaces
    that file by a named pipe (as a concurrent writer could, right after the listing).
    Returns a list that receives the pipe's path."""
    real = os.open
    seen = [0]
    fifos: list[bytes] = []

    def fake(name: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        b = os.fsencode(name)
        if b.endswith(victim):
            seen[0] += 1
            if seen[0] == nth:
                os.unlink(b, dir_fd=dir_fd)
                os.mkfifo(b, dir_fd=dir_fd)
                fifos.append(os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}").encode(), b)
                             if dir_fd is not None else b)
        return real(name, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake)
    return fifos


def _bounded(fn: Callable[[], object], fifos: list[bytes], timeout: float = 10) -> BaseException | None:
    """Run ``fn`` in a thread; return what it raised. If it is still blocked after ``timeout``
    (opening the pipe), unblock it by opening the pipe's other end, and fail."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - examined by the test
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        fds = [os.open(p, os.O_RDWR | os.O_NONBLOCK) for p in fifos]
        t.join(10)
        for fd in fds:
            os.close(fd)
        pytest.fail("the dump blocked opening a named pipe")
    return box[0]


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        (root / "sub" / f"f{i}").write_bytes(b"x" * (i + 1))
    (root / "sub" / "victim").write_bytes(b"v" * 100)
    (root / "sub" / "z").write_bytes(b"after")
    (root / "big-victim").write_bytes(os.urandom(200_000))
    return root


def _drain_events(path: Path) -> None:
    for ev in dump_events(path):
        for _ in getattr(ev, "chunks", ()):
            pass


DUMPERS: dict[str, Callable[[Path], object]] = {
    "dump_nar": lambda p: b"".join(bytes(c) for c in dump_nar(p)),
    "dump_nar-to-fd": lambda p: nartool.dump(p, os.devnull),
    "dump_events": _drain_events,
    "hash_path": lambda p: nartool.hash_path(p),
}


@pytest.mark.parametrize("how", sorted(DUMPERS))
@pytest.mark.parametrize("victim,nth", [(b"victim", 1), (b"big-victim", 1), (b"big-victim", 2)])
def test_member_swapped_for_fifo_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
                                               victim: bytes, nth: int) -> None:
    """Old code: a blocking open of the pipe, forever. The second open of a big file is
    dump_events' reopen when its contents are consumed."""
    tree = _tree(tmp_path / "t")
    fifos = _swap_for_fifo_on_open(monkeypatch, victim, nth)
    err = _bounded(lambda: DUMPERS[how](tree), fifos)
    if nth == 2 and how != "dump_events":
        assert err is None and not fifos  # only dump_events opens a file twice
        return
    assert fifos, "the swap did not happen"
    assert isinstance(err, FsError), err
    assert err.rule == "changed" and "changed type" in str(err) and "fifo" in str(err)
    assert err.path is not None and os.fsencode(err.path).endswith(victim)


@pytest.mark.parametrize("how", sorted(DUMPERS))
def test_root_file_swapped_for_fifo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    (tmp_path / "root-victim").write_bytes(b"data")
    fifos = _swap_for_fifo_on_open(monkeypatch, b"root-victim")
    err = _bounded(lambda: DUMPERS[how](tmp_path / "root-victim"), fifos)
    assert isinstance(err, FsError) and "changed type" in str(err), err


# a `nartool` that swaps the member named "victim" for a named pipe just before opening it
_SWAP = """
import os, sys
real = os.open
swapped = []
def fake(name, flags, mode=0o777, *, dir_fd=None):
    b = os.fsencode(name)
    if b.endswith(b"victim") and not swapped:
        swapped.append(b)
        os.unlink(b, dir_fd=dir_fd)
        os.mkfifo(b, dir_fd=dir_fd)
    return real(name, flags, mode, dir_fd=dir_fd)
os.open = fake
from nartool.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("argv", [["nar", "hash"], ["nar", "dump"], ["store", "add"]])
def test_cli_member_swapped_for_fifo(tmp_path: Path, argv: list[str]) -> None:
    """Old code: each of these hung for ever (killed here after the timeout)."""
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_bytes(b"a")
    (tree / "victim").write_bytes(b"v")
    r = subprocess.run([sys.executable, "-c", _SWAP, "--store", str(tmp_path / "store"), *argv, str(tree)],
                       capture_output=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert b"changed type during the dump (now a fifo)" in r.stderr and b"victim" in r.stderr


# a `nartool` whose producer thread blocks (as in a system call that never returns) when it
# opens the member named "stuck"
_STUCK = """
import os, sys, time
real = os.open
def fake(name, flags, mode=0o777, *, dir_fd=None):
    if os.fsencode(name).endswith(b"stuck"):
        sys.stderr.write("stuck\\n")
        sys.stderr.flush()
        time.sleep(3600)
    return real(name, flags, mode, dir_fd=dir_fd)
os.open = fake
from nartool.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_hash_with_stuck_producer_obeys_signals(tmp_path: Path, sig: signal.Signals) -> None:
    """Old code: the main thread, interrupted, then joined the stuck producer forever (and
    SIGHUP was not handled at all)."""
    tree = tmp_path / "t"
    tree.mkdir()
    for i in range(5):
        (tree / f"a{i}").write_bytes(b"x" * 1000)
    (tree / "stuck").write_bytes(b"y")
    p = subprocess.Popen([sys.executable, "-c", _STUCK, "nar", "hash", str(tree)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stderr is not None
        assert p.stderr.readline() == b"stuck\n"
        start = time.monotonic()
        p.send_signal(sig)
        rc = p.wait(timeout=10)
        assert rc == 130 and time.monotonic() - start < 5
        assert b"interrupted" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_abandoned_pipeline_closes_its_source() -> None:
    from nartool.pipeline import pipelined

    closed = threading.Event()

    def gen() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    it = cast(Generator[int, None, None], pipelined(gen(), depth=2))
    assert next(it) == 0
    it.close()
    assert closed.wait(5)


# ---------------------------------------------------------------------------------------------
# -o FILE: existing files keep their mode (and owner); symlinks are written through


def _small_tree(root: Path) -> Path:
    root.mkdir()
    (root / "f").write_bytes(b"hello")
    return root


def _expected(tree: Path) -> bytes:
    return b"".join(bytes(c) for c in write_nar(dump_events(tree)))


_cli = run_cli


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755, 0o400])
def test_output_keeps_existing_mode(tmp_path: Path, mode: int) -> None:
    """Old code: the replacement got 0666 less the umask (a private 0600 file became 0644)."""
    tree = _small_tree(tmp_path / "t")
    out = tmp_path / "out.nar"
    out.write_bytes(b"old")
    os.chmod(out, mode)
    nartool.dump(tree, out)
    assert out.read_bytes() == _expected(tree)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert sorted(os.listdir(tmp_path)) == ["out.nar", "t"]


def test_cli_dump_output_keeps_mode(tmp_path: Path) -> None:
    tree = _small_tree(tmp_path / "t")
    out = tmp_path / "out.nar"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    r = _cli("nar", "dump", str(tree), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.read_bytes() == _expected(tree)


def test_cli_store_export_output_keeps_mode_and_symlink(tmp_path: Path) -> None:
    tree = _small_tree(tmp_path / "t")
    store = str(tmp_path / "store")
    r = _cli("--store", store, "store", "add", str(tree))
    assert r.returncode == 0, r.stderr
    path = r.stdout.decode().strip()
    out = tmp_path / "out.export"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    (tmp_path / "link").symlink_to("out.export")
    r = _cli("--store", store, "store", "export", path, "-o", str(tmp_path / "link"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "link").is_symlink() and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert _expected(tree) in out.read_bytes()


def test_output_new_file_respects_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with output_file(tmp_path / "new") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640


def test_output_drops_setuid_bits(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"old")
    os.chmod(out, 0o4755)
    with output_file(out) as f:
        f.write(b"new")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and out.read_bytes() == b"new"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_output_keeps_owner(tmp_path: Path) -> None:
    """Old code: the replacement belonged to whoever wrote it."""
    out = tmp_path / "out"
    out.write_bytes(b"old")
    os.chown(out, 12345, 23456)
    os.chmod(out, 0o640)
    with output_file(out) as f:
        f.write(b"new")
    st = out.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 23456, 0o640)


def test_output_failure_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    with pytest.raises(RuntimeError), output_file(out) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old" and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["out"]


def test_output_writes_through_symlinks(tmp_path: Path) -> None:
    """Old code: the symlink itself was replaced by a regular file; the target kept the old data."""
    tree = _small_tree(tmp_path / "t")
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "target.nar"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    links = tmp_path / "links"
    links.mkdir()
    (links / "hop").symlink_to("../real/target.nar")
    (links / "out.nar").symlink_to("hop")  # a chain of two links, relative targets
    nartool.dump(tree, links / "out.nar")
    assert os.readlink(links / "out.nar") == "hop" and os.readlink(links / "hop") == "../real/target.nar"
    assert target.read_bytes() == _expected(tree) and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(links)) == ["hop", "out.nar"] and os.listdir(real_dir) == ["target.nar"]
    r = _cli("nar", "dump", str(tree / "f"), "-o", str(links / "out.nar"))
    assert r.returncode == 0, r.stderr
    assert (links / "out.nar").is_symlink() and target.read_bytes() == _expected(tree / "f")


def test_output_dangling_symlink_creates_target(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("made.nar")
    with output_file(tmp_path / "link") as f:
        f.write(b"data")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "made.nar").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "made.nar").stat().st_mode) == 0o666 & ~_umask()


def test_output_symlink_to_device_and_fifo_writes_directly(tmp_path: Path) -> None:
    (tmp_path / "null").symlink_to("/dev/null")
    with output_file(tmp_path / "null") as f:
        f.write(b"gone")
    assert (tmp_path / "null").is_symlink()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def drain() -> None:
        with open(fifo, "rb") as r:
            got.extend(r.read())

    t = threading.Thread(target=drain)
    t.start()
    with output_file(fifo) as f:
        f.write(b"through")
    t.join(10)
    assert bytes(got) == b"through" and stat.S_ISFIFO(fifo.lstat().st_mode)


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


# ---------------------------------------------------------------------------------------------
# temporaries of restores that were killed


def test_temp_name_carries_pid() -> None:
    name = temp_name(b"dest")
    assert name.startswith(temp_prefix(b"dest")) and temp_owner(name, temp_prefix(b"dest")) == os.getpid()
    assert temp_owner(name, temp_prefix(b"other")) is None
    assert temp_owner(temp_prefix(b"dest") + b"12-short", temp_prefix(b"dest")) is None
    assert len(temp_name(b"x" * 255)) <= 255


def _start_restore(dest: Path) -> subprocess.Popen[bytes]:
    """A CLI restore of a 1 GiB file from a pipe, fed until its temporary exists."""
    work = dest.parent
    p = subprocess.Popen(cli_argv("nar", "restore", dest), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    sent = 0
    for chunk in write_nar(big_file_events(1 << 30)):
        p.stdin.write(chunk)
        sent += len(chunk)
        if sent > 16 << 20:
            break
    p.stdin.flush()
    deadline = time.time() + 10
    while not os.listdir(work) and time.time() < deadline:
        time.sleep(0.05)
    assert os.listdir(work), "restore did not start"
    return p


def test_restore_killed_by_sighup_leaves_nothing(tmp_path: Path) -> None:
    """Old code: SIGHUP (a dropped SSH session) killed the process without clean-up."""
    work = tmp_path / "w"
    work.mkdir()
    p = _start_restore(work / "dest")
    p.send_signal(signal.SIGHUP)
    try:
        assert p.stdin is not None
        p.stdin.close()
    except BrokenPipeError:
        pass
    assert p.wait(timeout=30) == 130
    assert os.listdir(work) == []


def test_temporary_of_killed_restore_is_removed_by_the_next(tmp_path: Path) -> None:
    """Old code: the temporary of a SIGKILLed restore stayed for ever."""
    work = tmp_path / "w"
    work.mkdir()
    p = _start_restore(work / "dest")
    p.kill()
    try:
        assert p.stdin is not None
        p.stdin.close()
    except BrokenPipeError:
        pass
    p.wait(timeout=30)
    left = os.listdir(work)
    assert len(left) == 1 and temp_owner(os.fsencode(left[0]), temp_prefix(b"dest")) == p.pid
    # another destination's temporary stays, however dead its process
    foreign = f"{os.fsdecode(temp_prefix(b'other'))}{p.pid}-0123456789ab"
    (work / foreign).mkdir()
    nar = b"".join(write_nar(big_file_events(10)))
    r = _cli("nar", "restore", str(work / "dest"), input=nar)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work)) == sorted(["dest", foreign])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_temporaries_are_not_removed(tmp_path: Path) -> None:
    """A temporary whose process lives (pid check), or whose root is locked by a restore the
    pid check cannot see (e.g. in another PID namespace), stays; a dead, unlocked one goes."""
    from nartool.fs.sink import remove_stale_temps

    prefix = os.fsdecode(temp_prefix(b"dest"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        live_name = f"{prefix}{sleeper.pid}-aaaaaaaaaaaa"
        locked_name = f"{prefix}{dead}-bbbbbbbbbbbb"
        stale_dir = f"{prefix}{dead}-cccccccccccc"
        stale_file = f"{prefix}{dead}-dddddddddddd"
        stale_link = f"{prefix}{dead}-eeeeeeeeeeee"
        for n in (live_name, locked_name, stale_dir):
            (tmp_path / n).mkdir()
        (tmp_path / stale_dir / "sub").mkdir()
        (tmp_path / stale_dir / "sub" / "f").write_bytes(b"x")
        os.chmod(tmp_path / stale_dir / "sub", 0o555)
        (tmp_path / stale_file).write_bytes(b"x")
        (tmp_path / stale_link).symlink_to("/")
        lock_fd = os.open(tmp_path / locked_name, os.O_RDONLY)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                remove_stale_temps(dfd, b"dest")
            finally:
                os.close(dfd)
        finally:
            os.close(lock_fd)
        assert sorted(os.listdir(tmp_path)) == sorted([live_name, locked_name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_api_restore_removes_stale_file_temporary(tmp_path: Path) -> None:
    stale = tmp_path / f"{os.fsdecode(temp_prefix(b'dest'))}{_dead_pid()}-0123456789ab"
    stale.write_bytes(b"partial")
    nartool.restore(tmp_path / "dest", b"".join(write_nar(big_file_events(10))))
    assert os.listdir(tmp_path) == ["dest"]


# ---------------------------------------------------------------------------------------------
# a declared content size beyond 2^63 in a NAR read from a file


def _huge_nar(tmp_path: Path) -> tuple[Path, int]:
    data = F.TOK_MAGIC + F.HDR_REGULAR + (2**64 - 1).to_bytes(8, "little") + b"a" * (2 << 20)
    p = tmp_path / "huge.nar"
    p.write_bytes(data)
    return p, len(data)


def test_huge_declared_size_from_file_api(tmp_path: Path) -> None:
    """Old code: ``OverflowError`` from copy_file_range (the count did not fit a ssize_t)."""
    nar, size = _huge_nar(tmp_path)
    for src in (nar, open(nar, "rb")):  # noqa: SIM115 - closed below
        with pytest.raises(TruncatedError) as e:
            nartool.restore(tmp_path / "out", src)
        assert e.value.offset == size and "unexpected end of NAR" in str(e.value)
        assert not (tmp_path / "out").exists()
        if not isinstance(src, Path):
            src.close()
    with pytest.raises(NartoolError):
        nartool.ls(nar)


@pytest.mark.parametrize("redirect", [False, True])
def test_huge_declared_size_from_file_cli(tmp_path: Path, redirect: bool) -> None:
    nar, size = _huge_nar(tmp_path)
    if redirect:
        with open(nar, "rb") as f:
            r = subprocess.run(cli_argv("nar", "restore", tmp_path / "out"), stdin=f, capture_output=True)
    else:
        r = _cli("nar", "restore", str(tmp_path / "out"), str(nar))
    assert r.returncode == 1
    assert b"unexpected end of NAR" in r.stderr and f"at byte {size}".encode() in r.stderr
    assert b"internal error" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["huge.nar"]
