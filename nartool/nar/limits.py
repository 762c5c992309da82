"""Bounds applied when reading and when dumping NARs (the values current Nix enforces)."""

from __future__ import annotations


class Limits:
    """Immutable, compared by value. (A plain class rather than a dataclass: ``dataclasses``
    loads ``inspect`` and compiles its methods at import, ~5 ms of every command's start-up.)"""

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

    def _values(self) -> tuple[int, int, int, int]:
        return (self.max_depth, self.max_tag, self.max_name, self.max_target)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Limits are immutable (cannot set {name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Limits are immutable (cannot delete {name})")

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if isinstance(other, Limits) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __reduce__(self) -> tuple[type[Limits], tuple[int, int, int, int]]:
        return (Limits, self._values())

    def __repr__(self) -> str:
        return ("Limits(max_depth={}, max_tag={}, max_name={}, max_target={})").format(*self._values())


DEFAULT_LIMITS = Limits()
