"""Store data types the upper layers (remote, build, caches) rely on.

:class:`PathInfo` mirrors a ``ValidPaths`` row plus its references. ``Store`` (importable from
here for compatibility) is :class:`nartool.store.base.BaseStore`, the base class every store
derives from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..hashes import Hash

if TYPE_CHECKING:
    from .base import BaseStore as Store


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


def __getattr__(name: str) -> object:
    # ``Store`` is the base class of every store (:class:`nartool.store.base.BaseStore`),
    # imported lazily: the base class module needs :class:`PathInfo` from here.
    if name == "Store":
        from .base import BaseStore

        return BaseStore
    raise AttributeError(name)


__all__ = ["PathInfo", "Store"]
