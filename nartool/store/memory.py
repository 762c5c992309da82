"""An in-memory :class:`~nartool.store.types.Store`: NAR bytes in a dict.

For tests and in-process transports (like dulwich's ``MemoryRepo``): every operation of the
protocol behaves as the on-disk store's does — hash, size and content-address checks (the
latter shared with it, :mod:`nartool.store.cacheck`), reference validity,
all-or-nothing batches and imports — without touching the filesystem.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from ..errors import StoreError
from ..hashes import Hash
from ..nar.events import Event
from ..nar.reader import NarReader
from ..nar.source import ByteSource
from ..nar.writer import write_nar
from .cacheck import CaCheck
from .closure import closure_set, topo_sort
from .export import end_chunk, read_marker, read_trailer, record_chunks
from .paths import DEFAULT_STORE_DIR, StorePath
from .types import PathInfo


def read_one_nar(src: ByteSource, ca: CaCheck | None = None) -> tuple[bytes, Hash]:
    """Parse exactly one NAR from ``src``; its bytes and SHA-256. ``ca`` sees the NAR's events
    and bytes on the way (the caller calls its ``finish``)."""
    h = hashlib.sha256()
    parts: list[bytes] = []
    events: Iterable[Event] = NarReader(src, standalone=False)
    if ca is not None:
        events = ca.events(events)
    for chunk in write_nar(events):
        b = bytes(chunk)
        h.update(b)
        if ca is not None:
            ca.update(b)
        parts.append(b)
    return b"".join(parts), Hash("sha256", h.digest())


class MemoryStore:
    """A store held in memory. Thread-safe; ``batch()`` nests (the outermost one commits)."""

    def __init__(self, store_dir: str = DEFAULT_STORE_DIR) -> None:
        self.store_dir = store_dir
        self.infos: dict[str, PathInfo] = {}
        self.nars: dict[str, bytes] = {}
        self.temp_roots: set[str] = set()
        self.derivation_outputs: dict[str, dict[str, str]] = {}
        self._lock = threading.RLock()
        self._local = threading.local()
        #: number of committed batches (one "sync + transaction" each); tests inspect it
        self.commits = 0

    # -- queries

    def _pending(self) -> dict[str, tuple[PathInfo, bytes]] | None:
        p: dict[str, tuple[PathInfo, bytes]] | None = getattr(self._local, "pending", None)
        return p

    def is_valid(self, path: str) -> bool:
        with self._lock:
            return path in self.infos

    def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        with self._lock:
            return {p for p in paths if p in self.infos}

    def query_path_info(self, path: str) -> PathInfo | None:
        with self._lock:
            return self.infos.get(path)

    def query_referrers(self, path: str) -> set[str]:
        with self._lock:
            return {p for p, i in self.infos.items() if path in i.references}

    def query_derivation_outputs(self, drv_path: str) -> dict[str, str]:
        with self._lock:
            return dict(self.derivation_outputs.get(drv_path, {}))

    def _refs(self, p: str) -> frozenset[str]:
        info = self.infos.get(p)
        if info is None:
            raise StoreError(f"path '{p}' is not valid", path=p, rule="invalid-path")
        return info.references

    def closure(self, paths: Iterable[str], *, include_outputs: bool = False) -> list[str]:
        with self._lock:
            start = list(paths)
            for p in start:
                self._refs(p)
            s = closure_set(start, self._refs)
            if include_outputs:
                while True:
                    extra = {o for p in s if p.endswith(".drv")
                             for o in self.derivation_outputs.get(p, {}).values() if o in self.infos}
                    if extra <= s:
                        break
                    s = closure_set(s | extra, self._refs)
            return topo_sort(s, self._refs)

    # -- contents

    def nar_chunks(self, path: str) -> Iterator[bytes | bytearray | memoryview]:
        with self._lock:
            nar = self.nars.get(path)
            info = self.infos.get(path)
        if nar is None or info is None:
            raise StoreError(f"path '{path}' is not valid", path=path, rule="invalid-path")
        for i in range(0, len(nar), 1 << 20):
            yield nar[i : i + (1 << 20)]
        if hashlib.sha256(nar).digest() != info.nar_hash.digest:
            raise StoreError(f"hash of path '{path}' has changed", path=path, rule="hash-changed")

    # -- adding

    def _check_path(self, info: PathInfo) -> None:
        StorePath.parse(info.path, self.store_dir)

    def add_nar(self, info: PathInfo, nar: ByteSource) -> PathInfo:
        self._check_path(info)
        ca = CaCheck(info, self.store_dir) if info.ca else None
        data, h = read_one_nar(nar, ca)
        if info.nar_hash.algo != "sha256" or h.digest != info.nar_hash.digest:
            raise StoreError(f"hash mismatch importing path '{info.path}'; specified: "
                             f"{info.nar_hash.prefixed()} got: {h.prefixed()}", path=info.path,
                             rule="hash-mismatch", expected=info.nar_hash.prefixed(), got=h.prefixed())
        if info.nar_size and len(data) != info.nar_size:
            raise StoreError(f"size mismatch importing path '{info.path}'", path=info.path,
                             rule="size-mismatch", expected=info.nar_size, got=len(data))
        if ca is not None:
            ca.finish()
        with self._lock:
            existing = self.infos.get(info.path)
            if existing is not None:
                return existing
        new = PathInfo(path=info.path, nar_hash=h, nar_size=len(data), references=info.references,
                       deriver=info.deriver, registration_time=info.registration_time or int(time.time()),
                       ultimate=info.ultimate, sigs=info.sigs, ca=info.ca)
        with self.batch():
            pending = self._pending()
            assert pending is not None
            pending[info.path] = (new, data)
        return new

    def import_paths(self, src: ByteSource) -> list[str]:
        done: list[str] = []
        with self.batch():
            while read_marker(src):
                data, h = read_one_nar(src)
                t = read_trailer(src, self.store_dir)
                info = PathInfo(path=t.path, nar_hash=h, nar_size=len(data), references=t.references,
                                deriver=t.deriver, registration_time=int(time.time()))
                pending = self._pending()
                assert pending is not None
                with self._lock:
                    if t.path not in self.infos:
                        pending[t.path] = (info, data)
                done.append(t.path)
        return done

    def export_paths(self, paths: Iterable[str]) -> Iterator[bytes | bytearray | memoryview]:
        with self._lock:
            ps = list(paths)
            for p in ps:
                self._refs(p)
            order = topo_sort(ps, self._refs)
        for p in order:
            info = self.infos[p]
            yield from record_chunks(p, info.references, info.deriver, self.nar_chunks(p))
        yield end_chunk()

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None:
        with self._lock:
            info = self.infos.get(path)
            if info is None:
                raise StoreError(f"path '{path}' is not valid", path=path, rule="invalid-path")
            info.sigs = info.sigs | frozenset(sigs)

    def temp_root(self, path: str) -> None:
        with self._lock:
            self.temp_roots.add(path)

    @contextmanager
    def batch(self) -> Iterator[None]:
        outer = self._pending() is None
        if outer:
            self._local.pending = {}
        try:
            yield
            if outer:
                pending = self._pending()
                assert pending is not None
                with self._lock:
                    for p, (info, _) in pending.items():
                        for r in info.references:
                            if r != p and r not in self.infos and r not in pending:
                                raise StoreError(f"path '{r}' is not valid", path=r, rule="invalid-path")
                    for p, (info, data) in pending.items():
                        if p not in self.infos:
                            self.infos[p] = info
                            self.nars[p] = data
                    self.commits += 1
        finally:
            if outer:
                self._local.pending = None

    # -- test helpers

    def add_bytes(self, info: PathInfo, nar: bytes) -> PathInfo:
        import io

        return self.add_nar(info, ByteSource(io.BytesIO(nar)))
