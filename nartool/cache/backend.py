"""What a binary cache is stored on: a :class:`CacheBackend` (a directory, an HTTP server, an
S3 bucket). :class:`~nartool.cache.store.BinaryCacheStore` does everything else (narinfos,
compression, signatures, checks) over these four calls.

Keys are relative, ``/``-separated (``nix-cache-info``, ``<hash>.narinfo``, ``<hash>.ls``,
``nar/<filehash>.nar.xz``, ``log/<drv>``); :func:`check_key` is what every backend applies to
a key before using it, so that nothing a narinfo says reaches outside the cache.

Errors: a backend raises :class:`CacheUnavailableError` when the cache cannot be reached at
all (connection refused or timed out, directory missing when reading is not possible): a
substituter that raises it is skipped for the rest of the run. Any other failure is a
:class:`~nartool.errors.StoreError` (or subclass) with a clear message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO, Protocol, runtime_checkable

from ..errors import StoreError

#: MIME types of the files of a cache (what Nix sends with an upload)
MIME_NARINFO = "text/x-nix-narinfo"
MIME_NAR = "application/x-nix-nar"
MIME_CACHE_INFO = "text/x-nix-cache-info"
MIME_LISTING = "application/json"
MIME_LOG = "text/plain; charset=utf-8"

#: the data an upload takes: bytes, an iterable of chunks, or a binary file (read to its end)
UploadData = bytes | Iterable[bytes] | BinaryIO


class CacheUnavailableError(StoreError):
    """The cache cannot be reached at all (``rule="unavailable"``)."""

    def __init__(self, message: str, *, where: str, got: object = None) -> None:
        super().__init__(message, rule="unavailable", path=where, got=got)


@runtime_checkable
class CacheBackend(Protocol):
    """Storage of a binary cache: files by key."""

    def file_exists(self, key: str) -> bool:
        """Whether ``key`` exists (a ``HEAD``; 403 counts as absent, as for Nix)."""
        ...

    def get_file(self, key: str) -> BinaryIO | None:
        """A streaming reader of ``key`` (the caller closes it); None when absent."""
        ...

    def upsert_file(self, key: str, data: UploadData, *, mime: str) -> None:
        """Create or replace ``key`` atomically: readers see the old file or the whole new one."""
        ...

    def describe(self) -> str:
        """The cache's URI as Nix shows it (``file:///srv/cache``, ``https://host/prefix``)."""
        ...


def check_key(key: str) -> str:
    """``key`` if it is a safe relative key, else a :class:`StoreError` (``rule="bad-key"``):
    non-empty ``/``-separated components, none empty, ``.`` or ``..``, no backslash, NUL,
    control character, ``?`` or ``#``, not absolute."""
    from .narinfo import check_url

    why = check_url(key)
    if why:
        raise StoreError(f"refusing the cache key: {why}", rule="bad-key", got=key[:200])
    return key


def iter_upload(data: UploadData, chunk: int = 1 << 20) -> Iterable[bytes]:
    """The chunks of an upload, whatever form it came in."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
        return
    read = getattr(data, "read", None)
    if read is not None:
        while True:
            b = read(chunk)
            if not b:
                return
            yield b
    else:
        for b in data:
            yield bytes(b)


__all__ = ["CacheBackend", "CacheUnavailableError", "check_key", "iter_upload", "UploadData", "MIME_NARINFO",
           "MIME_NAR", "MIME_CACHE_INFO", "MIME_LISTING", "MIME_LOG"]
