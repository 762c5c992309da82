#!/usr/bin/env python3
"""Benchmark nartool's NAR commands against Nix 2.8 as users run them.

nartool is measured as installed: a regular (non-editable) ``pip install`` of this checkout into a
fresh virtual environment (its dependencies from the configured package index, bytecode compiled),
and its ``nartool`` command timed as a whole process, start-up included. Nix 2.8 is timed the same
way (``nix-hash``, ``nix-store``). Runs alternate in pairs (ours then Nix, then Nix then ours, ...);
for each operation the median of the pairwise ratios nartool/Nix is printed with its range, and the
median times. The Python API is timed too (in a process of the installed package, start-up not
included), against the same Nix processes.

Operations:

    hash-tree     nartool nar hash --base16 TREE           vs  nix-hash --type sha256 TREE
    hash-file     nartool nar hash --base16 BIGFILE        vs  nix-hash --type sha256 BIGFILE
    restore-tree  nartool nar restore DEST < tree.nar      vs  nix-store --restore DEST < tree.nar
    restore-file  nartool nar restore DEST < file.nar      vs  nix-store --restore DEST < file.nar
    dump-tree     nartool nar dump TREE | cat >/dev/null   vs  nix-store --dump TREE | cat >/dev/null

Corpora (``--tree-source``, default a ``cp -a`` copy of /usr/share; a ``--big-mb`` MiB random file)
are built in a temporary directory on /dev/shm (tmpfs) when it has room for them and their
restores, else in the system's temporary directory; the table says where. Restores go to the same
directory.

    python3 scripts/bench_nar.py                    # everything, 5 pairs each
    python3 scripts/bench_nar.py --quick            # 200 MiB file, 3 pairs
    python3 scripts/bench_nar.py --only hash-tree --only restore-tree --runs 9
    python3 scripts/bench_nar.py --nartool ~/.local/bin/nartool   # time an existing install
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPS = ("hash-tree", "hash-file", "restore-tree", "restore-file", "dump-tree")
# the installed package's API, timed inside a process of the venv's Python (start-up excluded)
_API_SNIPPET = r"""
import os, sys, time
op, path, dest = sys.argv[1], sys.argv[2], sys.argv[3]
import nartool
t = time.perf_counter()
if op.startswith("hash"):
    nartool.hash_path(path)
elif op.startswith("restore"):
    nartool.restore(dest, path)
else:
    with open(os.devnull, "wb") as f:
        nartool.dump(path, f)
print(time.perf_counter() - t)
"""


def dependencies() -> list[str]:
    """The package's runtime dependencies, from pyproject.toml."""
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # Python 3.10
        return ["click>=8.1", "zstandard>=0.21", "pathspec>=0.11"]
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def install(venv: Path) -> Path:
    """A regular install of this checkout into a new venv; returns its ``nartool`` command."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + dependencies(), check=True)
    subprocess.run(pip + ["--no-deps", str(REPO)], check=True)
    site = subprocess.run([py, "-c", "import nartool, os; print(os.path.dirname(nartool.__file__))"],
                          check=True, capture_output=True, text=True, cwd="/").stdout.strip()
    if str(REPO) in site:
        sys.exit(f"bench_nar: the venv imports nartool from the checkout ({site}), not an install")
    subprocess.run([py, "-m", "compileall", "-q", site], check=True)
    return venv / "bin" / "nartool"


def tmpfs_with_room(need: int) -> str | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    if not os.access("/dev/shm", os.W_OK) or st.f_bavail * st.f_frsize < need:
        return None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return "/dev/shm" if avail > need + (2 << 30) else None


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def sh(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def q(p: Path | str) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


def pairs(ours: list[object], theirs: str, runs: int, prep: str | None) -> tuple[list[float], list[float]]:
    """Alternating timings: ``ours`` is a shell command, or [python, snippet, args...] (API)."""
    a: list[float] = []
    b: list[float] = []
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            if prep:
                sh(prep)
            if k == 1:
                b.append(sh(theirs))
            elif isinstance(ours[0], str) and len(ours) == 1:
                a.append(sh(ours[0]))
            else:
                # from "/": run in the checkout, ``python -c`` would import its package, not the install
                out = subprocess.run([str(x) for x in ours], check=True, capture_output=True, text=True, cwd="/")
                a.append(float(out.stdout.strip().splitlines()[-1]))
    if prep:
        sh(prep)
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 MiB file, 3 pairs")
    ap.add_argument("--runs", type=int, help="pairs per operation (default 5)")
    ap.add_argument("--big-mb", type=int, help="size of the big file in MiB (default 1024)")
    ap.add_argument("--tree-source", default="/usr/share", help="copied with cp -a as the tree corpus")
    ap.add_argument("--only", action="append", choices=OPS, help="run only these operations (repeatable)")
    ap.add_argument("--no-api", action="store_true", help="leave out the Python API rows")
    ap.add_argument("--nartool", help="time this nartool command instead of installing the checkout")
    ap.add_argument("--dir", help="build corpora here instead of a temporary directory (kept; reused)")
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    big_mb = args.big_mb or (200 if args.quick else 1024)
    ops = args.only or list(OPS)
    if shutil.which("nix-store") is None or shutil.which("nix-hash") is None:
        sys.exit("bench_nar: nix-store/nix-hash not found (Debian: apt-get install nix-bin)")
    tree_bytes = du(Path(args.tree_source))
    # corpora, their NARs and two restores of each
    need = 3 * (tree_bytes + (big_mb << 20)) + (tree_bytes + (big_mb << 20))
    if args.dir:
        work = Path(args.dir)
        work.mkdir(parents=True, exist_ok=True)
        keep = True
    else:
        work = Path(tempfile.mkdtemp(prefix="nartool-bench-", dir=tmpfs_with_room(need)))
        keep = False
    cleanup: list[Path] = [] if keep else [work]
    where = subprocess.run(["df", "--output=fstype,target", str(work)], capture_output=True, text=True
                           ).stdout.split("\n")[1].split()
    try:
        if args.nartool:
            nartool = Path(args.nartool)
            venv_py = Path(subprocess.run(["sh", "-c", f"head -1 {q(shutil.which(str(nartool)) or nartool)}"],
                                          capture_output=True, text=True).stdout[2:].strip())
        else:
            print("installing the checkout into a venv ...", file=sys.stderr)
            venv_dir = Path(tempfile.mkdtemp(prefix="nartool-bench-venv-"))
            cleanup.append(venv_dir)
            nartool = install(venv_dir / "venv")
            venv_py = venv_dir / "venv" / "bin" / "python"
        tree, big = work / "tree", work / "big"
        if not (work / "corpora-ok").exists():
            print(f"building corpora in {work} ...", file=sys.stderr)
            shutil.rmtree(tree, ignore_errors=True)
            subprocess.run(["cp", "-a", args.tree_source, str(tree)], check=True)
            with open(big, "wb") as f:
                for _ in range(big_mb):
                    f.write(os.urandom(1 << 20))
            for p in (tree, big):
                sh(f"nix-store --dump {q(p)} > {q(str(p) + '.nar')}")
            (work / "corpora-ok").touch()
        nfiles = int(subprocess.run(f"find {q(tree)} | wc -l", shell=True, capture_output=True, text=True
                                    ).stdout)
        big_mb = os.path.getsize(big) >> 20
        d_ours, d_nix = work / "r-ours", work / "r-nix"
        clean = f"rm -rf {q(d_ours)} {q(d_nix)}"
        nt = q(nartool)
        cases = {
            "hash-tree": (f"{nt} nar hash --base16 {q(tree)}", f"nix-hash --type sha256 {q(tree)}", None, tree),
            "hash-file": (f"{nt} nar hash --base16 {q(big)}", f"nix-hash --type sha256 {q(big)}", None, big),
            "restore-tree": (f"{nt} nar restore {q(d_ours)} < {q(str(tree) + '.nar')}",
                             f"nix-store --restore {q(d_nix)} < {q(str(tree) + '.nar')}", clean,
                             Path(str(tree) + ".nar")),
            "restore-file": (f"{nt} nar restore {q(d_ours)} < {q(str(big) + '.nar')}",
                             f"nix-store --restore {q(d_nix)} < {q(str(big) + '.nar')}", clean,
                             Path(str(big) + ".nar")),
            "dump-tree": (f"{nt} nar dump {q(tree)} | cat > /dev/null",
                          f"nix-store --dump {q(tree)} | cat > /dev/null", None, tree),
        }
        rows = []
        for op in ops:
            ours, theirs, prep, path = cases[op]
            print(f"{op} ...", file=sys.stderr)
            a, b = pairs([ours], theirs, runs, prep)
            rows.append((op + " (CLI)", a, b))
            if not args.no_api:
                a, b = pairs([venv_py, "-c", _API_SNIPPET, op, path, d_ours], theirs, runs, prep)
                rows.append((op + " (API)", a, b))
        nix_version = subprocess.run(["nix-store", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"\nnartool (installed from {REPO.name}: {nartool}) vs {nix_version}; {runs} alternating pairs; "
              f"corpora in {work} ({where[0]}): tree = cp -a {args.tree_source} ({nfiles} entries, "
              f"{tree_bytes / 1e6:.0f} MB), file = {big_mb} MiB random\n")
        print("| operation | nartool median (s) | Nix median (s) | ratio median | ratio range |")
        print("|---|---:|---:|---:|---|")
        for name, a, b in rows:
            r = sorted(x / y for x, y in zip(a, b, strict=True))
            print(f"| {name} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | "
                  f"{statistics.median(r):.2f} | {r[0]:.2f}–{r[-1]:.2f} |")
    finally:
        for p in cleanup:
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
