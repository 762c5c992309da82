"""``ssh://[USER@]HOST[?…]``: a serve-protocol server as a store (Nix's legacy SSH store).

:class:`SSHStore` is a :class:`~nartool.store.base.BaseStore` over a
:class:`~nartool.remote.client.ServeClient`: queries are the serve commands (``QueryValidPaths``,
``QueryPathInfos`` — many paths per command — and ``QueryClosure``), NARs are read with
``DumpStorePath`` (pipelined for many paths) and added with ``AddToStoreNar`` (pipelined) when
the remote allows writes. What the protocol cannot do (referrers, derivation outputs, lookups
by hash part, listing the store, signatures after the fact) raises
:class:`~nartool.errors.UnsupportedError`. A failed command ends a serve session; the store then
reconnects on its next use.

URI parameters, as Nix's: ``remote-program`` (default ``nartool``: runs ``nartool serve
--write``; e.g. ``nix-store`` runs ``nix-store --serve --write``), ``remote-store`` (the
remote's ``--store``), ``ssh-key`` (``-i FILE``), ``compress=true`` (ssh ``-C``); nartool adds
``compress-session=zstd`` (a zstd session with a nartool server). The host ``localhost`` runs
the command locally without ssh, as Nix does.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO
from urllib.parse import parse_qsl, quote, urlencode

from ..errors import ProtocolError, StoreError, UnsupportedError
from ..nar.reader import nar_passthrough
from ..nar.source import ByteSource, as_source
from ..store.base import BaseStore, ConsumeFn
from ..store.ops import refusal_message
from ..store.paths import DEFAULT_STORE_DIR
from ..store.types import PathInfo
from .client import RemoteError, ServeClient
from .messages import BuildDerivationRequest, BuildResult, BuildSettings

Connect = Callable[[], ServeClient]


class ReadOnlyRemoteError(UnsupportedError, ProtocolError):
    """The remote announced that it does not accept imports (``nartool serve`` without
    ``--write``): an unsupported operation of this store, and the remote's refusal."""


class SSHStore(BaseStore):
    """A serve-protocol remote as a store. ``connect`` opens a new session (called lazily, and
    again after a session died)."""

    scheme = "ssh"
    checks_signatures_locally = False

    def __init__(self, connect: Connect, *, name: str, store_dir: str = DEFAULT_STORE_DIR,
                 params: Mapping[str, str] | None = None, probe_ext: bool = True) -> None:
        self._connect = connect
        self.host = name
        self.params = dict(params or {})
        self.store_dir = store_dir
        self.probe_ext = probe_ext
        self._client: ServeClient | None = None
        self._owned = True
        #: validity queries ask the remote to substitute missing paths first (its own
        #: substituters; Nix's ``builders-use-substitutes``)
        self.substitute = False
        #: infos already queried (a valid path's info never changes): reading its NAR then
        #: needs no second QueryPathInfos
        self._known: dict[str, PathInfo] = {}

    # -- construction

    @classmethod
    def from_uri(cls, rest: str, store_dir: str = DEFAULT_STORE_DIR, *, ssh_opts: Sequence[str] = (),
                 stderr_to: object = None) -> SSHStore:
        """``rest`` is what follows ``ssh://``: ``[USER@]HOST[?key=value&…]``. ``stderr_to`` (an
        object with ``write(bytes)``/``flush()``) receives the remote's stderr, e.g. a remote
        build's log; by default it is passed through to ours."""
        from .transport import is_nartool_program, open_transport, serve_command_line

        host, _, query = rest.partition("?")
        if not host or "/" in host:
            raise StoreError(f"bad ssh store URI 'ssh://{rest}': expected ssh://[USER@]HOST[?params]",
                             rule="bad-uri")
        params = dict(parse_qsl(query, keep_blank_values=True))
        program = params.get("remote-program") or "nartool"
        compress = params.get("compress-session") if is_nartool_program(program) else None
        command = serve_command_line(program, params.get("remote-store"), compress)
        opts = list(ssh_opts)
        if params.get("ssh-key"):
            opts += ["-i", params["ssh-key"]]
        if params.get("compress") == "true":
            opts.append("-C")
        known_hosts = None
        if params.get("base64-ssh-public-host-key"):
            known_hosts = _known_hosts_file(host, params["base64-ssh-public-host-key"])
            opts.append(f"-oUserKnownHostsFile={known_hosts}")

        def connect() -> ServeClient:
            t = open_transport(host, command, opts, stderr_to=stderr_to)
            return ServeClient(t, store_dir=store_dir, compress=compress)

        st = cls(connect, name=host, store_dir=store_dir, params=params)
        if known_hosts is not None:
            weakref.finalize(st, _unlink_quietly, known_hosts)
        return st

    @classmethod
    def from_client(cls, client: ServeClient, *, probe_ext: bool = True) -> SSHStore:
        """A store over an open session the caller keeps owning (it is not closed here)."""

        def connect() -> ServeClient:
            raise RemoteError(f"the session with '{client.host}' ended", rule="remote-died")

        st = cls(connect, name=client.host, store_dir=client.store_dir, probe_ext=probe_ext)
        st._client = client
        st._owned = False
        return st

    @property
    def uri(self) -> str:
        return f"ssh://{self.host}" + (f"?{urlencode(self.params, safe='/:', quote_via=quote)}" if self.params else "")

    @property
    def client(self) -> ServeClient:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def close(self) -> None:
        c, self._client = self._client, None
        if c is not None and self._owned:
            c.close()

    def _run(self, fn: Callable[[ServeClient], object]) -> object:
        try:
            return fn(self.client)
        except BaseException:
            # a command that failed half-way leaves the session in an unknown state (and a
            # server ends it on any error): the next operation reconnects
            if self._owned:
                self.close()
            raise

    # -- queries

    def query_path_infos(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        ps = [self._path_arg(p) for p in paths]
        if not ps:
            return {}
        out = self._run(lambda c: c.query_path_infos(ps))
        assert isinstance(out, dict)
        self._known.update(out)
        return out

    def query_path_info(self, path: str) -> PathInfo | None:
        return self.query_path_infos([path]).get(self._path_arg(path))

    def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        ps = [self._path_arg(p) for p in paths]

        def go(c: ServeClient) -> set[str]:
            probe = self.probe_ext and not c._ext_probed
            return c.query_valid_paths(ps, probe_ext=probe, substitute=self.substitute)

        out = self._run(go)
        assert isinstance(out, set)
        return out

    @property
    def ext(self) -> object:
        """What a nartool server announced (None for Nix, or before the first validity query)."""
        return self.client.ext

    def query_closure_set(self, paths: Iterable[str], *, include_outputs: bool = False) -> dict[str, PathInfo]:
        """One ``QueryClosure``, then one ``QueryPathInfos`` for the whole closure."""
        start = list(dict.fromkeys(self._path_arg(p) for p in paths))
        for p in start:
            self.parse_path(p)
        if not start:
            return {}
        try:
            members = self._run(lambda c: c.query_closure(start, include_outputs=include_outputs))
        except RemoteError:
            # the server ends the session on an invalid path: say which one, as other stores do
            valid = self.query_valid_paths(start)
            bad = [p for p in start if p not in valid]
            if bad:
                raise StoreError("path is not valid", path=bad[0], rule="invalid-path") from None
            raise
        assert isinstance(members, set)
        infos = self.query_path_infos(members)
        lost = members - infos.keys()
        if lost:
            raise ProtocolError(f"'{self.host}' reported {len(lost)} closure paths but has no info for them, "
                                f"e.g. '{sorted(lost)[0]}'", rule="missing-info")
        return infos

    # -- contents

    def nar_chunks(self, path: str, *, check: bool = True) -> Iterator[bytes | bytearray | memoryview]:
        """``DumpStorePath`` after one ``QueryPathInfos`` (without ``check``, e.g. for a copy whose
        receiver verifies anyway, an info queried before is used). The NAR is read as exactly its
        ``narSize`` bytes; with ``check`` its hash is verified at the end."""
        p = self._path_arg(path)
        info = (None if check else self._known.get(p)) or self.path_info(p)
        return self._nar(info, check)

    def _nar(self, info: PathInfo, check: bool) -> Iterator[bytes | bytearray | memoryview]:
        from . import wire as W

        h = hashlib.sha256()
        n = 0
        try:
            c = self.client
            c._guard("DumpStorePath", lambda: c.w.u64(W.CMD_DUMP_STORE_PATH).str_(info.path).flush())
            sub = W.limited_source(c.src, info.nar_size)
            it = nar_passthrough(sub)
            while True:
                chunk = c._guard("DumpStorePath", lambda: next(it, None))
                if chunk is None:
                    break
                if check:
                    h.update(chunk)
                n += len(chunk)
                yield chunk
            if W.drain(sub) or n != info.nar_size:
                raise ProtocolError(f"NAR of '{info.path}' from '{self.host}' is shorter than its narSize",
                                    rule="size-mismatch", expected=info.nar_size, got=n)
        except BaseException:
            if self._owned:
                self.close()
            raise
        if check and h.digest() != info.nar_hash.digest:
            raise StoreError("hash of path has changed", path=info.path, rule="hash-changed",
                             expected=info.nar_hash.prefixed("nix32"))

    def send_nars(self, infos: Sequence[PathInfo], consume: ConsumeFn, *,
                  on_bytes: Callable[[int], None] | None = None,
                  before_wait: Callable[[], None] | None = None) -> None:
        """Pipelined ``DumpStorePath`` of every path; ``before_wait`` runs whenever the next
        byte from the remote is not there yet."""

        def go(c: ServeClient) -> None:
            c.before_wait = before_wait
            try:
                c.dump_many(infos, consume, on_bytes=on_bytes)
            finally:
                c.before_wait = None

        self._run(go)

    # -- adding

    def _check_write(self, infos: Sequence[PathInfo]) -> None:
        """A nartool server says up front whether it accepts imports and unsigned paths; when it
        would refuse some of ``infos``, fail naming them before anything is sent."""
        c = self.client
        if not c._ext_probed and self.probe_ext:
            self.query_valid_paths([])
        ext = c.ext
        if ext is None or not infos:
            return
        if not ext.write:
            raise ReadOnlyRemoteError(self.uri, "adding paths",
                                      f"'{self.host}' does not accept imports: its nartool serve runs without --write")
        if not ext.unsigned_ok:
            refused = c.check_importable(infos)
            if refused:
                raise StoreError(refusal_message(self.host, refused, len(infos)), rule="untrusted")

    def check_receivable(self, infos: Sequence[PathInfo]) -> None:
        self._check_write(infos)

    def add_nar(self, info: PathInfo, nar: ByteSource | BinaryIO | bytes) -> PathInfo:
        """One ``AddToStoreNar`` (the NAR is parsed on the way, exactly one is consumed)."""
        src = as_source(nar, "NAR")
        self._check_write([info])
        chunks = nar_passthrough(src)
        self._run(lambda c: c.add_to_store_nar_many([info], lambda _p: chunks))
        return info

    # -- builds

    def build_derivation(self, req: BuildDerivationRequest) -> BuildResult:
        """``BuildDerivation`` on the remote (inputs must already be valid there)."""
        out = self._run(lambda c: c.build_derivation(req))
        assert isinstance(out, BuildResult)
        return out

    def build_paths(self, paths: Sequence[str], settings: BuildSettings) -> tuple[int, str]:
        """``BuildPaths`` on the remote: ``(0, "")`` or Nix's exit status and message."""
        out = self._run(lambda c: c.build_paths(paths, settings))
        assert isinstance(out, tuple)
        return out

    def receive_nars(self, source: BaseStore, infos: Sequence[PathInfo], *,
                     on_done: Callable[[list[str]], None], on_bytes: Callable[[int], None] | None = None,
                     batch_paths: int = 512, batch_bytes: int = 256 << 20) -> None:
        """Pipelined ``AddToStoreNar`` (``ImportPaths`` per path below protocol 2.5): requests go
        out back to back, each acknowledged path is durable on the remote. The NARs are not
        re-hashed here: the remote verifies each against the hash sent with it."""
        self._run(lambda c: c.add_to_store_nar_many(
            infos, lambda p: source.nar_chunks(p, check=False), on_ack=lambda i: on_done([i.path]),
            on_sent=on_bytes))


def _known_hosts_file(host: str, b64_key: str) -> str:
    """A private known-hosts file naming ``b64_key`` (base64 of an OpenSSH public key line, as
    Nix's ``base64-ssh-public-host-key`` and the machines file's last column) for ``host``."""
    import base64
    import binascii
    import os
    import tempfile

    try:
        key = base64.b64decode(b64_key, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise StoreError(f"invalid base64-ssh-public-host-key for '{host}': {e}", rule="bad-uri",
                         got=b64_key) from None
    if not key or "\n" in key:
        raise StoreError(f"invalid base64-ssh-public-host-key for '{host}': not one public key line",
                         rule="bad-uri", got=b64_key)
    fd, path = tempfile.mkstemp(prefix="nartool-known-hosts-")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{host.rpartition('@')[2]} {key}\n")
    return path


def _unlink_quietly(path: str) -> None:
    import os

    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["SSHStore", "ReadOnlyRemoteError"]
