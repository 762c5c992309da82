"""Binary caches: ``file://`` (here), ``http(s)://`` and ``s3://`` stores Nix reads and writes.

* :mod:`nartool.cache.narinfo` — the ``.narinfo`` format (:class:`NarInfo`);
* :mod:`nartool.cache.backend` — the storage protocol (:class:`CacheBackend`);
* :mod:`nartool.cache.store` — :class:`BinaryCacheStore`, a cache as a store;
* :mod:`nartool.cache.file` — the local directory backend;
* :mod:`nartool.cache.substitute` — substituters (:func:`substitute_paths`).
"""

from __future__ import annotations

from .backend import CacheBackend, CacheUnavailableError
from .narinfo import NarInfo, NarInfoError
from .store import BinaryCacheStore

__all__ = ["BinaryCacheStore", "CacheBackend", "CacheUnavailableError", "NarInfo", "NarInfoError"]
