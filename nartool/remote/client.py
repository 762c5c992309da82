"""The client side of the serve protocol (what ``nix-copy-closure`` and ``ssh://`` stores speak).

:class:`ServeClient` wraps a :mod:`~nartool.remote.transport` and offers one method per
command. Batches go out in one command where the protocol allows it (``QueryValidPaths``,
``QueryPathInfos`` and ``QueryClosure`` take sets), and uploads and downloads are pipelined:
a writer thread sends every request back to back while the calling thread reads the replies,
so a copy of N paths costs one round trip, not N.

When the remote dies, the error names the host and quotes the last lines of its stderr.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import NarError, ProtocolError, StoreError
from ..nar.reader import nar_passthrough
from ..nar.source import ByteSource
from ..store.export import end_chunk, record_chunks
from ..store.paths import DEFAULT_STORE_DIR
from ..store.types import PathInfo
from . import messages as M
from . import wire as W
from .serve import EXT_SENTINEL_NAME, STALL_GRACE, ext_path, fd_readable, is_ext_path
from .transport import Transport

T = TypeVar("T")
Chunks = Iterable[bytes | bytearray | memoryview]


class RemoteError(ProtocolError):
    """The remote failed or went away; ``remote_stderr`` holds the last lines it printed."""

    def __init__(self, message: str, remote_stderr: str = "", *, show_stderr: bool = True, **kw: object) -> None:
        full = message
        if remote_stderr and show_stderr:
            full += "\nremote stderr (last lines):\n  " + "\n  ".join(remote_stderr.splitlines())
        super().__init__(full, **kw)  # type: ignore[arg-type]
        self.remote_stderr = remote_stderr


@dataclass(frozen=True)
class RemoteExt:
    """What a nartool server announced about itself (see :mod:`nartool.remote.serve`)."""

    version: int
    write: bool
    unsigned_ok: bool


class ServeClient:
    """A serve-protocol session over ``transport``. The handshake happens in the constructor."""

    def __init__(self, transport: Transport, *, store_dir: str = DEFAULT_STORE_DIR, compress: str | None = None,
                 client_version: int = W.PROTOCOL_VERSION) -> None:
        self.t = transport
        self.host = transport.name
        self.store_dir = store_dir
        #: called before a read from the remote that would block (see copy's importer)
        self.before_wait: Callable[[], None] | None = None
        self.src = ByteSource(self._read_remote, "remote output")
        self.w = W.Writer(transport.sink)
        self.server_version = 0
        self.compressed = False
        self.ext: RemoteExt | None = None
        self._ext_probed = False
        try:
            self._handshake(compress, client_version)
        except BaseException:
            self.t.close(timeout=1.0)
            raise

    # -- plumbing

    def _read_remote(self, n: int) -> bytes:
        hook = self.before_wait
        if hook is not None:
            fd = getattr(self.t, "_out_fd", None)  # the server's output, where the transport has one
            if isinstance(fd, int) and fd >= 0 and not fd_readable(fd, STALL_GRACE):
                hook()
        return self.t.read(n)

    @property
    def minor(self) -> int:
        return W.version_minor(self.server_version)

    def _err(self, message: str, **kw: object) -> RemoteError:
        """A :class:`RemoteError` quoting the remote's last stderr lines (unless they were
        already passed through to ours)."""
        wait = getattr(self.t, "wait_stderr", None)
        if wait is not None:  # give the remote a moment to finish printing its message
            wait(1.0)
        return RemoteError(message, self.t.stderr_tail(), show_stderr=not self.t.passthrough, **kw)

    def _dead(self, what: str, cause: BaseException | None = None) -> RemoteError:
        detail = f": {cause}" if cause is not None and not isinstance(cause, (OSError, NarError)) else ""
        return self._err(f"{what} of '{self.host}' failed: the remote closed the connection{detail}",
                         rule="remote-died")

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RemoteError:
            raise
        except (BrokenPipeError, ConnectionResetError) as e:
            raise self._dead(what, e) from None
        except (W.WireError, NarError) as e:
            if getattr(e, "rule", None) == "truncated" or self.src.at_eof():
                raise self._dead(what, None) from None
            raise

    def _handshake(self, compress: str | None, version: int) -> None:
        if compress:
            version |= W.VERSION_FLAG_ZSTD
        try:
            self.w.u64(W.SERVE_MAGIC_1).u64(version).flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the read below reports it
        head = self.src.peek(8)
        if len(head) < 8:
            if not head:
                raise self._err(f"cannot connect to '{self.host}'", rule="connect")
            raise self._err(f"'nix-store --serve' protocol mismatch from '{self.host}', got {head!r}",
                            rule="protocol-mismatch")
        magic = int.from_bytes(head, "little")
        if magic > W.MAX_U32:
            shown = W.take_buffered(self.src)[:512]
            raise self._err(f"'nix-store --serve' protocol mismatch from '{self.host}', got "
                            f"'{shown.decode('utf-8', 'replace')}'", rule="protocol-mismatch", got=shown)
        self.src.read_exact(8)
        if magic != W.SERVE_MAGIC_2:
            raise self._err(f"'nix-store --serve' protocol mismatch from '{self.host}'",
                            rule="protocol-mismatch", expected=hex(W.SERVE_MAGIC_2), got=hex(magic))
        self.server_version = self._guard("handshake", lambda: W.read_u32(self.src, "server version"))
        if W.version_major(self.server_version) != 0x200:
            raise self._err(f"unsupported 'nix-store --serve' protocol version on '{self.host}'",
                            rule="version", got=hex(self.server_version))
        if compress == "zstd" and self.server_version & W.VERSION_FLAG_ZSTD:
            leftover = W.take_buffered(self.src)
            self.src = ByteSource(W.zstd_reader(leftover, self._read_remote), "remote output")
            self.w = W.Writer(W.ZstdWriter(self.t.sink))
            self.compressed = True

    def close(self) -> int | None:
        return self.t.close()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries

    def query_valid_paths(self, paths: Iterable[str], *, lock: bool = False, substitute: bool = False,
                          probe_ext: bool = False) -> set[str]:
        """The subset of ``paths`` valid on the remote (one command). With ``probe_ext`` the
        request also carries nartool's extension sentinel; the answer lands in :attr:`ext`."""
        ps = list(dict.fromkeys(paths))
        if probe_ext:
            ps.append(ext_path(self.store_dir, EXT_SENTINEL_NAME))

        def go() -> set[str]:
            self.w.u64(W.CMD_QUERY_VALID_PATHS).u64(int(lock)).u64(int(substitute)).path_set(ps).flush()
            return set(W.read_path_set(self.src, self.store_dir, "valid paths"))

        valid = self._guard("QueryValidPaths", go)
        if probe_ext:
            self._ext_probed = True
            for p in valid:
                if is_ext_path(p, self.store_dir):
                    self.ext = _parse_ext(p.rsplit("/", 1)[1][33:]) or self.ext
        return {p for p in valid if not is_ext_path(p, self.store_dir)}

    def query_path_infos(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        """Infos of the valid ones among ``paths``, asked in one command."""
        ps = list(dict.fromkeys(paths))
        if not ps:
            return {}
        if self.minor < 4:
            raise RemoteError(f"'{self.host}' speaks serve protocol 2.{self.minor}, too old to query path infos",
                              rule="version")

        def go() -> dict[str, PathInfo]:
            self.w.u64(W.CMD_QUERY_PATH_INFOS).path_set(ps).flush()
            out: dict[str, PathInfo] = {}
            while True:
                rec = M.PathInfoRecord.read(self.src, self.store_dir, self.minor)
                if rec is None:
                    return out
                out[rec.path] = rec.to_info(registration_time=int(time.time()))

        return self._guard("QueryPathInfos", go)

    def query_path_info(self, path: str) -> PathInfo | None:
        return self.query_path_infos([path]).get(path)

    def query_closure(self, paths: Iterable[str], *, include_outputs: bool = False) -> set[str]:
        ps = list(dict.fromkeys(paths))

        def go() -> set[str]:
            self.w.u64(W.CMD_QUERY_CLOSURE).u64(int(include_outputs)).path_set(ps).flush()
            return set(W.read_path_set(self.src, self.store_dir, "closure"))

        return self._guard("QueryClosure", go)

    # -- downloads

    def dump_store_path(self, path: str) -> Iterator[bytes | bytearray | memoryview]:
        """The NAR of ``path`` (parsed as it arrives: exactly one canonical NAR is consumed)."""
        self._guard("DumpStorePath", lambda: self.w.u64(W.CMD_DUMP_STORE_PATH).str_(path).flush())
        it = nar_passthrough(self.src)
        while True:
            try:
                chunk = self._guard("DumpStorePath", lambda: next(it, None))
            except NarError as e:
                raise ProtocolError(f"bad NAR of '{path}' from '{self.host}': {e}", rule=e.rule) from None
            if chunk is None:
                return
            yield chunk

    def dump_many(self, infos: Sequence[PathInfo], consume: Callable[[PathInfo, ByteSource], None], *,
                  on_bytes: Callable[[int], None] | None = None) -> None:
        """Pipelined ``DumpStorePath`` of every path in ``infos``: the requests go out from a
        writer thread, and ``consume(info, src)`` gets each NAR as a source of exactly
        ``info.nar_size`` bytes (it must read all of them), in order."""
        paths = [i.path for i in infos]

        def send() -> None:
            for p in paths:
                self.w.u64(W.CMD_DUMP_STORE_PATH).str_(p)
            self.w.flush()

        def body() -> None:
            for info in infos:
                sub = W.limited_source(self.src, info.nar_size, on_chunk=on_bytes)
                try:
                    consume(info, sub)
                except NarError as e:
                    if self.src.at_eof():
                        raise self._dead("DumpStorePath") from None
                    raise ProtocolError(f"bad NAR of '{info.path}' from '{self.host}': {e}", rule=e.rule) from None
                left = W.drain(sub)
                if left:
                    raise ProtocolError(f"NAR of '{info.path}' from '{self.host}' is shorter than its narSize",
                                        rule="size-mismatch", expected=info.nar_size)

        self._pipelined("DumpStorePath", send, body)

    def export_paths(self, paths: Iterable[str]) -> bytes:
        """An export stream of ``paths`` (all in memory; for small sets and tests)."""
        from ..store.export import read_marker, read_trailer

        def go() -> bytes:
            self.w.u64(W.CMD_EXPORT_PATHS).u64(0).path_set(paths).flush()
            out = bytearray()
            while True:
                mark = read_marker(self.src)
                out += W.enc_u64(int(mark))
                if not mark:
                    return bytes(out)
                for c in nar_passthrough(self.src):
                    out += c
                t = read_trailer(self.src, self.store_dir)
                out += b"".join(bytes(c) for c in record_chunks(t.path, t.references, t.deriver, []))[8:]

        return self._guard("ExportPaths", go)

    # -- uploads

    def _pipelined(self, what: str, send: Callable[[], None], body: Callable[[], None]) -> None:
        """Run ``send`` in a writer thread while ``body`` reads replies. A failure of the
        writer half-closes the connection so that the reader does not wait forever."""
        failure: list[BaseException] = []

        def writer() -> None:
            try:
                send()
            except BaseException as e:  # noqa: BLE001 - handed to the reader
                failure.append(e)
                try:
                    self.t.close_input()
                except OSError:
                    pass

        th = threading.Thread(target=writer, name="nartool-serve-writer", daemon=True)
        th.start()
        try:
            body()
        except RemoteError:
            th.join(5.0)
            if failure and not isinstance(failure[0], OSError):
                raise failure[0] from None
            raise
        except BaseException:
            self.t.close_input()
            th.join(5.0)
            raise
        th.join()
        if failure:
            if isinstance(failure[0], OSError):
                raise self._dead(what, failure[0])
            raise failure[0]

    def add_to_store_nar_many(self, infos: Sequence[PathInfo], nar: Callable[[str], Chunks], *,
                              on_ack: Callable[[PathInfo], None] | None = None,
                              on_sent: Callable[[int], None] | None = None) -> int:
        """Upload ``infos`` (in the given order, references first) with their NARs from
        ``nar(path)``: ``AddToStoreNar`` commands sent back to back by a writer thread while the
        replies are read here; against servers older than 2.5, one ``ImportPaths`` per path.
        ``on_ack(info)`` is called for every acknowledged (durable) path."""
        use_nar = self.minor >= 5

        def send() -> None:
            w = self.w
            for info in infos:
                if use_nar:
                    w.u64(W.CMD_ADD_TO_STORE_NAR)
                    # ultimate = 0 like Nix's copy code: a copy is never "ultimately trusted"
                    M.AddToStoreNarHeader.from_info(info, ultimate=False).write(w)
                    chunks: Chunks = nar(info.path)
                else:
                    w.u64(W.CMD_IMPORT_PATHS)
                    chunks = record_chunks(info.path, info.references, info.deriver, nar(info.path))
                sent = 0
                for c in chunks:
                    w.raw(c)
                    sent += len(c)
                    if on_sent is not None:
                        on_sent(len(c))
                if use_nar and sent != info.nar_size:
                    raise StoreError(f"NAR of '{info.path}' has {sent} bytes, its info says {info.nar_size}",
                                     path=info.path, rule="size-mismatch", expected=info.nar_size, got=sent)
                if not use_nar:
                    w.raw(end_chunk())
                w.flush()

        def body() -> None:
            for info in infos:
                at = self.src.offset
                r = self._guard("AddToStoreNar" if use_nar else "ImportPaths",
                                lambda: W.read_u64(self.src, "reply"))
                if r != 1:
                    raise ProtocolError(f"unexpected reply {r} from '{self.host}' to importing '{info.path}'",
                                        offset=at, expected=1, got=r, rule="bad-reply")
                if on_ack is not None:
                    on_ack(info)

        if infos:
            self._pipelined("AddToStoreNar", send, body)
        return len(infos)

    def import_paths(self, stream: Chunks) -> None:
        """One ``ImportPaths`` command with a whole export stream."""

        def send() -> None:
            self.w.u64(W.CMD_IMPORT_PATHS)
            self.w.raw_chunks(stream)
            self.w.flush()

        def body() -> None:
            r = self._guard("ImportPaths", lambda: W.read_u64(self.src, "reply"))
            if r != 1:
                raise ProtocolError(f"unexpected reply {r} from '{self.host}' to ImportPaths", rule="bad-reply")

        self._pipelined("ImportPaths", send, body)

    # -- builds

    def build_derivation(self, req: M.BuildDerivationRequest) -> M.BuildResult:
        """``BuildDerivation`` (8): the derivation goes inline; the reply comes when the remote
        build ends (its log arrives meanwhile on the remote's stderr)."""

        def go() -> M.BuildResult:
            self.w.u64(W.CMD_BUILD_DERIVATION)
            req.write(self.w, self.minor)
            self.w.flush()
            return M.read_build_result(self.src, self.minor)

        return self._guard("BuildDerivation", go)

    def build_paths(self, paths: Sequence[str], settings: M.BuildSettings) -> tuple[int, str]:
        """``BuildPaths`` (6): ``(0, "")`` on success, else Nix's exit status and message."""

        def go() -> tuple[int, str]:
            self.w.u64(W.CMD_BUILD_PATHS).strs(list(paths))
            settings.write(self.w, self.minor)
            self.w.flush()
            status = W.read_u64(self.src, "status")
            return (0, "") if status == 0 else (status, W.read_str(self.src, "errorMsg", 1 << 20))

        return self._guard("BuildPaths", go)

    # -- nartool extension

    def check_importable(self, infos: Sequence[PathInfo]) -> list[tuple[str, str]]:
        """Ask a nartool server which of ``infos`` it would refuse: (path, reason) pairs.
        Only for servers that announced the extension (:attr:`ext`)."""
        if self.ext is None:
            raise ProtocolError(f"'{self.host}' did not announce nartool's extensions", rule="no-ext")

        def go() -> list[tuple[str, str]]:
            w = self.w
            w.u64(W.CMD_EXT_CHECK_IMPORTABLE).u64(len(infos))
            for i in infos:
                M.CheckImportableEntry.from_info(i).write(w)
            w.flush()
            n = W.read_count(self.src, "refusals")
            return [(W.read_str(self.src, "path", W.MAX_PATH_LEN), W.read_str(self.src, "reason"))
                    for _ in range(n)]

        return self._guard("CheckImportable", go)


def _parse_ext(name: str) -> RemoteExt | None:
    """``nartool-ext-v1-w1-t0`` → RemoteExt."""
    parts = name.split("-")
    if len(parts) < 5 or parts[:2] != ["nartool", "ext"] or not parts[2].startswith("v"):
        return None
    try:
        version = int(parts[2][1:])
    except ValueError:
        return None
    flags = {p[0]: p[1:] == "1" for p in parts[3:] if p}
    return RemoteExt(version, flags.get("w", False), flags.get("t", False))
