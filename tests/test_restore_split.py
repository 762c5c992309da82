"""A restore split across processes (nartool.fs.sink._Split): the parent reads and checks the
NAR and makes the directories; helper processes make the files of the directories given to
them, from the NAR's file. Same tree as one process, same errors, all or nothing, no process
left behind."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the split restore is Linux-only (it reads the NAR's file by offset)", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402

import nartool.fs.forked as forked  # noqa: E402
import nartool.fs.sink as sink  # noqa: E402
import nartool.nar.reader as reader_module  # noqa: E402
from nartool.errors import FsError, NarError, NartoolError  # noqa: E402
from nartool.nar import nar_bytes  # noqa: E402
from nartool.nar.reader import NarReader  # noqa: E402

from .fusefs import ci_mount  # noqa: E402, F401  (fixture)
from .helpers import cli_argv, cli_env, nix_env, run_cli  # noqa: E402
from .test_nar_fastpath import NAME, dribble, tree_state  # noqa: E402
from .test_nar_property import events_of, tree_strategy  # noqa: E402

BIG = 200_000  # past the reader's small-file size: the slow path, copied with copy_file_range


@pytest.fixture
def helpers_started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Split whatever the NAR's size; the list gets the number of processes of each split.
    Afterwards, every helper must have been waited for."""
    monkeypatch.setattr(sink, "SPLIT_MIN_BYTES", 0)
    assert forked.can_fork(), f"threads: {threading.enumerate()}, tasks: {os.listdir('/proc/self/task')}"
    counts: list[int] = []
    pids: list[int] = []
    real = sink._Split.start

    def start(self: sink._Split) -> None:
        real(self)
        counts.append(len(self.pids))
        pids.extend(self.pids[1:])

    monkeypatch.setattr(sink._Split, "start", start)
    yield counts
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def restore_file(data: bytes, work: str, jobs: int) -> str:
    path = os.path.join(work, "in.nar")
    with open(path, "wb") as f:
        f.write(data)
    dest = os.path.join(work, f"r{jobs}")
    with open(path, "rb") as f:
        sink.restore_events(NarReader(f), dest, jobs=jobs)
    return dest


def mixed_tree() -> dict[bytes, Any]:
    """Directories of every kind of entry, some big files, one directory much bigger than the rest."""
    tree: dict[bytes, Any] = {b"top-big": os.urandom(BIG)}
    for d in range(12):
        sub: dict[bytes, Any] = {b"f%03d" % i: os.urandom(i * 37 % 900) for i in range(20 + d * 3)}
        sub[b"exe"] = ("x", b"#!/bin/sh\n")
        sub[b"link"] = ("l", b"../top-big")
        sub[b"empty"] = b""
        sub[b"nested"] = {b"deep": {b"x": b"y", b"big": os.urandom(BIG + d)}, b"z": b""}
        if d % 4 == 0:
            sub[b"bigone"] = ("x", os.urandom(BIG * 2))
        tree[b"d%02d" % d] = sub
    tree[b"many"] = {b"m%04d" % i: b"%d" % i for i in range(600)}
    tree[b"zz-empty-dir"] = {}
    return tree


@pytest.mark.parametrize("jobs", [2, 3])
def test_split_restores_the_same_tree(helpers_started: list[int], jobs: int) -> None:
    data = nar_bytes(events_of(mixed_tree()))
    work = tempfile.mkdtemp()
    try:
        one = tree_state(restore_file(data, work, 1))
        assert helpers_started == []  # one job: never split
        split = tree_state(restore_file(data, work, jobs))
        assert helpers_started == [jobs]
        assert split == one
        assert sorted(os.listdir(work)) == ["in.nar", "r1", f"r{jobs}"]  # no temporary left
    finally:
        shutil.rmtree(work)


trees = tree_strategy(NAME, file_max=300, exec_max=100, dir_max=6, max_leaves=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(trees)
def test_split_as_one_process(helpers_started: list[int], tree: Any) -> None:
    data = nar_bytes(events_of(tree))
    work = tempfile.mkdtemp()
    try:
        assert tree_state(restore_file(data, work, 2)) == tree_state(restore_file(data, work, 1))
    finally:
        shutil.rmtree(work)


@pytest.mark.parametrize("shape", ["dirs", "flat"])
def test_split_gives_helpers_work(helpers_started: list[int], monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    """The helper makes files (not only the parent), and both make some: of many directories,
    and of one big directory (shared out every EVERY files)."""
    made: list[tuple[int, bytes]] = []  # (pid, name) of every file made by the fast path's open
    real_open = os.open
    log_r, log_w = os.pipe()

    def spy_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_CREAT and isinstance(path, bytes) and path.startswith(b"f"):
            os.write(log_w, b"%d %s\n" % (os.getpid(), path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(sink, "EVERY", 64)
    monkeypatch.setattr(reader_module, "EVERY", 64)
    if shape == "dirs":
        tree: dict[bytes, Any] = {b"d%02d" % d: {b"f%03d" % i: b"x" * i for i in range(50)} for d in range(8)}
    else:
        tree = {b"f%04d" % i: b"x" * (i % 100) for i in range(400)}
    work = tempfile.mkdtemp()
    try:
        restore_file(nar_bytes(events_of(tree)), work, 2)
    finally:
        monkeypatch.undo()
        shutil.rmtree(work)
    os.close(log_w)
    with os.fdopen(log_r, "rb") as f:
        for line in f:
            who, name = line.split()
            made.append((int(who), name))
    assert len(made) == 400
    by_pid: dict[int, int] = {}
    for pid, _ in made:
        by_pid[pid] = by_pid.get(pid, 0) + 1
    assert len(by_pid) == 2 and os.getpid() in by_pid, by_pid
    assert min(by_pid.values()) >= 50, by_pid  # shared out, not all to one


#: the rule each damage breaks (see damaged)
DAMAGE_RULES = {"truncate": "truncated", "trailing": "trailing-data", "padding": "padding"}


def damaged(kind: str) -> bytes:
    """The NAR of mixed_tree() with damage past the point where it splits: cut short, trailing
    bytes, or a padding byte after the contents of "many/m0599" (b"599", then five of padding)."""
    good = nar_bytes(events_of(mixed_tree()))
    if kind == "truncate":
        return good[:-100]
    if kind == "trailing":
        return good + b"\0" * 8
    data = bytearray(good)
    data[good.rindex(b"599") + 3] = 1
    return bytes(data)


def source_tree(root: Path, dirs: int, files: int, step: int, big: int) -> None:
    """A tree for the CLI tests: ``dirs`` directories of ``files`` files of 0, step, 2*step...
    bytes, each with one file of ``big`` bytes, an executable and a symlink."""
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(files):
            (sub / f"f{i}").write_bytes(os.urandom(i * step))
        (sub / "big").write_bytes(os.urandom(big))
        (sub / "run").write_bytes(b"#!/bin/sh\n")
        (sub / "run").chmod(0o755)
        (sub / "ln").symlink_to("big")


def nix_hash(path: Path, nix_hash_cmd: tuple[str, ...] = ("nix-hash",)) -> bytes:
    return subprocess.run([*nix_hash_cmd, "--type", "sha256", str(path)], capture_output=True, check=True,
                          env=nix_env()).stdout


@pytest.mark.parametrize("damage", ["truncate", "trailing", "padding"])
def test_damage_after_the_split_leaves_nothing(helpers_started: list[int], damage: str) -> None:
    data = damaged(damage)
    work = tempfile.mkdtemp()
    try:
        with pytest.raises(NarError) as e:
            restore_file(data, work, 2)
        assert helpers_started == [2]
        assert e.value.rule == DAMAGE_RULES[damage]
        assert os.listdir(work) == ["in.nar"]
    finally:
        shutil.rmtree(work)


def test_interrupted_parent_kills_helpers(helpers_started: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = [0]
    real_feed = sink._Builder.feed

    def feed(self: sink._Builder, ev: Any) -> None:
        seen[0] += 1
        if seen[0] == 30:
            raise KeyboardInterrupt
        real_feed(self, ev)

    monkeypatch.setattr(sink._Builder, "feed", feed)
    work = tempfile.mkdtemp()
    try:
        with pytest.raises(KeyboardInterrupt):
            restore_file(nar_bytes(events_of(mixed_tree())), work, 2)
        assert helpers_started == [2]
        assert os.listdir(work) == ["in.nar"]
    finally:
        shutil.rmtree(work)


def test_helper_killed(helpers_started: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    def die(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(sink, "_carry_out", die)
    work = tempfile.mkdtemp()
    try:
        with pytest.raises(FsError) as e:
            restore_file(nar_bytes(events_of(mixed_tree())), work, 2)
        assert "a helper process ended with signal 9" in str(e.value)
        assert os.listdir(work) == ["in.nar"]
    finally:
        shutil.rmtree(work)


def test_no_split_when_it_cannot_pay_or_is_unsafe(monkeypatch: pytest.MonkeyPatch) -> None:
    counts: list[int] = []
    real = sink._Split.start

    def start(self: sink._Split) -> None:
        counts.append(1)
        real(self)

    monkeypatch.setattr(sink._Split, "start", start)
    data = nar_bytes(events_of(mixed_tree()))
    work = tempfile.mkdtemp()
    try:
        restore_file(data, work, 2)  # below SPLIT_MIN_BYTES
        shutil.rmtree(os.path.join(work, "r2"))
        sink.restore_events(NarReader(data), os.path.join(work, "r2"), jobs=2)  # a stream, below it
        shutil.rmtree(os.path.join(work, "r2"))
        monkeypatch.setattr(sink, "SPLIT_MIN_BYTES", 0)
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            restore_file(data, work, 2)  # another thread: never fork
        finally:
            stop.set()
            t.join()
        shutil.rmtree(os.path.join(work, "r2"))
        assert counts == []
        restore_file(data, work, 2)
        assert counts == [1]
    finally:
        shutil.rmtree(work)


def test_processes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTOOL_PROCESSES", "1")
    assert forked.helper_processes() == 1
    monkeypatch.setenv("NARTOOL_PROCESSES", "3")
    assert forked.helper_processes() == 3
    monkeypatch.setenv("NARTOOL_PROCESSES", "many")
    assert forked.helper_processes() == 1
    monkeypatch.delenv("NARTOOL_PROCESSES")
    assert 1 <= forked.helper_processes() <= forked.MAX_PROCESSES


def collision_nar(kind: str) -> bytes:
    """A NAR whose directory ``d`` goes to the helper (the root's big file makes the parent the
    busier one), with two names that only differ in case: both files (made by the helper), or a
    directory (made by the parent) and a file (the helper)."""
    inner: dict[bytes, Any] = {b"X": b"1", b"x": b"2"} if kind == "files" else {b"Sub": {}, b"sub": b"2"}
    return nar_bytes(events_of({b"a-big": os.urandom(BIG), b"d": inner}))


@pytest.mark.parametrize("kind", ["files", "dir-and-file"])
def test_helper_collision_on_case_insensitive_mount(ci_mount: Path, helpers_started: list[int],  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    kind: str) -> None:
    owners: dict[bytes, int] = {}
    real = sink._Split.entered

    def entered(self: sink._Split, name: bytes, outer: int) -> int:
        owners[name] = real(self, name, outer)
        return owners[name]

    monkeypatch.setattr(sink._Split, "entered", entered)
    nar = tmp_path / "in.nar"
    nar.write_bytes(collision_nar(kind))
    with open(nar, "rb") as f, pytest.raises(FsError) as e:
        sink.restore_events(NarReader(f), ci_mount / "out", jobs=2)
    assert helpers_started == [2] and owners[b"d"] == 1
    assert e.value.rule == "exists" and e.value.path in (b"d/x", b"d/sub"), e.value
    assert os.listdir(ci_mount) == []


def test_helper_reports_its_error_fields() -> None:
    err = NarError("bad thing", offset=8, expected=b"x" * 10_000, got=object(), path=b"a/b", rule="token")
    back = forked.reported(forked.report(err), 1 << 8)
    assert type(back) is NarError and back.rule == "token" and back.offset == 8 and back.path == b"a/b"
    assert back.expected == b"x" * 4096 and isinstance(back.got, str)
    other = forked.reported(forked.report(MemoryError("no room")), 1 << 8)
    assert isinstance(other, FsError) and "MemoryError: no room" in str(other)
    assert "status 3" in str(forked.reported(b"", 3 << 8))
    assert "status 1" in str(forked.reported(b"garbled", 1 << 8))
    assert isinstance(forked.reported(b"garbled", 1 << 8), NartoolError)


def test_cli_split_restore_as_nix(tmp_path: Path) -> None:
    """Through the CLI, a NAR big enough to split, from stdin (a file) and as an argument:
    the restored tree hashes as Nix hashes the original."""
    if shutil.which("nix-store") is None:
        pytest.skip("needs nix-store (Nix 2.8)")
    src = tmp_path / "src"
    source_tree(src, 10, 60, 200, 1 << 20)
    nar = tmp_path / "src.nar"
    with open(nar, "wb") as f:
        subprocess.run(["nix-store", "--dump", str(src)], stdout=f, check=True, env=nix_env())
    assert nar.stat().st_size > sink.SPLIT_MIN_BYTES
    want = nix_hash(src)
    for how in ("stdin", "arg"):
        dest = tmp_path / f"out-{how}"
        env = {"NARTOOL_PROCESSES": "2"}
        if how == "stdin":
            with open(nar, "rb") as f:
                r = subprocess.run(cli_argv("nar", "restore", str(dest)), stdin=f, capture_output=True,
                                   env=cli_env(env))
        else:
            r = run_cli("nar", "restore", str(dest), str(nar), env=env)
        assert r.returncode == 0, r.stderr
        assert nix_hash(dest) == want


def test_copy_range_falls_back_to_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "src"
    src.write_bytes(b"x" * 7 + data)

    def refused(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    with open(src, "rb") as f:
        for copy in (None, refused):
            if copy is not None:
                monkeypatch.setattr(os, "copy_file_range", copy)
            out = tmp_path / f"out-{copy is None}"
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                sink._copy_range(f.fileno(), 7, len(data), fd)
            finally:
                os.close(fd)
            assert out.read_bytes() == data
        fd = os.open(tmp_path / "short", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with pytest.raises(OSError, match="shorter"):
                sink._copy_range(f.fileno(), 7, len(data) + 1, fd)
        finally:
            os.close(fd)


def test_split_restore_to_another_filesystem(helpers_started: list[int], tmp_path: Path) -> None:
    """The NAR on one filesystem, the tree made on another (the helper's copy_file_range may be
    refused across them: it reads and writes then)."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    data = nar_bytes(events_of(mixed_tree()))
    (tmp_path / "in.nar").write_bytes(data)
    work = tempfile.mkdtemp(dir=other)
    try:
        with open(tmp_path / "in.nar", "rb") as f:
            sink.restore_events(NarReader(f), os.path.join(work, "r"), jobs=2)
        assert helpers_started == [2]
        one = tree_state(restore_file(data, str(tmp_path), 1))
        assert tree_state(os.path.join(work, "r")) == one
    finally:
        shutil.rmtree(work)


_INTERRUPTED = r"""
import os, sys, time
import nartool.fs.sink as sink
from nartool.nar.reader import NarReader
sink.SPLIT_MIN_BYTES = 0
real = sink._carry_out
def slow(*args):
    print("helper", os.getpid(), flush=True)
    time.sleep(60)
sink._carry_out = slow
real_send = sink._Split.send
def send(self, q):
    real_send(self, q)
    time.sleep(0.01)
sink._Split.send = send
print("parent", os.getpid(), flush=True)
with open(sys.argv[1], "rb") as f:
    sink.restore_events(NarReader(f), sys.argv[2], jobs=2)
"""


def test_interrupt_of_the_process_group(tmp_path: Path) -> None:
    """Ctrl-C reaches the parent and the helper: nothing is left, no process either."""
    import time

    (tmp_path / "in.nar").write_bytes(nar_bytes(events_of(mixed_tree())))
    p = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, str(tmp_path / "in.nar"), str(tmp_path / "r")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), start_new_session=True)
    assert p.stdout is not None
    pids = {}
    for _ in range(2):
        who, pid = p.stdout.readline().split()
        pids[who] = int(pid)
    time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGINT and b"KeyboardInterrupt" in err  # (Python ends by the signal)
    assert os.listdir(tmp_path) == ["in.nar"]
    with pytest.raises(ProcessLookupError):
        os.kill(pids[b"helper"], 0)


_NO_SPACE = r"""
import json, os, sys
import nartool.fs.sink as sink
from nartool.errors import NartoolError
from nartool.nar.reader import NarReader
sink.SPLIT_MIN_BYTES = 0
starts = []
real = sink._Split.start
def start(self):
    real(self)
    starts.append(len(self.pids))
sink._Split.start = start
dest = os.path.join(sys.argv[2], "out")
try:
    with open(sys.argv[1], "rb") as f:
        sink.restore_events(NarReader(f), dest, jobs=2)
    out = {"ok": True}
except NartoolError as e:
    out = {"ok": False, "error": str(e), "rule": e.rule}
out["left"] = os.listdir(sys.argv[2])
out["starts"] = starts
print(json.dumps(out))
"""


def test_no_space_left_leaves_nothing(tmp_path: Path) -> None:
    """A filesystem that fills up during a split restore (a 2 MiB tmpfs, in a mount namespace of
    the test's own): an error naming the cause, whichever process met it, and nothing left."""
    import json

    from .conftest import IS_ROOT, require

    require("ROOT", IS_ROOT and shutil.which("unshare") is not None,
            "needs root (and unshare) to mount a small tmpfs in a mount namespace of its own")
    tree = {b"d%02d" % d: {b"f%03d" % i: os.urandom(2000 + i) for i in range(60)} for d in range(40)}
    nar = tmp_path / "in.nar"
    nar.write_bytes(nar_bytes(events_of(tree)))
    assert nar.stat().st_size > 4 << 20
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs -o size=2m tmpfs "$1" && exec "$0" -c "$2" "$3" "$1"',
                        sys.executable, str(small), _NO_SPACE, str(nar)],
                       capture_output=True, env=cli_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["starts"] == [2]
    assert not out["ok"] and "No space left" in out["error"] and out["rule"] == "io", out
    assert out["left"] == []


@pytest.mark.parametrize("due", ["0", "3000", "150000", "in-flat"])
@pytest.mark.parametrize("jobs", [2, 3])
def test_split_from_adribble(helpers_started: list[int], monkeypatch: pytest.MonkeyPatch, due: str,
                             jobs: int) -> None:
    """From a stream (no file to read contents back from), small contents come with the orders
    and big files are made by the parent; the split starts once SPLIT_MIN_BYTES were read, at
    the next directory or the next EVERY files, with the helpers in the directory the parent is
    in: the same tree as one process."""
    monkeypatch.setattr(sink, "EVERY", 64)
    monkeypatch.setattr(reader_module, "EVERY", 64)
    tree = mixed_tree()
    tree[b"m-flat"] = {b"f%04d" % i: b"x" * (i % 300) for i in range(500)}
    data = nar_bytes(events_of(tree))
    # "in-flat": due inside m-flat, where no directory follows for a while: the split starts at
    # the next EVERY files, inside that directory
    monkeypatch.setattr(sink, "SPLIT_MIN_BYTES", data.index(b"m-flat") + 20_000 if due == "in-flat" else int(due))
    work = tempfile.mkdtemp()
    try:
        one = tree_state(restore_file(data, work, 1))
        for step in (1 << 16, 777):
            dest = os.path.join(work, f"s{step}")
            sink.restore_events(NarReader(dribble(data, step)), dest, jobs=jobs)
            assert tree_state(dest) == one
        assert helpers_started == [jobs, jobs]
    finally:
        shutil.rmtree(work)


def test_small_stream_never_forks(helpers_started: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink, "SPLIT_MIN_BYTES", 1 << 30)
    data = nar_bytes(events_of(mixed_tree()))
    work = tempfile.mkdtemp()
    try:
        sink.restore_events(NarReader(dribble(data, 1 << 16)), os.path.join(work, "r"), jobs=2)
        assert helpers_started == []
    finally:
        shutil.rmtree(work)


@pytest.mark.parametrize("damage", ["truncate", "padding"])
def test_stream_damage_after_the_split_leaves_nothing(helpers_started: list[int], damage: str) -> None:
    data = damaged(damage)
    work = tempfile.mkdtemp()
    try:
        with pytest.raises(NarError) as e:
            sink.restore_events(NarReader(dribble(data, 4096)), os.path.join(work, "r"), jobs=2)
        assert helpers_started == [2]
        assert e.value.rule == DAMAGE_RULES[damage]
        assert os.listdir(work) == []
    finally:
        shutil.rmtree(work)


def test_cli_split_restore_from_a_pipe(tmp_path: Path) -> None:
    """Through the CLI, a NAR piped in (cat | nartool nar restore): as Nix restores it."""
    if shutil.which("nix-store") is None:
        pytest.skip("needs nix-store (Nix 2.8)")
    src = tmp_path / "src"
    source_tree(src, 12, 80, 150, 700_000)
    nar = subprocess.run(["nix-store", "--dump", str(src)], capture_output=True, check=True, env=nix_env()).stdout
    assert len(nar) > sink.SPLIT_MIN_BYTES
    r = subprocess.run(cli_argv("nar", "restore", str(tmp_path / "out")), input=nar, capture_output=True,
                       env=cli_env({"NARTOOL_PROCESSES": "2"}))
    assert r.returncode == 0, r.stderr
    subprocess.run(["nix-store", "--restore", str(tmp_path / "nix")], input=nar, check=True, env=nix_env())
    assert nix_hash(tmp_path / "out") == nix_hash(tmp_path / "nix")


def test_split_restore_of_current_nix_dump(tmp_path: Path) -> None:
    """Current Nix's NAR (nix-store --dump of Nix 2.26), restored split from a file and from a
    pipe, hashes as current Nix hashes the original."""
    from .test_store_conformance import MODERN_NIX, modern_nix_store

    modern_store = str(modern_nix_store(tmp_path))
    assert MODERN_NIX is not None
    src = tmp_path / "src"
    source_tree(src, 12, 80, 150, 700_000)
    nar = tmp_path / "src.nar"
    with open(nar, "wb") as f:
        subprocess.run([modern_store, "--dump", str(src)], stdout=f, check=True, env=nix_env())
    assert nar.stat().st_size > sink.SPLIT_MIN_BYTES
    want = nix_hash(src, (*MODERN_NIX.split(), "nix-hash"))
    env = cli_env({"NARTOOL_PROCESSES": "2"})
    r = subprocess.run(cli_argv("nar", "restore", str(tmp_path / "from-file"), str(nar)), capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cli_argv("nar", "restore", str(tmp_path / "from-pipe")), input=nar.read_bytes(),
                       capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    assert nix_hash(tmp_path / "from-file") == want == nix_hash(tmp_path / "from-pipe")
