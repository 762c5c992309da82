"""A minimal Nix-compatible store (paths, SQLite db, references, closures, GC, export/import).

:class:`LocalStore` is the on-disk store (the layout of ``nix-store --store ROOT``);
:class:`PathInfo` and :class:`Store` are the types upper layers code against.
"""

from .local import LocalStore, default_root
from .paths import ContentAddress, StorePath
from .types import PathInfo, Store

__all__ = ["LocalStore", "default_root", "ContentAddress", "StorePath", "PathInfo", "Store"]
