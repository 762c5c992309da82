"""Several processes on one store at once, and the WAL under sustained load.

``test_concurrent_import_gc_roots``: two importers import (and add) overlapping closures, each
rooting what it imported with ``add_indirect_root`` right after (and leaving some unrooted, or
dropping old roots, to make garbage); a third process runs ``collect_garbage`` in a loop; a
fourth roots random valid paths (temp root first, as Nix does) and drops some of its roots. At
the end nothing is half-registered (``verify(check_contents=True)`` and real ``nix-store
--verify --check-contents``), every path still rooted by a link a worker reported is valid with
its whole closure, the GC really deleted things, and no worker hit an error.

``test_wal_stays_bounded``: long-lived reader connections doing short reads and writers doing
registration batches for a few seconds; the ``db.sqlite-wal`` size is sampled throughout and
must stay under a fixed bound while the database grows.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nartool.store.db import JOURNAL_SIZE_LIMIT, WAL_AUTOCHECKPOINT, StoreDB
from nartool.store.gc import add_indirect_root, collect_garbage
from nartool.store.local import LocalStore

from .test_store_faults import Closure, check_consistent, gc_clean, make_closure

REPO = Path(__file__).resolve().parent.parent
ACTIVE = float(os.environ.get("NARTOOL_STRESS_SECONDS", "7"))


def _spawn(role: str, cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); "
            "from tests.test_store_concurrency import worker; worker(sys.argv[2], json.loads(sys.argv[3]))")
    return subprocess.Popen([sys.executable, "-c", code, str(REPO), role, json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def worker(role: str, cfg: dict[str, Any]) -> None:
    """Entry point of the child processes; prints one JSON report on stdout."""
    rng = random.Random(cfg["seed"])
    root = cfg["root"]
    start = cfg["start"]
    while time.time() < start:  # start together
        time.sleep(0.005)
    deadline = start + cfg["seconds"]
    report: dict[str, Any] = {"role": role, "pid": os.getpid(), "errors": [], "ops": 0}
    if cfg.get("trace"):
        _trace(report)
    try:
        {"importer": _importer, "gc": _collector, "rooter": _rooter, "reader": _reader,
         "writer": _writer}[role](root, cfg, rng, deadline, report)
    except BaseException as e:  # noqa: BLE001 - reported to the test
        report["errors"].append(f"{type(e).__name__}: {e}")
    print(json.dumps(report))


def _trace(report: dict[str, Any]) -> None:
    """Record, for the timeline printed when a rooted path went missing: temp roots added (and
    whether a collector was told), temp-root files read by the collector, objects removed."""
    import nartool.store.gc as gcmod
    import nartool.store.locks as locks

    events: list[list[Any]] = []
    report["events"] = events
    orig_add, orig_tell, orig_read = locks.TempRoots.add, locks._tell_collector, locks.read_temp_roots
    orig_remove = LocalStore._remove_object

    def add(self: Any, path: str) -> None:
        t = time.time()
        orig_add(self, path)
        try:  # is the file written still the one at its name?
            linked = os.fstat(self._fd).st_ino == os.stat(os.path.join(self.dir, str(os.getpid()))).st_ino
        except OSError:
            linked = False
        events.append(["add", t, time.time(), linked, path])

    def tell(socket_path: str, path: str) -> bool:
        ok = orig_tell(socket_path, path)
        events.append(["tell", time.time(), ok, path])
        return ok

    def read(state_dir: str) -> tuple[set[str], list[str]]:
        t = time.time()
        roots, problems = orig_read(state_dir)
        events.append(["read", t, time.time(), sorted(roots)])
        return roots, problems

    def remove(self: Any, path: str) -> None:
        events.append(["remove", time.time(), path])
        orig_remove(self, path)

    locks.TempRoots.add = add  # type: ignore[method-assign]
    locks._tell_collector = tell
    gcmod.read_temp_roots = read  # type: ignore[assignment]
    LocalStore._remove_object = remove  # type: ignore[method-assign]


def _importer(root: str, cfg: dict[str, Any], rng: random.Random, deadline: float, report: dict[str, Any]) -> None:
    rooted: list[dict[str, Any]] = []
    report["rooted"] = rooted
    report["unrooted"] = 0
    n = 0
    while time.time() < deadline:
        n += 1
        link = os.path.join(cfg["links"], f"{cfg['name']}-{n}")
        t_open = time.time()
        with LocalStore(root) as st:  # a store per operation: its temp roots end with it
            if rng.random() < 0.8:
                stream = rng.choice(cfg["streams"])
                with open(stream["file"], "rb") as f:
                    paths = st.import_paths(f)
                if paths != stream["paths"]:
                    report["errors"].append(f"import returned {len(paths)} paths, expected {len(stream['paths'])}")
                top = stream["paths"][-1]
            else:
                top = st.add_path(rng.choice(cfg["sources"])).path
            if rng.random() < 0.3:
                report["unrooted"] += 1  # garbage, for the collector
            else:
                t_added = time.time()
                add_indirect_root(st, link, top)
                item = {"link": link, "path": top, "t_open": t_open, "t_added": t_added, "t_rooted": time.time()}
                rooted.append(item)
        if rooted and "t_closed" not in rooted[-1]:
            rooted[-1]["t_closed"] = time.time()
        while len(rooted) > cfg["keep"] or rooted and rng.random() < 0.2:
            # drop an old root: its paths may become garbage
            os.unlink(rooted.pop(rng.randrange(len(rooted)))["link"])
        report["ops"] += 1


def _collector(root: str, cfg: dict[str, Any], rng: random.Random, deadline: float, report: dict[str, Any]) -> None:
    report["deleted"] = 0
    report["problems"] = []
    report["runs"] = []  # [start, end, deleted paths]: the timeline shown when a check fails
    while time.time() < deadline:
        t0 = time.time()
        with LocalStore(root) as st:
            res = collect_garbage(st)
        report["runs"].append([t0, time.time(), res.deleted])
        report["deleted"] += len(res.deleted)
        report["problems"] += [p for p in res.problems if "still referenced" not in p]
        report["ops"] += 1
        time.sleep(rng.uniform(0, 0.05))


def _rooter(root: str, cfg: dict[str, Any], rng: random.Random, deadline: float, report: dict[str, Any]) -> None:
    rooted: list[dict[str, Any]] = []
    report["rooted"] = rooted
    n = 0
    while time.time() < deadline:
        with LocalStore(root) as st:
            paths = st.all_paths()
            if paths:
                p = rng.choice(paths)
                st.temp_root(p)  # protect it first, then check it is (still) valid
                if st.is_valid(p):
                    n += 1
                    link = os.path.join(cfg["links"], f"rooter-{n}")
                    add_indirect_root(st, link, p)
                    rooted.append({"link": link, "path": p})
        while len(rooted) > cfg["keep"] or rooted and rng.random() < 0.3:
            os.unlink(rooted.pop(rng.randrange(len(rooted)))["link"])
        report["ops"] += 1
        time.sleep(rng.uniform(0, 0.02))


def _reader(root: str, cfg: dict[str, Any], rng: random.Random, deadline: float, report: dict[str, Any]) -> None:
    db = StoreDB(os.path.join(root, "nix", "var", "nix", "db"))  # one long-lived connection
    try:
        known: list[str] = []
        while time.time() < deadline:
            if not known or rng.random() < 0.01:
                known = [p for p in (db.path_by_hash_part("/nix/store", c * 32 if c else "0" * 32)
                                     for c in "0123456789abcdfg") if p] or known
            for _ in range(50):
                if known:
                    p = rng.choice(known)
                    db.is_valid(p)
                    db.info(p)
                db.path_by_hash_part("/nix/store", "".join(rng.choice("0123456789") for _ in range(4)))
                report["ops"] += 1
    finally:
        db.close()


def _writer(root: str, cfg: dict[str, Any], rng: random.Random, deadline: float, report: dict[str, Any]) -> None:
    report["paths"] = 0
    with LocalStore(root) as st:
        k = 0
        prev: list[str] = []
        while time.time() < deadline:
            k += 1
            with st.batch():
                now: list[str] = []
                for i in range(cfg["batch"]):
                    data = f"{cfg['name']} batch {k} item {i} {rng.random()}\n".encode() * 4
                    refs = rng.sample(prev, min(2, len(prev)))
                    now.append(st.add_text(f"{cfg['name']}-{k}-{i}", data, refs).path)
            prev = now
            report["paths"] += len(now)
            report["ops"] += 1


def _finish(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[dict[str, Any]]:
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err.decode()
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    return reports


# -- the stress test --------------------------------------------------------------------------------


def _closures(rng: random.Random) -> list[Closure]:
    shared = make_closure("shared", 6, 8, rng, max_size=2000)
    return [make_closure(f"c{i}", 5, 8, rng, max_size=2000, shared=shared) for i in range(6)]


def test_concurrent_import_gc_roots(tmp_path: Path) -> None:
    seed = random.randrange(1, 1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    closures = _closures(rng)
    streams = []
    expected = {}
    for i, c in enumerate(closures):
        f = tmp_path / f"c{i}.export"
        f.write_bytes(c.stream())
        streams.append({"file": os.fspath(f), "paths": c.paths})
        expected.update(c.hashes)
    sources = []
    for i in range(3):
        d = tmp_path / f"src{i}"
        (d / "sub").mkdir(parents=True)
        for k in range(20):
            (d / "sub" / f"f{k}").write_bytes(rng.randbytes(rng.randrange(3000)))
        sources.append(os.fspath(d))
    root = tmp_path / "store"
    links = tmp_path / "links"
    links.mkdir()
    LocalStore(root).close()
    start = time.time() + 1.0
    common = {"root": os.fspath(root), "links": os.fspath(links), "start": start, "seconds": ACTIVE, "keep": 3,
              "trace": True}
    procs = [
        _spawn("importer", {**common, "name": "a", "seed": seed + 1, "streams": streams, "sources": sources}),
        _spawn("importer", {**common, "name": "b", "seed": seed + 2, "streams": streams[::-1], "sources": sources}),
        _spawn("gc", {**common, "seed": seed + 3}),
        _spawn("rooter", {**common, "seed": seed + 4}),
    ]
    reports = _finish(procs, ACTIVE + 60)
    for r in reports:
        print({k: (v if not isinstance(v, list) else len(v)) for k, v in r.items()})
    for r in reports:
        assert r["errors"] == [], r
    gc_rep = next(r for r in reports if r["role"] == "gc")
    assert gc_rep["problems"] == []
    assert gc_rep["ops"] >= 5 and gc_rep["deleted"] > 0, "the collector did not race with anything"
    assert all(r["ops"] >= 5 for r in reports)

    # nothing half-registered; contents intact; real Nix agrees
    valid = check_consistent(root, expected)
    # every path still rooted by a reported link is valid, with its closure
    closure_of = {c.top: c.paths for c in closures}
    with LocalStore(root) as st:
        for r in reports:
            for item in r.get("rooted", []):
                assert os.path.islink(item["link"])
                if item["path"] not in valid:
                    t0 = item.get("t_open", 0)
                    print("TIMELINE", json.dumps({
                        "item": {k: (v - t0 if k.startswith("t_") else v) for k, v in item.items()},
                        "deleted_by": [[r[0] - t0, r[1] - t0] for r in gc_rep["runs"] if item["path"] in r[2]],
                        "runs_near": [[r[0] - t0, r[1] - t0] for r in gc_rep["runs"] if abs(r[0] - t0) < 1]}))
                    for rep in reports:
                        for ev in rep.get("events", []):
                            if abs(ev[1] - t0) < 1 and (item["path"] in ev[-1] or ev[0] == "read"):
                                shown = [x - t0 if isinstance(x, float) else x for x in ev]
                                if ev[0] == "read":
                                    shown[-1] = item["path"] in ev[-1]
                                print("EVENT", rep["role"], rep["pid"], json.dumps(shown))
                assert item["path"] in valid, item
                assert set(closure_of.get(item["path"], [item["path"]])) <= valid
                assert set(st.closure([item["path"]])) <= valid
    # a last collection leaves exactly the rooted closures, and nothing else in the store dir
    live = gc_clean(root)
    rooted_paths = {i["path"] for r in reports for i in r.get("rooted", [])}
    with LocalStore(root) as st:
        assert live == set(st.closure(rooted_paths)) if rooted_paths else live == set()


# -- WAL ---------------------------------------------------------------------------------------------


def test_wal_stays_bounded(tmp_path: Path) -> None:
    """Readers on long-lived connections and batch writers for a few seconds, on a database that
    already holds 150,000 paths: the WAL file stays under a fixed bound, far below the size of the
    database, and does not grow with it.

    The bound: each commit is followed by a passive checkpoint, and SQLite checkpoints on its own
    every ``WAL_AUTOCHECKPOINT`` pages (1,000 × 4 KiB = 4 MiB). Short reads never pin old frames
    for long, so the WAL restarts from its beginning soon after each complete checkpoint, and its
    file stays about one checkpoint interval plus a batch or two (measured: ~2 MiB on an empty
    database, ~5-7 MiB on a 40 MiB one). We allow 4 MiB × 4 = 16 MiB, a quarter of
    ``JOURNAL_SIZE_LIMIT`` (64 MiB, what a larger WAL is cut back to), and half the database."""
    root = tmp_path / "store"
    db_dir = root / "nix" / "var" / "nix" / "db"
    with LocalStore(root) as st, st.db.transaction() as c:
        c.executemany("insert into ValidPaths (path, hash, registrationTime, narSize) values (?, ?, 1, 120)",
                      ((f"/nix/store/{i:032d}-pre{i}", "sha256:" + f"{i:064x}")
                       for i in range(150_000)))
    wal = db_dir / "db.sqlite-wal"
    page = 4096
    bound = 4 * WAL_AUTOCHECKPOINT * page
    assert bound <= JOURNAL_SIZE_LIMIT
    seconds = float(os.environ.get("NARTOOL_WAL_SECONDS", "5"))
    start = time.time() + 1.0
    common = {"root": os.fspath(root), "start": start, "seconds": seconds}
    procs = [
        _spawn("writer", {**common, "name": "w1", "seed": 1, "batch": 100}),
        _spawn("writer", {**common, "name": "w2", "seed": 2, "batch": 100}),
        _spawn("reader", {**common, "seed": 3}),
        _spawn("reader", {**common, "seed": 4}),
    ]
    samples: list[tuple[float, int, int]] = []
    while any(p.poll() is None for p in procs):
        t = time.time() - start
        try:
            w = wal.stat().st_size
        except FileNotFoundError:
            w = 0
        d = (db_dir / "db.sqlite").stat().st_size
        if t >= 0:
            samples.append((t, w, d))
        time.sleep(0.02)
    reports = _finish(procs, 60)
    for r in reports:
        assert r["errors"] == [], r
    written = sum(r.get("paths", 0) for r in reports)
    reads = sum(r["ops"] for r in reports if r["role"] == "reader")
    assert samples
    max_wal = max(s[1] for s in samples)
    db_end = samples[-1][2]
    print(f"\nWAL: {written} paths registered in {seconds:.0f}s by 2 writers (batches of 100), {reads} short reads "
          f"by 2 readers; db {samples[0][2] / 2**20:.2f} -> {db_end / 2**20:.2f} MiB; "
          f"WAL max {max_wal / 2**20:.2f} MiB (bound {bound / 2**20:.0f} MiB)")
    for s in samples[:: max(1, len(samples) // 10)]:
        print(f"  t={s[0]:5.2f}s wal={s[1] / 2**20:6.2f} MiB db={s[2] / 2**20:6.2f} MiB")
    assert written >= 1000 and reads >= 1000, "too little load to say anything"
    assert max_wal <= bound
    assert max_wal <= db_end / 2, "the WAL is as large as the database"


# -- temp-root files ----------------------------------------------------------------------------------

_OWNER = """
import sys
from nartool.store.local import LocalStore
root, x, y = sys.argv[1:4]
st = LocalStore(root)
st.temp_root(x)
print("ready", flush=True)
sys.stdin.readline()
st.close()  # unlinks temproots/<pid> ...
st = LocalStore(root)
st.temp_root(y)  # ... and a new file of the same name holds the new store's roots
print("reopened", flush=True)
sys.stdin.readline()
"""


def test_temp_roots_file_recreated_during_scan(tmp_path: Path, monkeypatch: Any) -> None:
    """A collector that opened a process's temp-roots file just before the process closed its
    store and opened another (same pid, same file name) must not delete the new file when it finds
    the old one unlocked: the new file's roots would become invisible to later collections."""
    import fcntl

    import nartool.store.locks as locks

    root = tmp_path / "store"
    LocalStore(root).close()
    state = os.fspath(root / "nix" / "var" / "nix")
    x, y = "/nix/store/" + "1" * 32 + "-x", "/nix/store/" + "2" * 32 + "-y"
    child = subprocess.Popen([sys.executable, "-c", _OWNER, os.fspath(root), x, y], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        real_flock = fcntl.flock
        fired = []

        def flock(fd: int, op: int) -> None:
            if op == fcntl.LOCK_EX | fcntl.LOCK_NB and not fired:  # the collector probing the owner's file
                fired.append(fd)
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                assert child.stdout.readline().strip() == "reopened"
            real_flock(fd, op)

        monkeypatch.setattr(locks.fcntl, "flock", flock)
        first, _ = locks.read_temp_roots(state)
        monkeypatch.setattr(locks.fcntl, "flock", real_flock)
        assert fired, "the collector did not probe the owner's file"
        assert y not in first  # it was announced over the gc socket in a real collection
        assert os.path.exists(os.path.join(state, "temproots", str(child.pid)))
        second, _ = locks.read_temp_roots(state)
        assert y in second and x not in second
    finally:
        if child.stdin is not None:
            child.stdin.write("done\n")
            child.stdin.flush()
        child.wait(timeout=30)


# -- temp roots: the ordering that closes the told-then-written race ---------------------------------


def test_temp_root_is_on_file_before_a_collector_is_told(tmp_path: Path) -> None:
    """A collector that is told about a temp root may finish at once, and the next one reads the
    temp-roots files when it starts: the path must already be in the file by the time the first
    one hears of it. (Written after telling, a busy machine once let a collector that started in
    between delete a path that was being added.)"""
    import fcntl
    import socket
    import threading

    from nartool.store.locks import TempRoots, read_temp_roots

    state = tmp_path / "state"
    (state / "gc-socket").mkdir(parents=True)
    gc_lock = os.open(state / "gc.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(gc_lock, fcntl.LOCK_EX)  # "a collector is running"
    seen_on_file: list[bool] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(state / "gc-socket" / "socket"))
    server.listen(1)

    def collector() -> None:
        conn, _ = server.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(4096)
            # what a collector starting right now would find on file
            held = {line.decode().strip()} <= _file_roots(state)
            seen_on_file.append(held)
            conn.sendall(b"1")

    def _file_roots(d: Path) -> set[str]:
        return {x.decode() for f in (d / "temproots").iterdir() for x in f.read_bytes().split(b"\0") if x}

    t = threading.Thread(target=collector)
    t.start()
    roots = TempRoots(os.fspath(state))
    try:
        roots.add("/nix/store/" + "a" * 32 + "-being-added")
        t.join()
        assert seen_on_file == [True]
        fcntl.flock(gc_lock, fcntl.LOCK_UN)
        assert "/nix/store/" + "a" * 32 + "-being-added" in read_temp_roots(os.fspath(state))[0]
    finally:
        roots.close()
        server.close()
        os.close(gc_lock)


def test_add_root_waits_for_a_running_collection(tmp_path: Path) -> None:
    """A collector scans permanent roots before temp roots: a root made during its run by a
    process that then drops its temp root would be seen by neither scan. So making a root waits
    for the collection to end (the stress test caught the race under load before)."""
    import fcntl
    import threading

    root = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    with LocalStore(root) as st:
        p = st.add_path(src).path
        gc_lock = os.open(os.path.join(st.state_dir, "gc.lock"), os.O_RDWR)
        fcntl.flock(gc_lock, fcntl.LOCK_EX)  # a collection is running
        link = tmp_path / "result"
        done = threading.Event()
        t = threading.Thread(target=lambda: (add_indirect_root(st, os.fspath(link), p), done.set()))
        t.start()
        assert not done.wait(0.5) and not link.exists()  # waiting, nothing made yet
        fcntl.flock(gc_lock, fcntl.LOCK_UN)
        os.close(gc_lock)
        t.join(10)
        assert done.is_set() and os.readlink(link) == p
