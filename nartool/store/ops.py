"""Operations over any store, written once: closures, export and import streams, copying.

Each function takes stores (:class:`~nartool.store.base.BaseStore`) and uses only their
primitives and bulk queries, so it works the same for a local, in-memory or remote store:

* :func:`closure` — the closure of some paths in dependency order (one bulk query per level,
  or one ``QueryClosure`` plus one ``QueryPathInfos`` against a serve-protocol store);
* :func:`export_paths` / :func:`import_paths` — the ``nix-store --export`` stream;
* :func:`copy_paths` — ``nix copy``: the closure on the source, ONE validity query on the
  destination, the signature policy settled before any NAR moves, then the missing paths in
  dependency order through the stores' transfer hooks (pipelined when one end is remote,
  committed in batches on a local destination).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import NarError, SignatureError, StoreError, TruncatedError
from ..hashes import Hash
from ..nar.source import ByteSource
from . import export as X
from .closure import topo_sort
from .types import PathInfo

if TYPE_CHECKING:
    from .base import BaseStore
    from .signing import PublicKey

#: a local import batch (one sync + one transaction) ends after this many paths or bytes
BATCH_PATHS = 512
BATCH_BYTES = 256 << 20


# -- closures ----------------------------------------------------------------------------------


def closure(store: BaseStore, paths: Iterable[str], *, include_outputs: bool = False) -> list[str]:
    """The closure of ``paths`` in dependency order (``invalid-path`` if one is not valid)."""
    infos = store.query_closure_set(paths, include_outputs=include_outputs)
    return topo_sort(infos, lambda p: infos[p].references)


# -- export / import ---------------------------------------------------------------------------


def export_paths(store: BaseStore, paths: Iterable[str]) -> Iterator[bytes | bytearray | memoryview]:
    """A ``nix-store --export`` stream of exactly ``paths`` in dependency order. Every path is
    checked valid before the first byte is produced."""
    wanted = list(dict.fromkeys(paths))
    infos = store.query_path_infos(wanted)
    for p in wanted:
        if p not in infos:
            store.parse_path(p)
            raise StoreError("path is not valid", path=p, rule="invalid-path")
    order = topo_sort(wanted, lambda p: infos[p].references)

    def gen() -> Iterator[bytes | bytearray | memoryview]:
        for p in order:
            info = infos[p]
            yield from X.record_chunks(p, info.references, info.deriver, store.nar_chunks(p))
        yield X.end_chunk()

    return gen()


def import_paths(store: BaseStore, s: ByteSource) -> list[str]:
    """Import one export stream from ``s`` into ``store``, all or nothing (one batch); stops
    right after the stream's end marker. Returns the record paths in stream order."""
    base = s.offset
    imported: list[str] = []
    with store.batch():
        while X.read_marker(s, base):
            rec_at = s.offset - base
            got: list[str] = []

            def finish(nar_hash: Hash, nar_size: int, got: list[str] = got) -> PathInfo:
                t = X.read_trailer(s, store.store_dir, base)
                got.append(t.path)
                return PathInfo(t.path, nar_hash, nar_size, t.references, t.deriver,
                                registration_time=int(time.time()))

            try:
                store.add_nar_deferred(s, finish)
            except NarError as e:
                if got:
                    raise
                # reader errors count from the NAR's start; truncation ones from the source's
                at = (e.offset or 0) - base if isinstance(e, TruncatedError) else (e.offset or 0) + rec_at
                raise NarError(f"bad NAR in export record {len(imported) + 1}: {e.message}", offset=at,
                               rule=e.rule, expected=e.expected, got=e.got, path=e.path) from None
            imported.extend(got)
    return imported


# -- copying -----------------------------------------------------------------------------------


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
            "direction": self.direction, "requested": self.requested, "closureSize": len(self.closure),
            "missing": self.missing, "copied": self.copied, "bytesTotal": self.bytes_total,
            "bytesCopied": self.bytes_copied, "seconds": round(self.seconds, 3), "dryRun": self.dry_run,
        }


class Tracker:
    """Progress bookkeeping shared by the transfer threads; calls ``fn`` at most every
    ``interval`` seconds (and once at the end)."""

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


def unsigned_refusals(infos: Iterable[PathInfo], store_dir: str,
                      trusted_keys: Mapping[str, PublicKey]) -> list[tuple[str, str]]:
    """The paths among ``infos`` that a store with ``require-sigs`` must refuse: neither
    content-addressed (a ``ca`` that reproduces the path) nor signed by a trusted key."""
    from .paths import ca_matches
    from .signing import verify_path_info

    out = []
    for i in infos:
        if i.ca and ca_matches(i.path, i.ca, i.references, store_dir):
            continue
        try:
            if verify_path_info(i, trusted_keys):
                continue
        except SignatureError:
            pass
        out.append((i.path, f"cannot add path '{i.path}' because it lacks a signature by a trusted key"))
    return out


def copy_paths(src: BaseStore, dst: BaseStore, paths: Iterable[str], *, include_outputs: bool = False,
               check_sigs: bool = False, trusted_keys: Mapping[str, PublicKey] | None = None,
               dry_run: bool = False, progress: ProgressFn | None = None, direction: str = "copy",
               batch_paths: int = BATCH_PATHS, batch_bytes: int = BATCH_BYTES,
               on_start: Callable[[list[PathInfo]], None] | None = None,
               on_path: Callable[[str], None] | None = None) -> CopyResult:
    """Copy the closure of ``paths`` from ``src`` to ``dst`` (``nix copy``): only the paths
    ``dst`` lacks, in dependency order.

    ``check_sigs``: a destination that decides on signatures itself (a local store) refuses
    the copy up front, naming the paths, when a missing path is neither content-addressed nor
    signed by a key in ``trusted_keys`` (``require-sigs``); nothing is transferred then. A
    remote destination applies its own policy (a nartool server is asked before any NAR is
    sent). Each path counts as copied once it is durable on ``dst``.

    ``on_start`` gets the infos of the paths about to be transferred (not called when nothing
    is missing, nor for a dry run); ``on_path`` each path as it becomes durable on ``dst`` (for
    Nix's ``copying N paths...`` / ``copying path '…' to '…'...`` log lines)."""
    t0 = time.monotonic()
    requested = list(dict.fromkeys(paths))
    infos_all = src.query_closure_set(requested, include_outputs=include_outputs)
    closure_order = topo_sort(infos_all, lambda p: infos_all[p].references)
    valid = dst.query_valid_paths(closure_order) if closure_order else set()
    missing = [p for p in closure_order if p not in valid]
    infos = [infos_all[p] for p in missing]
    total = sum(i.nar_size for i in infos)
    if infos and check_sigs and dst.checks_signatures_locally:
        refused = unsigned_refusals(infos, dst.store_dir, trusted_keys or {})
        if refused:
            raise StoreError(refusal_message(dst.uri, refused, len(infos)), rule="untrusted",
                             path=refused[0][0])
    if infos:
        dst.check_receivable(infos)
    p = Progress(direction, paths_total=len(infos), bytes_total=total)
    tr = Tracker(p, progress)
    copied: list[str] = []
    if not dry_run and infos:
        if on_start is not None:
            on_start(infos)

        def done(ps: list[str]) -> None:
            copied.extend(ps)
            for q in ps:
                tr.path(q)
                if on_path is not None:
                    on_path(q)

        dst.receive_nars(src, infos, on_done=done, on_bytes=tr.bytes, batch_paths=batch_paths,
                         batch_bytes=batch_bytes)
    tr.done()
    return CopyResult(direction, requested, closure_order, missing, copied, total,
                      p.bytes_done if not dry_run else 0, time.monotonic() - t0, dry_run)


def refusal_message(where: str, refused: list[tuple[str, str]], n: int) -> str:
    shown = "\n  ".join(why for _, why in refused[:10])
    more = f"\n  … and {len(refused) - 10} more" if len(refused) > 10 else ""
    return f"'{where}' would refuse {len(refused)} of the {n} paths to copy (nothing was sent):\n  {shown}{more}"


__all__ = ["closure", "export_paths", "import_paths", "copy_paths", "CopyResult", "Progress", "Tracker",
           "unsigned_refusals", "BATCH_PATHS", "BATCH_BYTES"]
