"""``nartool cache serve``: any store as an HTTP binary cache (as nix-serve and harmonia do).

Routes (``GET`` and ``HEAD``):

| path | answer |
|---|---|
| ``/nix-cache-info`` | ``StoreDir``, ``WantMassQuery: 1``, ``Priority`` |
| ``/<hash>.narinfo`` | the path's narinfo, made from the store's info and signed on the fly |
| ``/nar/<hash>-<narhash>.nar`` | the NAR, generated from the store and streamed (``Content-Length``) |
| ``/nar/<hash>-<narhash>.nar.zst`` | the same, zstd-compressed on the fly (chunked) |
| ``/<hash>.ls`` | the NAR listing (``{"version":1,"root":…}``, with ``narOffset``) |
| ``/log/<drv>`` | a build log kept by a local store (``log/nix/drvs``) |

A NAR's name carries the NAR hash the narinfo announced, so a path that changed in between
(deleted and added again) is a ``404``, not a different NAR under the old narinfo. Narinfos
name ``.nar.zst`` files with ``compression="zstd"`` (no ``FileHash``/``FileSize``, which
Nix does not need) and ``.nar`` files with ``"none"`` (``FileHash`` = ``NarHash``), as Nix
writes them. NARs are never compressed with xz on the fly (too slow to serve).

HTTP caching: every ``200`` carries a strong ``ETag`` (narinfos: a digest of the bytes; NARs:
their hash) and ``Cache-Control`` (``nix-cache-info`` and narinfos one day, NARs and listings
a year — their names pin their contents — and ``404`` ``no-store``); ``If-None-Match`` is
answered ``304``. Connections are kept alive (HTTP/1.1, ``TCP_NODELAY``); each is served by a
thread, at most ``max_connections`` at once (more wait to be accepted); memory per request is
bounded (a NAR moves in chunks).

Uploads (``--writable``): ``PUT`` of what ``nix copy --to http://…`` sends — ``nix-cache-info``
(accepted, ignored), ``nar/…`` (spooled to a temporary file), then ``<hash>.narinfo``, which
registers the path: the narinfo is parsed strictly, must name a NAR uploaded before (its
``FileHash``/``FileSize`` are checked when given), the NAR is decompressed (bounded) and added
with every check of :meth:`~nartool.store.base.BaseStore.add_nar` (NAR hash and size, content
address, references valid), and with ``require-sigs`` it must be content-addressed or signed by
a key in ``trusted-public-keys`` — the rules of ``nartool copy`` into a local store. Only
clients from ``cache-serve-upload-from`` (default: loopback) may upload, and when
``cache-serve-upload-password-file`` is set only with that password (HTTP Basic, any user
name; Nix sends it from its netrc file). A refused upload is ``403``; a bad one ``400`` with
the reason; a read-only server answers ``PUT`` with ``501``, as a static server does.

Shutdown (:meth:`CacheServer.shutdown`, SIGTERM/SIGINT in the CLI): no new connections; idle
kept-alive connections are closed; requests in progress (a NAR being sent) finish, for up to
``drain_timeout`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .. import __version__
from .._log import get_logger
from ..errors import NartoolError, StoreError
from ..hashes import Hash
from ..store.base import BaseStore
from ..store.paths import StorePath
from ..store.signing import PublicKey, SecretKey

log = get_logger(__name__)

CACHE_CONTROL_INFO = "public, max-age=86400"
CACHE_CONTROL_IMMUTABLE = "public, max-age=31536000, immutable"
CACHE_CONTROL_MISSING = "no-store"
#: the most an uploaded narinfo or nix-cache-info may hold
MAX_SMALL_UPLOAD = 16 << 20
#: rendered, signed narinfos remembered (by everything they are made from)
NARINFO_MEMO = 8192
#: spooled NARs whose narinfo never came are dropped after this many seconds
SPOOL_MAX_AGE = 3600
#: where a local store's upload aliases and kept uploaded NARs live (in its state directory)
ALIASES_DIR = "nartool-cache-serve"
_CHUNK = 1 << 16
_HASH_RE = re.compile(r"[0-9a-df-np-sv-z]{32}\Z")
_NAR_RE = re.compile(r"nar/([0-9a-df-np-sv-z]{32})-([0-9a-df-np-sv-z]{52})\.nar(\.zst)?\Z")


@dataclass
class ServeOptions:
    """What ``nartool cache serve`` was asked for (see the module docstring)."""

    compression: str = "none"
    priority: int = 30
    sign_keys: Sequence[SecretKey] = ()
    writable: bool = False
    upload_from: Sequence[str] = ("127.0.0.1", "::1")
    upload_password: str | None = None
    require_sigs: bool = True
    trusted_keys: Mapping[str, PublicKey] = field(default_factory=dict)
    max_connections: int = 128
    idle_timeout: float = 60.0
    drain_timeout: float = 30.0
    zstd_level: int = 3
    spool_dir: str | None = None

    def __post_init__(self) -> None:
        if self.compression not in ("none", "zstd"):
            raise StoreError("cache serve compresses NARs with none or zstd only", rule="bad-compression",
                             expected="none or zstd", got=self.compression)


class _Upload:
    """A NAR uploaded by ``PUT /nar/…``, waiting for its narinfo."""

    def __init__(self, path: str, size: int, sha256: bytes) -> None:
        self.path, self.size, self.sha256, self.time = path, size, sha256, time.monotonic()


class _Reply(Exception):
    """Ends a request with this status and a short plain-text body."""

    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.headers = status, text, dict(headers or {})


class CacheServer(ThreadingHTTPServer):
    """An HTTP binary cache in front of ``store`` (see the module docstring)."""

    daemon_threads = False
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, store: BaseStore, address: tuple[str, int], options: ServeOptions | None = None) -> None:
        self.store = store
        self.options = options or ServeOptions()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(self.options.max_connections)
        self._conns: dict[socket.socket, bool] = {}  # socket -> busy with a request
        self._conns_lock = threading.Lock()
        self._workers: set[threading.Thread] = set()
        self._closing = threading.Event()
        # a store that is not safe to share between threads is used by one request at a time
        from ..store.local import LocalStore

        self.store_lock: threading.Lock | None = None if isinstance(store, LocalStore) else threading.Lock()
        self._narinfos: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._narinfos_lock = threading.Lock()
        self._uploads: dict[str, _Upload] = {}
        self._uploads_lock = threading.Lock()
        alias_dir = os.path.join(store.state_dir, ALIASES_DIR) if isinstance(store, LocalStore) else None
        self.aliases = _Aliases(alias_dir)
        # spooled uploads next to the kept NARs, so that keeping one is a rename
        self._spool = tempfile.mkdtemp(prefix="spool-", dir=self.options.spool_dir or self.aliases.dir)
        self._networks = [_network(a) for a in self.options.upload_from]
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        h = f"[{host}]" if ":" in host else host
        return f"http://{h}:{port}"

    # -- connections ----------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        if self._closing.is_set():
            self._slots.release()
            self.shutdown_request(request)
            return
        t = threading.Thread(target=self._run, args=(request, client_address), daemon=True,
                             name=f"cache-serve {client_address[0]}")
        with self._conns_lock:
            self._workers.add(t)
        t.start()

    def _run(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns[request] = False
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one connection's failure is not the server's
            self.handle_error(request, client_address)
        finally:
            with self._conns_lock:
                self._conns.pop(request, None)
                self._workers.discard(threading.current_thread())
            self.shutdown_request(request)
            self._slots.release()

    def set_busy(self, sock: socket.socket, busy: bool) -> bool:
        """Mark a connection busy (inside a request) or idle; False when shutting down."""
        with self._conns_lock:
            if sock in self._conns:
                self._conns[sock] = busy
        return not self._closing.is_set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("cache serve: connection from %s failed", client_address, exc_info=True)

    def shutdown(self) -> None:
        """Stop serving: see the module docstring. Safe to call from a signal handler's
        thread only when :meth:`serve_forever` runs in another thread; the CLI calls
        :meth:`close_gracefully` after ``serve_forever`` returned instead."""
        super().shutdown()
        self.close_gracefully()

    def close_gracefully(self) -> None:
        self._closing.set()
        self.socket.close()
        with self._conns_lock:
            idle = [s for s, busy in self._conns.items() if not busy]
        for s in idle:
            try:
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + self.options.drain_timeout
        while True:
            with self._conns_lock:
                threads = list(self._workers)
            if not threads:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("warning: %d connection(s) still busy after %g s; closing them", len(threads),
                            self.options.drain_timeout)
                with self._conns_lock:
                    socks = list(self._conns)
                for s in socks:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                for t in threads:
                    t.join(1.0)
                break
            threads[0].join(min(left, 0.2))
        shutil.rmtree(self._spool, ignore_errors=True)

    def server_close(self) -> None:
        super().server_close()
        shutil.rmtree(self._spool, ignore_errors=True)
        self.aliases.close()

    # -- store access ---------------------------------------------------------------------

    def _locked(self) -> Any:
        from contextlib import nullcontext

        return self.store_lock if self.store_lock is not None else nullcontext()

    def path_of(self, hash_part: str) -> str | None:
        with self._locked():
            try:
                return self.store.query_path_from_hash_part(hash_part)
            except StoreError as e:
                if e.rule == "unsupported":
                    raise _Reply(501, f"this store cannot look paths up by hash: {e}") from None
                raise

    def info_of(self, hash_part: str) -> Any:
        path = self.path_of(hash_part)
        if path is None:
            return None
        with self._locked():
            return self.store.query_path_info(path)

    def nar_url(self, info: Any) -> tuple[str, str]:
        hp = StorePath.parse(info.path, self.store.store_dir).hash_part
        ext = ".zst" if self.options.compression == "zstd" else ""
        return f"nar/{hp}-{info.nar_hash.nix32}.nar{ext}", self.options.compression

    def narinfo_bytes(self, info: Any) -> bytes:
        """The narinfo of ``info`` (rendered and signed once per distinct info: signatures are
        deterministic, so remembering them changes nothing but the time)."""
        key = (info.path, info.nar_hash.digest, info.nar_size, info.references, info.deriver, info.sigs, info.ca)
        with self._narinfos_lock:
            body = self._narinfos.get(key)
            if body is not None:
                self._narinfos.move_to_end(key)
                return body
        body = self._render_narinfo(info)
        with self._narinfos_lock:
            self._narinfos[key] = body
            if len(self._narinfos) > NARINFO_MEMO:
                self._narinfos.popitem(last=False)
        return body

    def _render_narinfo(self, info: Any) -> bytes:
        from .narinfo import NarInfo

        url, compression = self.nar_url(info)
        if compression == "none":
            ni = NarInfo.from_path_info(info, url=url, compression="none", file_hash=info.nar_hash.prefixed("nix32"),
                                        file_size=info.nar_size)
        else:
            ni = NarInfo.from_path_info(info, url=url, compression=compression, file_hash=None, file_size=None)
        for k in self.options.sign_keys:
            ni.sign(k)
        return ni.render()

    def nar_chunks(self, path: str) -> Iterator[bytes | bytearray | memoryview]:
        if self.store_lock is None:
            yield from self.store.nar_chunks(path)
            return
        with self.store_lock:
            yield from self.store.nar_chunks(path)

    def log_file(self, drv_base: str) -> str | None:
        from ..store.local import LocalStore

        if not isinstance(self.store, LocalStore) or len(drv_base) < 3:
            return None
        d = os.path.join(os.path.dirname(self.store.state_dir), "log", "nix", "drvs", drv_base[:2])
        for name in (drv_base[2:], drv_base[2:] + ".bz2"):
            p = os.path.join(d, name)
            if os.path.isfile(p) and not os.path.islink(p):
                return p
        return None

    # -- uploads --------------------------------------------------------------------------

    def may_upload(self, client: str, authorization: str | None) -> str | None:
        """Why ``client`` may not upload (None when it may)."""
        if not self.options.writable:
            return "not writable"
        try:
            addr = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return f"unknown client address {client!r}"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not any(n is None or addr in n for n in self._networks):
            return f"uploads from {addr} are not allowed (cache-serve-upload-from)"
        if self.options.upload_password is not None:
            got = _basic_password(authorization)
            if got is None or not hmac.compare_digest(got.encode(), self.options.upload_password.encode()):
                return "uploads need the password of cache-serve-upload-password-file"
        return None

    def spool_upload(self, key: str, body: Iterable[bytes]) -> None:
        self._expire_uploads()
        fd, tmp = tempfile.mkstemp(dir=self._spool, prefix="nar-")
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in body:
                    h.update(chunk)
                    f.write(chunk)
                    n += len(chunk)
        except BaseException:
            os.unlink(tmp)
            raise
        with self._uploads_lock:
            old = self._uploads.get(key)
            self._uploads[key] = _Upload(tmp, n, h.digest())
        if old is not None:
            _unlink(old.path)

    def has_upload(self, key: str) -> bool:
        with self._uploads_lock:
            return key in self._uploads

    def _expire_uploads(self) -> None:
        now = time.monotonic()
        with self._uploads_lock:
            old = [k for k, u in self._uploads.items() if now - u.time > SPOOL_MAX_AGE]
            gone = [self._uploads.pop(k) for k in old]
        for u in gone:
            _unlink(u.path)

    def register_upload(self, hash_part: str, data: bytes) -> str:
        """Register the path a narinfo upload describes; returns it. Raises ``_Reply``."""
        from ..compression import CompressionError, open_decompressed
        from ..nar.source import ByteSource
        from ..store.ops import unsigned_refusals
        from .narinfo import NarInfo, NarInfoError

        try:
            ni = NarInfo.parse(data, store_dir=self.store.store_dir, where=f"{hash_part}.narinfo")
        except NarInfoError as e:
            raise _Reply(400, str(e)) from None
        sp = StorePath.parse(ni.store_path, self.store.store_dir)
        if sp.hash_part != hash_part:
            raise _Reply(400, f"narinfo '{hash_part}.narinfo' describes another path: {ni.store_path}")
        with self._uploads_lock:
            up = self._uploads.get(ni.url)
        if up is None:
            with self._locked():
                valid = self.store.is_valid(ni.store_path)
            if valid:
                self.aliases.add(ni.url, ni.store_path, ni.nar_hash, ni.compression, None)
                return ni.store_path
            raise _Reply(400, f"the NAR '{ni.url}' of '{ni.store_path}' was not uploaded first")
        if ni.file_size is not None and ni.file_size != up.size:
            raise _Reply(400, f"FileSize of '{ni.store_path}' does not match the uploaded NAR: narinfo says "
                              f"{ni.file_size}, got {up.size} bytes")
        if ni.file_hash is not None:
            fh = Hash.parse(ni.file_hash)
            if fh.algo != "sha256" or fh.digest != up.sha256:
                raise _Reply(400, f"FileHash of '{ni.store_path}' does not match the uploaded NAR")
        info = ni.to_path_info()
        if self.options.require_sigs:
            refused = unsigned_refusals([info], self.store.store_dir, self.options.trusted_keys)
            if refused:
                raise _Reply(403, refused[0][1])
        with open(up.path, "rb") as f:
            try:
                read, _method = open_decompressed(f)
                with self._locked():
                    self.store.temp_root(info.path)
                    self.store.add_nar(info, ByteSource(read, "NAR"))
            except CompressionError as e:
                raise _Reply(400, f"the NAR of '{ni.store_path}' cannot be decompressed: {e}") from None
            except NartoolError as e:
                raise _Reply(400, f"cannot add '{ni.store_path}': {e}") from None
        with self._uploads_lock:
            if self._uploads.get(ni.url) is up:
                del self._uploads[ni.url]
        self.aliases.add(ni.url, ni.store_path, ni.nar_hash, ni.compression, up.path)
        log.info("cache serve: added '%s'", ni.store_path)
        return ni.store_path


class _Aliases:
    """The NAR names uploads used (``nar/<FileHash>.nar.xz``…), each with its store path, NAR
    hash, compression and the uploaded file itself. Nix remembers the narinfo it uploaded and
    later asks for the NAR under that name (current Nix insists on the compression that
    narinfo names), so the server keeps the uploaded bytes and serves them under that name —
    while the path is valid with that NAR hash. A name whose NAR was not uploaded (the path was
    valid already) is served compressed on the fly as its narinfo says. Kept in the store's
    state directory (``nartool-cache-serve/``), in a temporary directory for other stores."""

    def __init__(self, directory: str | None) -> None:
        import sqlite3

        self.temporary = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="nartool-cache-serve-")
        os.makedirs(os.path.join(self.dir, "nar"), exist_ok=True)
        _remove_stale_spools(self.dir)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.dir, "aliases.sqlite"), timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("pragma journal_mode = wal")
        self._db.execute("create table if not exists Aliases (key text primary key, path text not null, "
                         "narHash text not null, compression text not null, kept integer not null)")

    def _file(self, key: str) -> str:
        return os.path.join(self.dir, "nar", hashlib.sha256(key.encode()).hexdigest())

    def add(self, key: str, path: str, nar_hash: str, compression: str, upload: str | None) -> None:
        if upload is not None:
            shutil.move(upload, self._file(key))  # a rename unless the spool is elsewhere
        with self._lock:
            self._db.execute("insert or replace into Aliases values (?, ?, ?, ?, ?)",
                             (key, path, nar_hash, compression, int(upload is not None)))

    def get(self, key: str) -> tuple[str, str, str, str | None] | None:
        """(store path, NAR hash, compression, the kept file or None)."""
        with self._lock:
            row = self._db.execute("select path, narHash, compression, kept from Aliases where key = ?",
                                   (key,)).fetchone()
        if row is None:
            return None
        f = self._file(key) if row[3] and os.path.isfile(self._file(key)) else None
        return str(row[0]), str(row[1]), str(row[2]), f

    def drop(self, key: str) -> None:
        """Forget a name whose path is gone or changed (its kept file too)."""
        with self._lock:
            self._db.execute("delete from Aliases where key = ?", (key,))
        _unlink(self._file(key))

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self.temporary:
            shutil.rmtree(self.dir, ignore_errors=True)


def _remove_stale_spools(directory: str, max_age: float = 86400) -> None:
    """Spool directories a killed server left behind (untouched for a day)."""
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        p = os.path.join(directory, name)
        try:
            if name.startswith("spool-") and now - os.stat(p).st_mtime > max_age:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if text == "*":
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise StoreError("not an address or network in cache-serve-upload-from", rule="bad-setting",
                         got=text) from None


def _basic_password(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return raw.partition(":")[2]


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    if header.strip() == "*":
        return True
    bare = etag.strip('"')
    for t in header.split(","):
        t = t.strip()
        if t.startswith("W/"):
            t = t[2:]
        if t.strip('"') == bare:
            return True
    return False


class _Handler(BaseHTTPRequestHandler):
    server: CacheServer
    protocol_version = "HTTP/1.1"
    server_version = f"nartool-cache-serve/{__version__}"
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.options.idle_timeout)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("cache serve: %s %s", self.address_string(), format % args)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.server.set_busy(self.connection, True):
            self.close_connection = True
        try:
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return
            if not self.parse_request():
                return
            method = self.command
            if method in ("GET", "HEAD"):
                self._serve(head=method == "HEAD")
            elif method == "PUT":
                self._put()
            else:
                self._reply(_Reply(501, f"method {method} not supported"))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            if not self.server.set_busy(self.connection, False):
                self.close_connection = True

    # -- answers --------------------------------------------------------------------------

    def _send_head(self, status: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _reply(self, r: _Reply, *, head: bool = False) -> None:
        body = (r.text + "\n").encode("utf-8", "replace")
        headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body))}
        if r.status == 404:
            headers["Cache-Control"] = CACHE_CONTROL_MISSING
        headers.update(r.headers)
        self._send_head(r.status, headers)
        if not head:
            self.wfile.write(body)

    def _small(self, body: bytes, mime: str, etag: str, cache: str, head: bool) -> None:
        headers = {"ETag": etag, "Cache-Control": cache}
        if _etag_matches(self.headers.get("If-None-Match"), etag):
            self._send_head(304, headers)
            return
        headers.update({"Content-Type": mime, "Content-Length": str(len(body))})
        self._send_head(200, headers)
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/nix-cache-info":
                body = (f"StoreDir: {self.server.store.store_dir}\nWantMassQuery: 1\n"
                        f"Priority: {self.server.options.priority}\n").encode()
                self._small(body, "text/x-nix-cache-info", _digest_etag(body), CACHE_CONTROL_INFO, head)
            elif path.endswith(".narinfo") and _HASH_RE.match(path[1:-8]):
                info = self.server.info_of(path[1:-8])
                if info is None:
                    raise _Reply(404, "no such path")
                body = self.server.narinfo_bytes(info)
                self._small(body, "text/x-nix-narinfo", _digest_etag(body), CACHE_CONTROL_INFO, head)
            elif path.startswith("/nar/"):
                self._nar(path[1:], head)
            elif path.endswith(".ls") and _HASH_RE.match(path[1:-3]):
                self._listing(path[1:-3], head)
            elif path.startswith("/log/") and "/" not in path[5:]:
                self._log(path[5:], head)
            else:
                raise _Reply(404, "not found")
        except _Reply as r:
            self._reply(r, head=head)
        except NartoolError as e:
            log.warning("cache serve: %s: %s", self.path, e)
            self._reply(_Reply(500, str(e)), head=head)

    def _nar(self, key: str, head: bool) -> None:
        m = _NAR_RE.match(key)
        if m is None:
            self._alias(key, head)
            return
        hp, nar_hash, zst = m.group(1), m.group(2), bool(m.group(3))
        info = self.server.info_of(hp)
        if info is None or info.nar_hash.nix32 != nar_hash:
            raise _Reply(404, "no such NAR")
        etag = f'"{nar_hash}{"-zst" if zst else ""}"'
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL_IMMUTABLE}
        if _etag_matches(self.headers.get("If-None-Match"), etag):
            self._send_head(304, headers)
            return
        headers["Content-Type"] = "application/x-nix-nar"
        if not zst:
            headers["Content-Length"] = str(info.nar_size)
            self._send_head(200, headers)
            if not head:
                self._stream(self.server.nar_chunks(info.path), chunked=False)
            return
        if head:
            self._send_head(200, headers)
            return
        headers["Transfer-Encoding"] = "chunked"
        self._send_head(200, headers)
        self._stream(_zstd(self.server.nar_chunks(info.path), self.server.options.zstd_level), chunked=True)

    def _alias(self, key: str, head: bool) -> None:
        """A NAR under the name an upload gave it (see :class:`_Aliases`)."""
        alias = self.server.aliases.get(key)
        if alias is None:
            raise _Reply(404, "not found")
        path, nar_hash, compression, kept = alias
        info = self.server.info_of(StorePath.parse(path, self.server.store.store_dir).hash_part)
        if info is None or info.nar_hash != Hash.parse(nar_hash):
            self.server.aliases.drop(key)
            raise _Reply(404, "no such NAR")
        etag = f'"{info.nar_hash.nix32}-{compression}"'
        headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL_IMMUTABLE, "Content-Type": "application/x-nix-nar"}
        if _etag_matches(self.headers.get("If-None-Match"), etag):
            self._send_head(304, {k: v for k, v in headers.items() if k != "Content-Type"})
            return
        if kept is not None:
            with open(kept, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._send_head(200, {**headers, "Content-Length": str(size)})
                if not head:
                    self.wfile.flush()
                    self.connection.sendfile(f)  # zero-copy where the platform has it
            return
        if compression == "none":
            self._send_head(200, {**headers, "Content-Length": str(info.nar_size)})
            if not head:
                self._stream(self.server.nar_chunks(info.path), chunked=False)
            return
        from ..compression import compressor

        if compression not in ("xz", "bzip2", "gzip", "zstd"):
            raise _Reply(404, f"cannot serve {compression} compression")
        self._send_head(200, {**headers, "Transfer-Encoding": "chunked"})
        if not head:
            level = 0 if compression == "xz" else None  # any xz decodes; preset 0 is the fast one
            self._stream(compressor(self.server.nar_chunks(info.path), compression, level), chunked=True)

    def _stream(self, chunks: Iterable[bytes | bytearray | memoryview], *, chunked: bool) -> None:
        """Send ``chunks`` (coalesced into 64 KiB writes). An error after the head was sent
        can only be signalled by closing the connection early: the client sees a short body."""
        buf = bytearray()
        w = self.wfile

        def flush() -> None:
            if chunked:
                w.write(b"%x\r\n" % len(buf) + buf + b"\r\n")
            else:
                w.write(buf)
            buf.clear()

        try:
            for c in chunks:
                if len(c) >= _CHUNK and not buf and not chunked:
                    w.write(c)
                    continue
                buf += c
                if len(buf) >= _CHUNK:
                    flush()
            if buf:
                flush()
            if chunked:
                w.write(b"0\r\n\r\n")
        except NartoolError as e:
            log.warning("cache serve: %s: %s (connection closed)", self.path, e)
            self.close_connection = True

    def _listing(self, hp: str, head: bool) -> None:
        from ..nar.listing import json_listing
        from ..nar.reader import NarReader
        from ..nar.source import ByteSource, chunk_reader

        info = self.server.info_of(hp)
        if info is None:
            raise _Reply(404, "no such path")
        read = chunk_reader(iter(self.server.nar_chunks(info.path)))
        body = "".join(json_listing(NarReader(ByteSource(read, "NAR")), wrap=True)).encode("utf-8")
        etag = f'"{info.nar_hash.nix32}-ls"'
        self._small(body, "application/json", etag, CACHE_CONTROL_IMMUTABLE, head)

    def _log(self, drv: str, head: bool) -> None:
        p = self.server.log_file(drv)
        if p is None:
            raise _Reply(404, "no log for this derivation")
        st = os.stat(p)
        etag = f'"{st.st_size:x}-{int(st.st_mtime_ns):x}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=3600", "Content-Type": "text/plain; charset=utf-8"}
        if _etag_matches(self.headers.get("If-None-Match"), etag):
            self._send_head(304, headers)
            return
        if not p.endswith(".bz2"):
            headers["Content-Length"] = str(st.st_size)
            self._send_head(200, headers)
            if not head:
                with open(p, "rb") as f:
                    self._stream(iter(lambda: f.read(_CHUNK), b""), chunked=False)
            return
        headers["Transfer-Encoding"] = "chunked"
        self._send_head(200, headers)
        if not head:
            import bz2

            with bz2.open(p, "rb") as f:
                self._stream(iter(lambda: f.read(_CHUNK), b""), chunked=True)

    # -- uploads --------------------------------------------------------------------------

    def handle_expect_100(self) -> bool:
        why = self._upload_refusal() if self.command == "PUT" else None
        if why is not None:
            self._reply(why)
            self.close_connection = True
            return False
        return super().handle_expect_100()

    def _upload_refusal(self) -> _Reply | None:
        if not self.server.options.writable:
            return _Reply(501, "this cache is read-only")
        why = self.server.may_upload(self.client_address[0], self.headers.get("Authorization"))
        if why is None:
            return None
        return _Reply(403 if self.server.options.upload_password is None or "password" not in why else 401,
                      why, {"WWW-Authenticate": 'Basic realm="nartool cache"'} if "password" in why else None)

    def _body(self) -> Iterator[bytes]:
        """The request body (``Content-Length`` or chunked), in chunks."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if te == "chunked":
            while True:
                line = self.rfile.readline(1024)
                try:
                    n = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _Reply(400, "malformed chunked body") from None
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._exactly(n)
                if self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                    raise _Reply(400, "malformed chunked body")
        if te:
            raise _Reply(501, f"Transfer-Encoding {te} not supported")
        cl = self.headers.get("Content-Length")
        if cl is None or not cl.strip().isdigit():
            raise _Reply(411, "Content-Length required")
        yield from self._exactly(int(cl))

    def _exactly(self, left: int) -> Iterator[bytes]:
        """``left`` bytes of the request body, in chunks; a body that ends sooner is a 400."""
        while left:
            b = self.rfile.read(min(left, _CHUNK))
            if not b:
                raise _Reply(400, "truncated body")
            left -= len(b)
            yield b

    def _small_body(self) -> bytes:
        out = bytearray()
        for b in self._body():
            out += b
            if len(out) > MAX_SMALL_UPLOAD:
                self.close_connection = True
                raise _Reply(413, "too large")
        return bytes(out)

    def _put(self) -> None:
        try:
            why = self._upload_refusal()
            if why is not None:
                self.close_connection = True
                raise why
            key = self.path.split("?", 1)[0].lstrip("/")
            if key == "nix-cache-info":
                self._small_body()
            elif key.startswith("nar/") and "/" not in key[4:] and key[4:] and not key[4:].startswith("."):
                self.server.spool_upload(key, self._body())
            elif key.endswith(".narinfo") and _HASH_RE.match(key[:-8]):
                data = self._small_body()
                path = self.server.register_upload(key[:-8], data)
                log.debug("cache serve: registered %s", path)
            elif (key.endswith(".ls") and _HASH_RE.match(key[:-3])) or key.startswith(("log/", "realisations/")):
                for _ in self._body():  # accepted and dropped: nartool makes listings itself
                    pass
            else:
                raise _Reply(400, f"cannot upload '{key}'")
        except _Reply as r:
            if r.status >= 400:
                log.warning("cache serve: refused upload %s from %s: %s", self.path, self.client_address[0], r.text)
            self._reply(r)
            return
        except (NartoolError, OSError) as e:
            if isinstance(e, (BrokenPipeError, ConnectionResetError, TimeoutError)):
                raise
            log.warning("cache serve: upload %s from %s failed: %s", self.path, self.client_address[0], e)
            self.close_connection = True
            self._reply(_Reply(500, f"upload failed: {e}"))
            return
        self._send_head(204, {"Content-Length": "0"})


def _digest_etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _zstd(chunks: Iterable[bytes | bytearray | memoryview], level: int) -> Iterator[bytes]:
    import zstandard

    c = zstandard.ZstdCompressor(level=level).compressobj()
    for chunk in chunks:
        out = c.compress(chunk)
        if out:
            yield out
    tail = c.flush()
    if tail:
        yield tail


def read_password_file(path: str) -> str:
    """The first line of a password file (no trailing newline)."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8").rstrip("\r\n")
    if not first:
        raise StoreError("the upload password file is empty", path=path, rule="bad-setting")
    return first


__all__ = ["CacheServer", "ServeOptions", "read_password_file"]
