"""The ``nix-store --export`` stream (also the payload of the serve protocol's ImportPaths).

::

    stream = { u64 1, NAR, u64 0x4558494e ("NIXE"), str path, u64 n, n × str reference,
               str deriver, u64 0 } u64 0

Integers are u64 little-endian, strings are NAR-framed (length, bytes, zero padding).
Readers here are strict: markers other than 0/1, a wrong magic, non-zero padding, absurd
lengths, paths outside the store dir, and a legacy-signature word other than 0 or 1 are
errors carrying the byte offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import ExportFormatError, NarError
from ..nar import format as F
from ..nar.source import ByteSource
from .paths import DEFAULT_STORE_DIR, StorePath

EXPORT_MAGIC = 0x4558494E
#: longest string a trailer may carry (a store path is at most ~260 bytes)
MAX_STR = 4096
#: most references one record may list
MAX_REFS = 1 << 20

_MARK_RECORD = F.u64(1)
_MARK_END = F.u64(0)
_TRAILER_MAGIC = F.u64(EXPORT_MAGIC)


@dataclass(frozen=True)
class Trailer:
    path: str
    references: frozenset[str]
    deriver: str | None


def record_chunks(path: str, references: Iterable[str], deriver: str | None,
                  nar: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes | bytearray | memoryview]:
    """One export record: the marker, the NAR (streamed from ``nar``) and the trailer."""
    yield _MARK_RECORD
    yield from nar
    refs = sorted(references)
    out = bytearray(_TRAILER_MAGIC)
    out += F.enc_str(path.encode())
    out += F.u64(len(refs))
    for r in refs:
        out += F.enc_str(r.encode())
    out += F.enc_str((deriver or "").encode())
    out += F.u64(0)
    yield out


def end_chunk() -> bytes:
    return _MARK_END


# -- reading ---------------------------------------------------------------------------------


def _u64(src: ByteSource) -> int:
    return src.read_u64()


def read_str(src: ByteSource, what: str, limit: int = MAX_STR, error: type[ExportFormatError] = ExportFormatError,
             base: int = 0) -> bytes:
    at = src.offset
    n = _u64(src)
    if n > limit:
        raise error(f"{what} longer than {limit} bytes", offset=at - base, expected=f"<= {limit}", got=n,
                    rule="too-long")
    data, pad = src.read_padded(n)
    if pad is not None:
        raise error(f"non-zero padding after {what}", offset=at - base, rule="padding", got=pad)
    return data


def read_marker(src: ByteSource, base: int = 0) -> bool:
    """True when a record follows, False at the end marker."""
    at = src.offset
    try:
        m = _u64(src)
    except NarError as e:
        raise ExportFormatError("export stream ended without its end marker", offset=at - base,
                                rule="truncated") from e
    if m not in (0, 1):
        raise ExportFormatError("not an export stream (bad record marker)", offset=at - base, expected="0 or 1",
                                got=m, rule="marker")
    return m == 1


def _store_path(raw: bytes, what: str, at: int, store_dir: str) -> str:
    try:
        s = raw.decode("ascii")
        StorePath.parse(s, store_dir)
    except (UnicodeDecodeError, NarError, ExportFormatError):
        raise ExportFormatError(f"{what} is not a store path", offset=at, got=raw, rule="bad-path") from None
    except Exception as e:  # InvalidPathError
        raise ExportFormatError(f"{what} is not a valid store path: {getattr(e, 'message', e)}", offset=at,
                                got=raw, rule="bad-path") from None
    return s


def read_trailer(src: ByteSource, store_dir: str = DEFAULT_STORE_DIR, base: int = 0) -> Trailer:
    """The part of a record after its NAR."""
    try:
        at = src.offset
        magic = _u64(src)
        if magic != EXPORT_MAGIC:
            raise ExportFormatError("export record has a bad magic after its NAR", offset=at - base,
                                    expected=hex(EXPORT_MAGIC), got=hex(magic), rule="magic")
        at = src.offset
        path = _store_path(read_str(src, "store path", base=base), "record path", at - base, store_dir)
        at = src.offset
        n = _u64(src)
        if n > MAX_REFS:
            raise ExportFormatError("absurd reference count", offset=at - base, got=n, rule="too-long")
        refs = []
        for _ in range(n):
            at = src.offset
            refs.append(_store_path(read_str(src, "reference", base=base), "reference", at - base, store_dir))
        at = src.offset
        drv_raw = read_str(src, "deriver", base=base)
        deriver = _store_path(drv_raw, "deriver", at - base, store_dir) if drv_raw else None
        at = src.offset
        sig = _u64(src)
        if sig == 1:
            read_str(src, "legacy signature", limit=1 << 16, base=base)
        elif sig != 0:
            raise ExportFormatError("bad legacy-signature marker", offset=at - base, expected="0 or 1", got=sig,
                                    rule="marker")
    except ExportFormatError:
        raise
    except NarError as e:  # truncation inside the trailer
        raise ExportFormatError("export stream truncated inside a record trailer",
                                offset=(e.offset or src.offset) - base, rule="truncated") from None
    return Trailer(path, frozenset(refs), deriver)
