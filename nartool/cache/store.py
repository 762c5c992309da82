"""A binary cache as a store: :class:`BinaryCacheStore` over a :class:`~nartool.cache.backend.CacheBackend`.

Layout (as Nix's ``BinaryCacheStore``): ``nix-cache-info``, one ``<hashpart>.narinfo`` per
path, the compressed NARs under ``nar/`` named after the hash of the compressed file,
``<hashpart>.ls`` listings with ``write-nar-listing``, build logs under ``log/``.

Writing (:meth:`BinaryCacheStore.add_nar`) streams the NAR once: it is parsed and validated,
hashed, compressed into a temporary file (hashed too), and its listing collected; then the
``.ls``, the NAR file (skipped when the cache has it) and last the narinfo (signed with
``secret-key``) are uploaded, so a narinfo only appears once its NAR and its references'
narinfos are there. The bytes are those ``nix copy --to`` of Nix 2.8 writes for the same
path and key (single-threaded zstd, Python's lzma/bz2 with Nix's presets).

Reading checks everything a narinfo claims: the narinfo itself strictly
(:class:`~nartool.cache.narinfo.NarInfo`), that its ``StorePath`` is the path asked for,
``FileSize``/``FileHash`` of the compressed file, ``NarSize``/``NarHash`` of the NAR. The
decompressed output is bounded by ``NarSize`` and the last chunk of a NAR is only handed out
once every check passed, so a consumer never sees a complete NAR that does not match.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from .._log import get_logger
from ..errors import StoreError
from ..hashes import Hash
from ..nar.events import Directory, EndDirectory, Event, File, Symlink
from ..nar.reader import NarReader
from ..nar.source import ByteSource, as_source
from ..nar.writer import write_nar
from ..store.base import BaseStore
from ..store.paths import DEFAULT_STORE_DIR, StorePath
from ..store.types import PathInfo
from .backend import (
    MIME_CACHE_INFO,
    MIME_LISTING,
    MIME_LOG,
    MIME_NAR,
    MIME_NARINFO,
    CacheBackend,
    CacheUnavailableError,
)
from .narinfo import COMPRESSIONS, NarInfo, nar_url

log = get_logger("nartool.cache")

CACHE_INFO = "nix-cache-info"
#: compression methods nartool can write (Nix also knows br, lz4, lzip)
WRITABLE = ("none", "xz", "bzip2", "zstd", "gzip")
#: URL parameters of every binary cache store (Nix's BinaryCacheStoreConfig and StoreConfig)
BASE_PARAMS = frozenset({
    "compression", "compression-level", "parallel-compression", "secret-key", "write-nar-listing",
    "write-debug-info", "local-nar-cache", "priority", "want-mass-query", "trusted", "store",
    "path-info-cache-size", "system-features", "index-debug-info",
})
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class CacheParamError(StoreError):
    pass


@dataclass
class CacheParams:
    """Nix's binary cache URL parameters, parsed (unknown ones warn as Nix does)."""

    compression: str = "xz"
    compression_level: int | None = None
    parallel_compression: bool = False
    secret_key: str | None = None
    write_nar_listing: bool = False
    priority: int | None = None
    want_mass_query: bool | None = None
    trusted: bool = False
    extra: Mapping[str, str] | None = None  # the backend's own parameters

    @classmethod
    def parse(cls, params: Mapping[str, str], *, backend_params: Iterable[str] = (), uri: str = "") -> CacheParams:
        known = BASE_PARAMS | frozenset(backend_params)
        for k in params:
            if k not in known:
                log.warning("warning: unknown setting '%s'", k)

        def boolean(name: str, default: bool) -> bool:
            v = params.get(name)
            if v is None:
                return default
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise CacheParamError(f"invalid Boolean value for store parameter '{name}'", rule="bad-parameter",
                                  expected="true or false", got=v, path=uri or None)

        def integer(name: str) -> int | None:
            v = params.get(name)
            if v is None:
                return None
            try:
                return int(v)
            except ValueError:
                raise CacheParamError(f"invalid integer for store parameter '{name}'", rule="bad-parameter",
                                      got=v, path=uri or None) from None

        comp = params.get("compression", "xz")
        if comp not in COMPRESSIONS:
            raise CacheParamError(f"unknown compression method '{comp}'", rule="bad-compression",
                                  expected="|".join(WRITABLE), got=comp, path=uri or None)
        mq = params.get("want-mass-query")
        return cls(compression=comp, compression_level=integer("compression-level"),
                   parallel_compression=boolean("parallel-compression", False),
                   secret_key=params.get("secret-key") or None,
                   write_nar_listing=boolean("write-nar-listing", False), priority=integer("priority"),
                   want_mass_query=None if mq is None else boolean("want-mass-query", False),
                   trusted=boolean("trusted", False),
                   extra={k: v for k, v in params.items() if k in frozenset(backend_params)})


@dataclass
class CacheInfo:
    """``nix-cache-info``: ``StoreDir``, ``WantMassQuery``, ``Priority``."""

    store_dir: str | None = None
    want_mass_query: bool | None = None
    priority: int | None = None

    @classmethod
    def parse(cls, data: bytes) -> CacheInfo:
        info = cls()
        for line in data.decode("utf-8", "replace").splitlines():
            name, sep, value = line.partition(":")
            if not sep:
                continue
            value = value.strip()
            if name == "StoreDir":
                info.store_dir = value
            elif name == "WantMassQuery":
                info.want_mass_query = value == "1"
            elif name == "Priority":
                try:
                    info.priority = int(value)
                except ValueError:
                    pass
        return info


def compressobj(method: str, level: int | None = None, parallel: bool = False) -> Any:
    """A compressor with ``compress``/``flush`` producing what Nix 2.8 writes: xz preset 6
    (``level``) with a CRC64 check, bzip2 level 9, zstd level 3 single-threaded (unless
    ``parallel``), gzip level 6."""
    import bz2
    import lzma
    import zlib

    if method == "xz":
        return lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                   preset=6 if level is None or level < 0 else level)
    if method == "bzip2":
        return bz2.BZ2Compressor(9 if level is None or level < 1 else level)
    if method == "zstd":
        lvl = 3 if level is None or level < 0 else level
        if not parallel:
            sysz = SystemZstd.create(lvl)
            if sysz is not None:
                return sysz
        import zstandard

        return zstandard.ZstdCompressor(level=lvl, threads=-1 if parallel else 0).compressobj()
    if method == "gzip":
        return zlib.compressobj(6 if level is None or level < 0 else level, zlib.DEFLATED, 31)
    raise CacheParamError(f"nartool cannot write '{method}' compressed NARs", rule="bad-compression",
                          expected="|".join(WRITABLE), got=method)


class SystemZstd:
    """Single-threaded streaming zstd through the system's ``libzstd`` (the library Nix links).

    zstd's output depends on the library version (1.5.4 and 1.5.7 compress the same input
    larger than one block differently), so the bytes Nix writes are reproduced with the same
    library Nix uses; the ``zstandard`` package (which bundles its own copy) is the fallback
    when no system library is found. ``NARTOOL_SYSTEM_ZSTD=0`` turns this off."""

    _lib: Any = None
    _tried = False
    _C_LEVEL = 100  # ZSTD_c_compressionLevel
    _CONTINUE, _END = 0, 2  # ZSTD_e_continue, ZSTD_e_end

    @classmethod
    def library(cls) -> Any:
        if not cls._tried:
            cls._tried = True
            if os.environ.get("NARTOOL_SYSTEM_ZSTD", "1") == "0":
                return None
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("zstd")
            if name is None:
                return None
            try:
                lib = ctypes.CDLL(name)
                lib.ZSTD_createCCtx.restype = ctypes.c_void_p
                lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
                lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
                lib.ZSTD_compressStream2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
                lib.ZSTD_compressStream2.restype = ctypes.c_size_t
                lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
                lib.ZSTD_isError.restype = ctypes.c_uint
                lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
                lib.ZSTD_getErrorName.restype = ctypes.c_char_p
                lib.ZSTD_CStreamOutSize.restype = ctypes.c_size_t
                lib.ZSTD_versionNumber.restype = ctypes.c_uint
            except (OSError, AttributeError):
                return None
            cls._lib = lib
        return cls._lib

    @classmethod
    def create(cls, level: int) -> SystemZstd | None:
        lib = cls.library()
        return None if lib is None else cls(lib, level)

    _BufType: Any = None

    @classmethod
    def _buffer_type(cls) -> Any:
        """``ZSTD_inBuffer``/``ZSTD_outBuffer``: ``{void *ptr; size_t size; size_t pos;}``."""
        if cls._BufType is None:
            import ctypes

            class Buf(ctypes.Structure):
                _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]

            cls._BufType = Buf
        return cls._BufType

    def __init__(self, lib: Any, level: int) -> None:
        import ctypes

        self._ct = ctypes
        self._Buf = self._buffer_type()
        self.lib = lib
        self.cctx = lib.ZSTD_createCCtx()
        if not self.cctx:
            raise MemoryError("ZSTD_createCCtx failed")
        self._check(lib.ZSTD_CCtx_setParameter(self.cctx, self._C_LEVEL, level))
        self.out_size = int(lib.ZSTD_CStreamOutSize())
        self.out = ctypes.create_string_buffer(self.out_size)

    def _check(self, rc: int) -> int:
        if self.lib.ZSTD_isError(rc):
            raise CacheParamError(f"zstd: {self.lib.ZSTD_getErrorName(rc).decode()}", rule="compression-failed")
        return rc

    def _run(self, data: bytes, mode: int) -> bytes:
        ct = self._ct
        keep = ct.c_char_p(data)  # points into ``data`` itself (no copy); zstd only reads it
        inb = self._Buf(ct.cast(keep, ct.c_void_p), len(data), 0)
        out_addr = ct.addressof(self.out)
        parts = []
        while True:
            outb = self._Buf(out_addr, self.out_size, 0)
            rc = self._check(self.lib.ZSTD_compressStream2(self.cctx, ct.byref(outb), ct.byref(inb), mode))
            if outb.pos:
                parts.append(ct.string_at(out_addr, outb.pos))
            if mode == self._END:
                if rc == 0:
                    break
            elif inb.pos == inb.size:
                break
        return b"".join(parts)

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._run(bytes(data), self._CONTINUE) if len(data) else b""

    def flush(self) -> bytes:
        try:
            return self._run(b"", self._END)
        finally:
            self.close()

    def close(self) -> None:
        if self.cctx:
            self.lib.ZSTD_freeCCtx(self.cctx)
            self.cctx = None

    def __del__(self) -> None:
        self.close()


class _Listing:
    """Collects a NAR's events (without file contents) for its ``.ls`` listing."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def tee(self, events: Iterable[Event]) -> Iterator[Event]:
        for ev in events:
            if isinstance(ev, File):
                self.events.append(File(ev.name, ev.executable, ev.size, (), ev.offset))
            elif isinstance(ev, (Directory, EndDirectory, Symlink)):
                self.events.append(ev)
            yield ev

    def render(self) -> bytes:
        from ..nar.listing import json_listing

        return "".join(json_listing(self.events, wrap=True)).encode("utf-8")


class BinaryCacheStore(BaseStore):
    """A binary cache on ``backend`` (see the module docstring). ``params`` are the URL's
    query parameters; ``backend_params`` the names the backend takes itself (not warned about)."""

    checks_signatures_locally = False

    def __init__(self, backend: CacheBackend, *, store_dir: str = DEFAULT_STORE_DIR,
                 params: Mapping[str, str] | None = None, backend_params: Iterable[str] = (),
                 scheme: str = "file") -> None:
        self.backend = backend
        self.store_dir = store_dir
        self.scheme = scheme
        self.params = CacheParams.parse(params or {}, backend_params=backend_params, uri=backend.describe())
        self._secret: Any = None
        if self.params.secret_key:
            from ..store.signing import load_secret_key

            try:
                self._secret = load_secret_key(self.params.secret_key)
            except OSError as e:
                raise StoreError(f"cannot read the secret key: {e.strerror}", path=self.params.secret_key,
                                 rule="bad-key") from None
        if self.params.compression not in WRITABLE:
            log.debug("compression %s: this cache can be read, not written", self.params.compression)
        self._lock = threading.RLock()
        self._narinfos: dict[str, NarInfo] = {}  # positive answers, by path
        self._absent: set[str] = set()  # negative answers
        self._cache_info: CacheInfo | None = None
        self._cache_info_written = False

    # -- identity

    @property
    def uri(self) -> str:
        return self.backend.describe()

    @property
    def trusted(self) -> bool:
        """``?trusted=1``: signatures of this cache's paths are not required."""
        return self.params.trusted

    def cache_info(self) -> CacheInfo:
        """``nix-cache-info`` (read once); a different ``StoreDir`` is an error (``store-dir-mismatch``)."""
        with self._lock:
            if self._cache_info is None:
                f = self.backend.get_file(CACHE_INFO)
                if f is None:
                    info = CacheInfo()
                else:
                    with f:
                        info = CacheInfo.parse(f.read(1 << 16))
                if info.store_dir is not None and info.store_dir != self.store_dir:
                    raise StoreError(f"binary cache '{self.uri}' is for Nix stores with prefix '{info.store_dir}', "
                                     f"not '{self.store_dir}'", rule="store-dir-mismatch", expected=self.store_dir,
                                     got=info.store_dir)
                self._cache_info = info
            return self._cache_info

    @property
    def priority(self) -> int:
        """``?priority=`` if given, else the cache's ``Priority``, else 0 as in Nix (lower is tried first)."""
        if self.params.priority is not None:
            return self.params.priority
        p = self.cache_info().priority
        return 0 if p is None else p

    @property
    def want_mass_query(self) -> bool:
        if self.params.want_mass_query is not None:
            return self.params.want_mass_query
        return bool(self.cache_info().want_mass_query)

    def _init_for_writing(self) -> None:
        """Write ``nix-cache-info`` if the cache has none (as Nix does when it opens a cache)."""
        if self._cache_info_written:
            return
        self.cache_info()
        if not self.backend.file_exists(CACHE_INFO):
            self.backend.upsert_file(CACHE_INFO, f"StoreDir: {self.store_dir}\n".encode(), mime=MIME_CACHE_INFO)
        self._cache_info_written = True

    # -- queries

    def _hash_part(self, path: str) -> str:
        return StorePath.parse(path, self.store_dir).hash_part

    def narinfo(self, path: str) -> NarInfo | None:
        """The narinfo of ``path`` (None when the cache lacks it), checked strictly; remembered."""
        path = self._path_arg(path)
        with self._lock:
            if path in self._narinfos:
                return self._narinfos[path]
            if path in self._absent:
                return None
        self.cache_info()
        key = self._hash_part(path) + ".narinfo"
        f = self.backend.get_file(key)
        if f is None:
            with self._lock:
                self._absent.add(path)
            return None
        with f:
            from .narinfo import MAX_NARINFO_SIZE

            data = f.read(MAX_NARINFO_SIZE + 1)
        ni = NarInfo.parse(data, store_dir=self.store_dir, where=key)
        if ni.store_path != path:
            raise StoreError(f"binary cache '{self.uri}' was asked for '{path}' but its narinfo is for "
                             f"'{ni.store_path}'", rule="narinfo-path-mismatch", path=key, expected=path,
                             got=ni.store_path)
        with self._lock:
            self._narinfos[path] = ni
        return ni

    def query_path_info(self, path: str) -> PathInfo | None:
        ni = self.narinfo(path)
        return None if ni is None else ni.to_path_info()

    def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        out = set()
        for p in dict.fromkeys(paths):
            with self._lock:
                if p in self._narinfos:
                    out.add(p)
                    continue
                if p in self._absent:
                    continue
            self.cache_info()
            if self.backend.file_exists(self._hash_part(p) + ".narinfo"):
                out.add(p)
            else:
                with self._lock:
                    self._absent.add(p)
        return out

    def is_valid(self, path: str) -> bool:
        return self._path_arg(path) in self.query_valid_paths([self._path_arg(path)])

    def query_path_from_hash_part(self, hash_part: str) -> str | None:
        from ..store.paths import check_hash_part

        check_hash_part(hash_part, hash_part)
        key = hash_part + ".narinfo"
        f = self.backend.get_file(key)
        if f is None:
            return None
        with f:
            ni = NarInfo.parse(f.read(16 << 20), store_dir=self.store_dir, where=key)
        if self._hash_part(ni.store_path) != hash_part:
            raise StoreError("narinfo is for another path", rule="narinfo-path-mismatch", path=key,
                             got=ni.store_path)
        return ni.store_path

    def forget(self, paths: Iterable[str] | None = None) -> None:
        """Drop remembered answers (all, or those about ``paths``)."""
        with self._lock:
            if paths is None:
                self._narinfos.clear()
                self._absent.clear()
                return
            for p in paths:
                self._narinfos.pop(p, None)
                self._absent.discard(p)

    # -- reading NARs

    def nar_chunks(self, path: str, *, check: bool = True) -> Iterator[bytes | bytearray | memoryview]:
        ni = self.narinfo(path)
        if ni is None:
            raise StoreError(f"path is not valid in binary cache '{self.uri}'", path=path, rule="invalid-path")
        f = self.backend.get_file(ni.url)
        if f is None:
            raise StoreError(f"file '{ni.url}' does not exist in binary cache '{self.uri}'", path=path,
                             rule="nar-missing")
        return _verified_nar(f, ni, self.uri)

    # -- writing

    def _check_references(self, info: PathInfo) -> None:
        others = [r for r in info.references if r != info.path]
        for r in others:
            self.parse_path(r)
        missing = set(others) - self.query_valid_paths(others)
        if missing:
            r = sorted(missing)[0]
            raise StoreError(f"reference is not valid in binary cache '{self.uri}'", path=r,
                             rule="invalid-reference", got=info.path)

    def add_nar(self, info: PathInfo, nar: ByteSource | BinaryIO | bytes) -> PathInfo:
        src = as_source(nar, "NAR")
        ca = self._check_add(info)
        self._init_for_writing()
        p = self.params
        if p.compression not in WRITABLE:
            raise CacheParamError(f"nartool cannot write '{p.compression}' compressed NARs", rule="bad-compression",
                                  expected="|".join(WRITABLE), got=p.compression)
        if self.is_valid(info.path):
            for _ in NarReader(src, standalone=False):
                pass
            existing = self.query_path_info(info.path)
            assert existing is not None
            return existing
        listing = _Listing() if p.write_nar_listing else None
        events: Iterable[Event] = NarReader(src, standalone=False)
        if ca is not None:
            events = ca.events(events)
        if listing is not None:
            events = listing.tee(events)
        nh = hashlib.sha256()
        fh = hashlib.sha256()
        nar_size = file_size = 0
        comp = None if p.compression == "none" else compressobj(p.compression, p.compression_level,
                                                                 p.parallel_compression)
        tmp = self._nar_spool()
        try:
            for chunk in write_nar(events):
                nh.update(chunk)
                nar_size += len(chunk)
                if ca is not None:
                    ca.update(chunk)
                out = chunk if comp is None else comp.compress(chunk)
                if out:
                    fh.update(out)
                    file_size += len(out)
                    tmp.write(out)
            if comp is not None:
                out = comp.flush()
                fh.update(out)
                file_size += len(out)
                tmp.write(out)
            if nar_size != info.nar_size:
                raise StoreError("size mismatch importing path", path=info.path, rule="size-mismatch",
                                 expected=info.nar_size, got=nar_size)
            h = Hash("sha256", nh.digest())
            if h.digest != info.nar_hash.digest:
                raise StoreError("hash mismatch importing path", path=info.path, rule="hash-mismatch",
                                 expected=info.nar_hash.prefixed("nix32"), got=h.prefixed("nix32"))
            if ca is not None:
                ca.finish()
            file_hash = Hash("sha256", fh.digest())
            url = nar_url(file_hash, p.compression)
            hash_part = self._hash_part(info.path)
            if listing is not None:
                self.backend.upsert_file(hash_part + ".ls", listing.render(), mime=MIME_LISTING)
            if not self.backend.file_exists(url):
                self._upload_nar(url, tmp)
        finally:
            self._drop_spool(tmp)
        ni = NarInfo.from_path_info(info, url=url, compression=p.compression, file_hash=file_hash.prefixed("nix32"),
                                    file_size=file_size)
        if self._secret is not None:
            ni.sign(self._secret)
        self.backend.upsert_file(hash_part + ".narinfo", ni.render(), mime=MIME_NARINFO)
        with self._lock:
            self._narinfos[info.path] = ni
            self._absent.discard(info.path)
        return ni.to_path_info()

    def _nar_spool(self) -> BinaryIO:
        """Where :meth:`add_nar` writes a compressed NAR before uploading it."""
        return tempfile.TemporaryFile(prefix="nartool-nar-")

    def _upload_nar(self, url: str, tmp: BinaryIO) -> None:
        tmp.flush()
        tmp.seek(0)
        self.backend.upsert_file(url, tmp, mime=MIME_NAR)

    def _drop_spool(self, tmp: BinaryIO) -> None:
        tmp.close()

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None:
        ni = self.narinfo(path)
        if ni is None:
            raise StoreError("path is not valid", path=path, rule="invalid-path")
        ni.sigs = list(dict.fromkeys([*ni.sigs, *sigs]))
        self.backend.upsert_file(self._hash_part(path) + ".narinfo", ni.render(), mime=MIME_NARINFO)

    # -- build logs

    def get_build_log(self, drv_path: str) -> bytes | None:
        base = StorePath.parse(drv_path, self.store_dir).base
        f = self.backend.get_file("log/" + base)
        if f is None:
            return None
        with f:
            return f.read()

    def add_build_log(self, drv_path: str, data: bytes) -> None:
        base = StorePath.parse(drv_path, self.store_dir).base
        self.backend.upsert_file("log/" + base, data, mime=MIME_LOG)


def _verified_nar(f: BinaryIO, ni: NarInfo, where: str) -> Iterator[bytes]:
    """The NAR of ``ni`` decompressed from ``f``, checked against every hash and size of the
    narinfo. The last chunk is held back until the whole file was read and checked."""
    from ..compression import CompressionError, open_decompressed

    fh = hashlib.new(ni.file_hash.split(":", 1)[0]) if ni.file_hash else None
    raw_size = 0

    def raw_read(n: int) -> bytes:
        nonlocal raw_size
        b = f.read(n)
        if b:
            raw_size += len(b)
            if fh is not None:
                fh.update(b)
        return b

    def fail(msg: str, rule: str, expected: object = None, got: object = None) -> StoreError:
        return StoreError(f"{msg} in binary cache '{where}'", path=ni.store_path, rule=rule, expected=expected,
                          got=got)

    try:
        if ni.compression == "none":
            read: Callable[[int], bytes] = raw_read
        elif ni.compression in ("br", "lz4", "lzip"):
            raise fail(f"nartool cannot decompress '{ni.compression}' NARs ({ni.url})", "bad-compression",
                       got=ni.compression)
        else:
            read, _method = open_decompressed(raw_read)
        nh = hashlib.sha256()
        got = 0
        held: bytes | None = None
        while True:
            try:
                b = read(1 << 20)
            except CompressionError as e:
                if fh is not None:  # a damaged file: say so if its FileHash tells
                    while raw_read(1 << 20):
                        pass
                    if ni.file_hash is not None and not _same_hash(fh, ni.file_hash):
                        raise fail(f"file '{ni.url}' does not match its FileHash", "file-hash-mismatch",
                                   expected=ni.file_hash) from None
                raise fail(f"corrupt compressed NAR '{ni.url}': {e.message}", "corrupt-nar") from None
            if not b:
                break
            got += len(b)
            if got > ni.nar_size:
                raise fail(f"NAR '{ni.url}' is larger than its NarSize", "size-mismatch", expected=ni.nar_size,
                           got=f"more than {ni.nar_size}")
            nh.update(b)
            if held is not None:
                yield held
            held = b
        if got != ni.nar_size:
            raise fail("size mismatch importing path", "size-mismatch", expected=ni.nar_size, got=got)
        if ni.file_size is not None and raw_size != ni.file_size:
            raise fail(f"file '{ni.url}' does not match its FileSize", "file-size-mismatch", expected=ni.file_size,
                       got=raw_size)
        if fh is not None and ni.file_hash is not None and not _same_hash(fh, ni.file_hash):
            raise fail(f"file '{ni.url}' does not match its FileHash", "file-hash-mismatch", expected=ni.file_hash,
                       got=Hash(ni.file_hash.split(":", 1)[0], fh.digest()).prefixed("nix32"))
        if nh.digest() != Hash.parse(ni.nar_hash).digest:
            raise fail("hash mismatch importing path", "hash-mismatch", expected=ni.nar_hash,
                       got=Hash("sha256", nh.digest()).prefixed("nix32"))
        if held is not None:
            yield held
    finally:
        f.close()


def _same_hash(h: Any, text: str) -> bool:
    return bool(h.digest() == Hash.parse(text).digest)


def open_cache_store(backend: CacheBackend, u: Any, store_dir: str, *, backend_params: Iterable[str] = (),
                     scheme: str | None = None) -> BinaryCacheStore:
    """What a backend's ``open_store`` opener returns: a :class:`BinaryCacheStore` over
    ``backend`` with the URI's parameters (``u``: a :class:`~nartool.store.uri.StoreURI`)."""
    return BinaryCacheStore(backend, store_dir=store_dir, params=u.params, backend_params=backend_params,
                            scheme=scheme or u.scheme)


class FileCacheStore(BinaryCacheStore):
    """A ``file://`` cache: also creates the directories Nix creates (``nar``, ``log``,
    ``realisations``) before the first write, so the layout is Nix's exactly. Inside
    :meth:`batch` the files are made durable with one sync per batch instead of one ``fsync``
    per file (:meth:`nartool.cache.file.FileBackend.deferred`)."""

    @contextmanager
    def batch(self, *, keep_on_error: bool = False) -> Iterator[None]:
        from .file import FileBackend

        assert isinstance(self.backend, FileBackend)
        before = set(self._narinfos)
        try:
            with self.backend.deferred(keep_on_error=keep_on_error):
                yield
        except BaseException:
            if not keep_on_error:  # nothing of the block was published
                self.forget(set(self._narinfos) - before)
                self._cache_info_written = False
            raise

    def commit_pending(self) -> int:
        from .file import FileBackend

        assert isinstance(self.backend, FileBackend)
        return sum(1 for k in self.backend.flush() if k.endswith(".narinfo"))

    def _nar_spool(self) -> BinaryIO:
        """A hidden temporary in the cache's ``nar/`` (same filesystem: it is renamed into place,
        never copied)."""
        from .file import FileBackend

        assert isinstance(self.backend, FileBackend)
        return self.backend.temporary("nar")

    def _upload_nar(self, url: str, tmp: BinaryIO) -> None:
        from .file import FileBackend

        assert isinstance(self.backend, FileBackend)
        self.backend.adopt_file(url, tmp)

    def _drop_spool(self, tmp: BinaryIO) -> None:
        from .file import FileBackend

        assert isinstance(self.backend, FileBackend)
        self.backend.drop_temporary(tmp)

    def _init_for_writing(self) -> None:
        if not self._cache_info_written:
            from .file import FileBackend

            assert isinstance(self.backend, FileBackend)
            for sub in ("", "nar", "log", "realisations"):
                d = os.path.join(self.backend.root, sub)
                try:
                    os.makedirs(d, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"cannot create the cache directory: {e.strerror}", path=d,
                                     rule="io-error") from None
        super()._init_for_writing()


def open_file_store(u: Any, store_dir: str, opts: Mapping[str, Any]) -> BinaryCacheStore:
    """The ``file:///DIR`` opener (registered in :mod:`nartool.store.uri`)."""
    from .file import FileBackend

    if not u.authority:
        raise StoreError("a file:// store needs a directory (file:///DIR)", rule="bad-uri", got=u.text)
    return FileCacheStore(FileBackend(os.path.expanduser(u.authority)), store_dir=store_dir, params=u.params,
                          scheme="file")


__all__ = ["BinaryCacheStore", "FileCacheStore", "CacheParams", "CacheInfo", "CacheParamError", "CacheUnavailableError",
           "compressobj", "open_cache_store", "open_file_store", "WRITABLE", "BASE_PARAMS"]
