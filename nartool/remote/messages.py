"""The serve protocol's structured messages, declared once for both ends.

Each message is a dataclass whose ``write(w)`` and ``read(src, store_dir)`` are the only
places its field sequence is spelled out; :mod:`nartool.remote.serve` and
:mod:`nartool.remote.client` both go through them. Field layouts are those of
``docs/serve-protocol.md``:

* :class:`PathInfoRecord` — one record of a ``QueryPathInfos`` reply (the reply is a list
  of them ended by an empty path; ``narHash``/``ca``/``sigs`` only from protocol 2.4 on);
* :class:`AddToStoreNarHeader` — the request header of ``AddToStoreNar`` (after the
  command word, before the NAR);
* :class:`CheckImportableEntry` — one entry of nartool's ``CheckImportable`` extension;
* :class:`BuildDerivationRequest` (with :class:`BuildSettings`) — ``BuildDerivation``'s
  request;
* :class:`BuildResult` — the reply of ``BuildPaths``/``BuildDerivation`` (status values in
  :class:`BuildStatus`): the record is the store layer's (:mod:`nartool.store.buildresult`,
  re-exported here), its wire form :func:`write_build_result` and :func:`read_build_result`.
  The ``BasicDerivation`` that ``BuildDerivation`` sends is
  :class:`nartool.store.derivation.BasicDerivation` and its wire form lives there.

Hashes are kept as :class:`~nartool.hashes.Hash`; each message writes the encoding real Nix
uses for it (``sha256:``+nix32 in ``QueryPathInfos``, bare base16 in ``AddToStoreNar``) and
reads any encoding Nix accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NartoolError, ProtocolError
from ..hashes import Hash
from ..nar.source import ByteSource
from ..store.buildresult import BuildResult, BuildStatus
from ..store.derivation import BasicDerivation
from ..store.paths import ContentAddress
from ..store.types import PathInfo
from . import wire as W

#: most signatures accepted on one path
MAX_SIGS = 4096


def _read_hash(src: ByteSource, path: str) -> Hash:
    """A ``narHash`` field: sha256 in any of Nix's encodings."""
    at = src.offset
    text = W.read_str(src, "narHash", 256)
    try:
        return Hash.parse(text, "sha256")
    except NartoolError as e:
        raise ProtocolError(f"invalid narHash for '{path}': {e.message}", offset=at, path="narHash",
                            rule="bad-hash", got=text) from None


def _read_ca(src: ByteSource, path: str) -> str | None:
    """A content-address field: empty (none) or a valid content address."""
    at = src.offset
    ca = W.read_str(src, "ca") or None
    if ca is not None:
        try:
            ContentAddress.parse(ca)
        except NartoolError as e:
            raise ProtocolError(f"invalid content address for '{path}': {e.message}", offset=at, path="ca",
                                rule="bad-ca", got=ca) from None
    return ca


def _read_sigs(src: ByteSource) -> frozenset[str]:
    return frozenset(W.read_str_list(src, "sigs", max_count=MAX_SIGS))


@dataclass(frozen=True)
class PathInfoRecord:
    """One ``QueryPathInfos`` record: ``path deriver references downloadSize narSize``, then
    from minor 4 on ``narHash ca sigs``. ``nar_hash`` is None only below minor 4."""

    path: str
    deriver: str | None
    references: frozenset[str]
    download_size: int
    nar_size: int
    nar_hash: Hash | None = None
    ca: str | None = None
    sigs: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_info(cls, info: PathInfo) -> PathInfoRecord:
        # Nix's serve server sends narSize as downloadSize too
        return cls(path=info.path, deriver=info.deriver, references=info.references, download_size=info.nar_size,
                   nar_size=info.nar_size, nar_hash=info.nar_hash, ca=info.ca, sigs=info.sigs)

    def to_info(self, registration_time: int = 0) -> PathInfo:
        if self.nar_hash is None:
            raise ProtocolError(f"no NAR hash for '{self.path}' (serve protocol older than 2.4)", rule="no-hash")
        return PathInfo(path=self.path, nar_hash=self.nar_hash, nar_size=self.nar_size, references=self.references,
                        deriver=self.deriver, registration_time=registration_time, sigs=self.sigs, ca=self.ca)

    def write(self, w: W.Writer, minor: int) -> None:
        w.str_(self.path).str_(self.deriver or "").path_set(self.references)
        w.u64(self.download_size).u64(self.nar_size)
        if minor >= 4:
            if self.nar_hash is None:
                raise ValueError(f"no NAR hash for '{self.path}'")
            w.str_("sha256:" + self.nar_hash.nix32).str_(self.ca or "").strs(sorted(self.sigs))

    @staticmethod
    def write_end(w: W.Writer) -> None:
        """The empty path that ends a reply."""
        w.str_("")

    @classmethod
    def read(cls, src: ByteSource, store_dir: str, minor: int) -> PathInfoRecord | None:
        """The next record, or None at the empty path that ends the reply."""
        at = src.offset
        p = W.read_str(src, "path", W.MAX_PATH_LEN)
        if not p:
            return None
        W.check_store_path(p, store_dir, "path", at)
        deriver = W.read_opt_path(src, store_dir, "deriver")
        refs = frozenset(W.read_path_set(src, store_dir, "references"))
        download_size = W.read_u64(src, "downloadSize")
        nar_size = W.read_u64(src, "narSize")
        if minor < 4:
            return cls(p, deriver, refs, download_size, nar_size)
        # (order as on the wire: narHash, ca, sigs; the hash is checked once all are read)
        at = src.offset
        h = W.read_str(src, "narHash", 256)
        ca = W.read_str(src, "ca") or None
        sigs = _read_sigs(src)
        if not h:
            raise ProtocolError(f"NAR hash is now mandatory (path '{p}')", offset=at, rule="no-hash")
        try:
            nar_hash = Hash.parse(h, "sha256")
        except NartoolError as e:
            raise ProtocolError(f"invalid narHash for '{p}': {e.message}", offset=at, rule="bad-hash",
                                got=h) from None
        return cls(p, deriver, refs, download_size, nar_size, nar_hash, ca, sigs)


@dataclass(frozen=True)
class AddToStoreNarHeader:
    """``AddToStoreNar``'s header: ``path deriver narHash references registrationTime narSize
    ultimate sigs ca`` (the NAR of ``narSize`` bytes follows)."""

    path: str
    deriver: str | None
    nar_hash: Hash
    references: frozenset[str]
    registration_time: int
    nar_size: int
    ultimate: bool
    sigs: frozenset[str]
    ca: str | None

    @classmethod
    def from_info(cls, info: PathInfo, *, ultimate: bool | None = None) -> AddToStoreNarHeader:
        return cls(path=info.path, deriver=info.deriver, nar_hash=info.nar_hash, references=info.references,
                   registration_time=info.registration_time, nar_size=info.nar_size,
                   ultimate=info.ultimate if ultimate is None else ultimate, sigs=info.sigs, ca=info.ca)

    def to_info(self) -> PathInfo:
        return PathInfo(path=self.path, nar_hash=self.nar_hash, nar_size=self.nar_size, references=self.references,
                        deriver=self.deriver, registration_time=self.registration_time, ultimate=self.ultimate,
                        sigs=self.sigs, ca=self.ca)

    def write(self, w: W.Writer) -> None:
        # base16 without prefix, as Nix's copy code sends it
        w.str_(self.path).str_(self.deriver or "").str_(self.nar_hash.base16).path_set(self.references)
        w.u64(self.registration_time).u64(self.nar_size).u64(int(self.ultimate))
        w.strs(sorted(self.sigs)).str_(self.ca or "")

    @classmethod
    def read(cls, src: ByteSource, store_dir: str) -> AddToStoreNarHeader:
        path = W.read_path(src, store_dir, "path")
        deriver = W.read_opt_path(src, store_dir, "deriver")
        nar_hash = _read_hash(src, path)
        refs = frozenset(W.read_path_set(src, store_dir, "references"))
        reg_time = W.read_u64(src, "registrationTime")
        nar_size = W.read_u64(src, "narSize")
        ultimate = W.read_u64(src, "ultimate") != 0
        sigs = _read_sigs(src)
        ca = _read_ca(src, path)
        return cls(path, deriver, nar_hash, refs, reg_time, nar_size, ultimate, sigs, ca)


@dataclass(frozen=True)
class CheckImportableEntry:
    """One entry of nartool's ``CheckImportable`` request: ``path narHash narSize references
    sigs ca``. The request is ``count`` entries; the reply ``count`` (path, reason) pairs."""

    path: str
    nar_hash: Hash
    nar_size: int
    references: frozenset[str]
    sigs: frozenset[str]
    ca: str | None

    @classmethod
    def from_info(cls, info: PathInfo) -> CheckImportableEntry:
        return cls(info.path, info.nar_hash, info.nar_size, info.references, info.sigs, info.ca)

    def to_info(self) -> PathInfo:
        return PathInfo(path=self.path, nar_hash=self.nar_hash, nar_size=self.nar_size, references=self.references,
                        sigs=self.sigs, ca=self.ca)

    def write(self, w: W.Writer) -> None:
        w.str_(self.path).str_(self.nar_hash.prefixed("nix32")).u64(self.nar_size).path_set(self.references)
        w.strs(sorted(self.sigs)).str_(self.ca or "")

    @classmethod
    def read(cls, src: ByteSource, store_dir: str) -> CheckImportableEntry:
        path = W.read_path(src, store_dir, "path")
        nar_hash = _read_hash(src, path)
        nar_size = W.read_u64(src, "narSize")
        refs = frozenset(W.read_path_set(src, store_dir, "references"))
        sigs = _read_sigs(src)
        ca = W.read_str(src, "ca") or None
        return cls(path, nar_hash, nar_size, refs, sigs, ca)


@dataclass(frozen=True)
class BuildSettings:
    """The build settings that end ``BuildPaths`` and ``BuildDerivation`` requests:
    ``maxSilentTime buildTimeout``, from minor 2 ``maxLogSize``, from minor 3 ``buildRepeat
    enforceDeterminism``, from minor 7 ``keepFailed``."""

    max_silent_time: int = 0
    build_timeout: int = 0
    max_log_size: int = 0
    build_repeat: int = 0
    enforce_determinism: bool = False
    keep_failed: bool = False

    def write(self, w: W.Writer, minor: int) -> None:
        w.u64(self.max_silent_time).u64(self.build_timeout)
        if minor >= 2:
            w.u64(self.max_log_size)
        if minor >= 3:
            w.u64(self.build_repeat).u64(int(self.enforce_determinism))
        if minor >= 7:
            w.u64(int(self.keep_failed))

    @classmethod
    def read(cls, src: ByteSource, minor: int) -> BuildSettings:
        silent = W.read_u64(src, "maxSilentTime")
        timeout = W.read_u64(src, "buildTimeout")
        log_size = W.read_u64(src, "maxLogSize") if minor >= 2 else 0
        repeat, enforce = 0, False
        if minor >= 3:
            repeat = W.read_u32(src, "buildRepeat")
            enforce = W.read_flag(src, "enforceDeterminism")
        keep = W.read_flag(src, "keepFailed") if minor >= 7 else False
        return cls(silent, timeout, log_size, repeat, enforce, keep)


@dataclass(frozen=True)
class BuildDerivationRequest:
    """``BuildDerivation``'s request: ``drvPath``, the basic derivation, the build settings.
    The derivation is :class:`nartool.store.derivation.BasicDerivation`, written by its own
    :meth:`~nartool.store.derivation.BasicDerivation.to_wire`; :meth:`read` reads the same
    layout from a stream, bounded and validated like every other request."""

    drv_path: str
    drv: BasicDerivation
    settings: BuildSettings = field(default_factory=BuildSettings)

    def write(self, w: W.Writer, minor: int) -> None:
        w.str_(self.drv_path).raw(self.drv.to_wire())
        self.settings.write(w, minor)

    @classmethod
    def read(cls, src: ByteSource, store_dir: str, minor: int) -> BuildDerivationRequest:
        drv_path = W.read_path(src, store_dir, "drvPath")
        outs = []
        for _ in range(W.read_count(src, "outputs", 1 << 12)):
            name = W.read_str(src, "outputName")
            path = W.read_str(src, "outputPath", W.MAX_PATH_LEN)
            outs.append((name, path, W.read_str(src, "hashAlgo"), W.read_str(src, "hash")))
        srcs = W.read_path_set(src, store_dir, "inputSrcs")
        platform = W.read_str(src, "platform")
        builder = W.read_str(src, "builder", W.MAX_PATH_LEN)
        args = W.read_str_list(src, "args", 1 << 20, 1 << 16)
        env = [(W.read_str(src, "env name", 1 << 16), W.read_str(src, "env value", 1 << 24))
               for _ in range(W.read_count(src, "env", 1 << 16))]
        drv = BasicDerivation(outs, srcs, platform, builder, args, env)
        return cls(drv_path, drv, BuildSettings.read(src, minor))


# -- BuildResult: the reply of BuildPaths/BuildDerivation ----------------------------------------
#
# The record and its statuses are the store layer's (nartool.store.buildresult, re-exported here);
# their wire form is declared here: ``status errorMsg``, then from minor 3 on ``timesBuilt
# isNonDeterministic startTime stopTime``, then from minor 6 on the built outputs (a count, then
# per output its id and its realisation as JSON text).


def write_build_result(w: W.Writer, result: BuildResult, minor: int) -> None:
    """Write ``result`` as a peer of protocol minor version ``minor`` reads it."""
    w.u64(result.status).str_(result.error_msg)
    if minor >= 3:
        w.u64(result.times_built).u64(int(result.is_non_deterministic)).u64(result.start_time).u64(result.stop_time)
    if minor >= 6:
        w.u64(len(result.built_outputs))
        for oid, realisation in sorted(result.built_outputs):
            w.str_(oid).str_(realisation)


def read_build_result(src: ByteSource, minor: int) -> BuildResult:
    """Read a result as a peer of protocol minor version ``minor`` writes it."""
    status = W.read_u32(src, "status")
    error_msg = W.read_str(src, "errorMsg", 1 << 20)
    if minor < 3:
        return BuildResult(status, error_msg)
    times_built = W.read_u32(src, "timesBuilt")
    nondet = W.read_flag(src, "isNonDeterministic")
    start = W.read_u64(src, "startTime")
    stop = W.read_u64(src, "stopTime")
    outs: tuple[tuple[str, str], ...] = ()
    if minor >= 6:
        n = W.read_count(src, "builtOutputs", 1 << 16)
        outs = tuple((W.read_str(src, "outputId"), W.read_str(src, "realisation", 1 << 20)) for _ in range(n))
    return BuildResult(status, error_msg, times_built, nondet, start, stop, outs)


__all__ = ["PathInfoRecord", "AddToStoreNarHeader", "CheckImportableEntry", "BuildSettings", "BuildDerivationRequest",
           "BuildStatus", "BuildResult", "write_build_result", "read_build_result", "MAX_SIGS"]
