"""Bounds applied when reading and when dumping NARs (the values current Nix enforces)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    #: most levels of nodes, counting the root as level 1 (an object 64 levels below the
    #: root is refused, as in Nix 2.35+)
    max_depth: int = 64
    #: longest keyword token (the longest real one, ``executable``, has 10 bytes)
    max_tag: int = 32
    #: longest directory entry name
    max_name: int = 255
    #: longest symlink target
    max_target: int = 4095


DEFAULT_LIMITS = Limits()
