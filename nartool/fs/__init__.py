"""Filesystem adapters: dump sources and restore sinks that touch the disk.

Name codecs (the case hack) and filters plug into :func:`dump_events` and
:func:`restore_events` without touching the codec.
"""

from .sink import restore_events
from .source import DirNamer, Exclude, NameCodec, dump_events, dump_nar

__all__ = ["restore_events", "dump_events", "dump_nar", "DirNamer", "Exclude", "NameCodec"]
