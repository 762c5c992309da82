"""Helpers for protocol tests and benchmarks: synthetic store paths with real NARs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from ..hashes import Hash, nix32_encode
from ..nar import format as F
from ..store.paths import DEFAULT_STORE_DIR, ContentAddress, make_fixed_output_path
from ..store.types import PathInfo, Store


def wire_str(x: str | bytes) -> bytes:
    """A protocol string, as the peer sends it (length, bytes, zero padding)."""
    return F.enc_str(x.encode() if isinstance(x, str) else x)


def wire_strs(xs: Iterable[str]) -> bytes:
    """A protocol list of strings (count, then each string)."""
    items = list(xs)
    return F.u64(len(items)) + b"".join(wire_str(x) for x in items)


def file_nar(data: bytes, executable: bool = False) -> bytes:
    """The NAR of a single regular file."""
    hdr = F.HDR_EXECUTABLE if executable else F.HDR_REGULAR
    return F.TOK_MAGIC + hdr + F.u64(len(data)) + data + F.PAD[(-len(data)) & 7] + F.CLOSE


def dir_nar(files: Sequence[tuple[str, bytes]]) -> bytes:
    """The NAR of a directory of regular files (names sorted here)."""
    out = bytearray(F.TOK_MAGIC + F.HDR_DIRECTORY)
    for name, data in sorted(files, key=lambda t: t[0].encode()):
        out += F.ENTRY_OPEN + F.enc_str(name.encode()) + F.NODE
        out += F.HDR_REGULAR + F.u64(len(data)) + data + F.PAD[(-len(data)) & 7] + F.CLOSE2
    out += F.CLOSE
    return bytes(out)


def nar_hash(nar: bytes) -> Hash:
    return Hash("sha256", hashlib.sha256(nar).digest())


def input_addressed_path(name: str, seed: str, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """A plausible input-addressed path (hash part derived from ``seed``)."""
    digest = hashlib.sha256(seed.encode()).digest()[:20]
    return f"{store_dir}/{nix32_encode(digest)}-{name}"


def make_info(name: str, nar: bytes, refs: Iterable[str] = (), *, ca: bool = False, deriver: str | None = None,
              store_dir: str = DEFAULT_STORE_DIR, seed: str | None = None) -> PathInfo:
    """A path info for ``nar``: content-addressed (``fixed:r:sha256``) or input-addressed."""
    h = nar_hash(nar)
    refs = frozenset(refs)
    if ca:
        path = make_fixed_output_path(name, h, recursive=True, references=refs, store_dir=store_dir)
        return PathInfo(path=path, nar_hash=h, nar_size=len(nar), references=refs, deriver=deriver,
                        registration_time=1700000000, ca=ContentAddress("recursive", h).render())
    path = input_addressed_path(name, seed or (name + h.base16), store_dir)
    return PathInfo(path=path, nar_hash=h, nar_size=len(nar), references=refs, deriver=deriver,
                    registration_time=1700000000)


def add_path(store: Store, info: PathInfo, nar: bytes) -> PathInfo:
    import io

    from ..nar.source import ByteSource

    with store.batch():
        return store.add_nar(info, ByteSource(io.BytesIO(nar)))


def chain(store: Store, n: int, prefix: str = "p", size: int = 100, ca: bool = False) -> list[PathInfo]:
    """``n`` paths, each referring to the previous one, added to ``store``; returns their infos."""
    infos: list[PathInfo] = []
    prev: list[str] = []
    for i in range(n):
        data = (f"{prefix}{i}:" + "x" * size).encode() + b"".join(r.encode() for r in prev)
        nar = file_nar(data)
        info = make_info(f"{prefix}{i}", nar, prev, ca=ca, store_dir=store.store_dir)
        infos.append(add_path(store, info, nar))
        prev = [info.path]
    return infos
