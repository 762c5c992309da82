"""Framing of Nix's serve protocol (``docs/serve-protocol.md``, Framing) over a :class:`ByteSource`.

Every integer is a u64 little-endian word. The magic, the versions, the command word and the
flags ``lock``/``substitute``/``includeOutputs`` are read as 32-bit integers like Nix does: a
value above 2³²−1 is an error (``serialised integer N is too large for type 'j'``). Strings are
length-prefixed and zero-padded to 8 bytes; the padding must be zero. Readers are strict and
bounded: every declared length or count is checked against a limit *before* anything is
allocated or read, and every error is a :class:`~nartool.errors.ProtocolError` carrying the
byte offset in the stream (``offset``), the ``field`` being read (in ``path``) and a ``rule``.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from ..errors import InvalidPathError, NarError, ProtocolError, TruncatedError
from ..nar import format as F
from ..nar.source import ByteSource, ReadFn

SERVE_MAGIC_1 = 0x390C9DEB  # client → server
SERVE_MAGIC_2 = 0x5452EECB  # server → client
PROTOCOL_VERSION = 0x207  # what Nix 2.4 – 2.34 send

CMD_QUERY_VALID_PATHS = 1
CMD_QUERY_PATH_INFOS = 2
CMD_DUMP_STORE_PATH = 3
CMD_IMPORT_PATHS = 4
CMD_EXPORT_PATHS = 5
CMD_BUILD_PATHS = 6
CMD_QUERY_CLOSURE = 7
CMD_BUILD_DERIVATION = 8
CMD_ADD_TO_STORE_NAR = 9

#: nartool extension command (see :mod:`nartool.remote.serve`): which of these path infos
#: would the server refuse? Only ever sent to a server that identified itself as nartool.
CMD_EXT_CHECK_IMPORTABLE = 0x6E740001

#: longest string accepted where a store path is expected (store dir + 32 + 1 + 211, with room
#: for long store dirs)
MAX_PATH_LEN = 4096
#: longest other short string (deriver, hashes, content addresses, signatures)
MAX_STR_LEN = 4096
#: most elements of one set or list on the wire
MAX_COUNT = 1 << 22
MAX_U32 = 0xFFFFFFFF


class WireError(ProtocolError):
    """A malformed request or reply; ``field`` names what was being read."""

    def __init__(self, message: str, *, field: str, offset: int | None = None, expected: object = None,
                 got: object = None, rule: str | None = None) -> None:
        super().__init__(f"{message} (reading {field})", offset=offset, expected=expected, got=got, rule=rule)
        self.field = field


def version_minor(v: int) -> int:
    return v & 0xFF


def version_major(v: int) -> int:
    return v & 0xFF00


def _eof(src: ByteSource, field: str, e: TruncatedError) -> ProtocolError:
    return WireError("unexpected end-of-file", offset=src.offset, field=field, rule="truncated",
                         expected=e.expected, got="end of input")


def read_u64(src: ByteSource, field: str) -> int:
    """One u64 word (full 64-bit range)."""
    try:
        return src.read_u64()
    except TruncatedError as e:
        raise _eof(src, field, e) from None


def read_u32(src: ByteSource, field: str) -> int:
    """A u64 word that must fit in 32 bits (Nix's ``readInt`` into ``unsigned int``)."""
    at = src.offset
    n = read_u64(src, field)
    if n > MAX_U32:
        raise WireError(f"serialised integer {n} is too large for type 'j'", offset=at, field=field,
                            rule="int-too-large", expected=f"<= {MAX_U32}", got=n)
    return n


def read_flag(src: ByteSource, field: str) -> bool:
    """A 32-bit checked flag: any non-zero value is true (as in Nix)."""
    return read_u32(src, field) != 0


def read_bytes(src: ByteSource, field: str, limit: int = MAX_STR_LEN) -> bytes:
    """A padded string, at most ``limit`` bytes long."""
    at = src.offset
    n = read_u64(src, field)
    if n > limit:
        raise WireError(f"string longer than {limit} bytes", offset=at, field=field, rule="too-long",
                            expected=f"<= {limit}", got=n)
    try:
        data, pad = src.read_padded(n)
    except TruncatedError as e:
        raise _eof(src, field, e) from None
    if pad is not None:
        raise WireError("non-zero padding", offset=at + 8 + n, field=field, rule="padding",
                            expected="zero bytes", got=pad)
    return data


def read_str(src: ByteSource, field: str, limit: int = MAX_STR_LEN) -> str:
    """A padded string decoded as UTF-8 (hashes, content addresses, signatures, paths)."""
    at = src.offset
    raw = read_bytes(src, field, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("string is not valid UTF-8", offset=at, field=field, rule="encoding",
                            got=raw) from None


def read_count(src: ByteSource, field: str, limit: int = MAX_COUNT) -> int:
    at = src.offset
    n = read_u64(src, field)
    if n > limit:
        raise WireError("absurd element count", offset=at, field=field, rule="too-many",
                            expected=f"<= {limit}", got=n)
    return n


def read_str_list(src: ByteSource, field: str, limit: int = MAX_STR_LEN, max_count: int = MAX_COUNT) -> list[str]:
    n = read_count(src, field, max_count)
    return [read_str(src, field, limit) for _ in range(n)]


def _path_message(p: str, e: InvalidPathError, store_dir: str) -> str:
    if e.rule == "not-in-store":
        return f"path '{p}' is not in the Nix store"
    if "too short" in e.message:
        return f"'{p}' is too short to be a valid store path"
    return f"'{p}' is not a valid store path: {e.message}"


def check_store_path(p: str, store_dir: str, field: str, offset: int | None = None) -> str:
    """``p`` if it is a store path of ``store_dir``, else :class:`ProtocolError` with Nix's wording."""
    from ..store.paths import StorePath

    try:
        StorePath.parse(p, store_dir)
    except InvalidPathError as e:
        raise WireError(_path_message(p, e, store_dir), offset=offset, field=field, rule=e.rule or "bad-path",
                            got=p) from None
    return p


def read_path(src: ByteSource, store_dir: str, field: str) -> str:
    at = src.offset
    return check_store_path(read_str(src, field, MAX_PATH_LEN), store_dir, field, at)


def read_opt_path(src: ByteSource, store_dir: str, field: str) -> str | None:
    """A store path or the empty string (absent)."""
    at = src.offset
    s = read_str(src, field, MAX_PATH_LEN)
    return check_store_path(s, store_dir, field, at) if s else None


def read_path_set(src: ByteSource, store_dir: str, field: str, max_count: int = MAX_COUNT) -> list[str]:
    """A ``StorePathSet``: every element validated, duplicates dropped, order kept."""
    n = read_count(src, field, max_count)
    out: dict[str, None] = {}
    for _ in range(n):
        out[read_path(src, store_dir, field)] = None
    return list(out)


def sort_paths(paths: Iterable[str]) -> list[str]:
    """Nix's set order: by base name (``hash-name``), i.e. by hash part."""
    return sorted(paths, key=lambda p: p.rsplit("/", 1)[-1].encode())


def has_buffered_input(src: ByteSource, fd: int | None, want: int = 1) -> bool:
    """True when at least ``want`` bytes can be read without blocking: already buffered in
    ``src``, or readable on ``fd`` (a zero-timeout poll). False when unknown."""
    if src.buffered() >= want:
        return True
    if fd is None:
        return False
    try:
        r, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(r)


def file_fd(f: object) -> int | None:
    try:
        fileno = f.fileno  # type: ignore[attr-defined]
        return int(fileno())
    except (AttributeError, OSError, ValueError):
        return None


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int | None: ...
    def flush(self) -> None: ...


class Writer:
    """Buffered protocol writer. Nothing reaches ``out`` until :meth:`flush` (or when the
    buffer grows past ``limit``); large raw chunks are passed through without copying."""

    def __init__(self, out: Sink, limit: int = 1 << 16) -> None:
        self.out: Sink = out
        self.buf = bytearray()
        self.limit = limit
        self.written = 0

    def u64(self, n: int) -> Writer:
        self.buf += n.to_bytes(8, "little")
        return self

    def bytes_(self, b: bytes) -> Writer:
        self.buf += F.enc_str(b)
        if len(self.buf) >= self.limit:
            self._drain()
        return self

    def str_(self, s: str) -> Writer:
        return self.bytes_(s.encode())

    def strs(self, items: Iterable[str]) -> Writer:
        lst = list(items)
        self.u64(len(lst))
        for s in lst:
            self.str_(s)
        return self

    def path_set(self, paths: Iterable[str]) -> Writer:
        return self.strs(sort_paths(paths))

    def raw(self, data: bytes | bytearray | memoryview) -> Writer:
        if len(data) >= self.limit:
            self._drain()
            self.out.write(data)
            self.written += len(data)
        else:
            self.buf += data
            if len(self.buf) >= self.limit:
                self._drain()
        return self

    def raw_chunks(self, chunks: Iterable[bytes | bytearray | memoryview]) -> int:
        n = 0
        for c in chunks:
            self.raw(c)
            n += len(c)
        return n

    def _drain(self) -> None:
        if self.buf:
            self.out.write(self.buf)
            self.written += len(self.buf)
            self.buf = bytearray()

    def flush(self) -> None:
        self._drain()
        self.out.flush()


def enc_u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def limited_source(src: ByteSource, n: int, what: str = "NAR",
                   on_chunk: Callable[[int], None] | None = None) -> ByteSource:
    """A :class:`ByteSource` over exactly the next ``n`` bytes of ``src`` (consumed lazily).
    Reading past them is end-of-input; truncation of ``src`` is a :class:`TruncatedError`.
    ``on_chunk(len)`` is called for every chunk taken from ``src``."""
    it: Iterator[bytes] = src.iter_chunks(n)

    def read(_k: int) -> bytes:
        b = next(it, b"")
        if on_chunk is not None and b:
            on_chunk(len(b))
        return b

    return ByteSource(read, what)


def drain(src: ByteSource) -> int:
    """Consume a source to its end; the number of bytes skipped."""
    n = 0
    while True:
        b = src.peek(1 << 16)
        if not b:
            return n
        src.read_exact(len(b))
        n += len(b)


class FdReader:
    """``read(n)`` over a raw file descriptor (no Python-level buffering)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, n: int) -> bytes:
        return os.read(self.fd, n)


__all__ = [
    "ByteSource", "NarError", "ProtocolError", "Writer", "read_u64", "read_u32", "read_flag", "read_bytes",
    "read_str", "read_str_list", "read_path", "read_opt_path", "read_path_set", "sort_paths",
    "has_buffered_input", "limited_source", "drain",
]


# -- optional zstd framing of a whole session (nartool ↔ nartool only) ------------------------

#: bit set in a version word to offer/ask for a zstd-compressed session (never set towards Nix)
VERSION_FLAG_ZSTD = 1 << 16


def take_buffered(src: ByteSource) -> bytes:
    """Remove and return what ``src`` has buffered but not consumed."""
    return src.take_buffered()


#: largest zstd window a session peer may ask for (a nartool peer uses 2 MiB): this bounds the
#: decoder's memory, like the output bound of :func:`zstd_reader` bounds the rest
SESSION_MAX_WINDOW = 1 << 23


def zstd_reader(leftover: bytes, read: ReadFn) -> ReadFn:
    """``read(n)`` returning the decompressed data of a zstd stream read by ``read``.

    Output is decoded on demand, a bounded amount at a time (a small, highly compressed
    input does not balloon into memory before anything is parsed), and ``read`` is called
    only once nothing decodable is left: the peer is never waited for while the answer to
    its last request is already here. The peer may simply stop, even inside a frame: that
    is the end of the session's input."""
    from ..compression import zstd_read_fn

    return zstd_read_fn(read, leftover, max_window_size=SESSION_MAX_WINDOW, strict_end=False,
                        what="zstd session stream")


class ZstdWriter:
    """A file-like ``write``/``flush`` pair that compresses into ``out``; every :meth:`flush`
    ends a zstd block so that the peer can decode everything written so far."""

    def __init__(self, out: Sink, level: int = 3) -> None:
        import zstandard

        self.out: Sink = out
        self._c = zstandard.ZstdCompressor(level=level).compressobj()
        self._flush_mode = zstandard.COMPRESSOBJ_FLUSH_BLOCK

    def write(self, data: bytes | bytearray | memoryview) -> int:
        out = self._c.compress(bytes(data))
        if out:
            self.out.write(out)
        return len(data)

    def flush(self) -> None:
        out = self._c.flush(self._flush_mode)
        if out:
            self.out.write(out)
        self.out.flush()
