"""An in-memory store (``memory://``): NAR bytes in a dict.

For tests and in-process transports (like dulwich's ``MemoryRepo``). It derives from
:class:`~nartool.store.base.BaseStore` like every store, so closures, export and import are the
shared ones (:mod:`nartool.store.ops`), and adding behaves as the on-disk store's does: the same
checks in the same order with the same rules — path syntax, ``bad-hash`` for a non-sha256 NAR
hash, ``invalid-reference`` for a reference neither valid nor earlier in the batch,
``size-mismatch``, ``hash-mismatch``, content addresses checked from the NAR stream
(:mod:`nartool.store.cacheck`, shared with it), ``.drv`` outputs recorded from a regular file of
at most 16 MiB — with all-or-nothing batches, without touching the filesystem.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from ..errors import StoreError
from ..hashes import Hash
from ..nar.events import Event
from ..nar.reader import NarReader
from ..nar.source import ByteSource, as_source
from ..nar.writer import write_nar
from .base import BaseStore
from .cacheck import CaCheck
from .paths import DEFAULT_STORE_DIR
from .types import PathInfo

#: a ``.drv`` NAR larger than this is stored, but its outputs are not recorded (as LocalStore)
DRV_MAX_SIZE = 16 << 20


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


def _drv_outputs(nar: bytes) -> dict[str, str]:
    """Output paths of a ``.drv`` held as a single regular file in ``nar`` (else nothing)."""
    import io

    from ..nar.events import File
    from .derivation import DerivationError, parse_derivation

    if len(nar) > DRV_MAX_SIZE + 4096:
        return {}
    try:
        events = list(NarReader(ByteSource(io.BytesIO(nar), "NAR")))
        if len(events) != 1 or not isinstance(events[0], File):
            return {}
        text = b"".join(bytes(c) for c in events[0].chunks)
        drv = parse_derivation(text)
    except (StoreError, DerivationError, ValueError):  # not a derivation
        return {}
    return {name: o.path for name, o in drv.outputs.items() if o.path}


class MemoryStore(BaseStore):
    """A store held in memory. Thread-safe; ``batch()`` nests (the outermost one commits)."""

    scheme = "memory"

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

    def _pending(self) -> dict[str, tuple[PathInfo, bytes, dict[str, str]]] | None:
        p: dict[str, tuple[PathInfo, bytes, dict[str, str]]] | None = getattr(self._local, "pending", None)
        return p

    def is_valid(self, path: str) -> bool:
        with self._lock:
            return self._path_arg(path) in self.infos

    def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        with self._lock:
            return {p for p in paths if p in self.infos}

    def query_path_info(self, path: str) -> PathInfo | None:
        with self._lock:
            return self.infos.get(self._path_arg(path))

    def query_path_infos(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        with self._lock:
            return {p: self.infos[p] for p in paths if p in self.infos}

    def query_path_from_hash_part(self, hash_part: str) -> str | None:
        prefix = f"{self.store_dir}/{hash_part}-"
        with self._lock:
            return next((p for p in self.infos if p.startswith(prefix)), None)

    def query_referrers(self, path: str) -> set[str]:
        with self._lock:
            return {p for p, i in self.infos.items() if path in i.references}

    def query_derivation_outputs(self, drv_path: str) -> dict[str, str]:
        with self._lock:
            return dict(self.derivation_outputs.get(drv_path, {}))

    def all_paths(self) -> list[str]:
        with self._lock:
            return sorted(self.infos)

    # -- contents

    def nar_chunks(self, path: str, *, check: bool = True) -> Iterator[bytes | bytearray | memoryview]:
        with self._lock:
            nar = self.nars.get(path)
            info = self.infos.get(path)
        if nar is None or info is None:
            raise StoreError("path is not valid", path=path, rule="invalid-path")
        return self._chunks(path, nar, info, check)

    @staticmethod
    def _chunks(path: str, nar: bytes, info: PathInfo, check: bool) -> Iterator[bytes | bytearray | memoryview]:
        for i in range(0, len(nar), 1 << 20):
            yield nar[i : i + (1 << 20)]
        if check and hashlib.sha256(nar).digest() != info.nar_hash.digest:
            raise StoreError("hash of path has changed", path=path, rule="hash-changed")

    # -- adding

    def _check_references(self, info: PathInfo) -> None:
        pending = self._pending() or {}
        with self._lock:
            for r in info.references:
                self.parse_path(r)
                if r != info.path and r not in self.infos and r not in pending:
                    raise StoreError("reference is not valid", path=r, rule="invalid-reference", got=info.path)

    def add_nar(self, info: PathInfo, nar: ByteSource | BinaryIO | bytes) -> PathInfo:
        src = as_source(nar, "NAR")
        ca = self._check_add(info)
        data, h = read_one_nar(src, ca)
        if info.nar_size and len(data) != info.nar_size:
            raise StoreError("size mismatch importing path", path=info.path, rule="size-mismatch",
                             expected=info.nar_size, got=len(data))
        if h.digest != info.nar_hash.digest:
            raise StoreError("hash mismatch importing path", path=info.path, rule="hash-mismatch",
                             expected=info.nar_hash.prefixed("nix32"), got=h.prefixed("nix32"))
        if ca is not None:
            ca.finish()
        new = PathInfo(path=info.path, nar_hash=h, nar_size=len(data), references=info.references,
                       deriver=info.deriver, registration_time=info.registration_time or int(time.time()),
                       ultimate=info.ultimate, sigs=info.sigs, ca=info.ca)
        return self._put(new, data) or self.infos.get(info.path) or new

    def _put(self, info: PathInfo, data: bytes) -> PathInfo | None:
        """Queue ``info`` in the current batch (committing at once outside one); None when the
        path is valid already or earlier in the batch."""
        with self._lock:
            if info.path in self.infos:
                return None
        outs = _drv_outputs(data) if info.path.endswith(".drv") else {}
        with self.batch():
            pending = self._pending()
            assert pending is not None
            if info.path in pending:
                return None
            pending[info.path] = (info, data, outs)
        return info

    def add_nar_deferred(self, src: ByteSource, finish: Callable[[Hash, int], PathInfo]) -> PathInfo | None:
        data, h = read_one_nar(src)
        info = finish(h, len(data))
        self.parse_path(info.path)
        self._check_references(info)
        return self._put(info, data)

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None:
        with self._lock:
            info = self.infos.get(path)
            if info is None:
                raise StoreError("path is not valid", path=path, rule="invalid-path")
            info.sigs = info.sigs | frozenset(sigs)

    def temp_root(self, path: str) -> None:
        with self._lock:
            self.temp_roots.add(path)

    def commit_pending(self) -> int:
        pending = self._pending()
        if not pending:
            return 0
        n = self._commit(pending)
        pending.clear()
        return n

    def _commit(self, pending: dict[str, tuple[PathInfo, bytes, dict[str, str]]]) -> int:
        with self._lock:
            for p, (info, _, _) in pending.items():
                for r in info.references:
                    if r != p and r not in self.infos and r not in pending:
                        raise StoreError("reference is not valid", path=r, rule="invalid-reference", got=p)
            for p, (info, data, outs) in pending.items():
                if p not in self.infos:
                    self.infos[p] = info
                    self.nars[p] = data
                    if outs:
                        self.derivation_outputs[p] = outs
            self.commits += 1
        return len(pending)

    @contextmanager
    def batch(self, *, keep_on_error: bool = False) -> Iterator[None]:
        """All or nothing, whatever ``keep_on_error`` says: nothing of a memory store outlives
        the process, so there is nothing worth resuming."""
        outer = self._pending() is None
        if outer:
            self._local.pending = {}
        try:
            yield
            if outer:
                pending = self._pending()
                assert pending is not None
                self._commit(pending)
        finally:
            if outer:
                self._local.pending = None

    # -- test helpers

    def add_bytes(self, info: PathInfo, nar: bytes) -> PathInfo:
        import io

        return self.add_nar(info, ByteSource(io.BytesIO(nar)))
