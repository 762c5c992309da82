"""A minimal Nix-compatible store (paths, SQLite db, references, closures, GC, export/import).

:class:`BaseStore` (alias ``Store``) is the base class of every store; :class:`LocalStore` is
the on-disk store (the layout of ``nix-store --store ROOT``); :func:`open_store` opens any store
from its URI; :class:`PathInfo` is what a store knows about a path.

The names are imported when first used (``from nartool.store import LocalStore`` works as
before): importing a submodule such as :mod:`nartool.store.signing` then does not load the
on-disk store, SQLite and the URI parser at start-up.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from .base import BaseStore
    from .local import LocalStore, default_root
    from .paths import ContentAddress, StorePath
    from .types import PathInfo, Store
    from .uri import open_store, register_store_type

__all__ = ["BaseStore", "LocalStore", "default_root", "ContentAddress", "StorePath", "PathInfo", "Store",
           "open_store", "register_store_type"]

_WHERE = {"BaseStore": ".base", "LocalStore": ".local", "default_root": ".local", "ContentAddress": ".paths",
          "StorePath": ".paths", "PathInfo": ".types", "Store": ".types", "open_store": ".uri",
          "register_store_type": ".uri"}


__getattr__ = lazy_getattr(__name__, _WHERE, globals())
