"""The ``s3://BUCKET[/PREFIX]`` backend: a binary cache in an S3 bucket (Nix's ``S3BinaryCacheStore``).

Requests are signed with SigV4 by botocore (the optional extra ``s3``: ``pip install
'nartool[s3]'``), and credentials come from botocore's chain — the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``), the
shared files ``~/.aws/credentials`` and ``~/.aws/config``, then container and instance roles —
or from the named ``profile=`` of those files. Without any credentials requests go unsigned
(enough to read a bucket that allows anonymous reads).

URL parameters (Nix's names and defaults): ``region`` (``us-east-1``), ``endpoint``
(``HOST[:PORT]`` or a URL; with one, requests are path-style: ``ENDPOINT/BUCKET/KEY``),
``scheme`` (``https``; ``http`` for a plain endpoint), ``profile``, ``narinfo-compression``,
``ls-compression``, ``log-compression`` (those files are stored compressed, with
``Content-Encoding``, and decoded on reading), ``multipart-upload`` (``false``) and
``buffer-size`` (5 MiB: the part size of multipart uploads). Unlike Nix, a key prefix inside the
bucket is allowed (``s3://bucket/some/prefix``).

Uploads: one ``PutObject`` up to the threshold — ``buffer-size`` with ``multipart-upload=true``,
else S3's single-upload limit of 5 GiB (where Nix fails) — and a multipart upload above it.
Parts are at least 5 MiB (S3's minimum), grow so that an object fits S3's 10 000 parts
(from its size when known; when not, the part size doubles every 900 parts, which reaches
S3's 5 TiB object limit), and several are sent at once. Part data over 16 MiB is spooled to a
temporary file, so memory stays bounded. Any failure aborts the multipart upload, so no
incomplete upload is left in the bucket to be billed.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from .._log import get_logger
from ..errors import NartoolError, StoreError
from ..store.base import ConsumeFn
from ..store.paths import DEFAULT_STORE_DIR
from ..store.types import PathInfo
from .backend import CacheUnavailableError, UploadData, check_key, iter_upload
from .store import BinaryCacheStore, CacheInfo

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from ..store.uri import StoreURI

log = get_logger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
#: S3's limits: smallest part (but the last), largest part, parts per upload, single PUT, object
MIN_PART = 5 * MiB
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
MAX_SINGLE_PUT = 5 * GiB
MAX_OBJECT = 5 * (1 << 40)
#: Nix's default ``buffer-size``
DEFAULT_BUFFER_SIZE = 5 * MiB
#: parts larger than this are spooled to a temporary file rather than held in memory
_SPOOL_OVER = 16 * MiB
#: parts of one upload in flight at once
PART_WORKERS = 4
#: files uploaded at once while uploads are deferred (:meth:`S3Backend.deferred`)
UPLOAD_WORKERS = 4

INSTALL_HINT = "pip install 'nartool[s3]' (or rerun install.sh --extras s3)"
#: error codes that mean the credentials themselves are wrong (not a missing key)
_AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
               "InvalidSecurity", "TokenRefreshRequired",
               "RequestTimeTooSkewed", "MissingSecurityHeader"}
#: Content-Encoding values this backend writes and decodes (Nix's compression names)
_ENCODINGS = ("xz", "bzip2", "gzip", "zstd")


class S3Error(StoreError):
    """An S3 request failed. ``rule``: ``s3-credentials`` (wrong or missing credentials),
    ``s3-access-denied``, ``s3-no-bucket``, ``s3-too-large``, ``s3-error`` (anything else),
    ``missing-boto3``; ``got`` is S3's error code."""


class _Cancelled(S3Error):
    """An upload stopped because the copy was interrupted."""

    def __init__(self, message: str) -> None:
        super().__init__(message, rule="cancelled")


class Boto3MissingError(NartoolError):
    """An ``s3://`` store was opened but ``boto3`` is not importable."""


def require_boto3() -> None:
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise Boto3MissingError(f"s3:// stores need the Python package 'boto3', which is not installed: "
                                f"{INSTALL_HINT}", rule="missing-boto3") from None


@dataclass(frozen=True)
class S3Settings:
    """The S3 part of an ``s3://`` URI (see the module docstring)."""

    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    endpoint: str = ""
    scheme: str = ""
    profile: str = ""
    narinfo_compression: str = ""
    ls_compression: str = ""
    log_compression: str = ""
    multipart_upload: bool = False
    buffer_size: int = DEFAULT_BUFFER_SIZE


#: URL parameters of an S3 store, beyond those of every binary cache
S3_PARAMS = ("region", "endpoint", "scheme", "profile", "narinfo-compression", "ls-compression",
             "log-compression", "multipart-upload", "buffer-size")


def _bool_param(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", ""):
        return False
    raise StoreError(f"S3 store parameter '{name}' must be true or false", rule="bad-parameter",
                     expected="true|false", got=value)


def _compression_param(name: str, value: str) -> str:
    if value in ("", "none"):
        return ""
    if value not in _ENCODINGS:
        raise StoreError(f"unsupported {name} for an S3 store", rule="bad-parameter",
                         expected="|".join(("none", *_ENCODINGS)), got=value)
    return value


def parse_settings(location: str, params: dict[str, str]) -> S3Settings:
    """``BUCKET[/PREFIX]`` and the S3 parameters of ``params`` (removed from it; what remains is
    the binary cache's)."""
    bucket, _, prefix = location.partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise StoreError("an s3:// store needs a bucket name: s3://BUCKET[/PREFIX]", rule="bad-store-uri",
                         got=location)
    if prefix:
        check_key(prefix)
    p = {k: params.pop(k) for k in S3_PARAMS if k in params}
    buffer_size = DEFAULT_BUFFER_SIZE
    if "buffer-size" in p:
        try:
            buffer_size = int(p["buffer-size"])
        except ValueError:
            buffer_size = -1
        if buffer_size <= 0:
            raise StoreError("S3 store parameter 'buffer-size' must be a positive number of bytes",
                             rule="bad-parameter", got=p["buffer-size"])
    scheme = p.get("scheme", "")
    if scheme not in ("", "http", "https"):
        raise StoreError("S3 store parameter 'scheme' must be http or https", rule="bad-parameter",
                         expected="http|https", got=scheme)
    return S3Settings(
        bucket=bucket, prefix=prefix, region=p.get("region") or "us-east-1", endpoint=p.get("endpoint", ""),
        scheme=scheme, profile=p.get("profile", ""),
        narinfo_compression=_compression_param("narinfo-compression", p.get("narinfo-compression", "")),
        ls_compression=_compression_param("ls-compression", p.get("ls-compression", "")),
        log_compression=_compression_param("log-compression", p.get("log-compression", "")),
        multipart_upload=_bool_param("multipart-upload", p.get("multipart-upload", "false")),
        buffer_size=buffer_size)


def part_size_for(total: int | None, buffer_size: int) -> int:
    """The first part size of a multipart upload of ``total`` bytes (None: unknown)."""
    size = max(buffer_size, MIN_PART)
    if total is not None:
        size = max(size, -(-total // MAX_PARTS))
        size = -(-size // MiB) * MiB  # whole MiB
    return min(size, MAX_PART)


def part_size_at(first: int, number: int, known: bool) -> int:
    """The size of part ``number`` (1-based): constant when the total is known, else doubling
    every 900 parts (from 5 MiB: about 4.4 GiB after the first 900 parts, 5 TiB by part 9 125)."""
    if known:
        return first
    return min(first << ((number - 1) // 900), MAX_PART)


class _Reader(io.RawIOBase):
    """A ``read(n)`` callable as a binary file (for decoded downloads)."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None]) -> None:
        self._read = read
        self._close = close

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._close()
        super().close()


def _upload_source(data: UploadData) -> tuple[Callable[[int], bytes], int | None]:
    """``(read, size)`` of an upload; ``size`` is None when it is not known up front."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        bio = io.BytesIO(bytes(data))
        return bio.read, len(bio.getbuffer())
    read = getattr(data, "read", None)
    if read is not None:
        f: BinaryIO = data  # type: ignore[assignment]
        size: int | None = None
        try:
            if f.seekable():
                pos = f.tell()
                size = f.seek(0, io.SEEK_END) - pos
                f.seek(pos)
        except (OSError, ValueError, AttributeError):
            size = None
        return f.read, size
    it: Iterator[bytes] = iter(data)
    buf = bytearray()

    def read_chunks(n: int) -> bytes:
        while len(buf) < n:
            c = next(it, None)
            if c is None:
                break
            buf.extend(c)
        with memoryview(buf) as view:
            out = bytes(view[:n])
        del buf[:n]
        return out

    return read_chunks, None


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end); one read when it gives them all (no copy)."""
    first = read(n)
    if len(first) >= n or not first:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        b = read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _read_part(read: Callable[[int], bytes], n: int) -> tuple[bytes | BinaryIO, int]:
    """Up to ``n`` bytes: in memory when small, else in a temporary file (rewound)."""
    if n <= _SPOOL_OVER:
        data = _read_exactly(read, n)
        return data, len(data)
    f: BinaryIO = tempfile.TemporaryFile()  # noqa: SIM115
    got = 0
    try:
        while got < n:
            b = read(min(n - got, MiB))
            if not b:
                break
            f.write(b)
            got += len(b)
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f, got


class S3Backend:
    """A binary cache in an S3 bucket (see the module docstring)."""

    def __init__(self, settings: S3Settings, *, part_workers: int = PART_WORKERS,
                 upload_workers: int = UPLOAD_WORKERS) -> None:
        require_boto3()
        self.settings = settings
        self.part_workers = max(1, part_workers)
        self.upload_workers = max(1, upload_workers)
        self._client: S3Client | None = None
        self._lock = threading.Lock()
        self._bucket_checked = False
        self._unsigned = False  # no credentials were found
        self._warned_unsigned = False
        # deferred uploads (see deferred()): the pools, futures by key and in submission order
        self._deferred = 0
        self._pool: ThreadPoolExecutor | None = None  # NARs and the rest
        self._meta_pool: ThreadPoolExecutor | None = None  # narinfos (which wait for others)
        self._pending: dict[str, Future[None]] = {}
        self._submitted: list[Future[None]] = []
        self._slots: threading.BoundedSemaphore | None = None
        self._failure: BaseException | None = None
        self._check_first: set[str] = set()  # NARs to look for before uploading
        self._cancel = threading.Event()  # set on an interrupt: uploads stop (multipart ones abort)
        # downloads ahead (see prefetching()): futures by key, and what starts the next ones
        self._prefetch: tuple[dict[str, Future[BinaryIO | None]], Callable[[], None]] | None = None

    # -- identity

    def describe(self) -> str:
        s = self.settings
        return f"s3://{s.bucket}" + (f"/{s.prefix}" if s.prefix else "")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.settings.prefix}/{key}" if self.settings.prefix else key

    # -- the client

    def endpoint_url(self) -> str | None:
        s = self.settings
        if not s.endpoint:
            return None
        if "://" in s.endpoint:
            return s.endpoint
        return f"{s.scheme or 'https'}://{s.endpoint}"

    @property
    def client(self) -> S3Client:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> S3Client:
        import boto3
        import botocore
        import botocore.exceptions
        from botocore.config import Config

        s = self.settings
        try:
            session = boto3.session.Session(profile_name=s.profile or None)
        except botocore.exceptions.ProfileNotFound:
            raise S3Error(f"AWS profile '{s.profile}' not found (in ~/.aws/credentials or ~/.aws/config, or "
                          "the files AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE name)",
                          rule="s3-credentials", got=s.profile, path=self.describe()) from None
        try:
            creds = session.get_credentials()
        except botocore.exceptions.BotoCoreError as e:
            raise S3Error(f"cannot load AWS credentials: {e}", rule="s3-credentials",
                          path=self.describe()) from None
        cfg: dict[str, Any] = {
            "region_name": s.region, "signature_version": "s3v4",
            "s3": {"addressing_style": "path" if s.endpoint else "auto"},
            "retries": {"mode": "standard", "max_attempts": 5},
            "connect_timeout": 10, "read_timeout": 600,
            "max_pool_connections": 32,
            "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required",
        }
        if creds is None:
            log.info("no AWS credentials found: requests to %s go unsigned", self.describe())
            self._unsigned = True
            cfg["signature_version"] = botocore.UNSIGNED
        try:
            config = Config(**cfg)
        except TypeError:  # a botocore without the checksum settings
            del cfg["request_checksum_calculation"], cfg["response_checksum_validation"]
            config = Config(**cfg)
        client: S3Client = session.client("s3", endpoint_url=self.endpoint_url(),
                                          use_ssl=(s.scheme or "https") == "https", config=config)
        return client

    # -- errors

    def _error(self, e: BaseException, what: str, key: str) -> StoreError:
        """A clear :class:`S3Error` (or :class:`CacheUnavailableError`) for a botocore failure."""
        import botocore.exceptions as bx

        where = f"{self.describe()}/{key}" if key else self.describe()
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            return CacheUnavailableError(f"cannot reach S3 while {what}: {e}", where=where)
        if isinstance(e, bx.NoCredentialsError):
            return S3Error(f"no AWS credentials while {what}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "write ~/.aws/credentials, or name a profile with ?profile=", rule="s3-credentials",
                           path=where)
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", "")) or str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            msg = str(err.get("Message", "")) or str(e)
            if code in _AUTH_CODES:
                return S3Error(f"S3 refused the credentials while {what} ({code}: {msg}); check the access key "
                               "and secret (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, "
                               "?profile=)", rule="s3-credentials", got=code, path=where)
            if code in ("AccessDenied", "403", "Forbidden"):
                hint = "; no AWS credentials were found, so the request was unsigned" if self._unsigned else ""
                return S3Error(f"S3 denied access while {what} ({code}: {msg}){hint}", rule="s3-access-denied",
                               got=code, path=where)
            if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
                return S3Error(f"S3 error while {what} ({code}: {msg}); is region={self.settings.region} the "
                               "bucket's region?", rule="s3-error", got=code, path=where)
            if code == "NoSuchBucket":
                return S3Error(f"S3 bucket '{self.settings.bucket}' does not exist", rule="s3-no-bucket",
                               got=code, path=where)
            return S3Error(f"S3 error while {what} ({code}: {msg})", rule="s3-error", got=code, path=where)
        if isinstance(e, bx.BotoCoreError):
            return S3Error(f"S3 request failed while {what}: {e}", rule="s3-error", path=where)
        return S3Error(f"S3 request failed while {what}: {e}", rule="s3-error", path=where)

    @staticmethod
    def _code(e: Any) -> str:
        resp = getattr(e, "response", None) or {}
        code = str(resp.get("Error", {}).get("Code", ""))
        return code or str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))

    # -- reading

    def file_exists(self, key: str) -> bool:
        """Whether ``key`` exists (403 counts as absent unless the credentials are wrong). While
        uploads are deferred a NAR (``nar/…``) not yet seen is reported absent at once and its
        upload, if one follows, checks first and skips a NAR the bucket has: the store asks only
        to decide whether to upload, and the NAR's check then runs in parallel with the rest."""
        if self._wait_pending(key):
            return True
        with self._lock:
            if self._deferred > 0 and key.startswith("nar/"):
                self._check_first.add(key)
                return False
        return self._exists_now(key)

    def _exists_now(self, key: str) -> bool:
        import botocore.exceptions as bx

        k = self._key(key)
        try:
            self.client.head_object(Bucket=self.settings.bucket, Key=k)
            return True
        except bx.ClientError as e:
            code = self._code(e)
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            if code not in ("403", "Forbidden"):
                raise self._error(e, f"checking '{key}'", key) from None
            # a HEAD answer has no body: ask with a GET what the 403 was
            f = self.get_file(key, first_byte_only=True)
            if f is None:
                return False
            f.close()
            return True
        except bx.BotoCoreError as e:
            raise self._error(e, f"checking '{key}'", key) from None

    def get_file(self, key: str, *, first_byte_only: bool = False, prefetched: bool = True) -> BinaryIO | None:
        """A streaming reader of ``key``, decoded by its ``Content-Encoding`` (``narinfo-compression``
        and friends); None when absent — also for ``AccessDenied``, which S3 answers for a missing key
        when the bucket is not listable (as Nix does). Wrong credentials raise."""
        import botocore.exceptions as bx

        if not first_byte_only:  # (a one-byte GET is how _exists_now asks, maybe from that very upload)
            ahead = self._take_prefetched(key) if prefetched else None
            if ahead is not None:
                return ahead.result()
            self._wait_pending(key)
        k = self._key(key)
        try:
            extra: dict[str, str] = {"Range": "bytes=0-0"} if first_byte_only else {}
            resp = self.client.get_object(Bucket=self.settings.bucket, Key=k, **extra)  # type: ignore[arg-type]
        except bx.ClientError as e:
            code = self._code(e)
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("AccessDenied", "403", "Forbidden"):
                if self._unsigned and not self._warned_unsigned:
                    self._warned_unsigned = True
                    log.warning("%s denies access to requests without credentials (none were found): "
                                "what it denies counts as absent", self.describe())
                log.debug("%s: %s answered %s: treated as absent", self.describe(), k, code)
                return None
            if code == "InvalidRange":  # an empty object asked for its first byte
                return io.BytesIO(b"")
            raise self._error(e, f"reading '{key}'", key) from None
        except bx.BotoCoreError as e:
            raise self._error(e, f"reading '{key}'", key) from None
        body = resp["Body"]
        encoding = (resp.get("ContentEncoding") or "").strip().lower()
        if first_byte_only or encoding in ("", "identity", "none"):
            return _Reader(self._guarded(body.read, key), body.close)  # type: ignore[return-value]
        if encoding not in _ENCODINGS:
            body.close()
            raise S3Error("S3 object has a Content-Encoding nartool cannot decode", rule="s3-error",
                          got=encoding, path=f"{self.describe()}/{key}")
        from ..compression import open_decompressed

        read, _method = open_decompressed(self._guarded(body.read, key))
        return _Reader(read, body.close)  # type: ignore[return-value]

    def _guarded(self, read: Callable[[int], bytes], key: str) -> Callable[[int], bytes]:
        """``read`` with botocore's errors (a connection lost mid-body) turned into ours."""
        import botocore.exceptions as bx

        def guarded(n: int) -> bytes:
            try:
                return read(n)
            except (bx.BotoCoreError, OSError) as e:
                raise self._error(e, f"reading '{key}'", key) from None

        return guarded

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (relative to the store's prefix), in S3's order."""
        import botocore.exceptions as bx

        base = self._key(prefix) if prefix else (self.settings.prefix + "/" if self.settings.prefix else "")
        strip = len(self.settings.prefix) + 1 if self.settings.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket, Prefix=base)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:]
        except (bx.ClientError, bx.BotoCoreError) as e:
            raise self._error(e, "listing the bucket", prefix) from None

    # -- writing

    def _encoding_for(self, key: str) -> str:
        s = self.settings
        if s.narinfo_compression and key.endswith(".narinfo"):
            return s.narinfo_compression
        if s.ls_compression and key.endswith(".ls"):
            return s.ls_compression
        if s.log_compression and key.startswith("log/"):
            return s.log_compression
        return ""

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (as Nix does when it opens an S3 store to write)."""
        import botocore.exceptions as bx

        if self._bucket_checked:
            return
        s = self.settings
        try:
            self.client.head_bucket(Bucket=s.bucket)
        except bx.ClientError as e:
            code = self._code(e)
            if code in ("403", "Forbidden", "AccessDenied"):
                # keys that may write objects but not list the bucket (or wrong ones, which the
                # first upload reports with S3's reason): the bucket is taken to exist
                log.debug("%s: HEAD of the bucket answered %s", self.describe(), code)
                self._bucket_checked = True
                return
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error(e, "checking the bucket", "") from None
            try:
                if s.region == "us-east-1":
                    self.client.create_bucket(Bucket=s.bucket)
                else:
                    self.client.create_bucket(Bucket=s.bucket,
                                              CreateBucketConfiguration={"LocationConstraint": s.region})  # type: ignore[typeddict-item]
            except bx.ClientError as e2:
                if self._code(e2) not in ("BucketAlreadyOwnedByYou",):
                    raise self._error(e2, "creating the bucket", "") from None
            log.info("created S3 bucket %s", s.bucket)
        except bx.BotoCoreError as e:
            raise self._error(e, "checking the bucket", "") from None
        self._bucket_checked = True

    def upsert_file(self, key: str, data: UploadData, *, mime: str) -> None:
        """Upload ``key`` (S3 makes an object visible only once it is complete). While uploads
        are deferred (:meth:`deferred`) this returns once the data is taken over, and the upload
        runs in the background."""
        with self._lock:
            deferred = self._deferred > 0
        if not deferred:
            self._upsert_now(key, data, mime)
            return
        self._submit(key, data, mime)

    def _upsert_now(self, key: str, data: UploadData, mime: str) -> None:
        import botocore.exceptions as bx

        k = self._key(key)
        encoding = self._encoding_for(key)
        try:
            if encoding:
                self._put_encoded(k, data, mime, encoding)
                return
            read, size = _upload_source(data)
            threshold = self.multipart_threshold
            if size is not None and size <= threshold:
                if size > _SPOOL_OVER and _whole_file(data):  # botocore streams it (no copy)
                    self.client.put_object(Bucket=self.settings.bucket, Key=k, Body=data,  # type: ignore[arg-type]
                                           ContentLength=size, ContentType=mime)
                    return
                self._put(k, read, size, mime)
                return
            if size is None:  # unknown: read up to the threshold to decide
                head = _read_part(read, threshold + 1)
                body, n = head
                if n <= threshold:
                    try:
                        r, _ = _upload_source(body)
                        self._put(k, r, n, mime)
                    finally:
                        if not isinstance(body, bytes):
                            body.close()
                    return
                read = _chain(body, read)
            if size is not None and size > MAX_OBJECT:
                raise S3Error("too large for one S3 object (5 TiB)", rule="s3-too-large", got=size,
                              path=f"{self.describe()}/{key}")
            self._multipart(k, read, size, mime)
        except (bx.ClientError, bx.BotoCoreError) as e:
            raise self._error(e, f"uploading '{key}'", key) from None

    @property
    def multipart_threshold(self) -> int:
        """Above this many bytes an upload is multipart."""
        s = self.settings
        return max(s.buffer_size, 1) if s.multipart_upload else MAX_SINGLE_PUT

    def _put(self, k: str, read: Callable[[int], bytes], size: int, mime: str, encoding: str = "") -> None:
        body, n = _read_part(read, size)
        try:
            if n != size:
                raise S3Error("upload data ended early", rule="s3-error", expected=size, got=n, path=k)
            extra: dict[str, str] = {"ContentEncoding": encoding} if encoding else {}
            self.client.put_object(Bucket=self.settings.bucket, Key=k, Body=body, ContentLength=n,
                                   ContentType=mime, **extra)  # type: ignore[arg-type]
        finally:
            if not isinstance(body, bytes):
                body.close()

    def _put_encoded(self, k: str, data: UploadData, mime: str, encoding: str) -> None:
        from ..compression import compressor

        out = b"".join(bytes(c) for c in compressor(iter_upload(data), encoding))
        self._put(k, io.BytesIO(out).read, len(out), mime, encoding)

    def _multipart(self, k: str, read: Callable[[int], bytes], size: int | None, mime: str) -> None:
        """A multipart upload of what ``read`` gives (``size`` bytes if known); aborted on any failure."""
        bucket = self.settings.bucket
        first = part_size_for(size, self.settings.buffer_size)
        upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=k, ContentType=mime)["UploadId"]
        log.debug("multipart upload of %s/%s: %s, parts of %d bytes", self.describe(), k, upload_id, first)
        pool = ThreadPoolExecutor(max_workers=self.part_workers, thread_name_prefix="s3-part")
        inflight: deque[Future[dict[str, Any]]] = deque()
        parts: list[dict[str, Any]] = []
        try:
            number = 0
            total = 0
            while True:
                if self._cancel.is_set():
                    raise _Cancelled(f"multipart upload of {k} cancelled")
                number += 1
                want = part_size_at(first, number, size is not None)
                body, n = _read_part(read, want)
                if n == 0 and number > 1:
                    if not isinstance(body, bytes):
                        body.close()
                    break
                if number > MAX_PARTS:
                    raise S3Error(f"too large for one S3 multipart upload ({MAX_PARTS} parts)",
                                  rule="s3-too-large", got=total, path=k)
                total += n
                while len(inflight) >= self.part_workers:
                    parts.append(inflight.popleft().result())
                inflight.append(pool.submit(self._upload_part, k, upload_id, number, body, n))
                if n < want:
                    break
            while inflight:
                parts.append(inflight.popleft().result())
            if size is not None and total != size:
                raise S3Error("upload data changed size while being sent", rule="s3-error", expected=size,
                              got=total, path=k)
            self.client.complete_multipart_upload(Bucket=bucket, Key=k, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]
        except BaseException:
            for f in inflight:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            self._abort(k, upload_id)
            raise
        finally:
            pool.shutdown(wait=True)

    def _upload_part(self, k: str, upload_id: str, number: int, body: bytes | BinaryIO, n: int) -> dict[str, Any]:
        try:
            r = self.client.upload_part(Bucket=self.settings.bucket, Key=k, UploadId=upload_id, PartNumber=number,
                                        Body=body, ContentLength=n)
            return {"PartNumber": number, "ETag": r["ETag"]}
        finally:
            if not isinstance(body, bytes):
                body.close()

    def _abort(self, k: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.settings.bucket, Key=k, UploadId=upload_id)
            log.debug("aborted multipart upload %s of %s", upload_id, k)
        except Exception as e:  # the original failure is what the caller must see
            log.warning("could not abort the multipart upload %s of s3://%s/%s: %s", upload_id,
                        self.settings.bucket, k, e)

    def incomplete_uploads(self) -> list[tuple[str, str]]:
        """``(key, upload id)`` of the bucket's multipart uploads in progress under this store's prefix."""
        import botocore.exceptions as bx

        try:
            resp = self.client.list_multipart_uploads(Bucket=self.settings.bucket,
                                                      Prefix=self.settings.prefix)
        except (bx.ClientError, bx.BotoCoreError) as e:
            raise self._error(e, "listing multipart uploads", "") from None
        return [(u["Key"], u["UploadId"]) for u in resp.get("Uploads", [])]

    # -- deferred uploads

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block, uploads run in the background, several at once (``upload_workers``
        files, each multipart upload with its own parts in parallel), with one rule of order: a
        narinfo is uploaded only once the uploads it names succeeded — its NAR (``URL``), its
        ``.ls`` and the narinfos of its references — so a narinfo never appears before them. At
        most ``4 × upload_workers`` uploads wait at a time (the caller blocks beyond that). The
        block ends when every upload has ended; the first failure is raised (the block's own
        error wins if it failed)."""
        with self._lock:
            self._deferred += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.upload_workers, thread_name_prefix="s3-upload")
                self._meta_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-narinfo")
                self._slots = threading.BoundedSemaphore(4 * self.upload_workers)
        try:
            try:
                yield
            except BaseException as e:
                if not isinstance(e, Exception):  # interrupted (Ctrl-C, SIGTERM): stop, do not finish
                    self._cancel.set()
                self.flush(raise_errors=False)
                raise
            try:
                self.flush()
            except BaseException as e:
                if not isinstance(e, Exception):  # interrupted while waiting for the uploads
                    self._cancel.set()
                    self.flush(raise_errors=False)
                raise
        finally:
            with self._lock:
                self._deferred -= 1
                if self._deferred == 0:
                    self._cancel.clear()
                pools = (self._pool, self._meta_pool) if self._deferred == 0 else (None, None)
                if self._deferred == 0:
                    self._pool = self._meta_pool = None
            for pool in pools:
                if pool is not None:
                    pool.shutdown(wait=True)

    def flush(self, *, raise_errors: bool = True) -> None:
        """Wait for every deferred upload; raise the first failure (and forget it)."""
        with self._lock:
            futures, self._submitted = self._submitted, []
        for i, f in enumerate(futures):
            try:
                f.exception()  # waits; the failure itself is in self._failure
            except BaseException:  # interrupted while waiting: the rest still to be waited for
                with self._lock:
                    self._submitted[:0] = futures[i:]
                raise
        with self._lock:
            for k in [k for k, f in self._pending.items() if f.done()]:
                del self._pending[k]
            self._check_first.clear()
            failure, self._failure = self._failure, None
        if failure is not None and raise_errors:
            raise failure

    def _wait_pending(self, key: str) -> bool:
        """If ``key`` is being uploaded in the background: wait, True once it is there."""
        with self._lock:
            f = self._pending.get(key)
        if f is None:
            return False
        f.result()
        return True

    def _narinfo_deps(self, key: str, data: UploadData) -> list[Future[None]]:
        """The pending uploads a narinfo must follow: its NAR, its ``.ls``, its references'
        narinfos (all pending uploads, if the narinfo cannot be read). Under ``self._lock``."""
        if not isinstance(data, bytes):
            return list(self._submitted)
        names = [key[: -len(".narinfo")] + ".ls"]
        for line in data.decode("utf-8", "replace").split("\n"):
            field, _, value = line.partition(": ")
            if field == "URL":
                names.append(value)
            elif field == "References":
                names += [r[:32] + ".narinfo" for r in value.split()]
        return [self._pending[n] for n in names if n != key and n in self._pending]

    def _submit(self, key: str, data: UploadData, mime: str) -> None:
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure
        owned = _take_over(data)
        assert self._slots is not None
        self._slots.acquire()
        try:
            with self._lock:
                narinfo = key.endswith(".narinfo")
                deps = self._narinfo_deps(key, owned) if narinfo else []
                pool = self._meta_pool if narinfo else self._pool
                assert pool is not None
                fut = pool.submit(self._run_deferred, key, owned, mime, deps)
                self._pending[key] = fut
                self._submitted.append(fut)
        except BaseException:
            self._slots.release()
            _close(owned)
            raise
        slots = self._slots
        fut.add_done_callback(lambda _f: slots.release())

    def _run_deferred(self, key: str, data: UploadData, mime: str, deps: list[Future[None]]) -> None:
        try:
            if self._cancel.is_set():
                raise _Cancelled(f"upload of {key} cancelled")
            for f in deps:  # a narinfo: only once its NAR, listing and references are there
                if f.exception() is not None:
                    raise S3Error("not uploaded: an upload it must follow failed", rule="s3-error",
                                  path=f"{self.describe()}/{key}")
            with self._lock:
                check = key in self._check_first
                self._check_first.discard(key)
            if check and self._exists_now(key):
                log.debug("%s: %s is there already: not uploaded again", self.describe(), key)
                return
            self._upsert_now(key, data, mime)
        except BaseException as e:
            with self._lock:
                if self._failure is None:
                    self._failure = e
            raise
        finally:
            _close(data)

    # -- prefetched downloads

    @contextmanager
    def prefetching(self, keys: list[str], *, window: int = 4) -> Iterator[None]:
        """Inside the block, the files ``keys`` are downloaded ahead, ``window`` at a time and in
        this order, each into a temporary file; :meth:`get_file` of one of them waits for its
        download and hands the file over (a failed download raises there). Meant for reading
        NARs one after another (a pull): the next ones are on their way while one is checked."""
        order = deque(dict.fromkeys(keys))
        pool = ThreadPoolExecutor(max_workers=max(1, window), thread_name_prefix="s3-prefetch")
        futures: dict[str, Future[BinaryIO | None]] = {}

        def more() -> None:  # under self._lock
            while order and len(futures) < window:
                k = order.popleft()
                futures[k] = pool.submit(self._download, k)

        with self._lock:
            self._prefetch = (futures, more)
            more()
        try:
            yield
        finally:
            with self._lock:
                self._prefetch = None
                order.clear()
                left = list(futures.values())
                futures.clear()
            for f in left:
                f.cancel()
            pool.shutdown(wait=True)
            for f in left:
                if not f.cancelled() and f.exception() is None:
                    got = f.result()
                    if got is not None:
                        got.close()

    def _download(self, key: str) -> BinaryIO | None:
        f = self.get_file(key, prefetched=False)
        if f is None:
            return None
        spool: BinaryIO = tempfile.SpooledTemporaryFile(max_size=MiB)  # type: ignore[assignment]  # noqa: SIM115
        try:
            with f:
                while True:
                    b = f.read(MiB)
                    if not b:
                        break
                    spool.write(b)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool

    def _take_prefetched(self, key: str) -> Future[BinaryIO | None] | None:
        with self._lock:
            if self._prefetch is None:
                return None
            futures, more = self._prefetch
            f = futures.pop(key, None)
            more()
        return f

    def close(self) -> None:
        self.flush(raise_errors=False)
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()


def _whole_file(data: UploadData) -> bool:
    """Whether ``data`` is a regular file positioned at its start (botocore may rewind it to retry)."""
    fileno = getattr(data, "fileno", None)
    if fileno is None:
        return False
    try:
        return stat.S_ISREG(os.fstat(fileno()).st_mode) and data.tell() == 0  # type: ignore[union-attr]
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def _take_over(data: UploadData) -> UploadData:
    """``data`` in a form that stays valid after the caller returns: bytes as they are, a regular
    file through a duplicate of its descriptor (no copy: the caller may close its own), anything
    else spooled to a temporary file."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    fileno = getattr(data, "fileno", None)
    if fileno is not None:
        try:
            fd = fileno()
            if stat.S_ISREG(os.fstat(fd).st_mode):
                f: BinaryIO = data  # type: ignore[assignment]
                pos = f.tell()
                f.flush()
                dup = os.fdopen(os.dup(fd), "rb")
                dup.seek(pos)
                return dup
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
    spool: BinaryIO = tempfile.SpooledTemporaryFile(max_size=_SPOOL_OVER)  # type: ignore[assignment]  # noqa: SIM115
    try:
        for chunk in iter_upload(data):
            spool.write(chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


def _close(data: UploadData) -> None:
    close = getattr(data, "close", None)
    if close is not None and not isinstance(data, (bytes, bytearray, memoryview)):
        close()


def _chain(first: bytes | BinaryIO, rest: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """``read(n)`` of ``first`` (bytes, or a file closed once read), then of ``rest``."""
    state: dict[str, Any] = {"f": io.BytesIO(first) if isinstance(first, bytes) else first}

    def read(n: int) -> bytes:
        f = state["f"]
        if f is not None:
            b: bytes = f.read(n)
            if b:
                return b
            f.close()
            state["f"] = None
        return rest(n)

    return read


class S3CacheStore(BinaryCacheStore):
    """A binary cache in an S3 bucket: :class:`~nartool.cache.store.BinaryCacheStore` over
    :class:`S3Backend`. Inside :meth:`batch` (which a copy opens around its paths) uploads run
    in parallel (:meth:`S3Backend.deferred`: NARs several at once, each narinfo after its NAR and
    its references'); the batch ends once all are done. The bucket is created on the first
    write if it does not exist, as Nix does."""

    backend: S3Backend

    def __init__(self, backend: S3Backend, *, store_dir: str = DEFAULT_STORE_DIR,
                 params: Mapping[str, str] | None = None) -> None:
        super().__init__(backend, store_dir=store_dir, params=params, backend_params=S3_PARAMS, scheme="s3")

    def cache_info(self) -> CacheInfo:
        """``nix-cache-info``; a bucket that does not exist yet is an empty cache (a first write
        creates it), reading a path from it is then an error."""
        try:
            return super().cache_info()
        except S3Error as e:
            if e.rule != "s3-no-bucket":
                raise
            log.debug("%s: no such bucket (yet)", self.uri)
            return CacheInfo()

    def _init_for_writing(self) -> None:
        if not self._cache_info_written:
            self.backend.ensure_bucket()
        super()._init_for_writing()

    @contextmanager
    def _batch(self) -> Iterator[None]:
        with self.backend.deferred():
            yield

    def batch(self, *, keep_on_error: bool = False) -> AbstractContextManager[None]:
        """Uploads inside the block run in parallel; the block ends when they have. A failure
        leaves what was complete before it (narinfos only of paths whose uploads all succeeded),
        whatever ``keep_on_error`` says: S3 has no transactions."""
        return self._batch()

    def commit_pending(self) -> int:
        self.backend.flush()
        return 0

    #: lookups (narinfo GETs, HEADs) sent at once by the bulk queries
    query_workers = 8

    def _fan_out(self, paths: Iterable[str], one: Callable[[list[str]], Any]) -> list[Any]:
        ps = list(dict.fromkeys(paths))
        if len(ps) <= 1:
            return [one(ps)]
        self.cache_info()  # once, before the threads
        with ThreadPoolExecutor(max_workers=min(self.query_workers, len(ps)), thread_name_prefix="s3-query") as pool:
            return list(pool.map(lambda p: one([p]), ps))

    def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        """One request per path, several at once (S3 has no bulk lookup)."""
        out: set[str] = set()
        for r in self._fan_out(paths, super().query_valid_paths):
            out |= r
        return out

    def query_path_infos(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        """One narinfo GET per path, several at once."""
        out: dict[str, PathInfo] = {}
        for r in self._fan_out(paths, super().query_path_infos):
            out.update(r)
        return out

    def send_nars(self, infos: Sequence[PathInfo], consume: ConsumeFn, *,
                  on_bytes: Callable[[int], None] | None = None,
                  before_wait: Callable[[], None] | None = None) -> None:
        """As every store does, with the next NAR files downloaded ahead (four at a time) while
        one is checked and consumed."""
        urls = []
        for info in infos:
            ni = self.narinfo(info.path)
            if ni is not None:
                urls.append(ni.url)
        with self.backend.prefetching(urls):
            super().send_nars(infos, consume, on_bytes=on_bytes, before_wait=before_wait)

    def all_paths(self) -> list[str]:
        """Every path with a narinfo at the top of the bucket (or prefix)."""
        out = []
        for key in self.backend.list_keys():
            if "/" in key or not key.endswith(".narinfo") or len(key) != 32 + len(".narinfo"):
                continue
            path = self.query_path_from_hash_part(key[:32])
            if path is not None:
                out.append(path)
        return sorted(out)

    def close(self) -> None:
        self.backend.close()


def open_s3_store(u: StoreURI, store_dir: str, opts: Mapping[str, Any]) -> S3CacheStore:
    """The ``s3://BUCKET[/PREFIX]`` opener (registered in :mod:`nartool.store.uri`)."""
    settings = parse_settings(u.authority, dict(u.params))
    return S3CacheStore(S3Backend(settings), store_dir=store_dir, params=u.params)


__all__ = ["S3CacheStore", "open_s3_store", "S3Backend", "S3Settings", "S3Error", "Boto3MissingError", "parse_settings", "S3_PARAMS",
           "part_size_for", "part_size_at", "require_boto3", "MIN_PART", "MAX_PARTS", "MAX_SINGLE_PUT"]
