"""Fault injection on the local store, with real processes.

* ``nartool store add`` / ``store import`` children are SIGKILLed at random moments; after each
  kill the store must verify (ours and real ``nix-store --verify --check-contents``), nothing may
  be registered with incomplete files (an import is all or nothing), the same command must then
  succeed, and a GC must leave exactly the valid paths behind (no ``*-nartool-tmp`` names,
  unregistered objects, stale ``.lock`` files or temp-root files of dead processes);
* SIGINT / SIGTERM mid-import: exit 130, nothing registered partially, nothing left over;
* malformed export streams through the CLI: one-line ``error: …`` with the byte offset, no
  traceback, nothing registered, no new store entries; ``add_nar`` with a wrong hash or size;
* invalid store path arguments on every CLI command that takes paths.

The kill loops run under a time budget (``NARTOOL_FAULT_BUDGET`` seconds each, default 8) and
print their random seed (set ``NARTOOL_FAULT_SEED`` to replay one run).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nartool.errors import NarError, StoreError
from nartool.fs.source import dump_events
from nartool.hashes import Hash
from nartool.nar.format import enc_str, u64
from nartool.nar.reader import NarReader
from nartool.nar.writer import write_nar
from nartool.store import export as X
from nartool.store.gc import add_indirect_root, collect_garbage
from nartool.store.local import LocalStore
from nartool.store.paths import make_fixed_output_path, make_store_path
from nartool.store.signing import SecretKey
from nartool.store.types import PathInfo

from . import helpers
from .conftest import NIX_STORE
from .helpers import cli_argv, nix_env
from .narbuild import dir_, entry, link, nar, reg

STORE_DIR = "/nix/store"
BUDGET = float(os.environ.get("NARTOOL_FAULT_BUDGET", "8"))
SEED = int(os.environ.get("NARTOOL_FAULT_SEED", "0")) or random.randrange(1, 1 << 30)


# -- helpers shared with test_store_concurrency -------------------------------------------------


def cli(root: Path | str, *args: str) -> list[str]:
    return cli_argv("--store", root, "store", *args)


def run_cli(root: Path | str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return helpers.run_cli("--store", root, "store", *args, text=True, timeout=timeout)


def store_entries(root: Path | str) -> set[str]:
    """Names in ROOT/nix/store, except Nix's ``.links`` hard-link pool."""
    return set(os.listdir(os.path.join(root, "nix", "store"))) - {".links"}


def base(path: str) -> str:
    return path.rsplit("/", 1)[1]


def fake_path(tag: str, name: str) -> str:
    """An input-addressed-looking store path (its hash is not derived from the contents)."""
    return make_store_path("output:out", Hash("sha256", hashlib.sha256(tag.encode()).digest()), name, STORE_DIR)


@dataclass
class Closure:
    """A closure of made-up paths (dependency order) with their NARs and references."""

    paths: list[str]
    refs: dict[str, list[str]]
    nars: dict[str, bytes]
    hashes: dict[str, Hash] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hashes = {p: Hash("sha256", hashlib.sha256(n).digest()) for p, n in self.nars.items()}

    @property
    def top(self) -> str:
        return self.paths[-1]

    def record(self, p: str, *, refs: Iterable[str] | None = None, path: str | None = None) -> bytes:
        return b"".join(bytes(c) for c in X.record_chunks(path or p, self.refs[p] if refs is None else refs,
                                                             None, [self.nars[p]]))

    def stream(self, paths: Sequence[str] | None = None) -> bytes:
        return b"".join(self.record(p) for p in (paths or self.paths)) + X.end_chunk()


def make_closure(tag: str, n: int, files: int, rng: random.Random, *, max_size: int = 4096,
                 shared: Closure | None = None) -> Closure:
    """``n`` paths, each referring to the previous one and a random earlier one (sometimes to
    itself, and, with ``shared``, to that closure's top, whose paths then come first)."""
    paths = list(shared.paths) if shared else []
    refs = dict(shared.refs) if shared else {}
    nars = dict(shared.nars) if shared else {}
    first = len(paths)
    for i in range(n):
        p = fake_path(f"{tag}-{i}", f"{tag}-p{i}")
        r: set[str] = set()
        if i:
            r.add(paths[-1])
            r.add(paths[first + rng.randrange(i)])
        elif shared:
            r.add(shared.top)
        if rng.random() < 0.2:
            r.add(p)
        ents = [entry(b"bin", dir_(entry(b"run", reg(b"#!/bin/sh\nexit 0\n" + p.encode(), executable=True))))]
        for k in range(files):
            size = rng.choice((0, 1, 7, 8, 100, rng.randrange(max_size + 1)))
            ents.append(entry(b"f%05d" % k, reg(rng.randbytes(size))))
        ents.append(entry(b"link", link((min(r) if r else p).encode())))
        paths.append(p)
        refs[p] = sorted(r)
        nars[p] = nar(dir_(*ents))
    return Closure(paths, refs, nars)


def make_tree(root: Path, dirs: int, files: int, rng: random.Random) -> None:
    for d in range(dirs):
        sub = root / f"d{d:03d}"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub / f"f{f:04d}").write_bytes(rng.randbytes(rng.choice((0, 3, 100, 1000, 5000))))
        os.symlink(f"f{0:04d}", sub / "ln")
        os.chmod(sub / f"f{0:04d}", 0o755)


def tree_path(tree: Path) -> tuple[str, Hash]:
    h = hashlib.sha256()
    for c in write_nar(dump_events(tree)):
        h.update(c)
    nh = Hash("sha256", h.digest())
    return make_fixed_output_path(tree.name, nh, recursive=True, store_dir=STORE_DIR), nh


def nix_verify(root: Path | str) -> None:
    """Real ``nix-store --verify --check-contents`` on ROOT must pass (skipped without Nix,
    unless NARTOOL_REQUIRE_NIX=1)."""
    if NIX_STORE is None:
        if os.environ.get("NARTOOL_REQUIRE_NIX") == "1":
            pytest.fail("nix-store not found (NARTOOL_REQUIRE_NIX=1)")
        return
    r = subprocess.run([NIX_STORE, "--store", os.fspath(root), "--verify", "--check-contents"],
                       capture_output=True, text=True, timeout=120, env=nix_env())
    assert r.returncode == 0, f"nix-store --verify failed: {r.stderr}"
    assert "modified" not in r.stderr and "error" not in r.stderr, r.stderr


def check_consistent(root: Path | str, expected: dict[str, Hash]) -> set[str]:
    """Every registered path verifies, and those in ``expected`` carry the expected NAR hash
    (so none was registered with partial contents). Returns the valid paths."""
    with LocalStore(root) as st:
        problems = st.verify(check_contents=True)
        valid = set(st.all_paths())
        for p in valid & expected.keys():
            assert st.path_info(p).nar_hash == expected[p], p
    assert problems == []
    nix_verify(root)
    return valid


def gc_clean(root: Path | str) -> set[str]:
    """Collect garbage; then the store dir holds exactly the valid paths and no temp-root file of
    a dead process remains. Returns the valid paths."""
    with LocalStore(root) as st:
        res = collect_garbage(st)
        valid = set(st.all_paths())
    assert store_entries(root) == {base(p) for p in valid}, res.problems
    assert os.listdir(os.path.join(root, "nix", "var", "nix", "temproots")) == []
    return valid


def wait_for_tmp(root: Path | str, proc: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    """Poll until a ``*-nartool-tmp`` entry appears (the child started restoring)."""
    d = os.path.join(root, "nix", "store")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if any(n.endswith("-nartool-tmp") for n in os.listdir(d)):
                return True
        except FileNotFoundError:  # the child has not created the store yet
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    return False


def calibrate(tmp: Path, args: Sequence[str], runs: int = 2) -> tuple[float, float]:
    """Uninterrupted runs of ``nartool store ARGS`` into fresh stores: the fastest (seconds to the
    first temporary entry, seconds of work after it) — the first run is often slowed by a cold cache."""
    best = (float("inf"), float("inf"))
    for i in range(runs):
        root = tmp / f"cal{i}"
        t0 = time.monotonic()
        p = subprocess.Popen(cli(root, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_for_tmp(root, p)
        t1 = time.monotonic()
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        best = (min(best[0], t1 - t0), min(best[1], time.monotonic() - t1))
    return best


def kill_at_random(root: Path, argv: list[str], rng: random.Random, startup: float, work: float) -> tuple[int, str]:
    """Start ``argv`` and SIGKILL it: a quarter of the time at a random delay from the start
    (startup included), otherwise at a random moment after it began restoring."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if rng.random() < 0.25:
        how = "from-start"
        time.sleep(rng.uniform(0, startup + work * 1.2))
    else:
        how = "mid-work"
        wait_for_tmp(root, p)
        time.sleep(rng.uniform(0, work * 1.1))
    p.kill()
    return p.wait(timeout=30), how


def seed_store(root: Path, keep: Path) -> str:
    """A store holding one rooted path (that every GC must keep)."""
    with LocalStore(root) as st:
        info = st.add_text("kept.txt", b"keep me\n")
        add_indirect_root(st, os.fspath(keep), info.path)
    return info.path


# -- SIGKILL loops ------------------------------------------------------------------------------


def kills(root: Path, argv: list[str], rng: random.Random, startup: float, work: float,
          kept: str) -> Iterator[tuple[int, str, set[str]]]:
    """SIGKILL ``argv`` at random moments: at least 6 times, more while ``BUDGET`` lasts, at most
    20. Yields ``(exit status, how it was killed, store entries left besides kept's)``."""
    deadline = time.monotonic() + BUDGET
    n = 0
    while n < 20 and (n < 6 or time.monotonic() < deadline):
        n += 1
        rc, how = kill_at_random(root, argv, rng, startup, work)
        yield rc, how, store_entries(root) - {base(kept)}


def rooted_then_collected(root: Path, tmp_path: Path, top: str, live: set[str], kept: str) -> None:
    """Rooting ``top`` keeps exactly ``live`` through a collection; unrooted, only ``kept`` stays."""
    link_ = tmp_path / "result"
    with LocalStore(root) as st:
        add_indirect_root(st, os.fspath(link_), top)
    assert gc_clean(root) == live
    link_.unlink()
    assert gc_clean(root) == {kept}


def test_sigkill_during_add(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    tree = tmp_path / "tree"
    make_tree(tree, 30, 100, rng)  # 3,000 files in 30 dirs, symlinks, executables
    want, want_hash = tree_path(tree)
    expected = {want: want_hash}
    startup, work = calibrate(tmp_path, ["add", os.fspath(tree)])
    root = tmp_path / "store"
    kept = seed_store(root, tmp_path / "kept")
    argv = cli(root, "add", os.fspath(tree))
    stats: dict[str, int] = {}
    for rc, how, leftovers in kills(root, argv, rng, startup, work, kept):
        valid = check_consistent(root, expected)
        assert valid <= {kept, want}
        outcome = ("registered" if want in valid else "leftovers" if leftovers else "clean") + f"/{how}/rc={rc}"
        stats[outcome] = stats.get(outcome, 0) + 1
        r = run_cli(root, "add", os.fspath(tree))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want
        with LocalStore(root) as st:
            assert st.path_info(want).nar_hash == want_hash
        rooted_then_collected(root, tmp_path, want, {kept, want}, kept)
    print(f"add: startup {startup:.3f}s work {work:.3f}s; {sum(stats.values())} kills: {stats}")
    assert any(k.startswith("leftovers") for k in stats), f"no kill interrupted the work: {stats}"


def test_sigkill_during_import(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    print(f"seed {SEED + 1}")
    clo = make_closure("kill", 25, 100, rng)  # 2,500 files in 25 paths
    stream = tmp_path / "closure.export"
    stream.write_bytes(clo.stream())
    if NIX_STORE is not None:  # the fixture itself is a stream real Nix accepts
        with open(stream, "rb") as f:
            r0 = subprocess.run([NIX_STORE, "--store", os.fspath(tmp_path / "nixcal"), "--import"], stdin=f,
                                capture_output=True, text=True, timeout=120, env=nix_env())
        assert r0.returncode == 0, r0.stderr
        assert r0.stdout.split() == clo.paths
    startup, work = calibrate(tmp_path, ["import", os.fspath(stream)])
    root = tmp_path / "store"
    kept = seed_store(root, tmp_path / "kept")
    argv = cli(root, "import", os.fspath(stream))
    everything = {kept, *clo.paths}
    stats: dict[str, int] = {}
    for rc, how, leftovers in kills(root, argv, rng, startup, work, kept):
        valid = check_consistent(root, clo.hashes)
        assert valid in ({kept}, everything), "an import must be all or nothing"
        outcome = ("registered" if valid == everything else "leftovers" if leftovers else "clean") + \
            f"/{how}/rc={rc}"
        stats[outcome] = stats.get(outcome, 0) + 1
        r = run_cli(root, "import", os.fspath(stream))
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == clo.paths
        with LocalStore(root) as st:
            assert {p: st.path_info(p).nar_hash for p in clo.paths} == clo.hashes
        rooted_then_collected(root, tmp_path, clo.top, everything, kept)
    print(f"import: startup {startup:.3f}s work {work:.3f}s; {sum(stats.values())} kills: {stats}")
    assert any(k.startswith("leftovers") for k in stats), f"no kill interrupted the work: {stats}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_import(tmp_path: Path, sig: signal.Signals) -> None:
    rng = random.Random(SEED + int(sig))
    clo = make_closure("intr", 30, 200, rng)
    stream = tmp_path / "closure.export"
    stream.write_bytes(clo.stream())
    _, work = calibrate(tmp_path, ["import", os.fspath(stream)])
    root = tmp_path / "store"
    kept = seed_store(root, tmp_path / "kept")
    everything = {kept, *clo.paths}
    interrupted = 0
    for _ in range(4):
        p = subprocess.Popen(cli(root, "import", os.fspath(stream)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert wait_for_tmp(root, p)
        time.sleep(rng.uniform(0, work * 0.5))
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        valid = check_consistent(root, clo.hashes)
        assert valid in ({kept}, everything), "an import must be all or nothing"
        assert b"Traceback" not in err
        if p.returncode == 130:
            interrupted += 1
            assert err.decode().strip() in ("interrupted", "aborted")  # click reports ^C as "Abort"
        else:  # finished before the signal arrived
            assert p.returncode == 0, err
            assert valid == everything
        # the interrupted import cleaned up after itself: no leftovers, no lock files
        assert store_entries(root) == {base(x) for x in valid}
        if valid == everything:
            with LocalStore(root) as st:
                collect_garbage(st, paths=clo.paths)
    assert interrupted >= 2


# -- malformed export streams ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Closure:
    return make_closure("bad", 3, 5, random.Random(7), max_size=300)


def _trailer(path: str, refs: Sequence[str] = (), deriver: str = "", *, sig: int = 0,
             raw_path: bytes | None = None) -> bytes:
    out = u64(X.EXPORT_MAGIC) + (raw_path if raw_path is not None else enc_str(path.encode()))
    out += u64(len(refs)) + b"".join(enc_str(r.encode()) for r in refs) + enc_str(deriver.encode()) + u64(sig)
    return out


def _offset_in_nar(data: bytes) -> int:
    try:
        for ev in NarReader(data):
            for _ in getattr(ev, "chunks", ()):
                pass
    except NarError as e:
        assert e.offset is not None
        return e.offset
    raise AssertionError("NAR is valid")


def _case(name: str, c: Closure) -> tuple[bytes, int | None, str]:
    """(stream, expected byte offset or None, a word expected in the message)."""
    p0, p1, _ = c.paths
    r0 = c.record(p0)
    full = c.stream()
    nar1 = c.nars[p1]
    at1 = len(r0) + 8  # where record 2's NAR starts
    tr1 = at1 + len(nar1)  # where its trailer starts
    if name == "bad-marker":
        return u64(2) + full[8:], 0, "marker"
    if name == "bad-marker-later":
        return r0 + u64(7) + full[len(r0) + 8 :], len(r0), "marker"
    if name == "bad-nixe-magic":
        return full[:tr1] + u64(0x4558494F) + full[tr1 + 8 :], tr1, "magic"
    if name == "bad-nar-magic":
        return r0 + u64(1) + enc_str(b"nix-archive-2") + nar1[24:] + full[tr1:], at1, "magic"
    if name == "truncated-nar":
        cut = at1 + len(nar1) // 2
        return full[:cut], cut, "end"
    if name == "truncated-trailer":
        cut = tr1 + 8 + 20
        return full[:cut], cut, "truncated"
    if name == "no-end-marker":
        return full[:-8], len(full) - 8, "end marker"
    if name == "path-outside-store":
        bad = "/tmp/store/" + base(p1)
        return r0 + u64(1) + nar1 + _trailer(bad) + X.end_chunk(), tr1 + 8, "store path"
    if name == "path-bad-chars":
        bad = p1[:-2] + " !"
        return r0 + u64(1) + nar1 + _trailer(bad) + X.end_chunk(), tr1 + 8, "store path"
    if name == "path-too-long":
        bad = p1[: len(STORE_DIR) + 34] + "x" * 212  # "<store>/<32-char hash>-" + 212 chars
        return r0 + u64(1) + nar1 + _trailer(bad) + X.end_chunk(), tr1 + 8, "store path"
    if name == "reference-outside-store":
        return r0 + u64(1) + nar1 + _trailer(p1, ["/usr/lib/" + base(p0)]) + X.end_chunk(), tr1 + 8 + len(
            enc_str(p1.encode())) + 8, "reference"
    if name == "reference-not-valid":
        ghost = fake_path("ghost", "ghost")
        return r0 + c.record(p1, refs=[p0, ghost]) + X.end_chunk(), None, "reference is not valid"
    if name == "deriver-not-a-path":
        return r0 + u64(1) + nar1 + _trailer(p1, [p0], "not-a-drv") + X.end_chunk(), tr1 + 8 + len(
            enc_str(p1.encode())) + 8 + len(enc_str(p0.encode())), "deriver"
    if name == "padding-in-trailer":
        raw = bytearray(enc_str(p1.encode()))
        assert len(p1) % 8
        raw[-1] = 1
        return r0 + u64(1) + nar1 + _trailer(p1, raw_path=bytes(raw)) + X.end_chunk(), tr1 + 8, "padding"
    if name == "padding-in-nar":
        bad = bytearray(nar1)
        # the padding after the first non-empty file whose size is not a multiple of 8
        i = next(k for k in range(len(bad) - 16) if bad[k : k + 16] == enc_str(b"contents") and
                 int.from_bytes(bad[k + 16 : k + 24], "little") % 8)
        size = int.from_bytes(bad[i + 16 : i + 24], "little")
        bad[i + 24 + size] = 0xFF
        return r0 + u64(1) + bytes(bad) + full[tr1:], at1 + _offset_in_nar(bytes(bad)), "padding"
    if name == "bad-signature-marker":
        return r0 + u64(1) + nar1 + _trailer(p1, [p0], sig=5) + X.end_chunk(), len(r0) + len(
            c.record(p1, refs=[p0])) - 8, "signature"
    if name == "absurd-reference-count":
        t = u64(X.EXPORT_MAGIC) + enc_str(p1.encode()) + u64(1 << 40)
        return r0 + u64(1) + nar1 + t, tr1 + 8 + len(enc_str(p1.encode())), "reference count"
    raise AssertionError(name)


MALFORMED = ["bad-marker", "bad-marker-later", "bad-nixe-magic", "bad-nar-magic", "truncated-nar",
             "truncated-trailer", "no-end-marker", "path-outside-store", "path-bad-chars", "path-too-long",
             "reference-outside-store", "reference-not-valid", "deriver-not-a-path", "padding-in-trailer",
             "padding-in-nar", "bad-signature-marker", "absurd-reference-count"]


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_export_stream(tmp_path: Path, small: Closure, case: str) -> None:
    data, offset, word = _case(case, small)
    f = tmp_path / "bad.export"
    f.write_bytes(data)
    root = tmp_path / "store"
    kept = seed_store(root, tmp_path / "kept")
    before = store_entries(root)
    r = run_cli(root, "import", os.fspath(f))
    msg = one_line_error(r)
    assert word in msg, msg
    if offset is not None:
        assert f" at byte {offset} " in msg, (offset, msg)
    with LocalStore(root) as st:
        assert st.all_paths() == [kept]
    assert store_entries(root) == before


def test_malformed_fixture_is_otherwise_valid(tmp_path: Path, small: Closure) -> None:
    """The unmodified stream imports (so each case above fails for its own reason)."""
    f = tmp_path / "ok.export"
    f.write_bytes(small.stream())
    r = run_cli(tmp_path / "store", "import", os.fspath(f))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == small.paths
    check_consistent(tmp_path / "store", small.hashes)


@pytest.mark.parametrize("what", ["hash", "size", "truncated", "trailing-garbage-ok"])
def test_add_nar_checks(tmp_path: Path, small: Closure, what: str) -> None:
    p = small.paths[0]
    data = small.nars[p]
    h = small.hashes[p]
    size = len(data)
    if what == "hash":
        h = Hash("sha256", hashlib.sha256(b"other").digest())
    elif what == "size":
        size += 8
    elif what == "truncated":
        data = data[:-16]
    else:
        data = data + b"garbage"  # add_nar reads exactly one NAR
    root = tmp_path / "store"
    kept = seed_store(root, tmp_path / "kept")
    before = store_entries(root)
    with LocalStore(root) as st:
        info = PathInfo(p, h, size, frozenset(small.refs[p]))
        if what == "trailing-garbage-ok":
            st.add_nar(info, data)
            assert st.is_valid(p)
            return
        with pytest.raises((StoreError, NarError)) as ei:
            st.add_nar(info, data)
        assert ei.value.rule == {"hash": "hash-mismatch", "size": "size-mismatch", "truncated": "truncated"}[what]
        assert st.all_paths() == [kept]
    assert store_entries(root) == before


# -- invalid store path arguments -------------------------------------------------------------------

_H = "1" * 32
BAD_PATHS = {
    "bad-chars": f"{STORE_DIR}/{_H}-foo bar",
    "bad-char-tilde": f"{STORE_DIR}/{_H}-a~b",
    "too-long": f"{STORE_DIR}/{_H}-" + "x" * 212,
    "bad-hash-part": f"{STORE_DIR}/{'e' * 32}-foo",
    "outside-store": "/usr/local/" + f"{_H}-foo",
    "other-store-dir": f"/gnu/store/{_H}-foo",
}


def _commands(path: str, tmp: Path, key: Path) -> list[list[str]]:
    return [
        ["dump", path], ["ls", path], ["cat", path, "/x"], ["export", path], ["export", "-r", path],
        ["query", path], ["query", "--requisites", path], ["add-root", os.fspath(tmp / "lnk"), path],
        ["delete", path], ["sign", "--key-file", os.fspath(key), path],
    ]


def test_invalid_path_arguments(tmp_path: Path) -> None:
    root = tmp_path / "store"
    kept = seed_store(root, tmp_path / "kept")
    before = store_entries(root)
    key = tmp_path / "key.sec"
    key.write_text(SecretKey.generate("test-1").to_text())
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    bad_src = tmp_path / "a b"
    bad_src.mkdir()
    jobs: list[tuple[str, list[str]]] = []
    for kind, path in BAD_PATHS.items():
        for argv in _commands(path, tmp_path, key):
            jobs.append((kind, argv))
    for name in ("foo bar", "x" * 212, "a/b", "tab\tname", "é"):
        jobs.append(("add-name", ["add", "--name", name, os.fspath(src)]))
    jobs.append(("add-basename", ["add", os.fspath(bad_src)]))
    jobs.append(("add-flat-name", ["add", "--flat", "--name", "bad~name", os.fspath(src / "f")]))
    jobs.append(("root-in-store", ["add-root", os.fspath(root / "nix" / "store" / "lnk"), kept]))
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda j: run_cli(root, *j[1]), jobs))
    failures = []
    for (kind, argv), r in zip(jobs, results, strict=True):
        try:
            msg = one_line_error(r)
            assert any(w in msg for w in ("store path", "not in the store", "name", "inside the store")), msg
        except AssertionError as e:
            failures.append(f"{kind} {argv[:2]}: rc={r.returncode} {e} {r.stderr!r}")
    assert not failures, "\n".join(failures)
    with LocalStore(root) as st:
        assert st.all_paths() == [kept]
    assert store_entries(root) == before
    assert not (tmp_path / "lnk").exists()


def test_gc_removes_leftovers(tmp_path: Path) -> None:
    """Deterministic: temporaries, unregistered objects and stale locks (also of valid paths) go."""
    root = tmp_path / "store"
    kept = seed_store(root, tmp_path / "kept")
    d = root / "nix" / "store"
    (d / f"{_H}-nartool-tmp").mkdir()
    (d / f"{_H}-nartool-tmp" / "f").write_text("partial")
    os.chmod(d / f"{_H}-nartool-tmp", 0o555)
    (d / f"{'2' * 32}-unregistered").write_text("x")
    (d / f"{'3' * 32}-gone.lock").write_text("")
    (d / (base(kept) + ".lock")).write_text("")
    (d / "not-a-store-path").write_text("x")
    assert gc_clean(root) == {kept}


def test_path_lock_interrupted_anywhere_leaves_no_lock_file(tmp_path: Path) -> None:
    """An interrupt at any step of taking a path lock (here: raised from every line the lock
    code runs, one after the other) leaves neither a lock file nor a held lock."""
    import sys as _sys

    from nartool.store import locks

    phys = str(tmp_path / "p")
    lines: set[int] = set()

    def count(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == locks.__file__ and event == "line":
            lines.add(frame.f_lineno)
        return count

    _sys.settrace(count)
    try:
        locks.PathLock(phys).release()
    finally:
        _sys.settrace(None)
    assert lines
    for target in sorted(lines):
        state = {"pending": False, "fired": False}

        def interrupt(frame: Any, event: str, arg: Any, target: int = target,
                      state: dict[str, bool] = state) -> Any:
            # a signal sent when ``target`` is reached runs its handler at the first line at
            # which the signal is not blocked (signals_deferred holds it back)
            if event != "line" or state["fired"]:
                return interrupt
            if frame.f_code.co_filename == locks.__file__ and frame.f_lineno == target:
                state["pending"] = True
            if state["pending"] and signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, []):
                state["fired"] = True
                raise KeyboardInterrupt
            return interrupt

        lock = locks.PathLock(phys, acquire=False)
        _sys.settrace(interrupt)
        try:
            lock.acquire()
        except KeyboardInterrupt:
            pass
        finally:
            _sys.settrace(None)
        lock.release()  # what a caller's clean-up does with the object it kept
        assert not os.path.exists(phys + ".lock"), f"lock file left after an interrupt at line {target}"
        locks.PathLock(phys, wait=False).release()  # and nobody holds it
