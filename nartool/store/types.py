"""Store data types the upper layers (remote, build, caches) rely on.

:class:`PathInfo` mirrors a ``ValidPaths`` row plus its references. ``Store`` (importable from
here for compatibility) is :class:`nartool.store.base.BaseStore`, the base class every store
derives from.
"""

from __future__ import annotations

from .._record import Record

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from ..hashes import Hash
    from .base import BaseStore as Store


_EMPTY: frozenset[str] = frozenset()


class PathInfo(Record):
    """What a store knows about one valid path. Paths are full logical store paths (str).

    A mutable record compared by value (unhashable), with :meth:`~nartool._record.Record.replace`."""

    __slots__ = ("path", "nar_hash", "nar_size", "references", "deriver", "registration_time", "ultimate", "sigs",
                 "ca")

    def __init__(self, path: str, nar_hash: Hash, nar_size: int, references: frozenset[str] = _EMPTY,
                 deriver: str | None = None, registration_time: int = 0, ultimate: bool = False,
                 sigs: frozenset[str] = _EMPTY, ca: str | None = None) -> None:
        self.path = path
        self.nar_hash = nar_hash
        self.nar_size = nar_size
        self.references = references
        self.deriver = deriver
        self.registration_time = registration_time
        self.ultimate = ultimate
        self.sigs = sigs
        self.ca = ca


def __getattr__(name: str) -> object:
    # ``Store`` is the base class of every store (:class:`nartool.store.base.BaseStore`),
    # imported lazily: the base class module needs :class:`PathInfo` from here.
    if name == "Store":
        from .base import BaseStore

        return BaseStore
    raise AttributeError(name)


__all__ = ["PathInfo", "Store"]
