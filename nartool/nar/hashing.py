"""NAR hashing: digest and size of an event stream's serialisation, without storing it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..hashes import Hash
from ..pipeline import pipelined
from .events import Event
from .limits import DEFAULT_LIMITS, Limits
from .writer import write_nar


def hash_events(events: Iterable[Event], algo: str = "sha256", *, limits: Limits = DEFAULT_LIMITS) -> tuple[Hash, int]:
    """``(hash, nar_size)`` of the NAR that ``events`` serialise to."""
    h = hashlib.new(algo)
    update = h.update
    size = 0
    for chunk in pipelined(write_nar(events, limits=limits)):
        update(chunk)
        size += len(chunk)
    return Hash(algo, h.digest()), size
