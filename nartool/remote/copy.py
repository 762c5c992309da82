"""Copy closures between a local store and a serve-protocol remote (``nix-copy-closure``).

``--to``: the closure is computed locally; one ``QueryValidPaths`` finds what the remote lacks;
the missing paths go out in dependency order as pipelined ``AddToStoreNar`` commands.

``--from``: one ``QueryClosure``; the local store's validity is checked locally; one batched
``QueryPathInfos`` for all missing paths; pipelined ``DumpStorePath`` requests, each NAR
imported with ``add_nar`` (checking the queried hash, size and content address from the
stream) inside ``local.batch()`` groups, so a cut connection leaves only complete, verified,
registered paths behind and a rerun fetches just the rest. Whenever the next read from the
remote would block, the open group is committed first (``commit_pending``), so a slow or
stalled server never keeps local paths locked and unregistered.

Trust is settled before any NAR byte moves: a nartool server announces whether it accepts
imports and unsigned paths (see :mod:`nartool.remote.serve`); when it would refuse some
paths, the copy fails up front naming them. Real Nix servers announce nothing (they import
unsigned paths, or their daemon decides).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from ..errors import ProtocolError, StoreError
from ..nar.source import ByteSource
from ..store.closure import topo_sort
from ..store.types import PathInfo, Store
from .client import ServeClient
from .serve import resumable_batch

#: a local import batch (one sync + one transaction) ends after this many paths or bytes
BATCH_PATHS = 512
BATCH_BYTES = 256 << 20


@dataclass
class Progress:
    direction: str
    paths_done: int = 0
    paths_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    started: float = field(default_factory=time.monotonic)
    current: str | None = None
    finished: bool = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        e = self.elapsed
        return self.bytes_done / e if e > 0 else 0.0

    @property
    def eta(self) -> float | None:
        r = self.rate
        if r <= 0:
            return None
        return max(self.bytes_total - self.bytes_done, 0) / r


ProgressFn = Callable[[Progress], None]


@dataclass
class CopyResult:
    direction: str
    requested: list[str]
    closure: list[str]
    missing: list[str]
    copied: list[str]
    bytes_total: int
    bytes_copied: int
    seconds: float
    dry_run: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "direction": self.direction, "requested": self.requested, "closure_size": len(self.closure),
            "missing": self.missing, "copied": self.copied, "bytes_total": self.bytes_total,
            "bytes_copied": self.bytes_copied, "seconds": round(self.seconds, 3), "dry_run": self.dry_run,
        }


class _Tracker:
    def __init__(self, p: Progress, fn: ProgressFn | None, interval: float = 0.2) -> None:
        self.p = p
        self.fn = fn
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def bytes(self, n: int) -> None:
        with self._lock:
            self.p.bytes_done += n
            self._emit(False)

    def path(self, path: str) -> None:
        with self._lock:
            self.p.paths_done += 1
            self.p.current = path
            self._emit(False)

    def done(self) -> None:
        with self._lock:
            self.p.finished = True
            self._emit(True)

    def _emit(self, force: bool) -> None:
        if self.fn is None:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.fn(self.p)


def _infos(store: Store, paths: Iterable[str]) -> list[PathInfo]:
    out = []
    for p in paths:
        i = store.query_path_info(p)
        if i is None:
            raise StoreError(f"path '{p}' is not valid", path=p, rule="invalid-path")
        out.append(i)
    return out


def copy_closure(local: Store, client: ServeClient, paths: Iterable[str], direction: str = "to", *,
                 include_outputs: bool = False, dry_run: bool = False, progress: ProgressFn | None = None,
                 check_trust: bool = True) -> CopyResult:
    """Copy the closure of ``paths`` to (``direction="to"``) or from (``"from"``) the remote."""
    if direction not in ("to", "from"):
        raise ValueError("direction must be 'to' or 'from'")
    requested = list(dict.fromkeys(paths))
    t0 = time.monotonic()
    if direction == "to":
        return _copy_to(local, client, requested, include_outputs, dry_run, progress, check_trust, t0)
    return _copy_from(local, client, requested, include_outputs, dry_run, progress, t0)


def _copy_to(local: Store, client: ServeClient, requested: list[str], include_outputs: bool, dry_run: bool,
             progress: ProgressFn | None, check_trust: bool, t0: float) -> CopyResult:
    closure = local.closure(requested, include_outputs=include_outputs)
    valid = client.query_valid_paths(closure, probe_ext=check_trust)
    missing = [p for p in closure if p not in valid]
    infos = _infos(local, missing)
    total = sum(i.nar_size for i in infos)
    ext = client.ext
    if missing and ext is not None:
        if not ext.write:
            raise ProtocolError(f"'{client.host}' does not accept imports (its nartool serve runs without --write)",
                                rule="read-only")
        if not ext.unsigned_ok:
            refused = client.check_importable(infos)
            if refused:
                shown = "\n  ".join(why for _, why in refused[:10])
                more = f"\n  … and {len(refused) - 10} more" if len(refused) > 10 else ""
                raise StoreError(f"'{client.host}' would refuse {len(refused)} of the {len(missing)} paths to copy "
                                 f"(nothing was sent):\n  {shown}{more}", rule="untrusted")
    p = Progress("to", paths_total=len(missing), bytes_total=total)
    tr = _Tracker(p, progress)
    copied: list[str] = []
    if not dry_run and missing:
        def ack(info: PathInfo) -> None:
            copied.append(info.path)
            tr.path(info.path)

        client.add_to_store_nar_many(infos, _unchecked_nars(local), on_ack=ack, on_sent=tr.bytes)
    tr.done()
    return CopyResult("to", requested, closure, missing, copied, total, p.bytes_done if not dry_run else 0,
                      time.monotonic() - t0, dry_run)


def _unchecked_nars(local: Store) -> Callable[[str], Iterable[bytes | bytearray | memoryview]]:
    """NAR streams for uploading: the receiver verifies every NAR against the hash we send, so
    the local re-hash (which would only fail after the NAR was sent anyway) is skipped."""
    from ..store.local import LocalStore

    if isinstance(local, LocalStore):
        return lambda p: local.nar_chunks(p, check=False)
    return local.nar_chunks


def _copy_from(local: Store, client: ServeClient, requested: list[str], include_outputs: bool, dry_run: bool,
               progress: ProgressFn | None, t0: float) -> CopyResult:
    closure_set = client.query_closure(requested, include_outputs=include_outputs)
    have = local.query_valid_paths(closure_set)
    missing_set = closure_set - have
    infos = client.query_path_infos(missing_set)
    lost = missing_set - infos.keys()
    if lost:
        raise ProtocolError(f"'{client.host}' reported {len(lost)} closure paths but has no info for them, "
                            f"e.g. '{sorted(lost)[0]}'", rule="missing-info")
    order = topo_sort(missing_set, lambda q: infos[q].references if q in infos else ())
    closure_order = topo_sort(closure_set, lambda q: infos[q].references if q in infos else ())
    ordered = [infos[q] for q in order]
    total = sum(i.nar_size for i in ordered)
    p = Progress("from", paths_total=len(ordered), bytes_total=total)
    tr = _Tracker(p, progress)
    copied: list[str] = []
    if not dry_run and ordered:
        _fetch(local, client, ordered, tr, copied)
    tr.done()
    return CopyResult("from", requested, closure_order, order, copied, total,
                      p.bytes_done if not dry_run else 0, time.monotonic() - t0, dry_run)


class _Importer:
    """Imports the NARs of pipelined dumps in ``local.batch()`` groups; a group's paths count as
    copied once the group committed. An error rolls the open group back."""

    def __init__(self, local: Store, tr: _Tracker, copied: list[str]) -> None:
        self.local = local
        self.tr = tr
        self.copied = copied
        self.cm: AbstractContextManager[None] | None = None
        self.pending: list[str] = []
        self.nbytes = 0

    def consume(self, info: PathInfo, src: ByteSource) -> None:
        if self.cm is None:
            self.cm = resumable_batch(self.local)
            self.cm.__enter__()
            self.pending = []
            self.nbytes = 0
        self.local.temp_root(info.path)
        self.local.add_nar(info, src)
        self.pending.append(info.path)
        self.nbytes += info.nar_size
        if len(self.pending) >= BATCH_PATHS or self.nbytes >= BATCH_BYTES:
            self.commit()

    def before_wait(self) -> None:
        """The remote is slow: make the group's paths durable now (staying in the batch)."""
        commit_pending = getattr(self.local, "commit_pending", None)
        if commit_pending is None or self.cm is None or not self.pending:
            return
        commit_pending()
        self.copied.extend(self.pending)
        for q in self.pending:
            self.tr.path(q)
        self.pending = []

    def commit(self) -> None:
        cm, self.cm = self.cm, None
        if cm is None:
            return
        cm.__exit__(None, None, None)
        self.copied.extend(self.pending)
        for q in self.pending:
            self.tr.path(q)
        self.pending = []

    def abort(self, e: BaseException) -> None:
        cm, self.cm = self.cm, None
        if cm is not None:
            cm.__exit__(type(e), e, e.__traceback__)


def _fetch(local: Store, client: ServeClient, infos: list[PathInfo], tr: _Tracker, copied: list[str]) -> None:
    imp = _Importer(local, tr, copied)
    client.before_wait = imp.before_wait
    try:
        client.dump_many(infos, imp.consume, on_bytes=tr.bytes)
    except BaseException as e:
        imp.abort(e)
        raise
    finally:
        client.before_wait = None
    imp.commit()
