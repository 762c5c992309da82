"""Filesystem adapters: dump sources and restore sinks that touch the disk.

Name codecs (the case hack) and filters plug into :func:`dump_events` and
:func:`restore_events` without touching the codec.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sink import restore_events
    from .source import DirNamer, Exclude, NameCodec, dump_events, dump_nar

# the names below are imported from their modules at first use (start-up time: a command loads
# only the modules it needs)
_WHERE = {
    "restore_events": ".sink",
    "DirNamer": ".source",
    "Exclude": ".source",
    "NameCodec": ".source",
    "dump_events": ".source",
    "dump_nar": ".source",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


__all__ = ["restore_events", "dump_events", "dump_nar", "DirNamer", "Exclude", "NameCodec"]
