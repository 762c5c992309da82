#!/usr/bin/env python3
"""Benchmark ``nartool cache serve`` against static servers of the same cache.

Builds a store (``--paths`` small text paths and one ``--nar-mib`` MiB path of random bytes),
writes it as a ``file://`` cache with ``compression=none`` (so every server sends the same
bytes), and serves it three ways, all on 127.0.0.1:

* ``nartool cache serve --compression none`` (narinfos made and signed on the fly, NARs
  generated from the store files);
* ``python -m http.server --protocol HTTP/1.1`` of the cache directory (static files; its
  command line leaves Nagle's algorithm on, so each request on a kept-alive connection waits
  for a delayed ACK), and the same handler with ``TCP_NODELAY`` (``+NODELAY``);
* ``busybox httpd -f`` of the cache directory (a static server written in C), when busybox
  has it.

Measured, in alternating rounds (each server once per round):

* narinfo requests/s: ``--clients`` client *processes*, each on one kept-alive connection
  (a new connection per request where the server closes it), asking for random narinfos
  for ``--seconds`` seconds;
* NAR MB/s: one client downloading the big NAR to /dev/null (``--nar-reps`` times).

Prints per server the range (min–max) over ``--rounds`` rounds. The client is Python too, so
requests/s are bounded by it; compare servers with each other, not with other machines.

Usage: ``python3 scripts/bench_cache_serve.py [--rounds 3] [--paths 300] [--nar-mib 128]
[--clients 4] [--seconds 3]``
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nartool.store.local import LocalStore  # noqa: E402
from nartool.store.ops import copy_paths  # noqa: E402
from nartool.store.signing import SecretKey  # noqa: E402
from nartool.store.uri import open_store  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server did not start: {proc.args}")


def _client(port: int, keys: list[str], seconds: float, q: mp.Queue[int]) -> None:  # type: ignore[type-arg]
    n = 0
    conn: http.client.HTTPConnection | None = None
    end = time.monotonic() + seconds
    rnd = random.Random(os.getpid())
    while time.monotonic() < end:
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/" + rnd.choice(keys))
        r = conn.getresponse()
        body = r.read()
        if r.status != 200 or not body.startswith(b"StorePath: "):
            raise SystemExit(f"bad answer {r.status}")
        n += 1
        if r.will_close:
            conn.close()
            conn = None
    q.put(n)


def narinfo_rate(port: int, keys: list[str], clients: int, seconds: float) -> float:
    q: mp.Queue[int] = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=_client, args=(port, keys, seconds, q)) for _ in range(clients)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    return total / (time.monotonic() - t0)


def nar_rate(port: int, url: str, reps: int) -> float:
    total = 0
    t0 = time.monotonic()
    for _ in range(reps):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/" + url)
        r = c.getresponse()
        if r.status != 200:
            raise SystemExit(f"NAR: {r.status}")
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            total += len(b)
        c.close()
    return total / (time.monotonic() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", type=int, default=300)
    ap.add_argument("--nar-mib", type=int, default=128)
    ap.add_argument("--nar-reps", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    a = ap.parse_args()

    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-cache-serve-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        store_root, cache = work / "store", work / "cache"
        key = SecretKey.generate("bench-1")
        (work / "key.sec").write_text(key.to_text())
        print(f"building the store: {a.paths} small paths and one {a.nar_mib} MiB path ...", flush=True)
        with LocalStore(store_root) as st:
            paths = [st.add_text(f"p{i}", f"path {i}\n" * 20).path for i in range(a.paths)]
            big = work / "big"
            big.mkdir()
            with open(big / "data", "wb") as f:
                for _ in range(a.nar_mib):
                    f.write(os.urandom(1 << 20))
            big_path = st.add_path(big).path
            shutil.rmtree(big)
            with open_store(f"file://{cache}?compression=none&secret-key={work / 'key.sec'}") as dst:
                copy_paths(st, dst, [*paths, big_path])
        keys = [p.split("/")[-1][:32] + ".narinfo" for p in paths]
        big_hp = big_path.split("/")[-1][:32]
        static_url = next(line.split(": ", 1)[1] for line in (cache / f"{big_hp}.narinfo").read_text().splitlines()
                          if line.startswith("URL: "))

        env = dict(os.environ, XDG_CACHE_HOME=str(work / "xdg"), NARTOOL_CONFIG=os.devnull,
                   PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        servers: dict[str, tuple[int, str]] = {}
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "nartool", "--store", str(store_root), "cache", "serve",
                                       "--listen", f"127.0.0.1:{port}", "--sign-key", str(work / "key.sec")],
                                      env=env, stderr=subprocess.DEVNULL))
        wait_port(port, procs[-1])
        c = http.client.HTTPConnection("127.0.0.1", port)
        c.request("GET", f"/{big_hp}.narinfo")
        served_url = next(line.split(": ", 1)[1] for line in c.getresponse().read().decode().splitlines()
                          if line.startswith("URL: "))
        c.close()
        servers["nartool cache serve"] = (port, served_url)
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "http.server", "--protocol", "HTTP/1.1", "-b",
                                       "127.0.0.1", "-d", str(cache), str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(port, procs[-1])
        servers["python -m http.server (static)"] = (port, static_url)
        port = free_port()
        code = ("import functools, sys; from http.server import SimpleHTTPRequestHandler as H, ThreadingHTTPServer as S\n"
                "class N(H):\n    protocol_version = 'HTTP/1.1'\n    disable_nagle_algorithm = True\n"
                "    def log_message(self, *a): pass\n"
                "S(('127.0.0.1', int(sys.argv[2])), functools.partial(N, directory=sys.argv[1])).serve_forever()\n")
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(cache), str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(port, procs[-1])
        servers["python http.server +NODELAY"] = (port, static_url)
        bb = shutil.which("busybox")
        if bb and b"httpd" in subprocess.run([bb, "--list"], capture_output=True).stdout:
            port = free_port()
            procs.append(subprocess.Popen([bb, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(cache)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(port, procs[-1])
            servers["busybox httpd (static, C)"] = (port, static_url)

        results: dict[str, dict[str, list[float]]] = {n: {"rps": [], "mbs": []} for n in servers}
        for rnd in range(a.rounds):
            for name, (port, url) in servers.items():
                results[name]["rps"].append(narinfo_rate(port, keys, a.clients, a.seconds))
                results[name]["mbs"].append(nar_rate(port, url, a.nar_reps))
            print(f"round {rnd + 1}/{a.rounds} done", flush=True)
        print(f"\n{a.clients} client processes, {a.paths} narinfos, one {a.nar_mib} MiB NAR, {a.rounds} rounds "
              f"(min-max); cpus: {os.cpu_count()}")
        print(f"{'server':32} {'narinfo req/s':>18} {'NAR MB/s':>16}")
        for name, r in results.items():
            rps = f"{min(r['rps']):.0f}-{max(r['rps']):.0f}"
            mbs = f"{min(r['mbs']):.0f}-{max(r['mbs']):.0f}"
            print(f"{name:32} {rps:>18} {mbs:>16}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
