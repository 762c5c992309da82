#!/usr/bin/env python3
"""Benchmark nartool's NAR hash, dump and restore against real Nix, in one run.

Corpora: a tree of tens of thousands of small files (a copy of /usr/share, capped) and one
large file. Runs alternate ours/Nix; medians and ratios ours/Nix are printed as a markdown
table. Ours is measured in-process (the Python API), Nix as the `nix-hash`/`nix-store`
processes; a CLI row (`python3 -m nartool nar hash`) shows the interpreter start-up cost too.

    python3 scripts/bench_nar.py            # 1 GiB file, up to 60k files, 5 runs
    python3 scripts/bench_nar.py --quick    # 200 MiB, up to 5k files, 3 runs

"dump" writes to /dev/null, "dump to file" to a file on the same tmpfs. nartool copies the
contents of files above 64 KiB with sendfile when the output is a descriptor (no trip through
user space), which is why its /dev/null rows are far below Nix's for big files; the file rows
show what that is worth for a real destination.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nartool  # noqa: E402


def copy_tree(src: Path, dst: Path, max_files: int) -> int:
    n = 0
    dst.mkdir()
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirnames:
            try:
                (dst / rel / d).mkdir()
            except OSError:
                pass
        for f in filenames:
            if n >= max_files:
                return n
            s = Path(dirpath) / f
            try:
                if s.is_symlink():
                    os.symlink(os.readlink(s), dst / rel / f)
                elif s.is_file():
                    shutil.copy2(s, dst / rel / f)
                else:
                    continue
                n += 1
            except OSError:
                continue
    return n


def make_big(path: Path, mb: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)


def dump_to_file(path: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    nartool.dump(path, out)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small corpora, 3 runs")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--big-mb", type=int)
    ap.add_argument("--max-files", type=int)
    ap.add_argument("--tree-source", default="/usr/share")
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    big_mb = args.big_mb or (200 if args.quick else 1024)
    max_files = args.max_files or (5000 if args.quick else 60000)
    if shutil.which("nix-store") is None:
        sys.exit("nix-store not found: install Debian's nix-bin (apt-get install nix-bin)")
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="nartool-bench-", dir=shm))
    try:
        tree = work / "tree"
        nfiles = copy_tree(Path(args.tree_source), tree, max_files)
        big = work / "big"
        make_big(big, big_mb)
        corpora = {f"tree ({nfiles} files)": tree, f"file ({big_mb} MiB)": big}
        rows = []
        for label, path in corpora.items():
            nar = work / "in.nar"
            sh(f"nix-store --dump '{path}' > '{nar}'")
            cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
                ("hash", lambda p=path: nartool.hash_path(p), lambda p=path: sh(f"nix-hash --type sha256 '{p}'")),
                ("hash (CLI)", lambda p=path: sh(f"'{sys.executable}' -m nartool nar hash --base16 '{p}'"),
                 lambda p=path: sh(f"nix-hash --type sha256 '{p}'")),
                ("dump", lambda p=path: nartool.dump(p, open(os.devnull, "wb")),  # noqa: SIM115
                 lambda p=path: sh(f"nix-store --dump '{p}' > /dev/null")),
                ("dump to file", lambda p=path: dump_to_file(p, work / "o1.nar"),
                 lambda p=path: sh(f"nix-store --dump '{p}' > '{work / 'o2.nar'}'")),
            ]
            for name, ours, theirs in cases:
                a, b = [], []
                for _ in range(runs):
                    a.append(timed(ours))
                    b.append(timed(theirs))
                rows.append((label, name, statistics.median(a), statistics.median(b)))
            a, b = [], []
            for _ in range(runs):
                d1, d2 = work / "r-ours", work / "r-nix"
                a.append(timed(lambda d=d1, n=nar: nartool.restore(d, n)))
                b.append(timed(lambda d=d2, n=nar: sh(f"nix-store --restore '{d}' < '{n}'")))
                for d in (d1, d2):
                    shutil.rmtree(d) if d.is_dir() else d.unlink()
            rows.append((label, "restore", statistics.median(a), statistics.median(b)))
            nar.unlink()
        nix_version = subprocess.run(["nix-store", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"\nnartool {nartool.__version__} vs {nix_version}, median of {runs} alternating runs, "
              f"corpora on {'tmpfs' if shm else 'disk'}\n")
        print("| corpus | operation | nartool (s) | Nix (s) | ratio |")
        print("|---|---|---:|---:|---:|")
        for label, name, ours_t, nix_t in rows:
            print(f"| {label} | {name} | {ours_t:.3f} | {nix_t:.3f} | {ours_t / nix_t:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
