"""The base class of every store: primitives, optional capabilities and generic defaults.

Like Nix's ``Store`` (or dulwich's ``BaseObjectStore``), :class:`BaseStore` splits a store's
interface in three:

* **Primitives** a concrete store must provide: :meth:`~BaseStore.query_path_info`,
  :meth:`~BaseStore.nar_chunks` and, for a writable store, :meth:`~BaseStore.add_nar`.
* **Optional capabilities** (referrers, derivation outputs, signatures, listing every path, …):
  a store that lacks one inherits a method raising :class:`~nartool.errors.UnsupportedError`,
  which names the store's URI and the operation. Nothing probes for features with
  ``getattr``/``isinstance``/``except TypeError``.
* **Generic defaults** built on the primitives, which a store overrides when it can do better:
  bulk :meth:`~BaseStore.query_path_infos` and :meth:`~BaseStore.query_valid_paths`,
  :meth:`~BaseStore.query_closure_set`, :meth:`~BaseStore.nar_events`, :meth:`~BaseStore.batch`
  and :meth:`~BaseStore.commit_pending` (stores without transactions commit as they go),
  :meth:`~BaseStore.temp_root` (stores without a collector need none), and the two transfer
  hooks :meth:`~BaseStore.send_nars` / :meth:`~BaseStore.receive_nars` that
  :func:`nartool.store.ops.copy_paths` drives (a remote store pipelines them).

Derived operations — closures, export and import streams, copying between stores — are free
functions over stores in :mod:`nartool.store.ops`, written once; the thin methods here
(:meth:`~BaseStore.closure`, :meth:`~BaseStore.export_paths`, :meth:`~BaseStore.import_paths`)
call them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

from ..errors import StoreError, UnsupportedError
from ..hashes import Hash
from ..nar.events import Event
from ..nar.reader import NarReader
from ..nar.source import ByteSource, as_source, chunk_reader
from ..nar.writer import write_nar
from .paths import DEFAULT_STORE_DIR, StorePath
from .types import PathInfo

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import BinaryIO

    from ..fs.source import Exclude, NameCodec
    from .cacheck import CaCheck

Chunks = Iterable[bytes | bytearray | memoryview]
#: ``consume(info, src)``: gets one NAR as a source of exactly ``info.nar_size`` bytes
ConsumeFn = Callable[[PathInfo, ByteSource], None]


class NarSpool:
    """One NAR (from ``events``) in memory (up to 8 MiB) or an anonymous temporary file, hashed on
    the way: what a store gets from :meth:`BaseStore.add_nar_deferred` or
    :meth:`BaseStore.add_path` when it cannot place a NAR before it knows its path. ``ca`` sees
    the events and bytes on the way."""

    def __init__(self, events: Iterable[Event], ca: CaCheck | None = None) -> None:
        import tempfile  # (here: with shutil, it costs every store command ~5 ms at start-up)

        self.file: BinaryIO = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # type: ignore[assignment]  # noqa: SIM115
        h = hashlib.sha256()
        n = 0
        if ca is not None:
            events = ca.events(events)
        try:
            for chunk in write_nar(events):
                h.update(chunk)
                if ca is not None:
                    ca.update(chunk)
                self.file.write(chunk)
                n += len(chunk)
        except BaseException:
            self.file.close()
            raise
        self.hash = Hash("sha256", h.digest())
        self.size = n
        self.file.seek(0)

    @classmethod
    def read(cls, src: ByteSource, ca: CaCheck | None = None) -> NarSpool:
        """Exactly one NAR from ``src``."""
        return cls(NarReader(src, standalone=False), ca)

    def source(self) -> ByteSource:
        self.file.seek(0)
        return ByteSource(self.file, "NAR")

    def close(self) -> None:
        self.file.close()


class BaseStore:
    """What every store is (see the module docstring). All paths are full logical store paths."""

    #: the URI scheme this store type registers under (``local``, ``memory``, ``ssh``, …)
    scheme = "?"
    #: whether this store itself decides on signatures of what it receives (a local or
    #: in-memory store does when a copy asks it to; a remote store's far end decides)
    checks_signatures_locally = True

    store_dir: str = DEFAULT_STORE_DIR

    # -- identity -------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """The URI that :func:`nartool.store.uri.open_store` would open this store from."""
        return f"{self.scheme}://"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"

    def unsupported(self, operation: str) -> UnsupportedError:
        return UnsupportedError(self.uri, operation)

    def close(self) -> None:
        """Release what the store holds (connections, descriptors)."""

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ----------------------------------------------------------------------------

    def parse_path(self, path: str) -> StorePath:
        return StorePath.parse(path, self.store_dir)

    def _path_arg(self, path: str | PathInfo) -> str:
        """A path argument: a store path string, or a :class:`PathInfo` (as the add methods
        return it) standing for its path. Anything else is refused cleanly."""
        if isinstance(path, PathInfo):
            return path.path
        if not isinstance(path, str):
            raise StoreError(f"a store path must be a str, not {type(path).__name__}", got=repr(path)[:80],
                             rule="bad-argument")
        return path

    def follow(self, path: str) -> str:
        """A store path from a user argument: a store path or a path inside one."""
        base = path[len(self.store_dir) + 1 :].split("/", 1)[0] if path.startswith(self.store_dir + "/") else ""
        return self.store_dir + "/" + StorePath.from_base(base).base if base else self.parse_path(path).full()

    # -- primitives -----------------------------------------------------------------------

    def query_path_info(self, path: str) -> PathInfo | None:
        """What the store knows about ``path``; None when it is not valid."""
        raise self.unsupported("querying path infos")

    def nar_chunks(self, path: str, *, check: bool = True) -> Iterator[bytes | bytearray | memoryview]:
        """The NAR of a valid path (checked against its registered hash as it streams unless
        ``check`` is false: a receiver that verifies anyway may skip it)."""
        raise self.unsupported("reading NARs")

    def add_nar(self, info: PathInfo, nar: ByteSource | BinaryIO | bytes) -> PathInfo:
        """Read exactly one NAR and add it as ``info.path``: size, sha256 and a claimed content
        address are checked against ``info``; references must be valid, the path itself, or
        added earlier in the same :meth:`batch`. An already valid path is skipped (its NAR is
        still consumed). Signature policy is the caller's. Returns the registered info."""
        raise self.unsupported("adding paths")

    def _check_add(self, info: PathInfo) -> CaCheck | None:
        """What every ``add_nar`` checks before reading the NAR: a valid path, a sha256 NAR
        hash, valid references (the subclass's ``_check_references``); returns the checker of a
        claimed content address (None without one)."""
        from .cacheck import CaCheck

        self.parse_path(info.path)
        if info.nar_hash.algo != "sha256":
            raise StoreError("NAR hashes must be sha256", got=info.nar_hash.algo, path=info.path, rule="bad-hash")
        ca = CaCheck(info, self.store_dir) if info.ca else None
        self._check_references(info)
        return ca

    def _check_references(self, info: PathInfo) -> None:
        """References of ``info`` must be valid, the path itself, or pending in this batch."""
        raise self.unsupported("adding paths")

    # -- queries with generic defaults ----------------------------------------------------

    def query_path_infos(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        """Infos of the valid ones among ``paths`` (one round trip where the store can)."""
        out: dict[str, PathInfo] = {}
        for p in dict.fromkeys(paths):
            info = self.query_path_info(p)
            if info is not None:
                out[p] = info
        return out

    def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        return set(self.query_path_infos(paths))

    def is_valid(self, path: str) -> bool:
        return self._path_arg(path) in self.query_valid_paths([self._path_arg(path)])

    def path_info(self, path: str) -> PathInfo:
        """:meth:`query_path_info`, raising ``invalid-path`` for an invalid path."""
        info = self.query_path_info(path)
        if info is None:
            raise StoreError("path is not valid", path=self._path_arg(path), rule="invalid-path")
        return info

    def query_references(self, path: str) -> set[str]:
        return set(self.path_info(path).references)

    def query_closure_set(self, paths: Iterable[str], *, include_outputs: bool = False) -> dict[str, PathInfo]:
        """The closure of ``paths`` with every member's info, walked level by level with one
        bulk query per level. ``invalid-path`` if a requested path is not valid."""
        start = list(dict.fromkeys(self._path_arg(p) for p in paths))
        infos = self.query_path_infos(start)
        for p in start:
            if p not in infos:
                self.parse_path(p)
                raise StoreError("path is not valid", path=p, rule="invalid-path")
        frontier = {r for i in infos.values() for r in i.references if r not in infos}
        while True:
            while frontier:
                got = self.query_path_infos(frontier)
                lost = frontier - got.keys()
                if lost:
                    p = sorted(lost)[0]
                    raise StoreError("path (a reference) is not valid", path=p, rule="invalid-path")
                infos.update(got)
                frontier = {r for i in got.values() for r in i.references if r not in infos}
            if not include_outputs:
                return infos
            outs = {o for p in infos if p.endswith(".drv")
                    for o in self.query_derivation_outputs(p).values() if o not in infos}
            frontier = self.query_valid_paths(outs)
            if not frontier:
                return infos

    def query_closure_paths(self, paths: Iterable[str]) -> set[str]:
        """The paths of the closure of ``paths`` (``invalid-path`` if a requested path is not
        valid): :meth:`query_closure_set` without the infos, where a store can answer faster."""
        return set(self.query_closure_set(paths))

    def query_path_from_hash_part(self, hash_part: str) -> str | None:
        """The valid path with this hash part, if any."""
        raise self.unsupported("looking paths up by hash part")

    def query_referrers(self, path: str) -> set[str]:
        raise self.unsupported("querying referrers")

    def referrers_closure(self, paths: Iterable[str]) -> set[str]:
        from .closure import closure_set

        return closure_set(paths, self.query_referrers)

    def query_derivation_outputs(self, drv_path: str) -> dict[str, str]:
        """Output name → output path of a registered ``.drv`` (``DerivationOutputs``)."""
        raise self.unsupported("querying derivation outputs")

    def all_paths(self) -> list[str]:
        raise self.unsupported("listing all paths")

    # -- reading contents -----------------------------------------------------------------

    def nar_events(self, path: str) -> Iterator[Event]:
        """The NAR of ``path`` as events (parsed from :meth:`nar_chunks`)."""
        return iter(NarReader(ByteSource(chunk_reader(iter(self.nar_chunks(path))), "NAR")))

    # -- adding ---------------------------------------------------------------------------

    def add_nar_deferred(self, src: ByteSource, finish: Callable[[Hash, int], PathInfo]) -> PathInfo | None:
        """Read one NAR from ``src`` whose path is only known afterwards (an export record's
        trailer follows its NAR): ``finish(nar_hash, nar_size)`` is called once the NAR was read
        and returns the info to add it under. Returns the info added, or None when the path was
        valid already. The default spools the NAR; a store that can place it first overrides."""
        spool = NarSpool.read(src)
        try:
            info = finish(spool.hash, spool.size)
            if self.is_valid(info.path):
                return None
            return self.add_nar(info, spool.source())
        finally:
            spool.close()

    def add_path(self, src: str | os.PathLike[str], *, name: str | None = None, flat: bool = False,
                 names: NameCodec | None = None, exclude: Exclude | None = None,
                 scan_references: bool | Iterable[str] = False) -> PathInfo:
        """``nix-store --add`` of a file or tree (``--add-fixed sha256`` with ``flat``): its NAR
        is spooled while hashed, then added with :meth:`add_nar` under its content-addressed
        path. Scanning for references is a local store's (:class:`~nartool.store.local.LocalStore`)."""
        from ..fs import dump_events
        from .local import _hash_flat
        from .paths import ContentAddress, make_fixed_output_path, validate_name

        if scan_references is not False:
            raise self.unsupported("scanning references while adding a path")
        srcp = os.fspath(src)
        name = name or os.path.basename(os.path.normpath(os.path.abspath(srcp)))
        validate_name(name)
        events: Iterable[Event] = dump_events(srcp, names=names, exclude=exclude)
        flat_hash = hashlib.sha256() if flat else None
        if flat_hash is not None:
            events = _hash_flat(events, flat_hash, srcp)
        spool = NarSpool(events)
        try:
            if flat_hash is not None:
                h = Hash("sha256", flat_hash.digest())
                path = make_fixed_output_path(name, h, recursive=False, store_dir=self.store_dir)
                ca = ContentAddress("flat", h)
            else:
                path = make_fixed_output_path(name, spool.hash, recursive=True, store_dir=self.store_dir)
                ca = ContentAddress("recursive", spool.hash)
            info = PathInfo(path, spool.hash, spool.size, registration_time=int(time.time()), ca=ca.render())
            return self.add_nar(info, spool.source())
        finally:
            spool.close()

    def add_text(self, name: str, data: bytes | str, references: Iterable[str] = ()) -> PathInfo:
        """A text object (``builtins.toFile``, ``.drv`` files); a ``str`` is stored as UTF-8."""
        from ..nar.events import File
        from .paths import ContentAddress, make_text_path

        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        refs = frozenset(references)
        th = Hash("sha256", hashlib.sha256(raw).digest())
        path = make_text_path(name, th, refs, self.store_dir)
        nar = b"".join(bytes(c) for c in write_nar([File(b"", False, len(raw), [raw])]))
        info = PathInfo(path, Hash("sha256", hashlib.sha256(nar).digest()), len(nar), refs,
                        registration_time=int(time.time()), ca=ContentAddress("text", th).render())
        return self.add_nar(info, nar)

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None:
        raise self.unsupported("adding signatures")

    def temp_root(self, path: str) -> None:
        """Protect ``path`` from this store's collector for this process's lifetime (a store
        without a collector needs nothing)."""

    def batch(self, *, keep_on_error: bool = False) -> AbstractContextManager[None]:
        """Paths added inside the block become valid together when it ends without error
        (``keep_on_error``: the complete ones also on error). A store without transactions
        makes each path valid as it is added."""
        return nullcontext()

    def commit_pending(self) -> int:
        """Inside a :meth:`batch`: make what it holds valid now and stay in it; how many paths."""
        return 0

    # -- derived operations (written once in ops) -----------------------------------------

    def closure(self, paths: Iterable[str], *, include_outputs: bool = False) -> list[str]:
        """The closure of ``paths`` in dependency order (every path after its references)."""
        from . import ops

        return ops.closure(self, paths, include_outputs=include_outputs)

    def export_paths(self, paths: Iterable[str]) -> Iterator[bytes | bytearray | memoryview]:
        """A ``nix-store --export`` stream of exactly ``paths`` (dependency order)."""
        from . import ops

        return ops.export_paths(self, paths)

    def import_paths(self, src: ByteSource | BinaryIO | bytes) -> list[str]:
        """Import one ``nix-store --export`` stream, all or nothing where the store has
        transactions (:meth:`batch`); the paths in stream order."""
        from . import ops

        return ops.import_paths(self, as_source(src, "export stream"))

    # -- transfer hooks (driven by ops.copy_paths) ----------------------------------------

    def send_nars(self, infos: Sequence[PathInfo], consume: ConsumeFn, *,
                  on_bytes: Callable[[int], None] | None = None,
                  before_wait: Callable[[], None] | None = None) -> None:
        """Give ``consume`` the NAR of every path in ``infos``, in order, each as a source of
        exactly ``info.nar_size`` bytes. ``before_wait`` is called when the next NAR is slow to
        come (a remote store); a local store never waits."""
        from ..remote import wire as W

        for info in infos:
            it = iter(self.nar_chunks(info.path))
            src = ByteSource(chunk_reader(it), "NAR")
            sub = W.limited_source(src, info.nar_size, on_chunk=on_bytes)
            consume(info, sub)
            if W.drain(sub):
                raise StoreError(f"NAR of '{info.path}' is shorter than its narSize", path=info.path,
                                 rule="size-mismatch", expected=info.nar_size)
            for _ in it:  # the hash check at the end of the stream
                pass

    def check_receivable(self, infos: Sequence[PathInfo]) -> None:
        """Refuse up front (before any NAR moves) a copy of ``infos`` this store would not
        accept. The default accepts anything (the checks happen in :meth:`add_nar`)."""

    def receive_nars(self, source: BaseStore, infos: Sequence[PathInfo], *,
                     on_done: Callable[[list[str]], None], on_bytes: Callable[[int], None] | None = None,
                     batch_paths: int = 512, batch_bytes: int = 256 << 20) -> None:
        """Add ``infos`` (dependency order) with their NARs from ``source``, in batches (one
        commit per ``batch_paths`` paths or ``batch_bytes`` bytes, and whenever the source is slow
        to deliver); ``on_done(paths)`` after each commit. A failure rolls the open batch back,
        keeping complete paths where the store can (a rerun fetches the rest)."""
        imp = _Importer(self, on_done, batch_paths, batch_bytes)
        try:
            source.send_nars(infos, imp.consume, on_bytes=on_bytes, before_wait=imp.before_wait)
        except BaseException as e:
            imp.abort(e)
            raise
        imp.commit()


class _Importer:
    """Adds NARs in ``store.batch()`` groups; a group's paths are reported once committed."""

    def __init__(self, store: BaseStore, on_done: Callable[[list[str]], None], max_paths: int,
                 max_bytes: int) -> None:
        self.store = store
        self.on_done = on_done
        self.max_paths = max_paths
        self.max_bytes = max_bytes
        self.cm: AbstractContextManager[None] | None = None
        self.pending: list[str] = []
        self.nbytes = 0

    def consume(self, info: PathInfo, src: ByteSource) -> None:
        if self.cm is None:
            self.cm = self.store.batch(keep_on_error=True)
            self.cm.__enter__()
            self.pending = []
            self.nbytes = 0
        self.store.temp_root(info.path)
        self.store.add_nar(info, src)
        self.pending.append(info.path)
        self.nbytes += info.nar_size
        if len(self.pending) >= self.max_paths or self.nbytes >= self.max_bytes:
            self.commit()

    def before_wait(self) -> None:
        """The source is slow: make the group's paths durable now (staying in the batch)."""
        if self.cm is None or not self.pending:
            return
        self.store.commit_pending()
        done, self.pending = self.pending, []
        self.on_done(done)

    def commit(self) -> None:
        cm, self.cm = self.cm, None
        if cm is None:
            return
        cm.__exit__(None, None, None)
        done, self.pending = self.pending, []
        self.on_done(done)

    def abort(self, e: BaseException) -> None:
        cm, self.cm = self.cm, None
        if cm is not None:
            cm.__exit__(type(e), e, e.__traceback__)


__all__ = ["BaseStore", "NarSpool", "ConsumeFn", "UnsupportedError"]
