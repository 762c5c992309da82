"""Stream compression: zstd, xz, bzip2, gzip — detected by magic bytes on input.

Everything streams: :func:`compressor` wraps an iterator of chunks, :func:`open_decompressed`
wraps a binary input and returns a ``read(n)`` callable.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from .errors import NartoolError

METHODS = ("none", "zstd", "xz", "bzip2", "gzip")

MAGICS = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x1f\x8b", "gzip"),
)


class CompressionError(NartoolError):
    pass


def detect(head: bytes) -> str:
    for magic, name in MAGICS:
        if head.startswith(magic):
            return name
    return "none"


def _compressobj(method: str, level: int | None) -> Any:
    if method == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3 if level is None else level, threads=-1).compressobj()
    if method == "xz":
        return lzma.LZMACompressor(preset=6 if level is None else level)
    if method == "bzip2":
        return bz2.BZ2Compressor(9 if level is None else level)
    if method == "gzip":
        return zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
    raise CompressionError(f"unknown compression method {method!r}", expected="|".join(METHODS), got=method)


def compressor(
    chunks: Iterable[bytes | bytearray | memoryview], method: str, level: int | None = None
) -> Iterator[bytes | bytearray | memoryview]:
    if method == "none":
        yield from chunks
        return
    c = _compressobj(method, level)
    for chunk in chunks:
        out = c.compress(chunk)
        if out:
            yield out
    tail = c.flush()
    if tail:
        yield tail


def _decompressobj(method: str) -> Any:
    if method == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()
    if method == "xz":
        return lzma.LZMADecompressor()
    if method == "bzip2":
        return bz2.BZ2Decompressor()
    if method == "gzip":
        return zlib.decompressobj(31)
    raise CompressionError(f"unknown compression method {method!r}")


class _Decompressing:
    """``read(n)`` over a compressed stream; returns ``b""`` only at the end."""

    def __init__(self, read: Callable[[int], bytes], method: str, head: bytes) -> None:
        self.read_raw = read
        self.method = method
        self.d = _decompressobj(method)
        self.pending = head
        self.out = b""
        self.eof = False

    def _decompress(self, data: bytes) -> bytes:
        try:
            return self.d.decompress(data)  # type: ignore[no-any-return]
        except Exception as e:  # each library has its own error type
            raise CompressionError(f"corrupt {self.method} stream: {e}", rule="corrupt") from e

    def read(self, n: int) -> bytes:
        while not self.out and not self.eof:
            data = self.pending or self.read_raw(1 << 16)
            self.pending = b""
            if not data:
                self.eof = True
                if self.method != "zstd" and not getattr(self.d, "eof", True):
                    raise CompressionError(f"truncated {self.method} stream", rule="truncated")
                break
            out = self._decompress(data)
            unused = getattr(self.d, "unused_data", b"")
            if getattr(self.d, "eof", False) and unused:
                # concatenated members (as gzip/xz/bzip2 tools allow): start a new one
                self.d = _decompressobj(self.method)
                self.pending = unused
            self.out = out
        if len(self.out) <= n:
            b, self.out = self.out, b""
            return b
        b = self.out[:n]
        self.out = self.out[n:]
        return b


def open_decompressed(f: BinaryIO | Callable[[int], bytes]) -> tuple[Callable[[int], bytes], str]:
    """Return ``(read, method)`` for an input that may be compressed."""
    read = f if callable(f) else f.read
    head = b""
    while len(head) < 6:
        more = read(6 - len(head))
        if not more:
            break
        head += more
    method = detect(head)
    if method == "none":
        state = {"head": head}

        def read_plain(n: int) -> bytes:
            h = state["head"]
            if h:
                if n >= len(h):
                    state["head"] = b""
                    rest = read(n - len(h)) if n > len(h) else b""
                    return h + rest
                state["head"] = h[n:]
                return h[:n]
            return read(n)

        return read_plain, method
    return _Decompressing(read, method, head).read, method
