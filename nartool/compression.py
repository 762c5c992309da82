"""Stream compression: zstd, xz, bzip2, gzip — detected by magic bytes on input.

Everything streams: :func:`compressor` wraps an iterator of chunks, :func:`open_decompressed`
wraps a binary input and returns a ``read(n)`` callable that decodes only about as much as it
is asked for, so that a small input standing for gigabytes costs neither memory nor more than
linear time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .errors import NartoolError

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

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
    # (each library is imported when it is used: commands that never meet compressed data,
    # such as the restore of a plain NAR, do not pay for loading them)
    if method == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3 if level is None else level, threads=-1).compressobj()
    if method == "xz":
        import lzma

        return lzma.LZMACompressor(preset=6 if level is None else level)
    if method == "bzip2":
        import bz2

        return bz2.BZ2Compressor(9 if level is None else level)
    if method == "gzip":
        import zlib

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


#: Largest output of one zstd block (the format's Block_Maximum_Size).
_ZSTD_BLOCK_MAX = 1 << 17
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # ... to 0x184D2A5F
#: What is read from the compressed input at a time.
_RAW_READ = 1 << 16
#: The least output one decoding step aims at (a read of fewer bytes keeps the rest for later).
_STEP = 1 << 17


class ZstdDecoder:
    """Incremental zstd decoding whose output per step is bounded, whatever the compression ratio.

    ``zstandard``'s ``decompressobj`` returns everything a piece of input expands to (64 KiB
    can hold 2 GiB), and its ``stream_reader`` asks its source for more input while decoded
    output is still held inside the decoder: on a conversation (the ``serve`` session) that
    waits forever for bytes the peer will only send after it got its answer (and it ends
    quietly where a file is cut short inside a frame). So the input is
    cut here at block boundaries, read off the frame and block headers, and each step feeds
    ``decompressobj`` only as many blocks as the output budget allows (a block never decodes
    to more than 128 KiB). Everything a step was fed comes out of it: nothing waits inside.

    Concatenated frames and skippable frames are accepted; anything else after a frame is an
    error, as is (with ``strict_end``) an input that stops inside a frame.
    """

    def __init__(self, *, max_window_size: int = 0, strict_end: bool = True, what: str = "zstd stream") -> None:
        import zstandard

        self._dctx = zstandard.ZstdDecompressor(max_window_size=max_window_size)
        self._error = zstandard.ZstdError
        self._d: Any = None  # decompressobj of the current frame
        self._buf = b""  # compressed input not yet fed
        self._pos = 0
        self._base = 0  # offset in the compressed input of _buf[0]
        self._state = "magic"  # "magic" | "block" | "checksum"
        self._left = 0  # bytes of the current block/checksum (fed) or skippable frame (skipped) to go
        self._feeding = False
        self._checksum = False
        self._out = 0  # decompressed bytes produced so far (for error messages)
        self.strict_end = strict_end
        self.what = what

    @property
    def offset(self) -> int:
        """How many compressed bytes were consumed."""
        return self._base + self._pos

    def add(self, data: bytes) -> None:
        """More compressed input (call only once :meth:`decode` returned None)."""
        self._base += self._pos
        self._buf = self._buf[self._pos :] + data if self._pos < len(self._buf) else data
        self._pos = 0

    def _fail(self, message: str, at: int, rule: str) -> CompressionError:
        return CompressionError(f"{message} in {self.what} (after {self._out} decompressed bytes; the offset "
                                "is in the compressed input)", offset=self._base + at, rule=rule)

    def _feed(self, start: int, end: int) -> bytes:
        try:
            out: bytes = self._d.decompress(self._buf[start:end])
        except self._error as e:
            raise self._fail(f"corrupt data ({e})", start, "corrupt") from None
        self._out += len(out)
        return out

    def decode(self, budget: int) -> bytes | None:
        """Feed what is buffered, up to blocks that may decode to about ``budget`` bytes (at
        least one block); return their output (possibly empty), or None when nothing can be
        done without more input."""
        buf, pos, end = self._buf, self._pos, len(self._buf)
        start = seg = pos  # seg: first byte not yet fed to the current frame's decoder
        outs: list[bytes] = []
        bound = 0
        while True:
            avail = end - pos
            if self._left:
                k = min(self._left, avail)
                if not k:
                    break
                pos += k
                self._left -= k
                if not self._feeding:
                    seg = pos
                continue
            if bound >= budget:
                break
            if self._state == "magic":
                if seg < pos:  # the frame before is complete: let its decoder finish it
                    outs.append(self._feed(seg, pos))
                    seg = pos
                if avail < 4:
                    break
                magic = int.from_bytes(buf[pos : pos + 4], "little")
                if magic == _ZSTD_MAGIC:
                    if avail < 5:
                        break
                    fhd = buf[pos + 4]
                    single = fhd & 0x20
                    size = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + ((1 if single else 0), 2, 4, 8)[fhd >> 6]
                    if avail < size:
                        break
                    self._d = self._dctx.decompressobj()
                    self._feeding = True
                    self._checksum = bool(fhd & 4)
                    self._state = "block"
                    pos += size
                elif magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
                    if avail < 8:
                        break
                    self._left = int.from_bytes(buf[pos + 4 : pos + 8], "little")
                    self._feeding = False
                    pos += 8
                    seg = pos
                else:
                    self._pos = pos
                    raise self._fail("data after the end of the last frame" if self._d is not None
                                     else "not a zstd frame", pos, "trailing-data")
            elif self._state == "block":
                if avail < 3:
                    break
                header = int.from_bytes(buf[pos : pos + 3], "little")
                kind, size = (header >> 1) & 3, header >> 3
                if kind == 3:
                    raise self._fail("reserved block type", pos, "corrupt")
                pos += 3
                self._left = 1 if kind == 1 else size  # an RLE block stores its byte once
                bound += max(size, _ZSTD_BLOCK_MAX)
                if header & 1:  # last block of the frame
                    self._state = "checksum" if self._checksum else "magic"
            else:
                self._left = 4
                self._state = "magic"
        if self._feeding and seg < pos:
            outs.append(self._feed(seg, pos))
        self._pos = pos
        if pos == start:
            return None
        return outs[0] if len(outs) == 1 else b"".join(outs)

    def finish(self) -> None:
        """The input has ended: an error (with ``strict_end``) if it did inside a frame."""
        if self.strict_end and (self._left or self._state != "magic" or self._pos < len(self._buf)):
            raise self._fail("truncated data: the input ends inside a frame", len(self._buf), "truncated")


def _also_catch(err: type[BaseException]) -> None:
    global _LIB_ERRORS
    if err not in _LIB_ERRORS:
        _LIB_ERRORS += (err,)


def _decompressobj(method: str) -> Any:
    if method == "xz":
        import lzma

        _also_catch(lzma.LZMAError)
        return lzma.LZMADecompressor()
    if method == "bzip2":
        import bz2

        return bz2.BZ2Decompressor()
    if method == "gzip":
        import zlib

        _also_catch(zlib.error)
        return zlib.decompressobj(31)
    raise CompressionError(f"unknown compression method {method!r}")


#: what a decompressor's ``decompress`` raises on corrupt data (each library's own error is
#: added when the library is first used)
_LIB_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
_MAGIC_OF = {name: magic for magic, name in MAGICS}


class _Decompressing:
    """``read(n)`` over a compressed stream; returns ``b""`` only at the end.

    Output is produced on demand: one call decodes at most about ``max(n, 128 KiB)`` bytes
    (the decoders are asked for no more), and what a call could not return is kept for the
    next ones without being copied again. So memory stays flat and time linear in the output,
    however much the input expands. Concatenated streams (zstd frames, xz streams, bzip2
    streams, gzip members) are read one after the other. Corrupt, truncated or trailing data
    is a :class:`CompressionError`; its ``offset`` counts compressed bytes (where the piece
    being decoded starts) and the message says how much had been decompressed.
    """

    def __init__(self, read: Callable[[int], bytes], method: str, head: bytes,
                 zstd: ZstdDecoder | None = None) -> None:
        self.read_raw = read
        self.method = method
        self.out = b""  # decoded, not yet returned: out[pos:]
        self.pos = 0
        self.done = False
        self.produced = 0
        self.taken = 0  # compressed bytes handed to the xz/bzip2/gzip decoders before `data`
        self.pending = head  # compressed input not yet handed to them
        self.zstd = zstd
        self.d: Any = None
        if method == "zstd":
            if self.zstd is None:
                self.zstd = ZstdDecoder()
            if head:
                self.zstd.add(head)
            self.pending = b""
        else:
            self.d = _decompressobj(method)

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        if self.pos < len(self.out):
            b = self.out[self.pos : self.pos + n]
            self.pos += len(b)
            if self.pos == len(self.out):
                self.out, self.pos = b"", 0
            return b
        if self.done:
            return b""
        out = self._decode_zstd(n) if self.zstd is not None else self._decode(n)
        if len(out) <= n:
            return out
        self.out, self.pos = out, n
        return out[:n]

    def _decode_zstd(self, n: int) -> bytes:
        z = self.zstd
        assert z is not None
        while True:
            out = z.decode(max(n, _STEP))
            if out:
                return out
            if out is None:  # nothing decodable is left inside: only now read on
                data = self.read_raw(_RAW_READ)
                if not data:
                    z.finish()
                    self.done = True
                    return b""
                z.add(data)

    def _error(self, message: str, rule: str) -> CompressionError:
        return CompressionError(f"{message} in {self.method} stream (after {self.produced} decompressed bytes; "
                                "the offset is in the compressed input)", offset=self.taken, rule=rule)

    def _input(self) -> bytes:
        data = self.pending or self.read_raw(_RAW_READ)
        self.pending = b""
        return data

    def _decode(self, n: int) -> bytes:
        """Up to ``max(n, _STEP)`` bytes from the xz/bzip2/gzip decoder; b"" at the end."""
        limit = max(n, _STEP)
        while True:
            d = self.d
            if d.eof:
                data = d.unused_data or self._input()
                if not data:
                    self.done = True
                    return b""
                magic = _MAGIC_OF[self.method]
                if not data.startswith(magic[: len(data)]):
                    raise self._error("data after the end of the last stream", "trailing-data")
                self.d = d = _decompressobj(self.method)  # another stream follows
            elif self.method == "gzip" or d.needs_input:
                data = d.unconsumed_tail if self.method == "gzip" else b""
                data = data or self._input()
                if not data:
                    # the input has ended: output the decoder may still hold is the last there is
                    out = self._call(d, b"", limit)
                    if out:
                        return out
                    raise self._error("truncated data: the input ends inside a stream", "truncated")
            else:
                data = b""  # the decoder still holds input: more output without new input
            out = self._call(d, data, limit)
            # input the decoder did not take is handed to it (or its successor) again
            if d.eof:
                self.taken += len(data) - len(d.unused_data)
            else:
                self.taken += len(data) - (len(d.unconsumed_tail) if self.method == "gzip" else 0)
            if out:
                return out

    def _call(self, d: Any, data: bytes, limit: int) -> bytes:
        try:
            out: bytes = d.decompress(data, limit)
        except _LIB_ERRORS as e:
            raise self._error(f"corrupt data ({e})", "corrupt") from None
        self.produced += len(out)
        return out


def zstd_read_fn(read: Callable[[int], bytes], head: bytes = b"", *, max_window_size: int = 0,
                 strict_end: bool = True, what: str = "zstd stream") -> Callable[[int], bytes]:
    """``read(n)`` over the zstd stream read by ``read`` (``head``: its first bytes, already
    read). Bounded like :func:`open_decompressed`, and it never asks ``read`` for more while
    decoded output is pending, so it can sit on one direction of a conversation. Without
    ``strict_end`` an input that stops inside a frame simply ends."""
    z = ZstdDecoder(max_window_size=max_window_size, strict_end=strict_end, what=what)
    return _Decompressing(read, "zstd", head, z).read


def open_decompressed(f: BinaryIO | Callable[[int], bytes]) -> tuple[Callable[[int], bytes], str]:
    """Return ``(read, method)`` for an input that may be compressed. (From a buffered file,
    reads take what has arrived, ``read1``: a pipe's reader then works on it while the writer
    writes on, rather than wait for a whole buffer's worth.)"""
    read = f if callable(f) else getattr(f, "read1", None) or f.read
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
