"""A minimal Nix-compatible store (paths, SQLite db, references, closures, GC, export/import)."""

from .types import PathInfo, Store

__all__ = ["PathInfo", "Store"]
