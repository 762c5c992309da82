#!/usr/bin/env python3
"""Remote builds: a chain of N derivations (default 20, each depending on the previous one) built
remotely by one client against two build machines in the same run, alternating:
``nartool serve --write`` and Nix 2.8's ``nix-store --serve --write``.

The client is Nix 2.8's ``nix-build --max-jobs 0 --builders 'ssh://localhost?…'`` (default;
Nix opens one session per derivation) or nartool's own client (``--client nartool``:
``try_remote_build`` per derivation, the same calls ``nartool build`` makes). The machine is
reached through ``localhost`` (the remote program runs locally without ssh, as Nix does), so
the figures compare the servers, not ssh. Every round starts from fresh client and machine
stores holding only busybox (the builder) and uses a fresh chain (a tag in the derivation
names), so every derivation is built on the machine each time.

Prints, per machine, min / median / max wall time of a whole chain build and the median ratio;
``--json`` for a machine-readable report. Needs ``nix-build``, ``nix-store``,
``nix-instantiate`` and ``/bin/busybox`` (busybox-static). As root, the machines sandbox their
builds.

    python scripts/bench_remote_build.py [--n 20] [--rounds 5] [--client nix|nartool] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUSYBOX = "/nix/store/ap5lw0pk87zllpr8psdiqgxx50yqpp1h-busybox"
EXPR = """{ busybox, n, tag }:
let
  sh = "${builtins.storePath busybox}/bin/sh";
  step = i: prev: derivation {
    name = "bench-${tag}-${toString i}"; system = builtins.currentSystem; builder = sh;
    args = [ "-c" (if prev == null then "echo step 0; echo 0 > $out"
                   else "echo step ${toString i}; cat ${prev} > $out; echo ${toString i} >> $out") ];
  };
  go = i: if i == 0 then step 0 null else step i (go (i - 1));
in go (n - 1)
"""


def nix_env(work: Path) -> dict[str, str]:
    conf = work / "nixconf"
    conf.mkdir(exist_ok=True)
    (conf / "nix.conf").write_text("substituters =\nbuild-users-group =\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(NIX_CONF_DIR=str(conf), NIX_USER_CONF_FILES="", NIX_CONFIG="")
    return env


def setup(work: Path) -> tuple[Path, Path]:
    src = work / "src" / "busybox"
    (src / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", src / "bin" / "busybox")
    (src / "bin" / "sh").symlink_to("busybox")
    expr = work / "chain.nix"
    expr.write_text(EXPR)
    conf = work / "nartool.conf"
    conf.write_text(f"trusted-users = root {os.environ.get('USER', 'root')}\n")
    os.chmod(conf, 0o600)
    serve = work / "nartool-serve"
    serve.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO} NARTOOL_CONFIG={conf}\n"
                     f'exec {sys.executable} -m nartool serve "$@"\n')
    serve.chmod(0o755)
    return expr, serve


def fresh_client(work: Path, name: str, env: dict[str, str]) -> Path:
    client = work / name
    out = subprocess.run(["nix-store", "--store", str(client), "--add", str(work / "src" / "busybox")], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    if out != BUSYBOX:
        sys.exit(f"/bin/busybox added as {out}, not {BUSYBOX}")
    return client


def instantiate(client: Path, expr: Path, n: int, tag: str, env: dict[str, str]) -> str:
    return subprocess.run(["nix-instantiate", "--store", str(client), "--arg", "busybox", f'"{BUSYBOX}"',
                           "--arg", "n", str(n), "--argstr", "tag", tag, str(expr)], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def run_nix_client(client: Path, expr: Path, n: int, tag: str, builders: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(["nix-build", "--store", str(client), "--max-jobs", "0", "--no-out-link", "--builders",
                        builders, "--arg", "busybox", f'"{BUSYBOX}"', "--arg", "n", str(n), "--argstr", "tag", tag,
                        str(expr)], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"nix-build failed against {builders}:\n{r.stderr}")
    return dt


def run_nartool_client(client: Path, expr: Path, n: int, tag: str, builders: str, env: dict[str, str]) -> float:
    from nartool.remote.builders import try_remote_build
    from nartool.store.derivation import read_derivation
    from nartool.store.local import LocalStore

    top = instantiate(client, expr, n, tag, env)
    st = LocalStore(client)
    try:
        order: list[str] = []
        p: str | None = top
        while p is not None:  # a chain: each has at most one input derivation
            order.append(p)
            d = read_derivation(st, p)
            p = next(iter(d.input_drvs), None)
        order.reverse()
        opts = types.SimpleNamespace(builders=builders, max_jobs=0, max_silent_time=0, timeout=0,
                                     max_build_log_size=0, system="x86_64-linux", system_features=())
        t = time.perf_counter()
        for q in order:
            lines: list[bytes] = []
            r = try_remote_build(st, q, read_derivation(st, q), opts, log=lines.append)
            if r is None or r.status not in (0, 2):
                sys.exit(f"remote build of {q} failed: {r}\nlog:\n" + b"".join(lines[-20:]).decode(errors="replace"))
        return time.perf_counter() - t
    finally:
        st.close()


def compile_package() -> None:
    """Write nartool's bytecode first (as an installed package has it): with
    PYTHONDONTWRITEBYTECODE set, stale modules would otherwise be compiled in every timed run."""
    import compileall
    compileall.compile_dir(str(REPO / "nartool"), quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="derivations in the chain (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="builds per machine (default 5)")
    ap.add_argument("--client", choices=("nix", "nartool"), default="nix")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    compile_package()
    for tool in ("nix-build", "nix-store", "nix-instantiate"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    if not os.access("/bin/busybox", os.X_OK):
        sys.exit("/bin/busybox not found (busybox-static)")
    work = Path(tempfile.mkdtemp(prefix="bench-remote-build-"))
    try:
        env = nix_env(work)
        os.environ.update({k: v for k, v in env.items() if k.startswith("NIX_")})
        expr, serve = setup(work)
        programs = {"nartool": str(serve), "nix-store": "nix-store"}
        times: dict[str, list[float]] = {k: [] for k in programs}
        run = run_nix_client if a.client == "nix" else run_nartool_client
        for i in range(a.rounds):
            order = list(programs) if i % 2 == 0 else list(reversed(programs))
            for name in order:
                tag = f"{name.replace('-', '')}{i}"
                client = fresh_client(work, f"client-{tag}", env)
                machine = work / f"machine-{tag}"
                builders = f"ssh://localhost?remote-program={programs[name]}&remote-store={machine} x86_64-linux - 1 1"
                times[name].append(run(client, expr, a.n, tag, builders, env))
                shutil.rmtree(client, ignore_errors=True)
                shutil.rmtree(machine, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        report = {"n": a.n, "rounds": a.rounds, "client": a.client,
                  "seconds": {k: {"min": min(v), "median": med[k], "max": max(v), "all": v} for k, v in times.items()},
                  "median_ratio_nartool_over_nix": med["nartool"] / med["nix-store"]}
        if a.json:
            print(json.dumps(report, indent=1))
        else:
            print(f"{a.n}-derivation chain, {a.rounds} rounds, client: {a.client}")
            for k, v in times.items():
                print(f"  {k:10s} min {min(v):6.2f} s  median {med[k]:6.2f} s  max {max(v):6.2f} s"
                      f"  ({med[k] / a.n * 1000:.0f} ms per derivation)")
            print(f"  median ratio nartool / nix-store: {report['median_ratio_nartool_over_nix']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
