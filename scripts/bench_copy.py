#!/usr/bin/env python3
"""Benchmark closure copying between two local stores: nartool vs ``nix-copy-closure`` (Nix 2.8).

Builds a source store (default: 220 paths, ~520 MB: 20 paths with one 20 MiB file each and
200 paths of 50 small files, chained by references) and copies the whole closure into a
fresh destination store over the same kind of transport for every tool: Nix's
``localhost?remote-store=DIR`` (the remote command runs locally through ``bash -c``, no ssh).

Variants (client → server):

* ``nix → nix``: ``nix-copy-closure --to`` into ``nix-store --serve --write``
* ``nartool → nartool``: ``nartool copy-closure --to`` into ``nartool serve --write``
* ``nartool → nix`` and ``nix → nartool``: the mixed pairs, to see which side costs what

Each variant runs ``--runs`` times (alternating), each into an empty destination; the median
wall time, the children's CPU time and the ratio to ``nix → nix`` are printed. ``--profile``
also times the parts of the nartool path separately (reading NARs from the source store,
importing them into a store from memory, the protocol over an in-process pipe).

``--latency`` measures what round trips cost instead: a closure of ~200 small paths is copied
through a real sshd on 127.0.0.1, once over the plain loopback and once over a delayed link —
an ssh ``ProxyCommand`` running a small relay (this script with ``--relay``) that holds every
chunk 25 ms in each direction (``--rtt 50``; the kernel here has no netem). Variants:
``nix-copy-closure`` into ``nix-store --serve``, ``nartool copy-closure`` and ``nartool copy
--to ssh://…`` into ``nartool serve``, and ``nartool copy-closure`` into ``nix-store --serve``.

Usage: ``python3 scripts/bench_copy.py [--quick] [--runs 3] [--dir DIR] [--profile]``,
``python3 scripts/bench_copy.py --latency [--rtt 50] [--paths 200] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import heapq
import io
import os
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nartool.nar.source import ByteSource  # noqa: E402
from nartool.remote.client import ServeClient  # noqa: E402
from nartool.remote.copy import copy_closure  # noqa: E402
from nartool.remote.testing import dir_nar, make_info  # noqa: E402
from nartool.remote.transport import PipeTransport  # noqa: E402
from nartool.store.local import LocalStore  # noqa: E402


def build_source(root: Path, big: int, big_size: int, small: int, files: int, file_size: int) -> tuple[str, int, int]:
    """Returns (top path, number of paths, total NAR bytes)."""
    st = LocalStore(root)
    prev: list[str] = []
    total = 0
    n = 0
    with st.batch():
        for i in range(big + small):
            if i < big:
                entries = [("blob", os.urandom(big_size)), ("ref", " ".join(prev).encode())]
            else:
                entries = [(f"f{k:03d}", os.urandom(file_size // 2) + b"\0" * (file_size // 2)) for k in range(files)]
                entries.append(("ref", " ".join(prev).encode()))
            nar = dir_nar(entries)
            info = make_info(f"bench-{i}", nar, prev, seed=f"bench-{i}")
            st.add_nar(info, ByteSource(io.BytesIO(nar)))
            total += len(nar)
            n += 1
            prev = [info.path]
    st.close()
    return prev[0], n, total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- a delayed link --------------------------------------------------------------------------


def relay(port: int, delay_ms: float) -> None:
    """ssh ``ProxyCommand``: stdin/stdout <-> 127.0.0.1:``port``, every chunk held ``delay_ms``
    in each direction (a latency, not a bandwidth limit: chunks in flight overlap)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    delay = delay_ms / 1000.0

    def pump(read: object, write: object, on_eof: object) -> None:
        q: list[tuple[float, int, bytes]] = []
        cv = threading.Condition()
        done = [False]
        seq = [0]

        def reader() -> None:
            while True:
                b = read()  # type: ignore[operator]
                with cv:
                    if not b:
                        done[0] = True
                    else:
                        seq[0] += 1
                        heapq.heappush(q, (time.monotonic() + delay, seq[0], b))
                    cv.notify()
                if not b:
                    return

        threading.Thread(target=reader, daemon=True).start()
        while True:
            with cv:
                while not q and not done[0]:
                    cv.wait()
                if not q and done[0]:
                    on_eof()  # type: ignore[operator]
                    return
                due, _, b = q[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with cv:
                heapq.heappop(q)
            write(b)  # type: ignore[operator]

    def up_eof() -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def write_out(b: bytes) -> None:
        mv = memoryview(b)
        while mv:
            mv = mv[os.write(1, mv):]

    up = threading.Thread(target=pump, args=(lambda: os.read(0, 1 << 16), sock.sendall, up_eof), daemon=True)
    up.start()
    pump(lambda: sock.recv(1 << 16), write_out, lambda: None)
    select.select([], [], [], 0)


def build_small(root: Path, n: int, files: int = 8, file_size: int = 2000) -> tuple[str, int, int]:
    """``n`` small paths (a few KB each), each referring to the previous ones' last."""
    st = LocalStore(root)
    prev: list[str] = []
    total = 0
    with st.batch():
        for i in range(n):
            entries = [(f"f{k}", os.urandom(file_size)) for k in range(files)]
            entries.append(("ref", " ".join(prev).encode()))
            nar = dir_nar(entries)
            info = make_info(f"lat-{i}", nar, prev, seed=f"lat-{i}")
            st.add_nar(info, ByteSource(io.BytesIO(nar)))
            total += len(nar)
            prev = [info.path]
    st.close()
    return prev[0], n, total


def latency_bench(args: argparse.Namespace, work: Path, cli: Path, wrapper: Path, env: dict[str, str]) -> None:
    sys.path.insert(0, str(REPO))
    from tests.sshd import Sshd

    src = work / "lat-src"
    top, npaths, nbytes = build_small(src, args.paths)
    print(f"source: {npaths} paths, {nbytes / 1e6:.1f} MB of NAR")
    sshd = Sshd(work / "sshd").start()
    try:
        key = sshd.add_key(None)
        links = {"loopback": 0.0, f"{args.rtt:g} ms RTT": args.rtt / 2}
        results: dict[str, dict[str, list[float]]] = {}
        for link, one_way in links.items():
            conf = work / f"ssh_config-{one_way:g}"
            lines = ["Host benchhost", "  HostName 127.0.0.1", f"  Port {sshd.port}", f"  User {sshd.user}",
                     f"  IdentityFile {key}", "  IdentitiesOnly yes", "  StrictHostKeyChecking no",
                     "  UserKnownHostsFile /dev/null", "  BatchMode yes", "  LogLevel ERROR"]
            if one_way:
                lines.append(f"  ProxyCommand {sys.executable} {Path(__file__).resolve()} --relay %p {one_way:g}")
            conf.write_text("\n".join(lines) + "\n")
            e = dict(env, NIX_SSHOPTS=f"-F {conf}")
            variants = {
                "nix-copy-closure > nix-store --serve":
                    lambda dst, e=e: (["nix-copy-closure", "--to", f"benchhost?remote-store={dst}", top],
                                      dict(e, NIX_REMOTE=str(src))),
                "nartool copy-closure > nartool serve":
                    lambda dst, e=e: ([sys.executable, "-m", "nartool", "--store", str(src), "copy-closure",
                                       "--remote-program", str(cli), "--to", f"benchhost?remote-store={dst}", top], e),
                "nartool copy --to ssh:// > nartool serve":
                    lambda dst, e=e: ([sys.executable, "-m", "nartool", "copy", "--from", str(src), "--to",
                                       f"ssh://benchhost?remote-program={cli}&remote-store={dst}", top], e),
                "nartool copy-closure > nix-store --serve":
                    lambda dst, e=e: ([sys.executable, "-m", "nartool", "--store", str(src), "copy-closure",
                                       "--remote-program", "nix-store", "--to", f"benchhost?remote-store={dst}",
                                       top], e),
            }
            res = results.setdefault(link, {})
            for i in range(args.runs):
                for name, make_argv in variants.items():
                    dst = work / f"lat-dst-{len(res)}-{i}-{abs(hash(name)) % 10000}"
                    argv, ee = make_argv(dst)
                    t = time.monotonic()
                    r = subprocess.run(argv, env=ee, capture_output=True, text=True)
                    wall = time.monotonic() - t
                    if r.returncode != 0:
                        sys.exit(f"{name} over {link}: failed:\n{r.stderr}")
                    check = subprocess.run(["nix-store", "--store", str(dst), "-q", "--requisites", top],
                                           capture_output=True, text=True)
                    if check.returncode != 0 or len(check.stdout.split()) != npaths:
                        sys.exit(f"{name} over {link}: destination incomplete: {check.stderr}")
                    res.setdefault(name, []).append(wall)
                    shutil.rmtree(dst, ignore_errors=True)
        print(f"\n{'client > server':<42}" + "".join(f"{link:>16}" for link in links))
        names = list(next(iter(results.values())))
        for name in names:
            row = "".join(f"{statistics.median(results[link][name]):>15.2f}s" for link in links)
            print(f"{name:<42}{row}")
        print(f"(median of {args.runs} runs, wall time including ssh's connection set-up; {npaths} paths)")
    finally:
        sshd.stop()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--relay":
        relay(int(sys.argv[2]), float(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small closure (~60 MB) and one run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--profile", action="store_true", help="also time the parts of nartool's path")
    ap.add_argument("--variants", default="nix>nix,nartool>nartool,nartool>nix,nix>nartool")
    ap.add_argument("--latency", action="store_true",
                    help="copy ~200 small paths through sshd, plain and over a delayed link")
    ap.add_argument("--rtt", type=float, default=50.0, help="round-trip time of the delayed link (ms)")
    ap.add_argument("--paths", type=int, default=200, help="paths in the --latency closure")
    args = ap.parse_args()
    for tool in ("nix-store", "nix-copy-closure"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-copy-"))
    work.mkdir(parents=True, exist_ok=True)
    bindir = work / "bin"
    bindir.mkdir(exist_ok=True)
    cli = bindir / "nartool"  # the CLI under its own name: remote program taking `serve --write`
    cli.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO}\nexec {sys.executable} -m nartool \"$@\"\n")
    cli.chmod(0o755)
    wrapper = bindir / "nartool-serve"  # for Nix clients: receives `--serve --write --store DIR`
    wrapper.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO}\nexec {sys.executable} -m nartool serve \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO), NARTOOL_CONFIG=str(work / "nartool.conf"))
    (work / "nartool.conf").write_text("trusted-users = root\n")

    if args.latency:
        try:
            latency_bench(args, work, cli, wrapper, env)
        finally:
            if not args.dir:
                shutil.rmtree(work, ignore_errors=True)
        return

    src = work / "src"
    if args.quick:
        shape = (4, 8 << 20, 200, 20, 6000)
        args.runs = 1
    else:
        shape = (20, 20 << 20, 200, 50, 12000)
    t0 = time.monotonic()
    top, npaths, nbytes = build_source(src, *shape)
    print(f"source: {npaths} paths, {nbytes / 1e6:.0f} MB of NAR (built in {time.monotonic() - t0:.1f}s)")

    def run(variant: str, dst: Path) -> tuple[float, float]:
        client, server = variant.split(">")
        if client == "nix":
            prog = "" if server == "nix" else f"&remote-program={wrapper}"
            argv = ["nix-copy-closure", "--to", f"localhost?remote-store={dst}{prog}", top]
            e = dict(env, NIX_REMOTE=str(src))
        else:
            prog = "nix-store" if server == "nix" else str(cli)
            argv = [sys.executable, "-m", "nartool", "--store", str(src), "copy-closure", "--remote-program", prog,
                    "--to", f"localhost?remote-store={dst}", top]
            e = env
        c0 = children_cpu()
        t = time.monotonic()
        r = subprocess.run(argv, env=e, capture_output=True, text=True)
        wall = time.monotonic() - t
        if r.returncode != 0:
            sys.exit(f"{variant}: {argv} failed:\n{r.stderr}")
        return wall, children_cpu() - c0

    variants = [v for v in args.variants.split(",") if v]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for i in range(args.runs):
        for v in variants:
            dst = work / f"dst-{v.replace('>', '-')}-{i}"
            times[v].append(run(v, dst))
            check = subprocess.run(["nix-store", "--store", str(dst), "-q", "--requisites", top],
                                   capture_output=True, text=True)
            if check.returncode != 0 or len(check.stdout.split()) != npaths:
                sys.exit(f"{v}: destination incomplete: {check.stderr}")
            shutil.rmtree(dst, ignore_errors=True)
    base = statistics.median(w for w, _ in times.get("nix>nix", [(float("nan"), 0.0)]))
    print(f"\n{'client > server':<20} {'median wall (s)':>16} {'CPU (s)':>9} {'MB/s':>8} {'ratio':>7}")
    for v, ts in times.items():
        wall = statistics.median(w for w, _ in ts)
        cpu = statistics.median(c for _, c in ts)
        print(f"{v:<20} {wall:>16.2f} {cpu:>9.2f} {nbytes / 1e6 / wall:>8.0f} {wall / base:>7.2f}")

    if args.profile:
        print("\nwhere nartool's time goes (in-process, same closure):")
        st = LocalStore(src)
        paths = st.closure([top])
        t = time.monotonic()
        n = sum(len(c) for p in paths for c in st.nar_chunks(p))
        t_dump = time.monotonic() - t
        print(f"  read NARs from the source store      {t_dump:6.2f}s  ({n / 1e6 / t_dump:.0f} MB/s)")
        nars = {p: b"".join(bytes(c) for c in st.nar_chunks(p)) for p in paths[: max(1, len(paths) // 4)]}
        d = LocalStore(work / "prof-import")
        t = time.monotonic()
        with d.batch():
            for p, nar in nars.items():
                info = st.query_path_info(p)
                assert info is not None
                d.add_nar(info, ByteSource(io.BytesIO(nar)))
        t_imp = time.monotonic() - t
        m = sum(len(x) for x in nars.values())
        print(f"  import NARs from memory (1/4 of them) {t_imp:6.2f}s  ({m / 1e6 / t_imp:.0f} MB/s)")
        d.close()
        d2 = LocalStore(work / "prof-pipe")
        t = time.monotonic()
        with PipeTransport(d2) as tr:
            copy_closure(st, ServeClient(tr), [top], "to")
        t_pipe = time.monotonic() - t
        print(f"  copy over an in-process pipe         {t_pipe:6.2f}s  ({nbytes / 1e6 / t_pipe:.0f} MB/s)")
        d2.close()
        st.close()
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
