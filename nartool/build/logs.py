"""Build logs as Nix 2.8 handles them (``docs/builds.md``).

* :class:`RawLog` stores the builder's bytes unmodified, bzip2-compressed, at
  ``<state>/log/nix/drvs/<first 2 chars of the .drv base name>/<rest>.bz2``, where
  ``nix-store -l`` finds them (written under a temporary name, renamed when complete).
* :class:`LineAssembler` makes lines: ``\\n`` ends a line; ``\\r`` moves back to column 0
  without truncating (later bytes overwrite); a last line without ``\\n`` is given at the end.
* :func:`filter_escapes` is Nix's display filter: every escape sequence goes, except SGR
  colours (``ESC [ … m``) when ``keep_colours`` (stderr is a terminal); an ``ESC`` followed by
  a byte 0x40–0x5F goes with that byte, an OSC body stays as text; tabs expand to the next
  multiple of 8 columns; ``\\r`` and BEL go.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from ..errors import StoreError


def log_path(state_dir: str, drv_path: str, *, compressed: bool = True) -> str:
    """Where the log of ``drv_path`` is kept under the store's state dir (``.../nix/var``'s
    ``log/nix/drvs``; ``state_dir`` is ``<root>/nix/var/nix``)."""
    base = drv_path.rsplit("/", 1)[-1]
    log_dir = os.path.join(os.path.dirname(state_dir), "log", "nix", "drvs")
    return os.path.join(log_dir, base[:2], base[2:] + (".bz2" if compressed else ""))


class RawLog:
    """The raw log file of one build (bzip2 unless ``compressed=False``)."""

    def __init__(self, path: str, *, compressed: bool = True) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._tmp = f"{path}.tmp-{os.getpid()}"
        self._f = open(self._tmp, "wb")  # noqa: SIM115 (closed by close/abort)
        self._z = None
        if compressed:
            import bz2  # (here: a command whose targets are all built already does without it)

            self._z = bz2.BZ2Compressor(9)

    def write(self, data: bytes) -> None:
        self._f.write(self._z.compress(data) if self._z is not None else data)

    def close(self) -> None:
        if self._f.closed:
            return
        if self._z is not None:
            self._f.write(self._z.flush())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def read_log(state_dir: str, drv_path: str) -> bytes:
    """A stored build log (bzip2 or plain), as ``nix-store -l`` prints it."""
    for compressed in (True, False):
        p = log_path(state_dir, drv_path, compressed=compressed)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        if compressed:
            import bz2

            try:
                return bz2.decompress(data)
            except (OSError, ValueError) as e:
                raise StoreError(f"build log is corrupt: {e}", path=p, rule="bad-log") from None
        return data
    raise StoreError(f"build log of '{drv_path}' is not available", path=drv_path, rule="no-log")


#: a displayed line is cut after this many bytes (the raw log keeps everything)
MAX_LINE = 1 << 20


class LineAssembler:
    """Bytes in, complete lines out (without their ``\\n``), as Nix assembles builder output
    (lines longer than :data:`MAX_LINE` are cut, unlike Nix, to bound memory)."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        self._line = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        line, pos = self._line, self._pos
        i, n = 0, len(data)
        while i < n:
            # fast path: a run without control bytes of interest
            j = i
            while j < n and data[j] not in (10, 13):
                j += 1
            if j > i:
                chunk = data[i:j][:max(0, MAX_LINE - pos)]  # (bounded memory: a longer line is cut)
                line[pos:pos + len(chunk)] = chunk
                pos += j - i
            if j < n:
                if data[j] == 10:
                    self.emit(bytes(line))
                    line.clear()
                    pos = 0
                else:
                    pos = 0
            i = j + 1
        self._line, self._pos = line, pos

    def finish(self) -> None:
        if self._line:
            self.emit(bytes(self._line))
            self._line.clear()
            self._pos = 0


def filter_escapes(line: bytes, *, keep_colours: bool = False) -> bytes:
    """Nix 2.8's ``filterANSIEscapes`` (no width limit), plus BEL dropped (see module doc)."""
    if 27 not in line and 9 not in line and 13 not in line and 7 not in line:
        return line
    out = bytearray()
    w = 0
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c == 27:
            start = i
            i += 1
            last = 0
            if i < n and line[i] == 0x5B:  # '['
                i += 1
                while i < n and 0x30 <= line[i] <= 0x3F:
                    i += 1
                while i < n and 0x20 <= line[i] <= 0x2F:
                    i += 1
                if i < n and 0x40 <= line[i] <= 0x7E:
                    last = line[i]
                    i += 1
            elif i < n and 0x40 <= line[i] <= 0x5F:
                i += 1
            if keep_colours and last == 0x6D:  # 'm'
                out += line[start:i]
        elif c == 9:
            i += 1
            out.append(32)
            w += 1
            while w % 8:
                out.append(32)
                w += 1
        elif c in (13, 7):
            i += 1
        else:
            w += 1  # one column per character: a UTF-8 lead byte takes its continuation bytes along
            more = 1 if c & 0xE0 == 0xC0 else 2 if c & 0xF0 == 0xE0 else 3 if c & 0xF8 == 0xF0 else 0
            out.append(c)
            i += 1
            while more and i < n and line[i] & 0xC0 == 0x80:
                out.append(line[i])
                i += 1
                more -= 1
    return bytes(out)


def iter_lines(data: bytes) -> Iterator[bytes]:
    """The assembled lines of a whole log (tests, ``store log``)."""
    lines: list[bytes] = []
    la = LineAssembler(lines.append)
    la.feed(data)
    la.finish()
    yield from lines
