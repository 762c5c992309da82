"""NAR hashing: digest and size of an event stream's serialisation, without storing it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

from ..hashes import Hash
from . import format as F
from .events import EndDirectory, Event, File, Symlink
from .limits import DEFAULT_LIMITS, Limits
from .writer import write_nar


def hash_events(events: Iterable[Event], algo: str = "sha256", *, limits: Limits = DEFAULT_LIMITS) -> tuple[Hash, int]:
    """``(hash, nar_size)`` of the NAR that ``events`` serialise to."""
    return hash_chunks(write_nar(events, limits=limits), algo)


def hash_chunks(
    chunks: Iterable[bytes | bytearray | memoryview], algo: str = "sha256", *, threaded: bool = True
) -> tuple[Hash, int]:
    """``(hash, size)`` of the concatenated ``chunks``; with ``threaded`` they are produced in
    a background thread so that producing overlaps hashing (which releases the GIL)."""
    h = hashlib.new(algo)
    update = h.update
    size = 0
    if threaded:
        from ..pipeline import pipelined  # (here: a build's start does without queue and its thread)

        chunks = pipelined(chunks, depth=8)
    for chunk in chunks:
        update(chunk)
        size += len(chunk)
    return Hash(algo, h.digest()), size


def tee_nar(events: Iterable[Event], sink: Callable[[bytes | bytearray | memoryview], None]) -> Iterator[Event]:
    """Pass ``events`` through unchanged while feeding ``sink`` the NAR bytes they serialise to.

    For streams already validated (e.g. by :class:`~nartool.nar.reader.NarReader`): no checks
    are repeated. A file's trailing bytes reach ``sink`` once its chunks are exhausted.
    """
    sink(F.TOK_MAGIC)
    depth = 0
    for ev in events:
        cls = ev.__class__
        if cls is EndDirectory:
            depth -= 1
            sink(F.CLOSE2 if depth else F.CLOSE)
            yield ev
            continue
        if depth:
            sink(F.ENTRY_OPEN + F.enc_str(ev.name) + F.NODE)  # type: ignore[union-attr]
        if cls is File:
            assert isinstance(ev, File)
            sink((F.HDR_EXECUTABLE if ev.executable else F.HDR_REGULAR) + F.u64(ev.size))
            yield File(ev.name, ev.executable, ev.size, _tee_chunks(ev, sink, depth), ev.offset)
        elif cls is Symlink:
            assert isinstance(ev, Symlink)
            sink(F.HDR_SYMLINK + F.enc_str(ev.target) + (F.CLOSE2 if depth else F.CLOSE))
            yield ev
        else:
            sink(F.HDR_DIRECTORY)
            depth += 1
            yield ev


def _tee_chunks(ev: File, sink: Callable[[bytes | bytearray | memoryview], None],
                depth: int) -> Iterator[bytes | bytearray | memoryview]:
    for c in ev.chunks:
        sink(c)
        yield c
    sink(F.PAD[(-ev.size) & 7] + (F.CLOSE2 if depth else F.CLOSE))


class NarDigest:
    """A ``sink`` for :func:`tee_nar` that hashes and counts."""

    def __init__(self, algo: str = "sha256") -> None:
        self.h = hashlib.new(algo)
        self.algo = algo
        self.size = 0

    def __call__(self, b: bytes | bytearray | memoryview) -> None:
        self.h.update(b)
        self.size += len(b)

    def hash(self) -> Hash:
        return Hash(self.algo, self.h.digest())
