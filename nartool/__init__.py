"""nartool: a Nix-compatible store import/export toolkit.

Layers, each usable alone: :mod:`nartool.nar` (pure NAR codec), :mod:`nartool.fs`
(filesystem sources and sinks), :mod:`nartool.store`, :mod:`nartool.remote`, :mod:`nartool.cli`.
The most used entry points are re-exported here lazily.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any


__version__ = "0.1.0"

# Library diagnostics go to the ``nartool`` loggers (nartool._log: ``logging`` is imported at
# their first use, and the ``nartool`` logger then gets a NullHandler); silent unless the
# application (the CLI: nartool.cli.main) configures a handler.

_LAZY = {
    "dump": "nartool.api",
    "restore": "nartool.api",
    "hash_path": "nartool.api",
    "ls": "nartool.api",
    "cat": "nartool.api",
}


_SUBMODULES = {"api", "nar", "fs", "store", "remote", "hashes", "errors", "compression"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None and name not in _SUBMODULES:
        # (before importing importlib: ``from nartool import _json`` asks here first)
        raise AttributeError(name)
    import importlib

    if mod is None:
        return importlib.import_module(f"nartool.{name}")
    return getattr(importlib.import_module(mod), name)
