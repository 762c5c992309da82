#!/usr/bin/env python3
"""Benchmark: ``nartool build`` against ``nix-store --realise`` (Nix 2.8) on the same derivations,
in the same run, alternating, each build into a fresh store.

* trivial: one derivation (``echo hi > $out``);
* chain: 50 derivations, each referring to the previous one (so built one after the other).

Both tools get a chroot store (``--store DIR``, so both sandbox every build) holding Debian's
static busybox; the derivations come from ``nix-instantiate`` and are copied into nartool's
store. Prints median and range (seconds) per case and tool, the per-build overhead of the
chain (total / 50), and what each further build costs once the process runs ((chain - trivial)
/ 49, round by round); then the floors of a process start: ``nix-store --version`` against the
interpreter of nartool's command starting with nothing to do (``python -c pass``, also with
``-I -S``).

Every timed run starts on an idle machine (it waits up to ``--idle-wait`` seconds for the CPUs
to be 92% idle, and counts the runs that could not) and after a ``sync``: nartool syncs the file
system once per build (Nix 2.8 does not), and without it that sync would also flush what the
benchmark itself just wrote (the two fresh stores), which is not the build's cost.

nartool is timed as users run it: the ``nartool`` command of a regular (non-editable) install of
this checkout into a fresh virtual environment, bytecode compiled (as ``scripts/bench_nar.py``
makes it); ``--nartool CMD`` times an existing command instead, ``--checkout`` this checkout's
package run as ``python -m nartool``.

    python scripts/bench_build.py [--rounds N] [--chain N] [--no-build-users] [--idle-wait SECS]
                                  [--nartool CMD | --checkout]
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from tests.buildkit import copy_drv_closure, nartool_store, nix_store_with_busybox  # noqa: E402
from tests.helpers import cli_argv, cli_env, nix_env  # noqa: E402

TRIVIAL = """derivation { name = "trivial-TAG"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
  args = [ "-c" "echo hi > $out" ]; }"""

CHAIN = """let
  step = n: prev: derivation { name = "chain-TAG-${toString n}"; system = builtins.currentSystem;
    builder = "${bb}/bin/sh"; args = [ "-c" "echo ${prev} > $out" ]; };
  go = n: if n == 0 then "none" else step n (go (n - 1));
in go COUNT"""


def instantiate(root: Path, expr: str) -> str:
    full = "let bb = builtins.storePath /nix/store/ap5lw0pk87zllpr8psdiqgxx50yqpp1h-busybox; in " + expr
    r = subprocess.run(["nix-instantiate", "--store", str(root), "--expr", full], capture_output=True, check=True,
                       env=nix_env())
    return r.stdout.decode().strip()


EXTRA: list[str] = []
#: the command that runs nartool (set in main)
NARTOOL: list[str] = []


def one(tool: str, expr: str, work: Path) -> float:
    """Prepare fresh stores and time one build of ``expr`` with ``tool``."""
    nixroot = work / "nix"
    nix_store_with_busybox(nixroot, work)
    drv = instantiate(nixroot, expr)
    if tool == "nix":
        argv = ["nix-store", "--store", str(nixroot), "--option", "substituters", "", *EXTRA, "--realise", drv]
        env = nix_env()
    else:
        st, _ = nartool_store(work / "ours", work)
        copy_drv_closure(nixroot, st, drv)
        st.close()
        argv = [*NARTOOL, "--store", str(work / "ours"), "build", *EXTRA, drv]
        env = cli_env()
        if cli_argv() != NARTOOL:
            env.pop("PYTHONPATH", None)  # (the installed package, not the checkout)
    os.sync()  # (see the module docstring)
    wait_idle()
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, env=env, check=False)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{tool} failed: {r.stderr.decode()[-2000:]}")
    return dt


#: how long to wait for an idle machine before a timed run (seconds; 0: do not wait)
IDLE_WAIT = [30.0]
NOT_IDLE: list[int] = []


def _cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def wait_idle() -> None:
    """Wait (up to IDLE_WAIT) until the CPUs were at least 92% idle over 0.3 s: on a shared
    machine another job's burst would otherwise land in one tool's runs. Counts the runs that
    started without."""
    if not IDLE_WAIT[0] or not os.path.exists("/proc/stat"):
        return
    end = time.monotonic() + IDLE_WAIT[0]
    while time.monotonic() < end:
        a = _cpu()
        time.sleep(0.3)
        b = _cpu()
        if (b[1] - a[1]) / max(1, b[0] - a[0]) >= 0.92:
            return
    NOT_IDLE.append(1)


def compile_package() -> None:
    """Write nartool's bytecode first (as an installed package has it): with
    PYTHONDONTWRITEBYTECODE set, stale modules would otherwise be compiled in every timed run."""
    import compileall
    compileall.compile_dir(str(REPO / "nartool"), quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chain", type=int, default=50)
    ap.add_argument("--no-build-users", action="store_true",
                    help="both tools without build users (--option build-users-group ''), as root")
    ap.add_argument("--nartool", metavar="CMD", help="time this nartool command instead of a fresh install")
    ap.add_argument("--checkout", action="store_true", help="time this checkout's package (python -m nartool)")
    ap.add_argument("--idle-wait", type=float, default=30.0, metavar="SECS",
                    help="before each timed run, wait up to SECS for the CPUs to be idle (0: never wait)")
    a = ap.parse_args()
    IDLE_WAIT[0] = a.idle_wait
    venv_dir = None
    if a.checkout:
        compile_package()
        NARTOOL.extend(cli_argv())
    elif a.nartool:
        NARTOOL.append(a.nartool)
    else:
        from bench_nar import install

        print("installing the checkout into a venv ...", file=sys.stderr)
        venv_dir = Path(tempfile.mkdtemp(prefix="nartool-bench-venv-"))
        NARTOOL.append(str(install(venv_dir / "venv")))
    try:
        run(a)
    finally:
        if venv_dir is not None:
            shutil.rmtree(venv_dir, ignore_errors=True)


def run(a: argparse.Namespace) -> None:
    if a.no_build_users:
        EXTRA.extend(["--option", "build-users-group", ""])
    cases = {"trivial": TRIVIAL, f"chain of {a.chain}": CHAIN.replace("COUNT", str(a.chain))}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(a.rounds):
        for case, expr in cases.items():
            for tool in (("nix", "nartool") if r % 2 == 0 else ("nartool", "nix")):
                work = Path(tempfile.mkdtemp(prefix="bench-build-"))
                try:
                    times.setdefault((case, tool), []).append(one(tool, expr.replace("TAG", f"{r}"), work))
                finally:
                    subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
                    shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':<14} {'tool':<8} {'median s':>9} {'min':>7} {'max':>7}   (rounds: {a.rounds}, alternating)")
    for (case, tool), ts in times.items():
        print(f"{case:<14} {tool:<8} {statistics.median(ts):9.3f} {min(ts):7.3f} {max(ts):7.3f}")
    for tool in ("nix", "nartool"):
        ts = times[(f"chain of {a.chain}", tool)]
        print(f"per build in the chain, {tool}: {statistics.median(ts) / a.chain * 1000:.1f} ms")
    # the process's own start and exit paid once: what each further build costs (chain minus
    # the trivial build's time, round by round)
    for tool in ("nix", "nartool"):
        inc = [(c - t) / (a.chain - 1) * 1000
               for c, t in zip(times[(f"chain of {a.chain}", tool)], times[("trivial", tool)], strict=True)]
        print(f"per further build (chain - trivial) / {a.chain - 1}, {tool}: {statistics.median(inc):.1f} ms "
              f"({min(inc):.1f}-{max(inc):.1f})")
    floors(a.rounds * 3)
    print(f"(machine: {os.cpu_count()} CPUs; both tools sandbox every build in a chroot store; nartool: "
          f"{' '.join(NARTOOL)}; {len(NOT_IDLE)} timed runs started on a busy machine)")


def interpreter() -> str:
    """The Python that runs nartool's command (its script's ``#!`` line, or the command itself)."""
    cmd = NARTOOL[0]
    try:
        with open(cmd, "rb") as f:
            head = f.readline()
    except OSError:
        return cmd
    return head[2:].decode().split()[0] if head.startswith(b"#!") else cmd


def floors(n: int) -> None:
    """What starting a process with nothing to do costs, alternating, ``n`` times each."""
    py = interpreter()
    env = cli_env()
    env.pop("PYTHONPATH", None)
    cmds = {"nix-store --version": (["nix-store", "--version"], nix_env()),
            "python -c pass": ([py, "-c", "pass"], env), "python -I -S -c pass": ([py, "-I", "-S", "-c", "pass"], env)}
    ts: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(n):
        for name, (argv, e) in cmds.items():
            t = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, env=e, check=True)
            ts[name].append((time.perf_counter() - t) * 1000)
    print("floors (ms, median and range): " + "; ".join(
        f"{k} {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for k, v in ts.items()) + f"  [{py}]")


if __name__ == "__main__":
    main()
