"""Bounds applied when reading and when dumping NARs (the values current Nix enforces)."""

from __future__ import annotations

from .._record import Frozen


class Limits(Frozen):
    """Immutable, compared by value (a plain record: see :mod:`nartool._record`)."""

    __slots__ = ("max_depth", "max_tag", "max_name", "max_target")

    #: most levels of nodes, counting the root as level 1 (an object 64 levels below the
    #: root is refused, as in Nix 2.35+)
    max_depth: int
    #: longest keyword token (the longest real one, ``executable``, has 10 bytes)
    max_tag: int
    #: longest directory entry name
    max_name: int
    #: longest symlink target
    max_target: int

    def __init__(self, max_depth: int = 64, max_tag: int = 32, max_name: int = 255, max_target: int = 4095) -> None:
        for name, value in (("max_depth", max_depth), ("max_tag", max_tag), ("max_name", max_name),
                            ("max_target", max_target)):
            object.__setattr__(self, name, value)


DEFAULT_LIMITS = Limits()
