"""Pure NAR codec: no filesystem access.

* :class:`NarReader` — strict streaming reader: bytes → events.
* :func:`write_nar` — writer: events → bytes chunks.
* :mod:`nartool.nar.events` — the event types.
* :mod:`nartool.nar.listing` — listings (``ls``, ``.ls`` JSON) and ``cat`` over events.
"""

from .events import END, Directory, EndDirectory, Event, File, Node, Symlink, with_paths
from .limits import DEFAULT_LIMITS, Limits
from .reader import NarReader
from .source import ByteSource
from .writer import nar_bytes, write_nar

__all__ = [
    "END", "Directory", "EndDirectory", "Event", "File", "Node", "Symlink", "with_paths",
    "DEFAULT_LIMITS", "Limits", "NarReader", "ByteSource", "nar_bytes", "write_nar",
]
