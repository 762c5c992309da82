"""The ``http://`` / ``https://`` binary-cache backend: files of a cache on a web server.

A :class:`HttpBackend` is the :class:`~nartool.cache.backend.CacheBackend` of a URL prefix
(``https://cache.example.org/prefix``): ``GET`` reads a file (streamed: a NAR is never held in
memory), ``HEAD`` asks whether one exists, ``PUT`` writes one (what ``nix copy --to http://…``
sends; ``nartool cache serve --writable`` accepts it). As in Nix, ``404``, ``403`` and ``410``
mean *absent* (S3 buckets without list permission answer ``403``).

Connections: :mod:`http.client`, kept alive and reused (a small pool per host, shared by
threads), ``TCP_NODELAY`` set. Timeouts are Nix's settings: ``connect-timeout`` bounds the
connection set-up, ``stalled-download-timeout`` any wait for data. Transient failures
(a connection reset, ``5xx`` other than ``501``/``505``/``511``, ``429``; a refused
connection only to a server reached before in this process) are retried up to
``download-attempts`` times with exponential back-off from 250 ms, as Nix's downloader does
(Nix retries a refusal from a server never reached too: nartool does not, so that a dead
substituter costs one attempt); a request on a kept-alive connection the server has meanwhile closed is repeated at once
on a new one. A server that still cannot be reached after that — or does not accept the
connection within ``connect-timeout``, or accepts it but never answers — is marked *dead*:
every later request to it in this process fails at once with the same error, so a dead
substituter costs its timeout only once. Redirects are followed (at most 10).
``Content-Encoding`` (gzip, xz, bzip2, zstd) is decoded, as Nix does; a body that ends before
its ``Content-Length`` is an error, never a file — except that a NAR download cut off midway
continues with a ``Range`` request when the server offers ``Accept-Ranges: bytes``.

TLS (``https://``): the server's certificate and host name are verified against one CA bundle,
chosen as Nix chooses it — the ``ssl-cert-file`` setting, else ``NIX_SSL_CERT_FILE``, else
``SSL_CERT_FILE``, else the system's certificates; a refusal is an error with ``rule="tls"``
(not retried: it would fail the same way).

Authentication: Basic credentials from the URL's user info, else from the ``netrc-file``
(Nix's setting; nartool's default ``/etc/nartool/netrc``) for the request's host — as Nix
does through curl, and the only authentication ``nix copy --to http://`` has.

``nix-cache-info`` and narinfos go through the :mod:`lookup cache <nartool.cache.lookup>`
(fresh answers cost no request; stale ones are revalidated with ``If-None-Match`` /
``If-Modified-Since``); a successful ``PUT`` of a narinfo drops its stored answer.
"""

from __future__ import annotations

import base64
import http.client
import io
import netrc
import os
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote, urljoin, urlsplit

from .. import __version__
from .._log import get_logger
from ..errors import StoreError
from .backend import CacheUnavailableError, check_key
from .lookup import Answer, Entry, LookupCache, TransferError
from .store import BinaryCacheStore

log = get_logger(__name__)

USER_AGENT = f"nartool/{__version__}"
#: Nix's defaults: ``download-attempts``, ``stalled-download-timeout``; nartool's own for
#: ``connect-timeout`` (Nix's 0 leaves curl's 300 s, far too long for a dead substituter)
DEFAULT_TRIES = 5
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 300.0
DEFAULT_NETRC_FILE = "/etc/nartool/netrc"
#: first retry delay (doubled per attempt, plus up to as much again at random), as Nix
RETRY_BASE = 0.25
MAX_REDIRECTS = 10
#: idle connections kept per host
POOL_SIZE = 8
_CHUNK = 1 << 16
_NOT_TRANSIENT_5XX = frozenset({501, 505, 511})
_ABSENT = frozenset({403, 404, 410})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class HttpError(TransferError):
    """An HTTP request to a cache failed: a timeout, an unexpected status or a malformed
    answer. ``url``, ``status`` (when there was one) and ``rule``."""


class HttpUnavailableError(CacheUnavailableError):
    """The server cannot be reached at all (refused, unresolvable, no answer within the
    connect timeout): the cache is dead for the rest of the process."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message, where=url)
        self.url = url


def _is_lookup(key: str) -> bool:
    """Files answered through the lookup cache: small, and asked for again and again."""
    return key == "nix-cache-info" or key.endswith(".narinfo")


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class _Conn(http.client.HTTPConnection):
    """``http.client`` with separate connect and read timeouts and ``TCP_NODELAY``."""

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(host, port, timeout=read_timeout, blocksize=_CHUNK)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    def connect(self) -> None:
        self.sock = _open_socket(self.host, self.port, self.connect_timeout, self.read_timeout)


class _TLSConn(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float,
                 context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=read_timeout, blocksize=_CHUNK, context=context)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls_context = context

    def connect(self) -> None:
        sock = _open_socket(self.host, self.port, self.connect_timeout, self.read_timeout)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


class _ConnectTimeout(Exception):
    pass


def _open_socket(host: str, port: int, connect_timeout: float, read_timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except TimeoutError as e:
        raise _ConnectTimeout(str(e) or "timed out") from None
    sock.settimeout(read_timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _tls_context(url: str, ssl_cert_file: str | None) -> ssl.SSLContext:
    """Certificates are verified against one bundle, as Nix hands curl one: the ``ssl-cert-file``
    setting, else ``NIX_SSL_CERT_FILE``, else ``SSL_CERT_FILE``; with none of them, the system's
    (OpenSSL's defaults). Host names are checked."""
    source, bundle = "ssl-cert-file", ssl_cert_file
    for var in ("NIX_SSL_CERT_FILE", "SSL_CERT_FILE"):
        if not bundle:
            source, bundle = var, os.environ.get(var)
    try:
        return ssl.create_default_context(cafile=bundle or None)
    except (OSError, ValueError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise HttpError(f"TLS error: cannot load the certificate bundle '{bundle}' ({source}): {what}",
                        url=url, rule="tls") from None


class _Pool:
    """Idle kept-alive connections per origin, shared by threads."""

    def __init__(self) -> None:
        self._idle: dict[_Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def take(self, origin: _Origin) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def give(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < POOL_SIZE:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


class _Response:
    """A response being read: the connection goes back to the pool once its body was read
    to the end (and the server keeps it open), else it is closed."""

    def __init__(self, backend: HttpBackend, origin: _Origin, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse, url: str) -> None:
        self.backend, self.origin, self.conn, self.resp, self.url = backend, origin, conn, resp, url
        self.status = resp.status
        self.length = resp.length
        self.received = 0  # body bytes delivered, over all resumed parts
        self.part = 0  # body bytes of the current response
        self.finished = False
        self.key: str | None = None  # set by enable_resume
        self.total: int | None = None
        self.etag: str | None = None
        self.resumes = 0

    def header(self, name: str) -> str | None:
        v = self.resp.getheader(name)
        return None if v is None else v.strip()

    def enable_resume(self, key: str) -> None:
        """Let a download cut off midway continue with a ``Range`` request (as Nix does) when
        the server offers ``Accept-Ranges: bytes`` for a plain body of known length."""
        if (self.status == 200 and (self.header("Accept-Ranges") or "").lower() == "bytes"
                and self.length is not None and (self.header("Content-Encoding") or "identity") == "identity"):
            self.key = key
            self.total = self.length
            self.etag = self.header("ETag")

    def read(self, n: int) -> bytes:
        while True:
            if self.finished:
                return b""
            err: HttpError | None
            try:
                data = self.resp.read(n)
            except http.client.IncompleteRead as e:
                self.abort()
                err = HttpError("truncated response: the server closed the connection early", url=self.url,
                                status=self.status, rule="truncated",
                                expected=f"{self.received + len(e.partial) + (e.expected or 0)} bytes",
                                got=f"{self.received + len(e.partial)} bytes")
            except TimeoutError:
                self.abort()
                err = HttpError(f"download stalled: no data for {self.backend.read_timeout:g} s", url=self.url,
                                status=self.status, rule="timeout")
            except (OSError, http.client.HTTPException) as e:
                self.abort()
                err = HttpError(f"download failed: {e}", url=self.url, status=self.status, rule="connection")
            else:
                if data or n <= 0:
                    self.received += len(data)
                    self.part += len(data)
                    return data
                err = self._end()
                if err is None:
                    return b""
            if not self._resume(err):
                raise err

    def _resume(self, err: HttpError) -> bool:
        """After ``err`` cut the body off: ask for the rest (``Range``); whether that worked."""
        if self.key is None or self.resumes + 1 >= self.backend.tries:
            return False
        self.resumes += 1
        self.backend._backoff(self.resumes, self.url, err)
        headers = {"Range": f"bytes={self.received}-"}
        if self.etag:
            headers["If-Range"] = self.etag
        try:
            r = self.backend._request("GET", self.key, headers=headers)
        except (HttpError, CacheUnavailableError) as e:
            log.warning("warning: cannot resume the download of '%s': %s", self.url, e)
            return False
        if r is None:
            return False
        skip = 0
        if r.status == 206:
            cr = (r.header("Content-Range") or "").replace("bytes ", "", 1)
            first, total = cr.partition("-")[0], cr.rpartition("/")[2]
            if first != str(self.received) or total != str(self.total):
                r.abort()
                log.warning("warning: cannot resume the download of '%s': unexpected Content-Range %r", self.url, cr)
                return False
        elif r.status == 200 and r.length == self.total and (self.etag is None or r.header("ETag") == self.etag):
            skip = self.received  # the server ignored the range: drop what we have already
        else:
            r.abort()
            return False
        self.conn, self.resp, self.origin, self.part, self.finished = r.conn, r.resp, r.origin, 0, False
        while skip:
            b = self.resp.read(min(skip, _CHUNK))
            if not b:
                return self._resume(HttpError("truncated response while resuming", url=self.url, rule="truncated"))
            skip -= len(b)
        return True

    def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            b = self.read(_CHUNK)
            if not b:
                return bytes(out)
            out += b
            if len(out) > limit:
                self.abort()
                raise HttpError("response too large", url=self.url, rule="too-large", expected=f"at most {limit} bytes")

    def _end(self) -> HttpError | None:
        """The current response's body ended: the error if it was short, else None (and the
        connection goes back to the pool)."""
        if self.finished:
            return None
        self.finished = True
        announced = self.resp.getheader("Content-Length")
        if announced is not None and announced.strip().isdigit() and self.part != int(announced):
            self.conn.close()
            return HttpError("truncated response: the body ended before its Content-Length", url=self.url,
                             rule="truncated", expected=f"{announced.strip()} bytes", got=f"{self.part} bytes")
        if self.resp.will_close:
            self.conn.close()
        else:
            self.backend._pool.give(self.origin, self.conn)
        return None

    def drain(self) -> None:
        """Read and drop a (short) body so the connection can be reused; close it otherwise."""
        if self.finished:
            return
        if self.length is not None and self.length <= (1 << 16):
            try:
                while self.read(_CHUNK):
                    pass
                return
            except HttpError:
                return
        self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.conn.close()


class _BodyReader(io.RawIOBase):
    """A streamed response body as a binary file (decoded if the server set
    ``Content-Encoding``)."""

    def __init__(self, resp: _Response, read: Any) -> None:
        super().__init__()
        self._resp = resp
        self._read = read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        data = self._read(len(mv))
        mv[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return bytes(self._read(size))

    def close(self) -> None:
        if not self.closed and not self._resp.finished:
            self._resp.abort()
        super().close()


def _decoder(resp: _Response) -> Any:
    """``read(n)`` of the body, decoded by its ``Content-Encoding``."""
    enc = (resp.header("Content-Encoding") or "identity").lower()
    if enc in ("identity", ""):
        return resp.read
    if enc not in ("gzip", "x-gzip", "xz", "bzip2", "zstd"):
        resp.abort()
        raise HttpError("unsupported Content-Encoding", url=resp.url, rule="bad-encoding",
                        expected="identity, gzip, xz, bzip2 or zstd", got=enc)
    from ..compression import CompressionError, open_decompressed

    try:
        read, method = open_decompressed(resp.read)
    except CompressionError as e:
        resp.abort()
        raise HttpError(f"cannot decode the {enc} body: {e.message}", url=resp.url, rule="bad-encoding") from None
    want = "gzip" if enc == "x-gzip" else enc
    if method != want:
        resp.abort()
        raise HttpError("body does not match its Content-Encoding", url=resp.url, rule="bad-encoding",
                        expected=want, got=method)

    def checked(n: int) -> bytes:
        try:
            return bytes(read(n))
        except CompressionError as e:
            resp.abort()
            raise HttpError(f"cannot decode the {enc} body: {e.message}", url=resp.url, rule="bad-encoding") from None

    return checked


class HttpBackend:
    """Files under ``url`` (``http://`` or ``https://``, no query) on a web server; see the
    module docstring. ``lookups`` caches ``nix-cache-info`` and narinfo answers (None: every
    lookup asks the server)."""

    #: largest narinfo / nix-cache-info accepted (they are a few hundred bytes)
    MAX_LOOKUP_SIZE = 4 << 20

    def __init__(self, url: str, *, lookups: LookupCache | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, tries: int = DEFAULT_TRIES,
                 netrc_file: str | None = DEFAULT_NETRC_FILE, retry_base: float = RETRY_BASE,
                 ssl_cert_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpError("not an http:// or https:// URL", url=url, rule="bad-url")
        if parts.query or parts.fragment:
            raise HttpError("a cache URL has no query or fragment here", url=url, rule="bad-url")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise HttpError("invalid port in URL", url=url, rule="bad-url") from None
        self.origin = _Origin(parts.scheme, parts.hostname, port)
        self.prefix = parts.path.rstrip("/")
        self.url = f"{parts.scheme}://{self.origin.netloc}{self.prefix}"
        self.lookups = lookups
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tries = max(1, tries)
        self.retry_base = retry_base
        self.netrc_file = netrc_file
        self.ssl_cert_file = ssl_cert_file
        self._url_auth = None
        if parts.username is not None:
            cred = f"{parts.username}:{parts.password or ''}".encode()
            self._url_auth = "Basic " + base64.b64encode(cred).decode("ascii")
        self._pool = _Pool()
        self._reached: set[_Origin] = set()  # origins connected to at least once
        self._dead: HttpUnavailableError | None = None
        self._tls: ssl.SSLContext | None = None
        self._netrc: netrc.netrc | None | bool = False  # False: not read yet

    # -- the CacheBackend protocol --------------------------------------------------------

    def describe(self) -> str:
        return self.url

    def file_exists(self, key: str) -> bool:
        if _is_lookup(key):
            return self._lookup(key) is not None
        resp = self._request("HEAD", key)
        if resp is None:
            return False
        resp.drain()
        return True

    def get_file(self, key: str) -> BinaryIO | None:
        if _is_lookup(key):
            body = self._lookup(key)
            return None if body is None else io.BytesIO(body)
        resp = self._request("GET", key)
        if resp is None:
            return None
        resp.enable_resume(key)
        return io.BufferedReader(_BodyReader(resp, _decoder(resp)), _CHUNK)

    def upsert_file(self, key: str, data: bytes | Iterable[bytes] | BinaryIO, *, mime: str) -> None:
        payload = _payload(data)
        try:
            resp = self._request("PUT", key, body=payload, headers={"Content-Type": mime}, absent_ok=False)
            assert resp is not None
            resp.drain()
        finally:
            if payload[0] is not data and hasattr(payload[0], "close"):
                payload[0].close()
        if self.lookups is not None and _is_lookup(key):
            self.lookups.forget(self.url, key)

    def close(self) -> None:
        self._pool.close()
        if self.lookups is not None:
            self.lookups.close()

    # -- beyond the protocol --------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes | None:
        """A whole (small) file, None when absent; lookups go through the lookup cache."""
        if _is_lookup(key):
            return self._lookup(key)
        resp = self._request("GET", key)
        if resp is None:
            return None
        return _read_limited(resp, self.MAX_LOOKUP_SIZE)

    def refetch(self, key: str) -> bytes | None:
        """Ask the server again for a lookup file even if the stored answer is fresh (a NAR
        named by a cached narinfo has vanished: the narinfo may have changed)."""
        if self.lookups is None:
            return self.get_bytes(key)
        return self.lookups.lookup(self.url, key, lambda prev: self._fetch_lookup(key, prev), revalidate=True)

    def forget(self, key: str) -> None:
        """Drop the stored answer for a lookup file."""
        if self.lookups is not None:
            self.lookups.forget(self.url, key)

    # -- lookups --------------------------------------------------------------------------

    def _lookup(self, key: str) -> bytes | None:
        if self.lookups is None:
            ans = self._fetch_lookup(key, None)
            return ans.body if ans.status == "ok" else None
        return self.lookups.lookup(self.url, key, lambda prev: self._fetch_lookup(key, prev))

    def _fetch_lookup(self, key: str, previous: Entry | None) -> Answer:
        headers = {}
        if previous is not None:
            if previous.etag:
                headers["If-None-Match"] = previous.etag
            if previous.last_modified:
                headers["If-Modified-Since"] = previous.last_modified
        resp = self._request("GET", key, headers=headers)
        if resp is None:
            return Answer("absent")
        if resp.status == 304:
            resp.drain()
            return Answer("not-modified", etag=resp.header("ETag"), last_modified=resp.header("Last-Modified"))
        etag, modified = resp.header("ETag"), resp.header("Last-Modified")
        body = _read_limited(resp, self.MAX_LOOKUP_SIZE)
        return Answer("ok", body, etag, modified)

    # -- requests -------------------------------------------------------------------------

    def _target(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{quote(key, safe='/!$&()*+,;=:@-._~')}"

    def _auth(self, origin: _Origin) -> str | None:
        if origin == self.origin and self._url_auth is not None:
            return self._url_auth
        if self._netrc is False:
            self._netrc = None
            if self.netrc_file and os.path.exists(self.netrc_file):
                try:
                    self._netrc = netrc.netrc(self.netrc_file)
                except (netrc.NetrcParseError, OSError) as e:
                    log.warning("warning: cannot read netrc file '%s': %s", self.netrc_file, e)
        if not isinstance(self._netrc, netrc.netrc):
            return None
        found = self._netrc.authenticators(origin.host)
        if not found:
            return None
        login, _account, password = found
        return "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode("ascii")

    def _connect(self, origin: _Origin, url: str) -> http.client.HTTPConnection:
        if origin.scheme == "https":
            if self._tls is None:
                self._tls = _tls_context(url, self.ssl_cert_file)
            return _TLSConn(origin.host, origin.port, self.connect_timeout, self.read_timeout, self._tls)
        return _Conn(origin.host, origin.port, self.connect_timeout, self.read_timeout)

    def _request(self, method: str, key: str, *, headers: Mapping[str, str] | None = None,
                 body: tuple[Any, int | None, Any] | None = None, absent_ok: bool = True) -> _Response | None:
        """One request with retries and redirects: the response (status 2xx or 304), or None
        for an absent file. ``body``: what :func:`_payload` made of an upload. Everything
        else raises :class:`HttpError`."""
        if self._dead is not None:
            raise HttpUnavailableError(self._dead.message, url=f"{self.url}/{key}")
        origin, target = self.origin, self._target(key)
        payload, length, rewind = body if body is not None else (None, None, None)
        attempt = 0
        redirects = 0
        while True:
            url = f"{origin.scheme}://{origin.netloc}{target}"
            hdrs = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            auth = self._auth(origin)
            if auth:
                hdrs["Authorization"] = auth
            if payload is not None:
                hdrs["Content-Length"] = str(length)
            hdrs.update(headers or {})
            try:
                resp = self._send(origin, method, target, hdrs, payload, False, url)
            except _Retry as r:
                attempt += 1
                if not r.retry or attempt >= self.tries or (payload is not None and rewind is None):
                    if r.connect:
                        self._dead = HttpUnavailableError(f"cannot reach binary cache '{self.url}': "
                                                          f"{r.error.message}", url=r.error.url)
                        raise self._dead from None
                    raise r.error from None
                if rewind is not None:
                    payload = rewind()
                self._backoff(attempt, url, r.error)
                continue
            st = resp.status
            if 200 <= st < 300 or st == 304:
                return resp
            if st in _REDIRECTS and resp.header("Location"):
                resp.drain()
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise HttpError("too many redirects", url=url, status=st, rule="redirects")
                nxt = urlsplit(urljoin(url, resp.header("Location") or ""))
                if nxt.scheme not in ("http", "https") or not nxt.hostname:
                    raise HttpError("redirect to a non-HTTP URL", url=url, status=st, rule="redirects",
                                    got=resp.header("Location"))
                origin = _Origin(nxt.scheme, nxt.hostname, nxt.port or (443 if nxt.scheme == "https" else 80))
                target = (nxt.path or "/") + (f"?{nxt.query}" if nxt.query else "")
                if st == 303:
                    method, payload = ("HEAD" if method == "HEAD" else "GET"), None
                elif rewind is not None:
                    payload = rewind()
                elif payload is not None:
                    raise HttpError("cannot repeat a streamed upload for a redirect", url=url, status=st,
                                    rule="redirects")
                continue
            if st in _ABSENT and absent_ok:
                resp.drain()
                return None
            excerpt = _excerpt(resp) if method != "HEAD" else ""
            transient = (st >= 500 and st not in _NOT_TRANSIENT_5XX) or st == 429 or st == 408
            err = HttpError(f"HTTP error {st} ({resp.resp.reason}){excerpt}", url=url, status=st,
                            rule="http-status")
            attempt += 1
            if transient and attempt < self.tries and (payload is None or rewind is not None):
                if rewind is not None:
                    payload = rewind()
                self._backoff(attempt, url, err)
                continue
            raise err

    def _send(self, origin: _Origin, method: str, target: str, headers: dict[str, str], payload: Any,
              chunked: bool, url: str) -> _Response:
        conn = self._pool.take(origin)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(origin, url)
                try:
                    conn.connect()
                except _ConnectTimeout:
                    conn.close()
                    raise _Retry(HttpError(f"cannot connect: no answer within the connect timeout "
                                           f"({self.connect_timeout:g} s)", url=url, rule="connect-timeout"),
                                 connect=True, retry=False) from None
                except ssl.SSLCertVerificationError as e:
                    conn.close()
                    raise HttpError(f"TLS error: certificate verify failed: {e.verify_message} (CA bundle: "
                                    "ssl-cert-file, else NIX_SSL_CERT_FILE, else the system's)", url=url, rule="tls") from None
                except ssl.SSLError as e:
                    conn.close()
                    raise HttpError(f"TLS error: {e}", url=url, rule="tls") from None
                except OSError as e:
                    conn.close()
                    what = e.strerror or str(e) or type(e).__name__
                    # refused/unreachable: retried (with back-off) only for a server this process
                    # has reached before (a restart); a cache that was never up costs one attempt
                    raise _Retry(HttpError(f"cannot connect: {what}", url=url, rule="connection"),
                                 connect=True, retry=origin in self._reached) from None
                self._reached.add(origin)
            try:
                conn.request(method, target, body=payload, headers=headers, encode_chunked=chunked)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused and payload is None:  # the server closed an idle kept-alive connection
                    conn, reused = None, False
                    continue
                raise _Retry(HttpError(f"connection failed: {e or type(e).__name__}", url=url, rule="connection"),
                             connect=False) from None
            except TimeoutError:
                conn.close()
                # a server that accepts connections but never answers is as dead as one that
                # refuses them, once the attempts are used up
                raise _Retry(HttpError(f"no response within {self.read_timeout:g} s", url=url,
                                       rule="timeout"), connect=True) from None
            except OSError as e:
                conn.close()
                raise _Retry(HttpError(f"connection failed: {e.strerror or e}", url=url, rule="connection"),
                             connect=False) from None
            except http.client.HTTPException as e:
                conn.close()
                raise _Retry(HttpError(f"malformed HTTP response ({type(e).__name__}: {e})", url=url,
                                       rule="bad-response"), connect=False) from None
            r = _Response(self, origin, conn, resp, url)
            if method == "HEAD" or resp.status == 304 or resp.length == 0:
                resp.read()
                r.finished = True
                if resp.will_close:
                    conn.close()
                else:
                    self._pool.give(origin, conn)
            return r

    def _backoff(self, attempt: int, url: str, err: HttpError) -> None:
        delay = self.retry_base * (1 << (attempt - 1))
        delay += random.uniform(0, delay)
        log.warning("warning: %s; retrying in %d ms", err, int(delay * 1000))
        time.sleep(delay)


class _Retry(Exception):
    def __init__(self, error: HttpError, *, connect: bool, retry: bool = True) -> None:
        super().__init__(str(error))
        self.error = error
        self.connect = connect
        self.retry = retry


def _payload(body: bytes | Iterable[bytes] | BinaryIO | None) -> tuple[Any, int | None, Any]:
    """(what to send, its length, a function giving it again or None). A file that cannot
    seek, or an iterable of chunks, is spooled first (in memory up to 8 MiB, then on disk) so
    that the upload has a ``Content-Length`` — servers in front of object stores often refuse
    chunked uploads — and can be repeated after a transient failure."""
    if body is None:
        return None, None, None
    if isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body)
        return data, len(data), lambda: data
    f: Any = body
    if hasattr(body, "read"):
        try:
            start = f.tell()
            end = f.seek(0, os.SEEK_END)
            f.seek(start)
        except (OSError, AttributeError, ValueError):
            pass
        else:

            def again() -> Any:
                f.seek(start)
                return f

            return f, end - start, again
        chunks: Iterable[bytes] = _chunks_of(f)
    else:
        chunks = body
    spool: Any = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 - closed by upsert_file
    n = 0
    for c in chunks:
        spool.write(c)
        n += len(c)
    spool.seek(0)

    def rewind() -> Any:
        spool.seek(0)
        return spool

    return spool, n, rewind


def _chunks_of(f: Any) -> Iterator[bytes]:
    while True:
        b = f.read(_CHUNK)
        if not b:
            return
        yield b


def _read_limited(resp: _Response, limit: int) -> bytes:
    read = _decoder(resp)
    out = bytearray()
    while True:
        b = read(_CHUNK)
        if not b:
            return bytes(out)
        out += b
        if len(out) > limit:
            resp.abort()
            raise HttpError("file too large for a cache's metadata file", url=resp.url, rule="too-large",
                            expected=f"at most {limit} bytes")


def _excerpt(resp: _Response) -> str:
    try:
        if resp.length is not None and resp.length > 4096:
            resp.abort()
            return ""
        text = resp.read_all(4096).decode("utf-8", "replace").strip()
    except HttpError:
        return ""
    text = " ".join(text.split())[:200]
    return f": {text}" if text else ""


class HttpCacheStore(BinaryCacheStore):
    """An ``http(s)://`` binary cache. A NAR missing behind a narinfo (collected on the server,
    or the narinfo stored in the lookup cache is out of date) makes it ask for the narinfo once
    more, bypassing the lookup cache; if the NAR is still missing, the error
    (``rule="nar-missing"``) lets a substituter fall back to the next cache."""

    backend: HttpBackend

    def nar_chunks(self, path: str, *, check: bool = True) -> Iterator[bytes | bytearray | memoryview]:
        try:
            return super().nar_chunks(path, check=check)
        except StoreError as e:
            if e.rule != "nar-missing":
                raise
            log.info("%s; asking '%s' for the narinfo again", e.message, self.uri)
        key = self._hash_part(self._path_arg(path)) + ".narinfo"
        self.forget([self._path_arg(path)])
        self.backend.refetch(key)
        return super().nar_chunks(path, check=check)

    def close(self) -> None:
        self.backend.close()


def backend_from_config(url: str, *, config: Any = None, refresh: bool | None = None) -> HttpBackend:
    """An :class:`HttpBackend` with the settings of ``config`` (default: the user's) and the
    user's lookup cache; ``refresh`` (default: :data:`nartool.cache.lookup.REFRESH`) forces
    revalidation of stored answers."""
    from . import lookup

    if config is None:
        from ..config import Config

        config = Config.load()
    lookups = LookupCache(positive_ttl=config.narinfo_cache_positive_ttl, negative_ttl=config.narinfo_cache_negative_ttl,
                          refresh=lookup.REFRESH if refresh is None else refresh)
    return HttpBackend(url, lookups=lookups, connect_timeout=float(config.connect_timeout or DEFAULT_CONNECT_TIMEOUT),
                       read_timeout=float(config.stalled_download_timeout or DEFAULT_READ_TIMEOUT),
                       tries=config.download_attempts or 1, netrc_file=config.netrc_file or None,
                       ssl_cert_file=config.ssl_cert_file or None)


def open_http_store(u: Any, store_dir: str, opts: Mapping[str, Any]) -> BinaryCacheStore:
    """The ``http://`` / ``https://`` opener (registered in :mod:`nartool.store.uri`)."""
    if not u.authority:
        raise StoreError(f"an {u.scheme}:// store needs a host ({u.scheme}://HOST[/PREFIX])", rule="bad-uri",
                         got=u.text)
    backend = backend_from_config(f"{u.scheme}://{u.authority}", refresh=opts.get("refresh"))
    return HttpCacheStore(backend, store_dir=store_dir, params=u.params, scheme=u.scheme)


__all__ = ["HttpBackend", "HttpCacheStore", "HttpError", "HttpUnavailableError", "USER_AGENT", "open_http_store",
           "backend_from_config"]
