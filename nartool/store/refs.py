"""Reference scanning: which candidate store paths does a NAR stream mention?

As Nix does it: a reference is any byte-exact occurrence of a candidate's 32-character
hash part anywhere in the NAR serialisation (contents, symlink targets, names, framing),
matches may span chunk boundaries, and only candidates count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from .paths import HASH_PART_LEN

# runs of nix32 characters long enough to hold a hash part
_RUN = re.compile(rb"[0-9a-df-np-sv-z]{32,}")


class RefScanner:
    """Feed NAR chunks with :meth:`update`; :attr:`found` holds the matched hash parts."""

    def __init__(self, hash_parts: Iterable[str]) -> None:
        self.candidates = {h.encode("ascii") for h in hash_parts}
        self.found: set[str] = set()
        self._tail = b""

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        if not self.candidates:
            return
        buf = self._tail + bytes(chunk)
        cands = self.candidates
        n = HASH_PART_LEN
        for m in _RUN.finditer(buf):
            run = m.group()
            if len(run) == n:
                if run in cands:
                    self._hit(run)
                continue
            for i in range(len(run) - n + 1):
                w = run[i : i + n]
                if w in cands:
                    self._hit(w)
        self._tail = buf[-(n - 1):]

    def _hit(self, h: bytes) -> None:
        self.found.add(h.decode("ascii"))
        self.candidates.discard(h)

    def tee(self, chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes | bytearray | memoryview]:
        """Pass ``chunks`` through while scanning them."""
        for c in chunks:
            self.update(c)
            yield c


def scan_references(chunks: Iterable[bytes | bytearray | memoryview], candidates: Iterable[str],
                    store_dir: str) -> set[str]:
    """The candidate store paths (full paths) whose hash parts occur in ``chunks``."""
    by_hash = {p[len(store_dir) + 1 : len(store_dir) + 1 + HASH_PART_LEN]: p for p in candidates}
    s = RefScanner(by_hash)
    for c in chunks:
        s.update(c)
    return {by_hash[h] for h in s.found}
