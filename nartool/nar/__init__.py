"""Pure NAR codec: no filesystem access.

* :class:`NarReader` — strict streaming reader: bytes → events.
* :func:`write_nar` — writer: events → bytes chunks.
* :mod:`nartool.nar.events` — the event types.
* :mod:`nartool.nar.listing` — listings (``ls``, ``.ls`` JSON) and ``cat`` over events.
"""


from .._lazy import lazy_getattr

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from .events import END, Directory, EndDirectory, Event, File, Node, Symlink, with_paths
    from .limits import DEFAULT_LIMITS, Limits
    from .reader import NarReader
    from .source import ByteSource
    from .writer import nar_bytes, write_nar

# the names below are imported from their modules at first use (start-up time: a command loads
# only the modules it needs)
_WHERE = {
    "END": ".events",
    "Directory": ".events",
    "EndDirectory": ".events",
    "Event": ".events",
    "File": ".events",
    "Node": ".events",
    "Symlink": ".events",
    "with_paths": ".events",
    "DEFAULT_LIMITS": ".limits",
    "Limits": ".limits",
    "NarReader": ".reader",
    "ByteSource": ".source",
    "nar_bytes": ".writer",
    "write_nar": ".writer",
}


__getattr__ = lazy_getattr(__name__, _WHERE, globals())


__all__ = [
    "END", "Directory", "EndDirectory", "Event", "File", "Node", "Symlink", "with_paths",
    "DEFAULT_LIMITS", "Limits", "NarReader", "ByteSource", "nar_bytes", "write_nar",
]
