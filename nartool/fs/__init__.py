"""Filesystem adapters: dump sources and restore sinks that touch the disk.

Name codecs (the case hack) and filters plug into :func:`dump_events` and
:func:`restore_events` without touching the codec.
"""


from .._lazy import lazy_getattr

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
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


__getattr__ = lazy_getattr(__name__, _WHERE, globals())


__all__ = ["restore_events", "dump_events", "dump_nar", "DirNamer", "Exclude", "NameCodec"]
