"""A minimal Nix-compatible store (paths, SQLite db, references, closures, GC, export/import).

:class:`BaseStore` (alias ``Store``) is the base class of every store; :class:`LocalStore` is
the on-disk store (the layout of ``nix-store --store ROOT``); :func:`open_store` opens any store
from its URI; :class:`PathInfo` is what a store knows about a path.
"""

from .base import BaseStore
from .local import LocalStore, default_root
from .paths import ContentAddress, StorePath
from .types import PathInfo, Store
from .uri import open_store, register_store_type

__all__ = ["BaseStore", "LocalStore", "default_root", "ContentAddress", "StorePath", "PathInfo", "Store",
           "open_store", "register_store_type"]
