"""The lookup cache: answers of remote binary caches (``nix-cache-info``, narinfos — present
*and* absent) kept in the user's cache directory, so that asking a cache about a path does not
cost a request every time, yet never goes stale.

Like Nix's narinfo disk cache (``~/.cache/nix/binary-cache-v6.sqlite``) an answer is used
without any request while it is *fresh*: for ``narinfo-cache-positive-ttl`` seconds when the
cache had the file, ``narinfo-cache-negative-ttl`` seconds when it had not (Nix's setting names;
both default to one hour here, see :data:`DEFAULT_POSITIVE_TTL`). Unlike Nix, an answer that
is no longer fresh is not thrown away but *revalidated*: the request carries ``If-None-Match``
(the stored ``ETag``) and ``If-Modified-Since`` (the stored ``Last-Modified``), and a
``304 Not Modified`` keeps the stored answer and restarts its clock — the HTTP download cache
semantics Nix uses for fetchers, applied to binary caches. A ``200`` whose ``ETag`` equals
the stored one counts as a ``304`` (servers that ignore ``If-None-Match``).

``refresh`` (the CLI's ``--refresh``) treats every stored answer as stale, once per process:
each is revalidated on its first use. Adding a path to a cache through nartool drops the
negative answers for it (:meth:`LookupCache.forget`), so "I pushed, but it is still missing"
does not happen for pushes nartool makes. A transfer error (the server is unreachable) while a
stored answer exists uses that answer with a warning, as Nix's fetchers do.

Storage: one SQLite database, ``$XDG_CACHE_HOME/nartool/binary-cache-v1.sqlite`` (default
``~/.cache/nartool/…``), in WAL mode with a busy timeout, so any number of processes (and
threads: a connection is shared under a lock) use it at once. A cache database that cannot be
opened (read-only home, corrupt file) is reported once and nartool goes on without one.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._log import get_logger
from ..errors import StoreError
from .backend import CacheUnavailableError

log = get_logger(__name__)

#: Seconds a present answer (a narinfo, ``nix-cache-info``) is used without asking again.
#: Nix's ``narinfo-cache-positive-ttl`` defaults to 30 days because Nix never revalidates;
#: nartool revalidates (a ``304`` costs one round trip and no body), so it can afford an hour,
#: which notices re-signed narinfos and collected NARs in time.
DEFAULT_POSITIVE_TTL = 3600
#: Seconds an absent answer (404/403) is used without asking again (Nix's default too).
DEFAULT_NEGATIVE_TTL = 3600

DB_NAME = "binary-cache-v1.sqlite"
#: the default of ``refresh`` for lookup caches opened from the settings (the CLI's ``--refresh``
REFRESH = False


def set_refresh(value: bool = True) -> None:
    """Make every lookup cache opened from now on revalidate stored answers (``--refresh``)."""
    global REFRESH
    REFRESH = value

_SCHEMA = """
create table if not exists Lookups (
    cache        text not null,
    key          text not null,
    present      integer not null,
    body         blob,
    etag         text,
    lastModified text,
    timestamp    integer not null,
    primary key (cache, key)
)
"""


class TransferError(StoreError):
    """Talking to a cache failed (no answer, or a server error): not an answer about a file.
    ``url`` is what was asked, ``status`` the HTTP status when there was one."""

    def __init__(self, message: str, *, url: str, status: int | None = None, rule: str = "transfer-failed",
                 expected: object = None, got: object = None) -> None:
        super().__init__(message, path=url, rule=rule, expected=expected, got=got)
        self.url = url
        self.status = status


@dataclass(frozen=True)
class Entry:
    """One stored answer: whether the file was there, its bytes, its validators and when the
    answer was last confirmed (Unix seconds)."""

    present: bool
    body: bytes | None
    etag: str | None
    last_modified: str | None
    timestamp: int


@dataclass(frozen=True)
class Answer:
    """What a (conditional) request got: ``status`` is ``"ok"`` (``body`` holds the file),
    ``"absent"`` (404/403) or ``"not-modified"`` (304)."""

    status: str
    body: bytes | None = None
    etag: str | None = None
    last_modified: str | None = None


#: ``fetch(previous)``: one request; ``previous`` (a stored present answer or None) supplies the
#: validators to send. Raises :class:`TransferError` (or ``OSError``) when there is no answer.
Fetch = Callable[[Entry | None], Answer]


def default_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nartool", DB_NAME)


class LookupCache:
    """The lookup cache (see the module docstring). ``path=":memory:"`` keeps it in memory
    (tests, or when the disk is unusable); ``clock`` returns Unix seconds."""

    def __init__(self, path: str | None = None, *, positive_ttl: int = DEFAULT_POSITIVE_TTL,
                 negative_ttl: int = DEFAULT_NEGATIVE_TTL, refresh: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path or default_path()
        self.positive_ttl = positive_ttl
        self.negative_ttl = negative_ttl
        self.refresh = refresh
        self.clock = clock
        self._lock = threading.Lock()
        self._revalidated: set[tuple[str, str]] = set()
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = self._open(self.path)
        except (sqlite3.Error, OSError) as e:
            log.warning("warning: cannot use the lookup cache '%s' (%s); going on without it", self.path, e)

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        if path != ":memory:":
            os.makedirs(os.path.dirname(path), exist_ok=True)
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            if path != ":memory:":
                conn.execute("pragma journal_mode = wal")
            conn.execute("pragma synchronous = normal")
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- rows -----------------------------------------------------------------------------

    def get(self, cache: str, key: str) -> Entry | None:
        with self._lock:
            if self._conn is None:
                return None
            try:
                row = self._conn.execute(
                    "select present, body, etag, lastModified, timestamp from Lookups where cache = ? and key = ?",
                    (cache, key)).fetchone()
            except sqlite3.Error as e:
                log.debug("lookup cache read failed: %s", e)
                return None
        if row is None:
            return None
        return Entry(bool(row[0]), None if row[1] is None else bytes(row[1]), row[2], row[3], int(row[4]))

    def put(self, cache: str, key: str, entry: Entry) -> None:
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute(
                    "insert or replace into Lookups (cache, key, present, body, etag, lastModified, timestamp) "
                    "values (?, ?, ?, ?, ?, ?, ?)",
                    (cache, key, int(entry.present), entry.body, entry.etag, entry.last_modified, entry.timestamp))
            except sqlite3.Error as e:
                log.debug("lookup cache write failed: %s", e)

    def forget(self, cache: str, key: str, *, negative_only: bool = False) -> None:
        """Drop the stored answer for ``key`` (only an absent one with ``negative_only``)."""
        with self._lock:
            self._revalidated.discard((cache, key))
            if self._conn is None:
                return
            try:
                self._conn.execute("delete from Lookups where cache = ? and key = ?"
                                   + (" and present = 0" if negative_only else ""), (cache, key))
            except sqlite3.Error as e:
                log.debug("lookup cache write failed: %s", e)

    def is_fresh(self, cache: str, key: str, entry: Entry) -> bool:
        if self.refresh and (cache, key) not in self._revalidated:
            return False
        ttl = self.positive_ttl if entry.present else self.negative_ttl
        return ttl > 0 and entry.timestamp + ttl > self.clock()

    # -- the protocol ---------------------------------------------------------------------

    def lookup(self, cache: str, key: str, fetch: Fetch, *, revalidate: bool = False) -> bytes | None:
        """The file ``key`` of ``cache`` (None when absent): the stored answer while fresh,
        else ``fetch`` with the stored validators; ``revalidate`` asks even when fresh."""
        entry = self.get(cache, key)
        if entry is not None and not revalidate and self.is_fresh(cache, key, entry):
            return entry.body if entry.present else None
        previous = entry if entry is not None and entry.present else None
        try:
            got = fetch(previous)
        except (TransferError, CacheUnavailableError, OSError) as e:
            if entry is None:
                raise
            log.warning("warning: %s; using the answer stored %s ago", e, _ago(self.clock() - entry.timestamp))
            return entry.body if entry.present else None
        now = int(self.clock())
        with self._lock:
            self._revalidated.add((cache, key))
        if got.status == "not-modified" or (
                got.status == "ok" and previous is not None and got.etag is not None and got.etag == previous.etag):
            if previous is None:  # a 304 to an unconditional request: ask again without validators
                raise TransferError("unexpected 304 Not Modified to an unconditional request", url=f"{cache}/{key}",
                                    status=304, rule="bad-response")
            self.put(cache, key, Entry(True, previous.body, got.etag or previous.etag,
                                       got.last_modified or previous.last_modified, now))
            return previous.body
        if got.status == "absent":
            self.put(cache, key, Entry(False, None, None, None, now))
            return None
        self.put(cache, key, Entry(True, got.body, got.etag, got.last_modified, now))
        return got.body


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"


__all__ = ["LookupCache", "set_refresh", "REFRESH", "Entry", "Answer", "Fetch", "TransferError", "default_path", "DEFAULT_POSITIVE_TTL",
           "DEFAULT_NEGATIVE_TTL"]
