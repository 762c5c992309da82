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
from ..nar.events import Event
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
    """Operations every store offers. All paths are full logical store paths."""

    store_dir: str

    # -- queries
    def is_valid(self, path: str) -> bool: ...
    def query_valid_paths(self, paths: Iterable[str]) -> set[str]: ...
    def query_path_info(self, path: str) -> PathInfo | None: ...
    def query_referrers(self, path: str) -> set[str]: ...
    def closure(self, paths: Iterable[str], *, include_outputs: bool = False) -> list[str]:
        """The closure of ``paths`` in dependency order: every path after its references."""
        ...

    # -- reading contents
    def nar_events(self, path: str) -> Iterator[Event]:
        """The NAR events of a valid path (streamed from disk)."""
        ...

    def nar_chunks(self, path: str) -> Iterator[bytes | bytearray | memoryview]:
        """The NAR bytes of a valid path, checked against its registered hash as they stream."""
        ...

    # -- adding contents
    def add_nar(self, info: PathInfo, nar: ByteSource, *, check_sigs: bool = False) -> PathInfo:
        """Restore one NAR read from ``nar`` (exactly one NAR is consumed) as ``info.path``,
        check its hash and size against ``info`` (when ``info.nar_size`` is non-zero), scan
        nothing (references come from ``info``), canonicalise, sync and register it.
        Already-valid paths are skipped (the NAR is still consumed and checked).
        All references other than the path itself must be valid or in the same batch."""
        ...

    def import_paths(self, src: ByteSource, *, check_sigs: bool = False) -> list[str]:
        """Read a ``nix-store --export`` stream and import every record, all or nothing."""
        ...

    def export_paths(self, paths: Iterable[str]) -> Iterator[bytes | bytearray | memoryview]:
        """A ``nix-store --export`` stream of ``paths`` (in dependency order)."""
        ...

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None: ...

    # -- concurrency
    def temp_root(self, path: str) -> None:
        """Protect ``path`` (valid or about to be added) from GC for this process's lifetime."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """Register everything added inside the block in one transaction, at its end."""
        ...
