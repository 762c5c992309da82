"""The store database: Nix's SQLite schema (version 10) at ``<state>/db/db.sqlite``.

Compatible both ways with Nix 2.8: same tables, columns, indexes and trigger (equivalent
DDL, ``create … if not exists``), same value conventions (``hash`` as ``sha256:<base16>``,
NULL rather than 0/"" for absent ``ultimate``/``sigs``/``deriver``/``ca``). Connection
policy, chosen so the WAL cannot grow without bound under sustained load:

* WAL mode, ``synchronous = normal``, foreign keys on, a long busy timeout plus retries;
* ``journal_size_limit`` so a checkpointed WAL is truncated, and an explicit passive
  checkpoint after a batch commit (a quiet point) once the WAL passed 2 MiB, a truncating one
  on close;
* short transactions: reads are single statements, each registration batch is one
  ``BEGIN IMMEDIATE … COMMIT``, garbage collection invalidates path by path; never VACUUM.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from ..errors import StoreError
from ..hashes import Hash
from .types import PathInfo

try:  # the C module itself (as nartool.build.zygote takes _socket): the sqlite3 package around it
    # adds only adapters for date and time values, which the store never holds, and loads the
    # pure-Python datetime for them (~1.5 ms of every command's start)
    import _sqlite3 as sqlite3
except ImportError:  # pragma: no cover - an interpreter without it
    import sqlite3  # type: ignore[no-redef]

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

SCHEMA_VERSION = 10
#: truncate the WAL to this size after checkpoints
JOURNAL_SIZE_LIMIT = 64 << 20
#: explicit checkpoints after a batch once the WAL is larger than this
CHECKPOINT_WAL_BYTES = 2 << 20
#: automatic checkpoint every N pages (SQLite's default; Nix 2.8 uses 40000)
WAL_AUTOCHECKPOINT = 1000

_SCHEMA = """
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"""


def _row_info(row: Sequence[object], refs: Iterable[str]) -> PathInfo:
    path, h, regtime, deriver, nar_size, ultimate, sigs, ca = row
    assert isinstance(h, str)
    return PathInfo(
        path=str(path),
        nar_hash=Hash.parse(h),
        nar_size=int(nar_size or 0),  # type: ignore[call-overload]
        references=frozenset(refs),
        deriver=str(deriver) if deriver else None,
        registration_time=int(regtime or 0),  # type: ignore[call-overload]
        ultimate=bool(ultimate),
        sigs=frozenset(str(sigs).split()) if sigs else frozenset(),
        ca=str(ca) if ca else None,
    )


class StoreDB:
    """One connection to a store database; safe to share between threads of one process."""

    def __init__(self, db_dir: str, *, create: bool = True) -> None:
        self.db_dir = db_dir
        self.path = os.path.join(db_dir, "db.sqlite")
        schema_file = os.path.join(db_dir, "schema")
        if not os.path.exists(self.path) and not create:
            raise StoreError("no store database here", path=self.path, rule="no-store")
        os.makedirs(db_dir, exist_ok=True)
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        c = self.conn
        self._retry(lambda: c.execute("pragma foreign_keys = 1"))
        self._retry(lambda: c.execute("pragma synchronous = normal"))
        mode = self._retry(lambda: c.execute("pragma main.journal_mode").fetchone()[0])
        want = "wal" if use_wal(db_dir) else "truncate"
        if str(mode).lower() != want:
            self._retry(lambda: c.execute(f"pragma main.journal_mode = {want}"))
        c.execute(f"pragma wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
        c.execute(f"pragma main.journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        if os.path.exists(schema_file):
            with open(schema_file) as f:
                text = f.read().strip()
            if text != str(SCHEMA_VERSION):
                raise StoreError("unsupported store database schema version", expected=SCHEMA_VERSION, got=text,
                                 path=schema_file, rule="schema")
        else:
            with self.transaction():
                for stmt in _statements(_SCHEMA):
                    c.execute(stmt)
            tmp = schema_file + f".tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(str(SCHEMA_VERSION))
            os.replace(tmp, schema_file)

    # -- plumbing ---------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying while the database is busy (the timeout covers most waits)."""
        delay = 0.01
        deadline = time.monotonic() + 3600
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                msg = str(e)
                if ("locked" not in msg and "busy" not in msg) or time.monotonic() > deadline:
                    raise StoreError(f"store database error: {msg}", path=self.path, rule="db") from e
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE … COMMIT`` (rolled back on error)."""
        with self._lock:
            self._retry(lambda: self.conn.execute("begin immediate"))
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("rollback")
                raise
            self._retry(lambda: self.conn.execute("commit"))

    def maybe_checkpoint(self, wal_bytes: int = CHECKPOINT_WAL_BYTES) -> None:
        """A passive checkpoint at a quiet point, when the WAL has grown past ``wal_bytes``
        (cheap otherwise: one stat; a checkpoint per tiny batch would cost an fsync each)."""
        try:
            size = os.stat(self.path + "-wal").st_size
        except OSError:
            return
        if size > wal_bytes:
            self.checkpoint()

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        """Copy WAL frames into the database at a quiet point; TRUNCATE also empties the WAL."""
        with self._lock:
            try:
                self.conn.execute(f"pragma wal_checkpoint({mode})").fetchall()
            except sqlite3.OperationalError:
                pass  # busy: the next quiet point will do it

    def close(self) -> None:
        with self._lock:
            self.checkpoint("TRUNCATE")
            self.conn.close()

    def _q(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._retry(lambda: self.conn.execute(sql, args).fetchall())

    # -- queries ----------------------------------------------------------------------------

    def path_id(self, path: str) -> int | None:
        rows = self._q("select id from ValidPaths where path = ?", (path,))
        return int(rows[0][0]) if rows else None  # type: ignore[call-overload]

    def is_valid(self, path: str) -> bool:
        return bool(self._q("select 1 from ValidPaths where path = ?", (path,)))

    def valid_subset(self, paths: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(paths))
        out: set[str] = set()
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            out.update(str(r[0]) for r in self._q(f"select path from ValidPaths where path in ({marks})", part))
        return out

    def references(self, path: str) -> set[str]:
        return {str(r[0]) for r in self._q(
            "select v2.path from ValidPaths v1 join Refs r on r.referrer = v1.id "
            "join ValidPaths v2 on v2.id = r.reference where v1.path = ?", (path,))}

    def referrers(self, path: str) -> set[str]:
        return {str(r[0]) for r in self._q(
            "select v1.path from ValidPaths v2 join Refs r on r.reference = v2.id "
            "join ValidPaths v1 on v1.id = r.referrer where v2.path = ?", (path,))}

    def info(self, path: str) -> PathInfo | None:
        rows = self._q("select path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca "
                       "from ValidPaths where path = ?", (path,))
        if not rows:
            return None
        return _row_info(rows[0], self.references(path))

    def closure_paths(self, paths: Iterable[str]) -> set[str]:
        """The valid paths among ``paths`` and every path they refer to, directly or not (one
        recursive query over ``Refs`` per 500 paths)."""
        wanted = list(dict.fromkeys(paths))
        out: set[str] = set()
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            out.update(str(r[0]) for r in self._q(
                f"with recursive c(id) as (select id from ValidPaths where path in ({marks}) "
                "union select r.reference from Refs r join c on r.referrer = c.id) "
                "select v.path from c join ValidPaths v on v.id = c.id", part))
        return out

    def infos(self, paths: Iterable[str], *, closure: bool = False) -> dict[str, PathInfo]:
        """Infos of the valid ones among ``paths`` or, with ``closure``, of every member of their
        closure (a recursive query over ``Refs``): two queries per 500 paths, whatever the depth."""
        wanted = list(dict.fromkeys(paths))
        rows: list[tuple[object, ...]] = []
        refs: dict[str, list[str]] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            marks = ",".join("?" * len(part))
            if closure:
                head = (f"with recursive c(id) as (select id from ValidPaths where path in ({marks}) "
                        "union select r.reference from Refs r join c on r.referrer = c.id) ")
                members, where = "c join ValidPaths v on v.id = c.id", ""
            else:
                head, members, where = "", "ValidPaths v", f" where v.path in ({marks})"
            with self._lock:
                rows += self._q(f"{head}select v.path, v.hash, v.registrationTime, v.deriver, v.narSize, "
                                f"v.ultimate, v.sigs, v.ca from {members}{where}", part)
                for a, b in self._q(f"{head}select v.path, v2.path from {members} join Refs r on r.referrer = v.id "
                                    f"join ValidPaths v2 on v2.id = r.reference{where}", part):
                    refs.setdefault(str(a), []).append(str(b))
        return {str(r[0]): _row_info(r, refs.get(str(r[0]), ())) for r in rows}

    def derivation_outputs(self, drv: str) -> dict[str, str]:
        return {str(a): str(b) for a, b in self._q(
            "select d.id, d.path from DerivationOutputs d join ValidPaths v on v.id = d.drv where v.path = ?",
            (drv,))}

    def derivers_of_output(self, path: str) -> set[str]:
        """Registered ``.drv`` paths that list ``path`` as an output."""
        return {str(r[0]) for r in self._q(
            "select v.path from DerivationOutputs d join ValidPaths v on v.id = d.drv where d.path = ?", (path,))}

    def path_by_hash_part(self, store_dir: str, hash_part: str) -> str | None:
        prefix = f"{store_dir}/{hash_part}"
        rows = self._q("select path from ValidPaths where path >= ? limit 1", (prefix,))
        if rows and str(rows[0][0]).startswith(prefix):
            return str(rows[0][0])
        return None

    def all_paths(self) -> list[str]:
        return [str(r[0]) for r in self._q("select path from ValidPaths order by path")]

    def load_graph_full(self) -> tuple[dict[int, str], dict[int, list[int]], dict[int, int], dict[int, str]]:
        """``(id → path, id → reference ids, id → narSize, id → deriver)`` in two scans (for GC)."""
        with self._lock:
            cur = self.conn.cursor()
            try:
                cur.execute("begin")  # one consistent snapshot for both scans
                paths: dict[int, str] = {}
                sizes: dict[int, int] = {}
                derivers: dict[int, str] = {}
                for i, p, n, d in cur.execute("select id, path, narSize, deriver from ValidPaths"):
                    paths[i] = p
                    sizes[i] = n or 0
                    if d:
                        derivers[i] = d
                refs: dict[int, list[int]] = {}
                for a, b in cur.execute("select referrer, reference from Refs"):
                    refs.setdefault(a, []).append(b)
            finally:
                cur.execute("commit")
        return paths, refs, sizes, derivers

    # -- updates ----------------------------------------------------------------------------

    def register(self, infos: Sequence[PathInfo], drv_outputs: dict[str, dict[str, str]] | None = None) -> None:
        """Register ``infos`` (and their references) in one transaction.

        References must be valid already or be among ``infos``; otherwise nothing is
        registered and :class:`StoreError` (rule ``invalid-reference``) names the reference.
        """
        drv_outputs = drv_outputs or {}
        with self.transaction() as c:
            ids: dict[str, int] = {}
            for info in infos:
                args = (info.nar_hash.prefixed("base16"), info.registration_time or int(time.time()),
                        info.deriver, info.nar_size or None, 1 if info.ultimate else None,
                        " ".join(sorted(info.sigs)) or None, info.ca)
                row = c.execute("select id from ValidPaths where path = ?", (info.path,)).fetchone()
                if row:
                    c.execute("update ValidPaths set hash = ?, registrationTime = ?, deriver = coalesce(?, deriver), "
                              "narSize = ?, ultimate = ?, sigs = ?, ca = ? where id = ?", (*args, row[0]))
                    ids[info.path] = row[0]
                else:
                    cur = c.execute("insert into ValidPaths (path, hash, registrationTime, deriver, narSize, "
                                    "ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?)", (info.path, *args))
                    assert cur.lastrowid is not None
                    ids[info.path] = cur.lastrowid
            for info in infos:
                for ref in info.references:
                    rid = ids.get(ref)
                    if rid is None:
                        row = c.execute("select id from ValidPaths where path = ?", (ref,)).fetchone()
                        if row is None:
                            raise StoreError("reference is not a valid path", path=ref, rule="invalid-reference",
                                             got=info.path)
                        rid = ids[ref] = row[0]
                    c.execute("insert or replace into Refs (referrer, reference) values (?, ?)",
                              (ids[info.path], rid))
                for name, out in sorted(drv_outputs.get(info.path, {}).items()):
                    c.execute("insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
                              (ids[info.path], name, out))
            for drv, outs in sorted(drv_outputs.items()):
                # a derivation that is not among ``infos`` (e.g. the one whose outputs these are)
                if drv in ids or not outs:
                    continue
                row = c.execute("select id from ValidPaths where path = ?", (drv,)).fetchone()
                if row is not None:
                    for name, out in sorted(outs.items()):
                        c.execute("insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
                                  (row[0], name, out))

    def set_sigs(self, path: str, sigs: Iterable[str]) -> None:
        with self.transaction() as c:
            c.execute("update ValidPaths set sigs = ? where path = ?", (" ".join(sorted(set(sigs))) or None, path))

    def invalidate(self, path: str) -> None:
        """Remove one path's registration (its own transaction). Refused (rule ``still-referenced``)
        while another valid path refers to it."""
        try:
            with self.transaction() as c:
                c.execute("delete from ValidPaths where path = ?", (path,))
        except sqlite3.IntegrityError as e:
            raise StoreError("path is still referenced by other valid paths", path=path,
                             rule="still-referenced") from e


#: filesystems where SQLite's WAL shared memory (an mmap-ed ``-shm`` file) is unsafe
_NO_WAL_FS = ("nfs", "nfs4", "cifs", "smb3", "9p", "fuse")


def fs_type(path: str) -> str:
    """The filesystem type holding ``path`` (Linux ``/proc/self/mountinfo``; "" elsewhere)."""
    try:
        with open("/proc/self/mountinfo") as f:
            rows = f.read().splitlines()
    except OSError:
        return ""
    real = os.path.realpath(path)
    best, kind = "", ""
    for row in rows:
        left, _, right = row.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = fields[4].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, right.split()[0]
    return kind


def use_wal(db_dir: str) -> bool:
    """WAL unless ``NARTOOL_SQLITE_WAL=0`` or the database is on a network or FUSE filesystem
    (as Nix's ``use-sqlite-wal = false`` for NFS): then the rollback journal (``truncate``)."""
    env = os.environ.get("NARTOOL_SQLITE_WAL", "")
    if env in ("0", "1"):
        return env == "1"
    kind = fs_type(db_dir)
    return not any(kind == k or kind.startswith(k + ".") for k in _NO_WAL_FS)


def _statements(script: str) -> list[str]:
    """Split the schema into statements (the trigger body holds a ';' of its own)."""
    out: list[str] = []
    cur = ""
    for line in script.splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            if cur.strip():
                out.append(cur.strip())
            cur = ""
    return out
