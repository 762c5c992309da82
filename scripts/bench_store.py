#!/usr/bin/env python3
"""Benchmark the local store against Nix 2.8 on the same data, in one run.

* **add**: ``N`` generated source directories (``--mib`` MiB in all), into a fresh store:
  nartool's Python API (one ``batch()``), ``nartool store add D1 … DN`` and
  ``nix-store --store DIR --add D1 … DN``;
* **import**: an export stream of a closure of ``N`` paths (each referring to the previous one
  and to random earlier ones; NARs = the source directories) into a fresh store:
  ``LocalStore.import_paths``, ``nartool store import FILE``, ``nix-store --import < FILE``;
* **export**: all ``N`` paths of that store to a file (``export_paths``, ``nartool store
  export``, ``nix-store --export``);
* **gc**: a synthetic store of ``--gc-paths`` tiny paths (chains of 10, half of them rooted by
  regular-file roots) registered directly in the database: ``--print-dead`` and a deleting
  collection (each on a fresh copy), ``collect_garbage`` / ``nartool store gc`` / ``nix-store --gc``.

Runs alternate between the tools (the order rotates each repetition); everything is flushed with
``sync`` before each timed run, since nartool ``syncfs``-es the store before registering (Nix 2.8
does not sync file contents at all) and must not pay for the previous run's write-back. Prints
medians and the ratio ours/Nix (lower is better; target ≤ 1.0).

    python3 scripts/bench_store.py            # 300 paths, 300 MiB, 100,000-path GC, 3 reps
    python3 scripts/bench_store.py --quick    # 40 paths, 40 MiB, 20,000-path GC, 2 reps
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nartool.fs.source import dump_events  # noqa: E402
from nartool.hashes import Hash, nix32_encode  # noqa: E402
from nartool.nar.format import enc_str  # noqa: E402
from nartool.nar.writer import write_nar  # noqa: E402
from nartool.store import export as X  # noqa: E402
from nartool.store.gc import collect_garbage  # noqa: E402
from nartool.store.local import LocalStore  # noqa: E402
from nartool.store.paths import make_store_path  # noqa: E402
from nartool.store.types import PathInfo  # noqa: E402

STORE_DIR = "/nix/store"
NARTOOL = [sys.executable, "-m", "nartool"]
NIX_STORE = shutil.which("nix-store")


def rm(path: Path) -> None:
    if path.exists():
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
        shutil.rmtree(path)


def sync() -> None:
    os.sync()


def run(argv: list[str], *, stdin: Path | None = None, stdout: Path | None = None) -> str:
    fin = open(stdin, "rb") if stdin else subprocess.DEVNULL  # noqa: SIM115
    fout = open(stdout, "wb") if stdout else subprocess.PIPE  # noqa: SIM115
    try:
        r = subprocess.run(argv, stdin=fin, stdout=fout, stderr=subprocess.PIPE, env=_env())
    finally:
        for f in (fin, fout):
            if hasattr(f, "close"):
                f.close()  # type: ignore[union-attr]
    if r.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
    return r.stdout.decode() if r.stdout is not None else ""


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("NIX_CONFIG", "experimental-features = nix-command")
    return e


# -- data ------------------------------------------------------------------------------------------


def make_sources(work: Path, n: int, total_mib: float, rng: random.Random) -> list[Path]:
    """``n`` directories of about ``total_mib / n`` MiB: a few big files, many small ones, a
    subdirectory, an executable and a symlink."""
    per = int(total_mib * 2**20 / n)
    out = []
    for i in range(n):
        d = work / "src" / f"pkg{i:04d}"
        (d / "bin").mkdir(parents=True)
        (d / "share" / "doc").mkdir(parents=True)
        left = per
        k = 0
        while left > 0:
            size = min(left, rng.choice((200, 3000, 40_000, 300_000)))
            sub = "share/doc" if size < 5000 else "share"
            (d / sub / f"f{k:03d}").write_bytes(os.urandom(size))
            left -= size
            k += 1
        (d / "bin" / "run").write_bytes(b"#!/bin/sh\necho pkg%d\n" % i)
        os.chmod(d / "bin" / "run", 0o755)
        os.symlink("share/f000", d / "link")
        out.append(d)
    return out


def make_stream(work: Path, sources: list[Path], rng: random.Random) -> tuple[Path, list[str]]:
    """An export stream of a closure over ``sources``: path i refers to i-1 and up to 3 random
    earlier paths (and sometimes itself)."""
    paths = [make_store_path("output:out", Hash("sha256", hashlib.sha256(b"bench%d" % i).digest()),
                             f"bench-{d.name}", STORE_DIR) for i, d in enumerate(sources)]
    f = work / "closure.export"
    with open(f, "wb") as out:
        for i, d in enumerate(sources):
            refs = {paths[i - 1]} if i else set()
            for _ in range(min(i, rng.randrange(4))):
                refs.add(paths[rng.randrange(i)])
            if rng.random() < 0.1:
                refs.add(paths[i])
            for c in X.record_chunks(paths[i], refs, None, write_nar(dump_events(d))):
                out.write(c)
        out.write(X.end_chunk())
    return f, paths


def make_gc_store(root: Path, n: int) -> int:
    """``n`` one-file paths in chains of 10 (each refers to the previous of its chain); the last
    path of every even chain is rooted by a regular-file root. Returns the number of dead paths."""
    st = LocalStore(root)
    try:
        sd = Path(st.real_store_dir)
        gcroots = Path(st.state_dir) / "gcroots"
        infos: list[PathInfo] = []
        prev = ""
        dead = 0
        for i in range(n):
            data = b"synthetic %d\n" % i
            nar = (enc_str(b"nix-archive-1") + enc_str(b"(") + enc_str(b"type") + enc_str(b"regular")
                   + enc_str(b"contents") + enc_str(data) + enc_str(b")"))
            h = nix32_encode(hashlib.sha256(b"gc%d" % i).digest()[:20])
            p = f"{STORE_DIR}/{h}-g{i}"
            fd = os.open(sd / f"{h}-g{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            os.write(fd, data)
            os.close(fd)
            refs = frozenset([prev]) if i % 10 else frozenset()
            infos.append(PathInfo(p, Hash("sha256", hashlib.sha256(nar).digest()), len(nar), refs,
                                  registration_time=1700000000))
            if i % 10 == 9:
                if (i // 10) % 2 == 0:
                    (gcroots / f"{h}-g{i}").write_bytes(b"")
                else:
                    dead += 10
            prev = p
            if len(infos) == 5000:
                st.db.register(infos)
                infos = []
        if infos:
            st.db.register(infos)
        dead += n % 10 if (n // 10) % 2 == 1 else 0
        st.db.checkpoint("TRUNCATE")
    finally:
        st.close()
    return dead


# -- timing ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Bench:
    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.rows: list[tuple[str, dict[str, float]]] = []

    def compare(self, label: str, tools: dict[str, Callable[[], object]],
                setup: Callable[[str], None] | None = None) -> dict[str, float]:
        times: dict[str, list[float]] = {k: [] for k in tools}
        names = list(tools)
        for r in range(self.reps):
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                if setup is not None:
                    setup(k)
                times[k].append(timed(tools[k]))
        med = {k: statistics.median(v) for k, v in times.items()}
        self.rows.append((label, med))
        print(f"  {label}: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()), flush=True)
        return med

    def table(self) -> None:
        cols = ["nartool-api", "nartool-cli", "nix-store"]
        print()
        print(f"{'operation':<42} " + " ".join(f"{c:>12}" for c in cols) + f" {'api/nix':>8} {'cli/nix':>8}")
        for label, med in self.rows:
            cells = " ".join(f"{med[c]:>11.3f}s" if c in med else f"{'-':>12}" for c in cols)
            nix = med.get("nix-store")

            def ratio(c: str, med: dict[str, float] = med, nix: float | None = nix) -> str:
                return f"{med[c] / nix:>8.2f}" if nix and c in med else f"{'-':>8}"

            print(f"{label:<42} {cells} {ratio('nartool-api')} {ratio('nartool-cli')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (40 paths, 40 MiB, 20,000-path GC, 2 reps)")
    ap.add_argument("--paths", type=int, help="paths in the closure (default 300)")
    ap.add_argument("--mib", type=float, help="total MiB of the closure (default 300)")
    ap.add_argument("--gc-paths", type=int, help="paths in the synthetic GC store (default 100000)")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (default 3)")
    ap.add_argument("--workdir", help="where to put the data (default: a temporary directory, removed after)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    n = a.paths or (40 if a.quick else 300)
    mib = a.mib or (40.0 if a.quick else 300.0)
    gc_n = a.gc_paths or (20_000 if a.quick else 100_000)
    reps = a.reps or (2 if a.quick else 3)
    if NIX_STORE is None:
        print("nix-store not found: timing nartool alone", file=sys.stderr)
    rng = random.Random(a.seed)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _run(work, n, mib, gc_n, reps, rng)
    finally:
        if not a.workdir:
            rm(work)


def _run(work: Path, n: int, mib: float, gc_n: int, reps: int, rng: random.Random) -> None:
    t = time.perf_counter()
    sources = make_sources(work, n, mib, rng)
    stream, paths = make_stream(work, sources, rng)
    print(f"data: {n} source dirs, {mib:.0f} MiB; export stream {stream.stat().st_size / 2**20:.1f} MiB; "
          f"generated in {time.perf_counter() - t:.1f}s", flush=True)
    b = Bench(reps)
    have_nix = NIX_STORE is not None
    stores = {k: work / f"store-{k}" for k in ("nartool-api", "nartool-cli", "nix-store")}

    def fresh(k: str) -> None:
        rm(stores[k])

    # add
    def api_add() -> None:
        with LocalStore(stores["nartool-api"]) as st, st.batch():
            for d in sources:
                st.add_path(d)

    add_tools: dict[str, Callable[[], object]] = {
        "nartool-api": api_add,
        "nartool-cli": lambda: run([*NARTOOL, "--store", str(stores["nartool-cli"]), "store", "add",
                                    *map(str, sources)]),
    }
    if have_nix:
        add_tools["nix-store"] = lambda: run([NIX_STORE or "", "--store", str(stores["nix-store"]), "--add",
                                              *map(str, sources)])
    b.compare(f"add {n} dirs ({mib:.0f} MiB)", add_tools, fresh)
    added = {k: sorted(LocalStore(s).all_paths()) for k, s in stores.items() if k in add_tools}
    assert len({tuple(v) for v in added.values()}) == 1 and len(next(iter(added.values()))) == n, \
        "the tools disagree on the added paths"

    # import
    def api_import() -> None:
        with LocalStore(stores["nartool-api"]) as st, open(stream, "rb") as f:
            st.import_paths(f)

    imp_tools: dict[str, Callable[[], object]] = {
        "nartool-api": api_import,
        "nartool-cli": lambda: run([*NARTOOL, "--store", str(stores["nartool-cli"]), "store", "import", str(stream)]),
    }
    if have_nix:
        imp_tools["nix-store"] = lambda: run([NIX_STORE or "", "--store", str(stores["nix-store"]), "--import"],
                                             stdin=stream)
    b.compare(f"import closure of {n} paths", imp_tools, fresh)
    for k in imp_tools:
        with LocalStore(stores[k]) as st:
            assert sorted(st.all_paths()) == sorted(paths), k

    # export (all from the same store: the one Nix imported into, else ours)
    src = stores["nix-store" if have_nix else "nartool-api"]
    outs = {k: work / f"out-{k}.export" for k in stores}

    def api_export() -> None:
        with LocalStore(src) as st, open(outs["nartool-api"], "wb") as f:
            for c in st.export_paths(paths):
                f.write(c)

    exp_tools: dict[str, Callable[[], object]] = {
        "nartool-api": api_export,
        "nartool-cli": lambda: run([*NARTOOL, "--store", str(src), "store", "export", *paths, "-o",
                                    str(outs["nartool-cli"])]),
    }
    if have_nix:
        exp_tools["nix-store"] = lambda: run([NIX_STORE or "", "--store", str(src), "--export", *paths],
                                             stdout=outs["nix-store"])
    b.compare(f"export {n} paths", exp_tools, lambda k: outs[k].unlink(missing_ok=True))  # no overwrites
    sizes = {k: outs[k].stat().st_size for k in exp_tools}
    same = len({outs[k].read_bytes() for k in exp_tools}) == 1
    print(f"  export outputs: {sizes[next(iter(sizes))] / 2**20:.1f} MiB each, identical bytes: {same}")
    assert len(set(sizes.values())) == 1
    for k in stores:
        rm(stores[k])

    # gc
    t = time.perf_counter()
    template = work / "gc-template"
    dead = make_gc_store(template, gc_n)
    print(f"gc store: {gc_n} paths ({dead} dead) built in {time.perf_counter() - t:.1f}s", flush=True)
    gc_stores = {k: work / f"gc-{k}" for k in stores}

    def copy(k: str) -> None:
        rm(gc_stores[k])
        subprocess.run(["cp", "-a", str(template), str(gc_stores[k])], check=True)

    def api_gc(action: str) -> None:
        with LocalStore(gc_stores["nartool-api"]) as st:
            res = collect_garbage(st, action=action)
        got = len(res.dead if action == "print-dead" else res.deleted)
        assert got == dead, (action, got, dead)

    def cli_gc(args: list[str], k: str) -> None:
        out = run([*NARTOOL, "--store", str(gc_stores[k]), "store", "gc", *args])
        if args:
            assert len(out.split()) == dead, (k, len(out.split()), dead)

    def nix_gc(args: list[str]) -> None:
        out = run([NIX_STORE or "", "--store", str(gc_stores["nix-store"]), "--gc", *args])
        if args:
            assert len(out.split()) == dead, ("nix", len(out.split()), dead)

    pd_tools: dict[str, Callable[[], object]] = {
        "nartool-api": lambda: api_gc("print-dead"),
        "nartool-cli": lambda: cli_gc(["--print-dead"], "nartool-cli"),
    }
    del_tools: dict[str, Callable[[], object]] = {
        "nartool-api": lambda: api_gc("delete"),
        "nartool-cli": lambda: cli_gc([], "nartool-cli"),
    }
    if have_nix:
        pd_tools["nix-store"] = lambda: nix_gc(["--print-dead"])
        del_tools["nix-store"] = lambda: nix_gc([])
    for k in stores:
        copy(k)
    b.compare(f"gc --print-dead, {gc_n} paths", pd_tools)
    b.compare(f"gc (delete {dead} of {gc_n} paths)", del_tools, copy)
    for k in del_tools:
        with LocalStore(gc_stores[k]) as st:
            left = len(st.all_paths())
        entries = len(set(os.listdir(gc_stores[k] / "nix" / "store")) - {".links"})
        assert left == gc_n - dead and entries == left, (k, left, entries)
    for k in stores:
        rm(gc_stores[k])
    b.table()


if __name__ == "__main__":
    main()
