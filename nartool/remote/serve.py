"""The server side of Nix's serve protocol: what ``nix-store --serve [--write]`` speaks.

:func:`serve_command` reads commands from ``inf`` and writes replies to ``outf`` until
end-of-file at a command boundary (exit status 0). Any failure is one line ``error: MESSAGE``
on ``log`` and exit status 1 — there is no error frame in the protocol, the client sees EOF.
Nothing but protocol bytes is ever written to ``outf``.

Behaviour follows Nix 2.8 (``docs/serve-protocol.md``): handshake reply ``0x5452eecb``/``0x207``;
sets sorted by base name; ``QueryPathInfos`` records with ``narHash`` (``sha256:``+nix32),
``ca`` and ``sigs`` for client minor ≥ 4; ``ExportPaths`` in dependency order; ``AddToStoreNar``
consumes exactly ``narSize`` bytes even when the path is already valid; ``lock=1`` in
``QueryValidPaths`` (with ``--write``) makes every requested path a temp root. Differences:

* Builds (commands 6 and 8, ``--write`` only; ``building paths is not allowed`` otherwise, before
  reading the request) run on :mod:`nartool.build` with the client's build settings; see
  :mod:`nartool.remote.serve_build` for the replies, the log and the access rules (an
  input-addressed ``BuildDerivation`` needs a user in ``trusted-users``).
* Trust. Nix's serve imports without any signature check. nartool decides per user: a user not
  in ``trusted-users`` may import a path only when it carries a valid signature by a key in
  ``trusted-public-keys`` or is content-addressed (``require-sigs = false`` lifts this), like
  an untrusted client of the Nix daemon. The decision is made from the request's metadata,
  before any NAR byte is read. ``ImportPaths`` carries no signatures, so untrusted users cannot
  use it (unless ``require-sigs = false``). A content address counts instead of a signature
  only when it reproduces the path, uses sha256 or sha512 (``fixed:md5:``/``fixed:sha1:``
  paths need a signature: those hashes are too weak to vouch for contents), and can be checked
  from the NAR alone (a recursive path that refers to itself cannot). Every ``ca`` field, from
  any user, is verified by the store against the NAR stream itself while it is restored
  (:mod:`nartool.store.cacheck`), never by reading restored files back.
* Derivations. Users not in ``trusted-users`` may not upload a ``*.drv`` path whose NAR is
  over 16 MiB (``UNTRUSTED_DRV_MAX_NAR``; refused from the metadata, before reading the NAR).
  Independently, the store parses a ``.drv``'s outputs only from a regular file of at most
  16 MiB, opened without following symlinks; anything else is stored without recorded outputs.
* Durability and group commit. A reply is only sent once its work is durable: every import
  runs inside ``store.batch()`` and is acknowledged after its path was committed. When further
  ``AddToStoreNar`` requests are already waiting on the input (a non-blocking check), they
  join the same batch and their ``1`` replies are sent together after one commit. Nix's
  client waits for each reply, so it always gets batches of one. Whenever the next read of
  the input would block, what the group holds so far is committed (``commit_pending``) and
  acknowledged first, so a slow or stalled client never keeps a path locked and unregistered.
  Each path is fully checked (size, hash, content address) before it joins the group; if the
  session dies inside a group, the group's paths are still registered where the store can
  (``LocalStore.batch(keep_on_error=True)``) but not acknowledged.

Extensions (harmless to real Nix clients, which never trigger them; ``docs/serve-protocol.md``,
Extensions):

* Announcement. A ``QueryValidPaths`` set containing the sentinel
  ``STORE/00000000000000000000000000000000-nartool-ext-query`` (a syntactically valid path no
  real store holds; a Nix server just reports it invalid) is answered with the valid subset
  plus ``STORE/000…000-nartool-ext-v1-w<0|1>-t<0|1>``: ``w`` = imports allowed (``--write``),
  ``t`` = unsigned imports accepted (trusted user or ``require-sigs = false``).
* Command ``0x6e740001`` CheckImportable (sent only to a server that announced itself):
  request ``u64 n``, n × (``str path``, ``str narHash``, ``u64 narSize``, ``StorePathSet refs``,
  ``list<str> sigs``, ``str ca``); reply ``u64 n``, n × (``str path``, ``str reason``) for the
  paths this server would refuse. Nothing is read or stored.
* zstd sessions. Started as ``nartool serve --compress zstd``, the server offers compression by
  setting bit 16 of its version word (``0x10207``; Nix 2.x clients only look at the low 16 bits).
  If the client's version word has the same bit, both directions switch to a zstd stream
  right after the handshake. A Nix client never sets the bit, so it gets a plain session.
"""

from __future__ import annotations

import io
import select
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol

from ..errors import NarError, NartoolError, ProtocolError, SignatureError, StoreError, TruncatedError
from ..nar.source import ByteSource
from ..store.cacheck import ca_proves_path
from ..store.types import PathInfo, Store
from . import messages as M
from . import wire as W

if TYPE_CHECKING:
    from ..config import Config, UserIdentity
    from ..store.signing import PublicKey

#: a group commit stops after this many paths or bytes (so replies keep flowing)
GROUP_MAX_PATHS = 1024
GROUP_MAX_BYTES = 64 << 20
#: how long a group waits for more input before it commits what it holds (seconds)
STALL_GRACE = 0.02
#: users not in ``trusted-users`` may not upload a ``*.drv`` path whose NAR is larger
UNTRUSTED_DRV_MAX_NAR = 16 << 20

EXT_SENTINEL_NAME = "nartool-ext-query"
EXT_HASH_PART = "0" * 32


class LogSink(Protocol):
    def write(self, s: str, /) -> int: ...
    def flush(self) -> None: ...


class ServeExit(Exception):
    """Stop serving with ``code`` after ``message`` (already formatted, without ``error: ``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Policy:
    """What this session may do."""

    write: bool
    trusted: bool = True
    trusted_keys: Mapping[str, PublicKey] = field(default_factory=dict)
    require_sigs: bool = True
    user: str = "?"

    @property
    def unsigned_ok(self) -> bool:
        return self.trusted or not self.require_sigs

    def refusal(self, info: PathInfo, store_dir: str, log: LogSink | None = None) -> str | None:
        """Why ``info`` may not be imported by this session (None = it may)."""
        if not self.write:
            return "importing paths is not allowed"
        if not self.trusted and info.path.endswith(".drv") and info.nar_size > UNTRUSTED_DRV_MAX_NAR:
            return (f"cannot add path '{info.path}': derivations over {UNTRUSTED_DRV_MAX_NAR >> 20} MiB "
                    f"(NAR size) are only accepted from trusted users, and user '{self.user}' is not one")
        if self.unsigned_ok:
            return None
        ca_why = ca_proves_path(info, store_dir) if info.ca else None
        if info.ca and ca_why is None:
            return None
        try:
            from ..store.signing import verify_path_info

            if verify_path_info(info, self.trusted_keys):
                return None
        except SignatureError:
            pass
        if info.ca and ca_why is not None:
            if log is not None and "reproduce" in ca_why:
                _log(log, f"warning: path '{info.path}' claims to be content-addressed but isn't")
            return f"cannot add path '{info.path}' because it lacks a valid signature, and {ca_why}{self.hint()}"
        return f"cannot add path '{info.path}' because it lacks a valid signature{self.hint()}"

    def hint(self) -> str:
        """How to make this session accept unsigned paths (for refusals), naming the system file:
        a user's own configuration does not count for serve."""
        from ..config import SYSTEM_CONFIG

        return (f" (user '{self.user}' is not trusted: add 'trusted-users = {self.user}' "
                f"to {SYSTEM_CONFIG} on the receiving machine, or sign the paths with a key in "
                "its 'trusted-public-keys')")


def _log(log: LogSink, line: str) -> None:
    try:
        log.write(line + "\n")
        log.flush()
    except (OSError, ValueError):
        pass


def policy_from_config(write: bool, config: Config | None, user: UserIdentity | None,
                       trusted: bool | None) -> Policy:
    if config is None:
        return Policy(write=write, trusted=True if trusted is None else trusted,
                      user=user.name if user else "?")
    if user is None:
        from ..config import UserIdentity

        user = UserIdentity.current()
    if not config.is_allowed(user):
        from ..config import SYSTEM_CONFIG

        raise ServeExit(f"user '{user.name}' is not allowed to use this store (see 'allowed-users' in "
                        f"{SYSTEM_CONFIG} on the serving machine)")
    return Policy(write=write, trusted=config.is_trusted(user) if trusted is None else trusted,
                  trusted_keys=config.trusted_keys(), require_sigs=config.require_sigs, user=user.name)


def resumable_batch(store: Store) -> AbstractContextManager[None]:
    """``store.batch()``, keeping the complete paths of the batch on error where the store
    supports it (``keep_on_error``; every store takes the flag): a cut connection then loses
    nothing that fully arrived and was verified. Such paths are registered but never acknowledged."""
    return store.batch(keep_on_error=True)


def fd_readable(fd: int, wait: float = 0.0) -> bool:
    """Whether ``fd`` has input (or end-of-file) to read within ``wait`` seconds; True when
    unknown."""
    try:
        r, _, _ = select.select([fd], [], [], wait)
    except (OSError, ValueError):
        return True
    return bool(r)


def ext_path(store_dir: str, name: str) -> str:
    return f"{store_dir}/{EXT_HASH_PART}-{name}"


def is_ext_path(p: str, store_dir: str) -> bool:
    return p.startswith(f"{store_dir}/{EXT_HASH_PART}-nartool-ext-")


class _Server:
    def __init__(self, store: Store, inf: BinaryIO, outf: BinaryIO, policy: Policy, log: LogSink,
                 compress: str | None) -> None:
        self.store = store
        self.store_dir = store.store_dir
        self.inf = inf
        self.in_fd = self.raw_fd = W.file_fd(inf)
        self._read_input = getattr(inf, "read1", inf.read)
        #: called before a read of the input that would block (see add_to_store_nar)
        self.before_wait: Callable[[], None] | None = None
        self.src = ByteSource(self._read_raw, "serve input")
        self.raw_out = outf
        self.w = W.Writer(outf)
        self.policy = policy
        self.log = log
        self.compress = compress
        self.client_version = 0
        self.minor = 0
        #: the configuration builds take their options from (None: built-in defaults)
        self.config: Config | None = None
        #: settings forced on every build of this session (``--option`` of ``nartool serve``)
        self.build_overrides: dict[str, str] = {}

    # -- plumbing

    def _read_raw(self, n: int) -> bytes:
        """Read from the (raw, possibly compressed) input; when a hook is set and nothing can be
        read without waiting, run the hook first."""
        hook = self.before_wait
        if hook is not None and self.raw_fd is not None and not fd_readable(self.raw_fd, STALL_GRACE):
            hook()
        return self._read_input(n)

    def handshake(self) -> None:
        magic = W.read_u32(self.src, "magic")
        if magic != W.SERVE_MAGIC_1:
            raise ServeExit("protocol mismatch")
        version = W.PROTOCOL_VERSION
        if self.compress:
            version |= W.VERSION_FLAG_ZSTD
        self.w.u64(W.SERVE_MAGIC_2).u64(version).flush()
        self.client_version = W.read_u32(self.src, "client version")
        self.minor = W.version_minor(self.client_version)
        if self.compress == "zstd" and self.client_version & W.VERSION_FLAG_ZSTD:
            leftover = W.take_buffered(self.src)
            raw_read = self.src.raw_read
            self.src = ByteSource(W.zstd_reader(leftover, raw_read), "serve input")
            self.in_fd = None  # pending compressed bytes do not mean a pending command
            self.w = W.Writer(W.ZstdWriter(self.raw_out))

    def run(self) -> int:
        self.handshake()
        handlers: dict[int, Callable[[], None]] = {
            W.CMD_QUERY_VALID_PATHS: self.query_valid_paths,
            W.CMD_QUERY_PATH_INFOS: self.query_path_infos,
            W.CMD_DUMP_STORE_PATH: self.dump_store_path,
            W.CMD_IMPORT_PATHS: self.import_paths,
            W.CMD_EXPORT_PATHS: self.export_paths,
            W.CMD_BUILD_PATHS: self.build_paths,
            W.CMD_QUERY_CLOSURE: self.query_closure,
            W.CMD_BUILD_DERIVATION: self.build_derivation,
            W.CMD_ADD_TO_STORE_NAR: self.add_to_store_nar,
            W.CMD_EXT_CHECK_IMPORTABLE: self.ext_check_importable,
        }
        while True:
            if self.src.at_eof():
                return 0
            cmd = W.read_u32(self.src, "command")
            h = handlers.get(cmd)
            if h is None:
                raise ServeExit(f"unknown serve command {cmd}")
            h()

    def _need_write(self, what: str) -> None:
        if not self.policy.write:
            raise ServeExit(f"{what} is not allowed")

    def _path_set(self, field: str) -> list[str]:
        return W.read_path_set(self.src, self.store_dir, field)

    # -- commands

    def query_valid_paths(self) -> None:
        lock = W.read_flag(self.src, "lock")
        substitute = W.read_flag(self.src, "substitute")
        paths = self._path_set("paths")
        sentinel = ext_path(self.store_dir, EXT_SENTINEL_NAME)
        ext = sentinel in paths
        real = [p for p in paths if not is_ext_path(p, self.store_dir)]
        if lock and self.policy.write:
            for p in real:
                self.store.temp_root(p)
        if substitute and self.policy.write and self.config is not None and self.config.substituters:
            # as nix-store --serve: missing paths are first fetched from this side's substituters
            # (nix-copy-closure -s, builders-use-substitutes); signatures are this side's policy
            from ..cache.substitute import substitute_paths

            substitute_paths(self.store, real, self.config)
        valid = set(self.store.query_valid_paths(real))
        if ext:
            w = int(self.policy.write)
            t = int(self.policy.unsigned_ok)
            valid.add(ext_path(self.store_dir, f"nartool-ext-v1-w{w}-t{t}"))
        self.w.path_set(valid).flush()

    def query_path_infos(self) -> None:
        paths = self._path_set("paths")
        w = self.w
        for p in W.sort_paths(paths):
            info = self.store.query_path_info(p)
            if info is None:
                continue
            M.PathInfoRecord.from_info(info).write(w, self.minor)
        M.PathInfoRecord.write_end(w)
        w.flush()

    def _valid_store_path(self, p: str, at: int | None = None) -> str:
        W.check_store_path(p, self.store_dir, "path", at)
        if not self.store.is_valid(p):
            raise ServeExit(f"path '{p}' is not valid")
        return p

    def dump_store_path(self) -> None:
        at = self.src.offset
        p = self._valid_store_path(W.read_str(self.src, "path", W.MAX_PATH_LEN), at)
        self.w.raw_chunks(self.store.nar_chunks(p))
        self.w.flush()

    def query_closure(self) -> None:
        include_outputs = W.read_flag(self.src, "includeOutputs")
        paths = self._path_set("paths")
        for p in paths:
            self._valid_store_path(p)
        self.w.path_set(self.store.closure(paths, include_outputs=include_outputs)).flush()

    def export_paths(self) -> None:
        W.read_u32(self.src, "obsolete word")
        paths = self._path_set("paths")
        for p in paths:
            self._valid_store_path(p)
        self.w.raw_chunks(self.store.export_paths(paths))
        self.w.flush()

    # -- builds (see nartool.remote.serve_build)

    def build_paths(self) -> None:
        self._need_write("building paths")
        _prestart_builds()
        from .serve_build import build_paths

        build_paths(self)

    def build_derivation(self) -> None:
        self._need_write("building paths")
        _prestart_builds()
        from .serve_build import build_derivation

        build_derivation(self)

    def import_paths(self) -> None:
        self._need_write("importing paths")
        if not self.policy.unsigned_ok:
            raise ServeExit("cannot import paths with ImportPaths: the export stream carries no signatures "
                            f"(a client speaking protocol 2.5 uses AddToStoreNar with signed paths){self.policy.hint()}")
        # As with AddToStoreNar: before waiting on a slow or stalled client, the complete paths
        # received so far are committed, so that none stays locked and unregistered meanwhile
        # (Nix's ImportPaths registers each path as it arrives, too; the reply still comes once,
        # after the whole stream).
        def commit_pending() -> None:
            self.store.commit_pending()

        self.before_wait = commit_pending
        try:
            with self.store.batch():
                paths = self.store.import_paths(self.src)
                for p in paths:
                    self.store.temp_root(p)
        finally:
            self.before_wait = None
        self.w.u64(1).flush()

    def _read_nar_info(self) -> PathInfo:
        h = M.AddToStoreNarHeader.read(self.src, self.store_dir)
        if h.nar_size == 0:
            raise ServeExit("narInfo is too old and missing the narSize field")
        info = h.to_info()
        if not self.policy.trusted:
            info = info.replace(ultimate=False)
        if not info.registration_time:
            info = info.replace(registration_time=int(time.time()))
        return info

    def _add_one(self, info: PathInfo) -> None:
        why = self.policy.refusal(info, self.store_dir, self.log)
        if why:
            raise ServeExit(why)
        self.store.temp_root(info.path)
        if self.store.is_valid(info.path):
            self.src.skip(info.nar_size)
            return
        # every check (size, hash, content address) happens inside add_nar, before the path
        # joins the batch: what the batch holds is fully verified, whatever happens next
        sub = W.limited_source(self.src, info.nar_size)
        try:
            self.store.add_nar(info, sub)
        except TruncatedError as e:
            if self.src.at_eof():
                raise
            raise StoreError(f"size mismatch importing path '{info.path}': the NAR is longer than its "
                             f"announced narSize {info.nar_size}",
                             path=info.path, rule="size-mismatch", expected=info.nar_size) from e
        extra = W.drain(sub)
        if extra:
            raise StoreError(f"size mismatch importing path '{info.path}': the NAR is shorter than its "
                             f"announced narSize {info.nar_size}",
                             path=info.path, rule="size-mismatch", expected=info.nar_size,
                             got=info.nar_size - extra)

    def add_to_store_nar(self) -> None:
        self._need_write("importing paths")
        acks = 0
        sent = 0
        nbytes = 0
        cmd9 = W.enc_u64(W.CMD_ADD_TO_STORE_NAR)
        commit_pending = self.store.commit_pending

        def before_wait() -> None:
            # The peer is slow (or stalled): make what the group holds durable now, so that no
            # path stays locked and unregistered while we wait, and acknowledge it.
            nonlocal sent
            if sent == acks:
                return
            commit_pending()
            self.w.raw(b"".join(W.enc_u64(1) for _ in range(acks - sent))).flush()
            sent = acks

        self.before_wait = before_wait
        try:
            with resumable_batch(self.store):
                while True:
                    info = self._read_nar_info()
                    self._add_one(info)
                    acks += 1
                    nbytes += info.nar_size
                    if acks >= GROUP_MAX_PATHS or nbytes >= GROUP_MAX_BYTES:
                        break
                    if not W.has_buffered_input(self.src, self.in_fd):
                        break
                    if self.src.peek(8) != cmd9:
                        break
                    self.src.read_exact(8)
        finally:
            self.before_wait = None
        for _ in range(acks - sent):
            self.w.u64(1)
        self.w.flush()

    def ext_check_importable(self) -> None:
        src, sd = self.src, self.store_dir
        n = W.read_count(src, "count")
        refused: list[tuple[str, str]] = []
        for _ in range(n):
            info = M.CheckImportableEntry.read(src, sd).to_info()
            why = self.policy.refusal(info, sd)
            if why:
                refused.append((info.path, why))
        self.w.u64(len(refused))
        for p, why in refused:
            self.w.str_(p).str_(why)
        self.w.flush()


def serve_command(store: Store, inf: BinaryIO, outf: BinaryIO, *, write: bool, trusted: bool | None = None,
                  config: Config | None = None, user: UserIdentity | None = None, log: LogSink | None = None,
                  compress: str | None = None, build_overrides: Mapping[str, str] | None = None) -> int:
    """Serve one session; returns the exit status (0 = clean EOF at a command boundary).

    Trust: with ``config``, ``allowed-users`` decides whether ``user`` (default: the current
    user) may be served at all, ``trusted-users`` whether it is trusted (unless ``trusted`` is
    given), and ``trusted-public-keys``/``require-sigs`` what an untrusted user may import.
    Without ``config`` the session is trusted unless ``trusted=False`` (then nothing unsigned
    and no signature at all is accepted).
    """
    if log is None:
        log = sys.stderr
    try:
        policy = policy_from_config(write, config, user, trusted)
        server = _Server(store, inf, outf, policy, log, compress)
        server.config = config
        server.build_overrides = dict(build_overrides or {})
        return server.run()
    except ServeExit as e:
        _log(log, f"error: {e.message}")
        return e.code
    except TruncatedError as e:
        _log(log, f"error: unexpected end-of-file ({e})")
        return 1
    except ProtocolError as e:
        _log(log, f"error: {e}")
        return 1
    except (StoreError, NarError, NartoolError) as e:
        _log(log, f"error: {e}")
        return 1
    except (BrokenPipeError, ConnectionResetError):
        _log(log, "error: the client closed the connection")
        return 1
    except OSError as e:
        _log(log, f"error: {e.strerror or e}" + (f": {e.filename!r}" if e.filename else ""))
        return 1


def serve_bytes(store: Store, data: bytes, **kw: object) -> tuple[int, bytes, str]:
    """Run a whole session from ``data``; (status, stdout bytes, stderr text). For tests."""
    out = io.BytesIO()
    err = io.StringIO()
    code = serve_command(store, io.BytesIO(data), out, log=err, **kw)  # type: ignore[arg-type]
    return code, out.getvalue(), err.getvalue()


def _prestart_builds() -> None:
    """Start the sandbox zygote (``nartool.build.zygote``) before the build modules are imported,
    so that the two start-ups overlap (a serve session is often one build)."""
    if sys.platform == "linux":
        from ..build import zygote
        zygote.prestart()
