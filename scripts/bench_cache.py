"""`nartool copy --to file://` and `--from file://` against `nix copy` (Nix 2.8) on the same closure.

Builds one closure in a store both tools read (a tree of SOURCE — default the Python standard
library's directory — plus a few text objects referring to it), then, in the same run and
alternating the tools, times for each compression:

* push:  `nix copy --store ROOT --to file://DIR?compression=C` vs `nartool --store ROOT copy --to …`
* pull:  `nix copy --from file://DIR --store NEW --no-check-sigs` vs `nartool --store NEW copy --from …`
  (each tool reads the cache the other wrote too, so both read the same bytes)

and prints min / median / max wall seconds per tool, plus the size of the cache.

    python scripts/bench_cache.py --runs 3 --compressions zstd,xz,none [--source DIR] [--chain N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

NIX_CONFIG = "experimental-features = nix-command\nsubstituters =\nsandbox = false\n"


def run(argv: list[str]) -> float:
    env = dict(os.environ, NIX_CONFIG=NIX_CONFIG, NIX_USER_CONF_FILES="", NARTOOL_CONFIG="/dev/null")
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{r.stderr.decode(errors='replace')}")
    return dt


def nartool(*args: str) -> list[str]:
    return [sys.executable, "-m", "nartool", *args]


def make_closure(root: Path, source: Path, chain: int) -> tuple[str, int, int]:
    from nartool.store.local import LocalStore

    with LocalStore(root) as st:
        tree = st.add_path(source, name="bench-tree")
        mid = st.add_text("bench-mid", "uses " + tree.path, [tree.path])
        for i in range(chain):  # many small paths: per-path costs
            mid = st.add_text(f"bench-chain-{i}", f"{i} uses {mid.path}\n" * 50, [mid.path])
        top = st.add_text("bench-top", "uses " + mid.path, [mid.path, tree.path])
        cl = st.closure([top.path])
        return top.path, sum(st.path_info(p).nar_size for p in cl), len(cl)


def du(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def fmt(ts: list[float]) -> str:
    return f"{min(ts):6.2f} / {statistics.median(ts):6.2f} / {max(ts):6.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compressions", default="zstd,xz,none")
    ap.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["stdlib"]) / "test",
                    help="the tree in the closure (default: the Python standard library's tests, ~100 MiB)")
    ap.add_argument("--chain", type=int, default=0, help="add a chain of N small paths to the closure")
    args = ap.parse_args()
    if shutil.which("nix") is None:
        sys.exit("needs Nix (nix copy) on PATH")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        t = Path(tmp)
        top, size, n = make_closure(t / "store", args.source, args.chain)
        print(f"closure of {top}: {n} paths, {size / 2**20:.1f} MiB NAR, {args.runs} runs, alternating; "
              "wall seconds min / median / max")
        for comp in args.compressions.split(","):
            res: dict[str, list[float]] = {k: [] for k in ("push nix", "push nartool", "pull nix", "pull nartool")}
            sizes = {}
            for i in range(args.runs):
                order = ("nix", "nartool") if i % 2 == 0 else ("nartool", "nix")
                for tool in order:
                    cache = t / f"cache-{tool}-{comp}-{i}"
                    uri = f"file://{cache}?compression={comp}"
                    argv = (["nix", "copy", "--store", str(t / "store"), "--to", uri, top] if tool == "nix" else
                            nartool("--store", str(t / "store"), "copy", "--to", uri, top))
                    res[f"push {tool}"].append(run(argv))
                    sizes[tool] = du(cache)
                for tool in order:
                    src = t / f"cache-{'nartool' if tool == 'nix' else 'nix'}-{comp}-{i}"  # the other's cache
                    dst = t / f"pull-{tool}-{comp}-{i}"
                    argv = (["nix", "copy", "--from", f"file://{src}", "--store", str(dst), "--no-check-sigs", top]
                            if tool == "nix" else
                            nartool("--store", str(dst), "copy", "--from", f"file://{src}", "--no-check-sigs", top))
                    res[f"pull {tool}"].append(run(argv))
                    shutil.rmtree(dst, ignore_errors=True)
            print(f"\ncompression={comp}: cache {sizes['nix'] / 2**20:.2f} MiB (nix), "
                  f"{sizes['nartool'] / 2**20:.2f} MiB (nartool)")
            for k, v in res.items():
                print(f"  {k:13} {fmt(v)}")


if __name__ == "__main__":
    main()
