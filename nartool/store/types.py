"""Store data types and the interface the upper layers (remote, build, caches) rely on.

:class:`PathInfo` mirrors a ``ValidPaths`` row plus its references. :class:`Store` is the
structural interface that :class:`nartool.store.local.LocalStore` implements and that
:mod:`nartool.remote` codes against (an in-memory or remote store can implement it too).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from ..hashes import Hash
from ..nar.source import ByteSource


@dataclass
class PathInfo:
    """What a store knows about one valid path. Paths are full logical store paths (str)."""

    path: str
    nar_hash: Hash
    nar_size: int
    references: frozenset[str] = field(default_factory=frozenset)
    deriver: str | None = None
    registration_time: int = 0
    ultimate: bool = False
    sigs: frozenset[str] = field(default_factory=frozenset)
    ca: str | None = None

    def sorted_references(self) -> list[str]:
        return sorted(self.references)


class Store(Protocol):
    """Operations every store offers. All paths are full logical store paths (``str``).

    Implementations: :class:`nartool.store.local.LocalStore` (on disk, Nix's layout and db) and
    :class:`nartool.store.memory.MemoryStore` (in memory, for tests and in-process transports).
    """

    store_dir: str

    # -- queries
    def is_valid(self, path: str) -> bool: ...
    def query_valid_paths(self, paths: Iterable[str]) -> set[str]: ...
    def query_path_info(self, path: str) -> PathInfo | None: ...
    def query_referrers(self, path: str) -> set[str]: ...
    def query_derivation_outputs(self, drv_path: str) -> dict[str, str]:
        """Output name → output path of a registered ``.drv`` (``DerivationOutputs``)."""
        ...

    def closure(self, paths: Iterable[str], *, include_outputs: bool = False) -> list[str]:
        """The closure of ``paths`` in dependency order: every path after its references.
        :class:`~nartool.errors.StoreError` (rule ``invalid-path``) if a path is not valid."""
        ...

    # -- reading contents
    def nar_chunks(self, path: str) -> Iterator[bytes | bytearray | memoryview]:
        """The NAR bytes of a valid path, checked against its registered hash as they stream
        (a mismatch raises :class:`~nartool.errors.StoreError` rule ``hash-changed`` at the end)."""
        ...

    # -- adding contents
    def add_nar(self, info: PathInfo, nar: ByteSource) -> PathInfo:
        """Read exactly one NAR from ``nar`` and add it as ``info.path``.

        Checks the NAR's sha256 and size against ``info`` (size only when ``info.nar_size`` is
        non-zero) and refuses a mismatch; references come from ``info`` (nothing is scanned) and
        must be valid already, be the path itself, or have been added earlier in the same
        :meth:`batch`. An already-valid path is skipped (its NAR is still read and checked).
        Signature policy is the caller's business. Returns the registered info."""
        ...

    def import_paths(self, src: ByteSource) -> list[str]:
        """Read a ``nix-store --export`` stream from ``src`` and import every record, all or
        nothing; returns the paths in stream order."""
        ...

    def export_paths(self, paths: Iterable[str]) -> Iterator[bytes | bytearray | memoryview]:
        """A ``nix-store --export`` stream of exactly ``paths`` (sorted into dependency order)."""
        ...

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None: ...

    # -- concurrency
    def temp_root(self, path: str) -> None:
        """Protect ``path`` (valid or about to be added) from GC for this process's lifetime."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """Paths added inside the block are synced and registered together (one filesystem
        sync, one transaction) when it ends without error. On error, paths of the batch that
        were not registered are removed again."""
        ...
