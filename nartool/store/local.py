"""A local store on disk, in the layout of ``nix-store --store ROOT``.

``ROOT/nix/store`` holds the store objects (logical paths ``/nix/store/<hash>-<name>``),
``ROOT/nix/var/nix`` the state: ``db/db.sqlite`` (Nix's schema), ``gcroots/``, ``profiles/``,
``temproots/``, ``gc.lock``. Real Nix 2.8 reads what this writes and the other way round.

How a path is added (:meth:`LocalStore.add_nar`, :meth:`add_path`, :meth:`import_paths`):

1. the path (and the temporary name used while restoring) become temporary GC roots;
2. the NAR is restored under a temporary store name, hashed on the way, with canonical
   metadata (0444/0555, mtime 1, xattrs stripped), never following symlinks; size, NAR hash
   and a claimed content address (:mod:`nartool.store.cacheck`, from the same stream: no
   restored object is ever read back by path) are all checked before the next step, and a
   ``.drv``'s outputs are parsed from the temporary opened without following symlinks;
3. under the per-path lock, a leftover at the final name is removed and the temporary is
   renamed into place (without replacing anything);
4. at the end of the batch one ``syncfs`` flushes everything, then one transaction registers
   the whole batch. A crash before that leaves at most unregistered (invalid) objects that
   the next add or a GC removes; the database never names unsynced contents.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from .. import _json as json
from ..errors import FsError, NarError, StoreError
from ..fs.osutil import remove_at, rename_noreplace, syncfs
from ..fs.source import Exclude, NameCodec, dump_events, dump_nar  # (not nartool.fs's lazy names: importlib)
from ..hashes import Hash, nix32_encode
from ..nar.events import Event, File
from ..nar.hashing import NarDigest, tee_nar
from ..nar.reader import NarReader
from ..nar.source import ByteSource, as_source
from .base import BaseStore
from .db import StoreDB
from .derivation import Derivation, DrvHash, drv_name_from_path, parse_derivation
from .locks import PathLock, TempRoots
from .paths import (
    DEFAULT_STORE_DIR,
    ContentAddress,
    StorePath,
    make_fixed_output_path,
    make_text_path,
    validate_name,
)
from .refs import RefScanner
from .types import PathInfo

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import BinaryIO

    from ..fs.casehack import CaseHackCodec
    from .cacheck import CaCheck

# (the case hack, the NAR restorer, content-address checks and closures are imported where they
# are used: a build's start-up does without them)

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: a ``.drv`` larger than this is stored, but its outputs are not parsed or recorded
DRV_MAX_SIZE = 16 << 20
SETTINGS_FILE = "nartool-store.json"
_SETTINGS_WRITTEN = {'{"case-hack": true}': {"case-hack": True}, '{"case-hack": false}': {"case-hack": False}}


def default_root() -> str:
    """The embedded default store: ``$XDG_DATA_HOME/nartool/store`` (``~/.local/share/…``)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "nartool", "store")


class _Pending:
    # (a plain class: a dataclass's generated methods cost start-up time)
    __slots__ = ("info", "lock", "drv_outputs")

    def __init__(self, info: PathInfo, lock: PathLock, drv_outputs: dict[str, str]) -> None:
        self.info = info
        self.lock = lock
        self.drv_outputs = drv_outputs


class PlacedOutputs:
    """Build outputs moved into the store and not registered yet (see
    :meth:`LocalStore.place_build_outputs`): their infos, and the names actually moved there."""

    __slots__ = ("infos", "moved")

    def __init__(self, infos: list[PathInfo], moved: list[bytes]) -> None:
        self.infos = infos
        self.moved = moved


class LocalStore(BaseStore):
    """A Nix-compatible store rooted at ``root`` (see the module docstring)."""

    scheme = "local"

    def __init__(self, root: str | os.PathLike[str] | None = None, store_dir: str = DEFAULT_STORE_DIR, *,
                 case_hack: bool | None = None, create: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root) if root is not None else default_root())
        if not store_dir.startswith("/") or store_dir != os.path.normpath(store_dir) or store_dir == "/":
            raise StoreError("store dir must be an absolute canonical path", got=store_dir, rule="bad-store-dir")
        self.store_dir = store_dir
        self.real_store_dir = self.root.rstrip("/") + store_dir
        self.state_dir = os.path.join(self.root, "nix", "var", "nix")
        db_dir = os.path.join(self.state_dir, "db")
        if not create and not os.path.exists(os.path.join(db_dir, "db.sqlite")):
            raise StoreError("no store here (no database)", path=self.root, rule="no-store")
        for d in (self.real_store_dir, db_dir, os.path.join(self.state_dir, "gcroots", "auto"),
                  os.path.join(self.state_dir, "profiles"), os.path.join(self.state_dir, "temproots")):
            os.makedirs(d, exist_ok=True)
        self.names: CaseHackCodec | None = self._settle_case_hack(case_hack)
        self.db = StoreDB(db_dir)
        self.roots = TempRoots(self.state_dir)
        self._store_fd = os.open(self.real_store_dir, _O_DIR)
        self._pending: list[_Pending] | None = None
        #: hashes modulo of registered input derivations, by path (for the .drv check)
        self._drv_hashes: dict[str, DrvHash] = {}

    # -- set-up -----------------------------------------------------------------------------

    def _settle_case_hack(self, requested: bool | None) -> CaseHackCodec | None:
        """The store remembers the case-hack choice it was created with (probed when not given)."""
        f = os.path.join(self.state_dir, SETTINGS_FILE)
        try:
            with open(f) as fh:
                text = fh.read()
            # (the two forms this method writes are read without json, a build's start-up
            # does without it; anything else goes through json)
            settings = _SETTINGS_WRITTEN.get(text) or json.loads(text)
            recorded = bool(settings["case-hack"])
        except FileNotFoundError:
            if requested is None:
                from ..fs.casehack import resolve

                codec, _ = resolve(None, self.real_store_dir + "/x", restore=True)
                recorded = codec is not None
            else:
                recorded = requested
            tmp = f"{f}.tmp-{os.getpid()}"
            with open(tmp, "w") as fh:
                json.dump({"case-hack": recorded}, fh)
            os.replace(tmp, f)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError("store settings file is malformed", path=f, rule="bad-settings") from e
        if requested is not None and requested != recorded:
            raise StoreError("this store was created " + ("with" if recorded else "without") +
                             " the case hack; it cannot be changed", path=self.root, rule="case-hack-mismatch",
                             expected=recorded, got=requested)
        if not recorded:
            return None
        from ..fs.casehack import CaseHackCodec

        return CaseHackCodec()

    @property
    def uri(self) -> str:
        """``local?root=ROOT`` (as Nix writes a chroot store), ``&store=DIR`` for another store dir."""
        from urllib.parse import quote

        extra = f"&store={quote(self.store_dir, safe='/')}" if self.store_dir != DEFAULT_STORE_DIR else ""
        return f"local?root={quote(self.root, safe='/')}{extra}"

    @property
    def case_hack(self) -> bool:
        return self.names is not None

    def close(self) -> None:
        if self._store_fd >= 0:
            os.close(self._store_fd)
            self._store_fd = -1
            self.db.close()
            self.roots.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ------------------------------------------------------------------------------

    def parse_path(self, path: str) -> StorePath:
        return StorePath.parse(path, self.store_dir)

    def physical(self, path: str) -> str:
        """Where a store path's files are on disk."""
        return self.real_store_dir + "/" + self.parse_path(path).base

    def follow(self, path: str) -> str:
        """A store path from a user argument: a store path, a path inside one, or a symlink
        (e.g. a ``result`` link) pointing into the store."""
        if not path.startswith(self.store_dir + "/") and os.path.islink(path):
            path = os.readlink(path)
        if path.startswith(self.real_store_dir + "/") and self.real_store_dir != self.store_dir:
            path = self.store_dir + path[len(self.real_store_dir):]
        base = path[len(self.store_dir) + 1 :].split("/", 1)[0] if path.startswith(self.store_dir + "/") else ""
        return self.store_dir + "/" + StorePath.from_base(base).base if base else self.parse_path(path).full()

    # -- queries ----------------------------------------------------------------------------

    def is_valid(self, path: str) -> bool:
        return self.db.is_valid(self._path_arg(path))

    def query_valid_paths(self, paths: Iterable[str]) -> set[str]:
        return self.db.valid_subset(paths)

    def query_path_info(self, path: str) -> PathInfo | None:
        return self.db.info(self._path_arg(path))

    def query_path_infos(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        return self.db.infos(self._path_arg(p) for p in paths)

    def query_closure_paths(self, paths: Iterable[str]) -> set[str]:
        start = list(dict.fromkeys(self._path_arg(p) for p in paths))
        out = self.db.closure_paths(start)
        for p in start:
            if p not in out:
                self.parse_path(p)
                raise StoreError("path is not valid", path=p, rule="invalid-path")
        return out

    def query_closure_set(self, paths: Iterable[str], *, include_outputs: bool = False) -> dict[str, PathInfo]:
        if include_outputs:
            return super().query_closure_set(paths, include_outputs=True)
        start = list(dict.fromkeys(self._path_arg(p) for p in paths))
        infos = self.db.infos(start, closure=True)  # (references of valid paths are valid: the schema's keys)
        for p in start:
            if p not in infos:
                self.parse_path(p)
                raise StoreError("path is not valid", path=p, rule="invalid-path")
        return infos

    def path_info(self, path: str) -> PathInfo:
        info = self.db.info(self._path_arg(path))
        if info is None:
            raise StoreError("path is not valid", path=self._path_arg(path), rule="invalid-path")
        return info

    def query_path_from_hash_part(self, hash_part: str) -> str | None:
        return self.db.path_by_hash_part(self.store_dir, hash_part)

    def query_referrers(self, path: str) -> set[str]:
        return self.db.referrers(path)

    def query_references(self, path: str) -> set[str]:
        return self.db.references(path)

    def query_derivation_outputs(self, drv_path: str) -> dict[str, str]:
        return self.db.derivation_outputs(drv_path)

    def all_paths(self) -> list[str]:
        return self.db.all_paths()

    def referrers_closure(self, paths: Iterable[str]) -> set[str]:
        from .closure import closure_set

        return closure_set(paths, self.db.referrers)

    # -- reading contents -------------------------------------------------------------------

    def nar_events(self, path: str) -> Iterator[Event]:
        """The NAR of ``path`` as events, straight from its files."""
        if not self.is_valid(path):
            raise StoreError("path is not valid", path=path, rule="invalid-path")
        return dump_events(self.physical(path), names=self.names)

    def nar_chunks(self, path: str, *, check: bool = True) -> Iterator[bytes | bytearray | memoryview]:
        info = self.path_info(path)
        # (a producer thread per path was measured slower here: paths are many and small)
        return self._checked_chunks(info, dump_nar(self.physical(path), names=self.names), check)

    def _checked_chunks(self, info: PathInfo, chunks: Iterable[bytes | bytearray | memoryview],
                        check: bool) -> Iterator[bytes | bytearray | memoryview]:
        h = hashlib.sha256()
        n = 0
        for c in chunks:
            h.update(c)
            n += len(c)
            yield c
        if check and info.nar_hash.digest != bytes(32) and h.digest() != info.nar_hash.digest:
            raise StoreError("hash of path has changed", path=info.path, rule="hash-changed",
                             expected=info.nar_hash.prefixed("nix32"), got="sha256:" + nix32_encode(h.digest()))
        if check and info.nar_size and n != info.nar_size:
            raise StoreError("size of path has changed", path=info.path, rule="hash-changed",
                             expected=info.nar_size, got=n)

    # -- temp roots, locks, batches ---------------------------------------------------------

    def temp_root(self, path: str) -> None:
        self.roots.add(path)

    @contextmanager
    def batch(self, *, keep_on_error: bool = False) -> Iterator[None]:
        """Sync and register everything added in the block together (see module docstring).

        To avoid deadlocks with other processes' batches, a batch that would have to wait for a
        path lock commits what it has so far first (a consistent prefix: references come first).

        On error, the batch's unregistered paths are removed, unless ``keep_on_error``: then the
        complete ones are registered (a resumable transfer keeps what fully arrived)."""
        if self._pending is not None:  # nested: part of the outer batch
            yield
            return
        self._pending = []
        try:
            yield
        except BaseException:
            pending, self._pending = self._pending, None
            if keep_on_error:
                try:
                    self._commit(pending)
                except BaseException:
                    self._discard(pending)
            else:
                self._discard(pending)
            raise
        pending, self._pending = self._pending, None
        try:
            self._commit(pending)
        except BaseException:
            self._discard(pending)
            raise

    def _commit(self, pending: list[_Pending]) -> None:
        if not pending:
            return
        try:
            syncfs(self._store_fd)
            self.db.register([p.info for p in pending], {p.info.path: p.drv_outputs for p in pending if p.drv_outputs})
        finally:
            for p in pending:
                p.lock.release()
        self.db.maybe_checkpoint()

    def _discard(self, pending: list[_Pending]) -> None:
        for p in pending:
            try:
                if not self.db.is_valid(p.info.path):
                    remove_at(self._store_fd, self.parse_path(p.info.path).base.encode())
            finally:
                p.lock.release()

    def _in_batch(self, path: str) -> bool:
        return self._pending is not None and any(p.info.path == path for p in self._pending)

    def _temp_name(self) -> bytes:
        """A fresh temporary store name, made a temp root (so no collector removes it)."""
        h = nix32_encode(os.urandom(20))  # (what secrets.token_bytes returns)
        name = f"{h}-nartool-tmp"
        self.temp_root(f"{self.store_dir}/{name}")
        return name.encode()

    def _restore_temp(self, events: Iterable[Event], scanner: RefScanner | None = None,
                      ca: CaCheck | None = None) -> tuple[bytes, NarDigest]:
        """Restore ``events`` under a temporary name; returns it and the NAR digest (and feeds
        the NAR bytes to ``scanner`` when given). ``ca`` sees the events and bytes on the way
        (it refuses a wrong kind of root before anything is restored for it)."""
        tmp = self._temp_name()
        digest = NarDigest()
        sink: Callable[[bytes | bytearray | memoryview], None] = digest
        extra = [f for f in (scanner.update if scanner is not None else None, ca.update if ca is not None else None)
                 if f is not None]
        if extra:
            def sink(b: bytes | bytearray | memoryview) -> None:
                digest(b)
                for f in extra:
                    f(b)
        if ca is not None:
            events = ca.events(events)
        from ..fs.sink import _Builder

        b = _Builder(self._store_fd, tmp, names=self.names, canonical=True, fsync=False)
        try:
            try:
                for ev in tee_nar(events, sink):
                    b.feed(ev)
                if not b.done:
                    raise NarError("NAR ended before its root node did", rule="truncated")
            finally:
                b.close_all()
        except BaseException:
            remove_at(self._store_fd, tmp)
            raise
        return tmp, digest

    def _place(self, tmp: bytes, info: PathInfo) -> bool:
        """Move a restored temporary to ``info.path`` and queue its registration.

        Returns False (and removes the temporary) when the path is valid already."""
        base = self.parse_path(info.path).base.encode()
        # An interrupt (SIGINT/SIGTERM) may land between any two steps, waiting for the temp
        # root or the lock included: the temporary is always ours to remove, and whatever sits
        # under ``base`` while we hold its lock and it is not registered is ours too.
        lock: PathLock | None = None
        renaming = False
        entry: _Pending | None = None
        try:
            self.temp_root(info.path)
            if self._in_batch(info.path):
                remove_at(self._store_fd, tmp)
                return False
            drv_outputs = self._drv_outputs(tmp, info.path) if info.path.endswith(".drv") else {}
            lock = PathLock(self.real_store_dir + "/" + base.decode(), acquire=False)
            self._lock_path(lock)
            if self.db.is_valid(info.path):
                lock.release()
                remove_at(self._store_fd, tmp)
                return False
            remove_at(self._store_fd, base)  # leftover of an interrupted add
            renaming = True
            try:
                rename_noreplace(tmp, base, src_dir_fd=self._store_fd, dst_dir_fd=self._store_fd)
            except OSError as e:
                raise StoreError(f"cannot move into place: {e.strerror}", path=info.path, rule="io") from e
            entry = _Pending(info, lock, drv_outputs)
            if self._pending is not None:
                self._pending.append(entry)
                return True
            self._commit([entry])
            return True
        except BaseException:
            try:
                if self._pending is not None and entry is not None:
                    self._pending[:] = [x for x in self._pending if x is not entry]
                remove_at(self._store_fd, tmp)
                if renaming and not self.db.is_valid(info.path):
                    remove_at(self._store_fd, base)
            finally:
                if lock is not None:
                    lock.release()
            raise

    def _lock_path(self, lock: PathLock) -> None:
        """Take ``lock`` (created with ``acquire=False`` and already kept by the caller, so that
        an interrupt right after taking it still finds it to release) without deadlocking
        against another batch: while this batch holds locks, never wait for one; if it is busy,
        commit what is pending (releasing our locks) first, then wait."""
        if self._pending:
            try:
                lock.acquire(wait=False)
                return
            except StoreError:
                self.commit_pending()
        lock.acquire()

    def commit_pending(self) -> int:
        """Inside a batch: sync and register what the batch added so far (releasing those
        paths' locks) and stay in the batch; returns how many paths were committed. A serve
        session calls this before it waits for more input, so that a stalled peer never keeps
        a path locked and unregistered. Outside a batch: nothing to do (0)."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        try:
            self._commit(pending)
        except BaseException:
            self._discard(pending)
            raise
        return len(pending)

    def _drv_outputs(self, tmp: bytes, drv_path: str) -> dict[str, str]:
        """Output paths of the just-restored ``.drv`` ``drv_path``, under store name ``tmp``
        (the temporary, or its final name), for ``DerivationOutputs``, checked as Nix checks a
        derivation it registers (``checkDerivationOutputs``): the ``.drv`` is read as bytes
        (it need not be UTF-8) and parsed as Nix parses it, and every input-addressed output
        must be the path its contents give (hash modulo over the input derivations, which are
        references and so valid or in this batch) and each output's variable must name it.
        Without that check a ``.drv`` - content-addressed, so anyone allowed to import may add
        one - could claim any store path as its output, and building it would put chosen
        contents there.

        The file is opened relative to the store without following a symlink; anything but a
        regular file, or a file that is not a derivation, is refused (rule ``bad-derivation``)
        as Nix refuses it; a wrong output is refused with rule ``bad-output``. A ``.drv`` over
        :data:`DRV_MAX_SIZE` bytes (only trusted users may add those) is stored without its
        outputs being recorded or checked."""
        from .derivation import DerivationError, check_outputs

        def read(name: bytes, what: str) -> bytes | None:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._store_fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise StoreError("a derivation must be a regular file, not a symlink", path=what,
                                     rule="bad-derivation") from None
                raise StoreError(f"cannot read derivation: {e.strerror}", path=what, rule="bad-derivation") from e
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StoreError("a derivation must be a regular file", path=what, rule="bad-derivation")
                if st.st_size > DRV_MAX_SIZE:
                    return None
                parts: list[bytes] = []
                left = st.st_size
                while left > 0:
                    b = os.read(fd, min(left, 1 << 20))
                    if not b:
                        break
                    parts.append(b)
                    left -= len(b)
                return b"".join(parts)
            finally:
                os.close(fd)

        data = read(tmp, drv_path)
        if data is None:
            return {}
        parsed: dict[str, Derivation] = {}

        def resolve(path: str) -> Derivation:
            d = parsed.get(path)
            if d is None:
                raw = read(self.parse_path(path).base.encode(), path)
                if raw is None:
                    raise StoreError("input derivation too large to check", path=path, rule="bad-derivation")
                d = parsed[path] = parse_derivation(raw, drv_name_from_path(path))
            return d

        try:
            drv = parse_derivation(data, drv_name_from_path(drv_path))
            outputs = drv.output_paths(self.store_dir)
            for p in outputs.values():
                self.parse_path(p)  # Nix refuses a .drv whose outputs are not store paths
            for p in drv.input_drvs:
                if not self._in_batch(p) and not self.db.is_valid(p):
                    raise StoreError("input derivation is not valid", path=p, rule="invalid-reference", got=drv_path)
            if len(self._drv_hashes) > 200_000:  # bounded (a .drv path names its contents: never stale)
                self._drv_hashes.clear()
            check_outputs(drv, resolve, self.store_dir, cache=self._drv_hashes)
        except DerivationError as e:
            e.message = f"derivation '{drv_path}' is not acceptable: {e.message}"
            e.path = e.path or drv_path
            if e.rule not in ("bad-output",):
                e.rule = "bad-derivation"
            raise
        return outputs

    def _check_references(self, info: PathInfo) -> None:
        for r in info.references:
            self.parse_path(r)
            if r != info.path and not self.db.is_valid(r) and not self._in_batch(r):
                raise StoreError("reference is not valid", path=r, rule="invalid-reference", got=info.path)
            if r != info.path:
                self.temp_root(r)  # a concurrent GC must not take it before we register

    # -- adding contents --------------------------------------------------------------------

    def add_nar(self, info: PathInfo, nar: ByteSource | BinaryIO | bytes) -> PathInfo:
        src = as_source(nar, "NAR")
        ca = self._check_add(info)
        start = src.offset
        tmp, digest = self._restore_temp(NarReader(src, standalone=False), ca=ca)
        try:
            got = digest.hash()
            if info.nar_size and digest.size != info.nar_size:
                raise StoreError("size mismatch importing path", path=info.path, rule="size-mismatch",
                                 expected=info.nar_size, got=src.offset - start)
            if got != info.nar_hash:
                raise StoreError("hash mismatch importing path", path=info.path, rule="hash-mismatch",
                                 expected=info.nar_hash.prefixed("nix32"), got=got.prefixed("nix32"))
            if ca is not None:
                ca.finish()
        except BaseException:
            remove_at(self._store_fd, tmp)
            raise
        info = info.replace(nar_size=digest.size, registration_time=info.registration_time or int(time.time()))
        if not self._place(tmp, info):
            return self.query_path_info(info.path) or info
        return info

    def add_path(self, src: str | os.PathLike[str], *, name: str | None = None, flat: bool = False,
                 names: NameCodec | None = None, exclude: Exclude | None = None,
                 scan_references: bool | Iterable[str] = False) -> PathInfo:
        """``nix-store --add`` (recursive, default) or ``--add-fixed sha256`` (``flat``): one pass
        over ``src``, restoring while hashing; no references.

        ``scan_references``: also scan the NAR stream for the hash parts of candidate store paths
        (``True``: every valid path; or an iterable of paths) and record those found as
        references; the path is then ``source:<refs>:…`` as Nix computes it for a recursive
        sha256 content address with references. (A tree cannot refer to itself this way: its
        path is not known before it is hashed.)"""
        srcp = os.fspath(src)
        name = name or os.path.basename(os.path.normpath(os.path.abspath(srcp)))
        validate_name(name)
        scanner: RefScanner | None = None
        by_hash: dict[str, str] = {}
        if scan_references is not False:
            if flat:
                raise StoreError("--flat paths cannot have references", rule="bad-ca")
            cands = self.all_paths() if scan_references is True else list(scan_references)
            by_hash = {self.parse_path(c).hash_part: c for c in cands}
            scanner = RefScanner(by_hash)
        events: Iterable[Event] = dump_events(srcp, names=names, exclude=exclude)
        flat_hash = hashlib.sha256() if flat else None
        if flat_hash is not None:
            events = _hash_flat(events, flat_hash, srcp)
        tmp, digest = self._restore_temp(events, scanner)
        refs = frozenset(by_hash[h] for h in scanner.found) if scanner is not None else frozenset()
        try:
            nar_hash = digest.hash()
            for r in refs:
                self.temp_root(r)  # keep them alive until registered
            if flat_hash is not None:
                h = Hash("sha256", flat_hash.digest())
                path = make_fixed_output_path(name, h, recursive=False, store_dir=self.store_dir)
                ca = ContentAddress("flat", h)
            else:
                path = make_fixed_output_path(name, nar_hash, recursive=True, references=refs,
                                              store_dir=self.store_dir)
                ca = ContentAddress("recursive", nar_hash)
            info = PathInfo(path, nar_hash, digest.size, refs, registration_time=int(time.time()), ca=ca.render())
            self._check_references(info)
        except BaseException:
            remove_at(self._store_fd, tmp)
            raise
        if not self._place(tmp, info):
            return self.query_path_info(path) or info
        return info

    def add_text(self, name: str, data: bytes | str, references: Iterable[str] = ()) -> PathInfo:
        """A text object (as ``builtins.toFile`` / ``.drv`` files make them); a ``str`` is
        stored as UTF-8."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        refs = frozenset(references)
        path = make_text_path(name, Hash("sha256", hashlib.sha256(data).digest()), refs, self.store_dir)
        info0 = PathInfo(path, Hash("sha256", bytes(32)), 0, refs)
        self._check_references(info0)
        tmp, digest = self._restore_temp([File(b"", False, len(data), [data])])
        info = PathInfo(path, digest.hash(), digest.size, refs, registration_time=int(time.time()),
                        ca=ContentAddress("text", Hash("sha256", hashlib.sha256(data).digest())).render())
        if not self._place(tmp, info):
            return self.query_path_info(path) or info
        return info

    def register_built_path(self, path: str, *, reference_candidates: Iterable[str] = (),
                            deriver: str | None = None, ca: str | None = None) -> PathInfo:
        """Register ``path``, whose files were produced in place at ``self.physical(path)``
        (e.g. by a builder), as Nix registers a build output.

        Under the path's lock (the path a temporary root first): the tree is made canonical
        (:func:`nartool.fs.canonical.canonicalise_tree`: refuses FIFOs, sockets, devices and
        files hard-linked from outside it), dumped once, hashed and scanned for the hash parts of
        ``reference_candidates`` (store paths; the path itself may be one, for a
        self-reference). Every reference found other than the path itself must be valid. A
        claimed content address ``ca`` is checked against the contents and the path as
        :meth:`add_nar` checks one. Then one ``syncfs`` and the registration, so the database
        never names unsynced contents.

        Refused (:class:`~nartool.errors.StoreError`, rule ``already-valid``): a path that is
        valid already, or queued in the current batch. Inside a batch the path is registered
        with the batch (and if the batch fails, its files are removed as the batch's other
        paths are). Otherwise, on any error nothing is registered and the files are left as
        they are (invalid: for the caller to inspect or remove; a GC removes them too)."""
        from ..fs.canonical import canonicalise_tree

        sp = self.parse_path(path)
        path = sp.full(self.store_dir)
        if deriver is not None:
            self.parse_path(deriver)
        cands = list(dict.fromkeys(reference_candidates))
        by_hash = {self.parse_path(c).hash_part: c for c in cands}
        base = sp.base
        phys = self.real_store_dir + "/" + base
        self.temp_root(path)
        if self._in_batch(path) or self.db.is_valid(path):
            raise StoreError("path is already valid", path=path, rule="already-valid")
        lock = PathLock(phys, acquire=False)
        queued = False
        try:
            self._lock_path(lock)
            if self.db.is_valid(path):
                raise StoreError("path is already valid", path=path, rule="already-valid")
            if not os.path.lexists(phys):
                raise StoreError("built path does not exist", path=path, rule="missing")
            canonicalise_tree(phys)
            scanner = RefScanner(by_hash)
            digest = NarDigest()

            def sink(b: bytes | bytearray | memoryview) -> None:
                digest(b)
                scanner.update(b)

            _drain(tee_nar(dump_events(phys, names=self.names), sink))
            refs = frozenset(by_hash[h] for h in scanner.found)
            info = PathInfo(path, digest.hash(), digest.size, refs, deriver=deriver,
                            registration_time=int(time.time()), ca=ca)
            if ca:
                # checks the path against the content address (and, for ``fixed:r:sha256``,
                # the NAR hash); other kinds hash the contents in a second pass
                from .cacheck import CaCheck

                check = CaCheck(info, self.store_dir)
                if not check.done:
                    _drain(tee_nar(check.events(dump_events(phys, names=self.names)), check.update))
                check.finish()
            self._check_references(info)
            drv_outputs = self._drv_outputs(base.encode(), path) if path.endswith(".drv") else {}
            entry = _Pending(info, lock, drv_outputs)
            if self._pending is not None:
                self._pending.append(entry)
                queued = True
                return info
            queued = True  # _commit releases the lock, whatever happens
            self._commit([entry])
            return info
        finally:
            if not queued:
                lock.release()

    def register_build_outputs(self, moves: list[tuple[str, PathInfo]], *, drv_path: str | None = None,
                               drv_outputs: dict[str, str] | None = None) -> list[PathInfo]:
        """Register a build's outputs together: each ``(location, info)`` is moved by ``rename``
        from ``location`` (e.g. inside a build's chroot, on the store's file system; nothing to
        move when it is the path's own place) to its place in the store, then one ``syncfs`` and
        one transaction registers them all (with ``drv_path``'s ``DerivationOutputs`` rows when
        that derivation is valid). The caller holds the paths' locks, has made the trees
        canonical and computed ``info`` (hash, size, references: valid or among ``moves``).
        On any error nothing is registered and the moved outputs are removed.

        The two halves, :meth:`place_build_outputs` and :meth:`commit_build_outputs`, can also
        be called apart (the build scheduler starts the next build in between)."""
        placed = self.place_build_outputs(moves)
        return self.commit_build_outputs(placed, drv_path=drv_path, drv_outputs=drv_outputs)

    def place_build_outputs(self, moves: list[tuple[str, PathInfo]]) -> PlacedOutputs:
        """The first half of :meth:`register_build_outputs`: move the outputs to their places in
        the store; nothing is registered yet. On an error the outputs moved so far are removed.
        Until :meth:`commit_build_outputs` or :meth:`discard_build_outputs`, the caller keeps the
        paths' locks (so no other process takes the unregistered paths for leftovers)."""
        moved: list[bytes] = []
        try:
            for location, info in moves:
                base = self.parse_path(info.path).base.encode()
                self.temp_root(info.path)
                if os.path.abspath(location) == self.physical(info.path):
                    continue
                if self.db.is_valid(info.path):
                    raise StoreError("path is already valid", path=info.path, rule="already-valid")
                remove_at(self._store_fd, base)  # an unregistered leftover (its lock is ours)
                try:
                    st = os.lstat(location)
                    if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IWUSR:
                        # a directory moved to another parent needs write access to itself ('..')
                        fd = os.open(location, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                        try:
                            os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
                            try:
                                rename_noreplace(os.fsencode(location), base, dst_dir_fd=self._store_fd)
                            finally:
                                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                        finally:
                            os.close(fd)
                    else:
                        rename_noreplace(os.fsencode(location), base, dst_dir_fd=self._store_fd)
                except OSError as e:
                    raise StoreError(f"cannot move build output into the store: {e.strerror}", path=info.path,
                                     rule="io") from e
                moved.append(base)
        except BaseException:
            for base in moved:
                remove_at(self._store_fd, base)
            raise
        return PlacedOutputs([info for _, info in moves], moved)

    def commit_build_outputs(self, placed: PlacedOutputs, *, drv_path: str | None = None,
                             drv_outputs: dict[str, str] | None = None) -> list[PathInfo]:
        """The second half of :meth:`register_build_outputs`: one ``syncfs``, then one
        transaction registers the placed outputs. On any error nothing is registered and the
        placed outputs are removed."""
        try:
            syncfs(self._store_fd)
            now = int(time.time())
            infos = [info.replace(registration_time=info.registration_time or now) for info in placed.infos]
            self.db.register(infos, {drv_path: dict(drv_outputs or {})} if drv_path else None)
        except BaseException:
            self.discard_build_outputs(placed)
            raise
        self.db.maybe_checkpoint()
        return infos

    def discard_build_outputs(self, placed: PlacedOutputs) -> None:
        """Remove placed, unregistered outputs (e.g. when their registration is refused)."""
        for base in placed.moved:
            remove_at(self._store_fd, base)

    def add_nar_deferred(self, src: ByteSource, finish: Callable[[Hash, int], PathInfo]) -> PathInfo | None:
        """Restore one NAR under a temporary name, then ask ``finish`` (which reads an export
        record's trailer) for its info and place it: an import never holds a NAR in memory."""
        tmp = None
        try:
            tmp, digest = self._restore_temp(NarReader(src, standalone=False))
            info = finish(digest.hash(), digest.size)
            self._check_references(info)
        except BaseException:
            if tmp is not None:
                remove_at(self._store_fd, tmp)
            raise
        return info if self._place(tmp, info) else None

    def add_signatures(self, path: str, sigs: Iterable[str]) -> None:
        info = self.path_info(path)
        self.db.set_sigs(path, set(info.sigs) | set(sigs))

    # -- deleting, verifying ----------------------------------------------------------------

    def _remove_object(self, path: str) -> None:
        """Invalidate ``path`` and delete its files (callers decide liveness)."""
        base = self.parse_path(path).base
        lock = PathLock(self.real_store_dir + "/" + base, acquire=False)
        try:
            lock.acquire()
            self.db.invalidate(path)
            remove_at(self._store_fd, base.encode())
        finally:
            lock.release()

    def verify(self, *, check_contents: bool = False, repair: bool = False) -> list[dict[str, str]]:
        """Problems found, one dict per path: ``path``, ``problem`` and maybe ``detail``.

        ``problem`` is ``missing`` (the path's files are gone), ``corrupt`` (with
        ``check_contents``: its NAR hash or size differs from the registered one) or
        ``unverifiable`` (its contents could not be dumped at all, e.g. an unreadable file or a
        file of a type no NAR holds). Only the first two are breakage. Contents are dumped
        without nartool's own NAR bounds (nesting depth, name and target lengths): any tree
        Nix registered is checked, however deep. A path unregistered meanwhile (e.g. by a
        collector) is not reported.

        ``repair`` removes a broken path (invalidates it, deletes what is left of its files)
        only if nothing needs it: no valid path refers to it and no GC root (permanent,
        indirect, temp or runtime; directly or through references and derivers) holds it.
        Broken paths are visited referrers first, so a broken path referred to only by broken
        paths that get removed goes too. Each broken path then gets ``repair``:
        ``invalidated``, ``already invalid``, or ``not repairable`` with a ``reason`` (the
        path is kept). Intact and unverifiable paths are never touched. This runs under the
        exclusive ``gc.lock``, so no root appears while it decides."""
        from ..nar.limits import Limits

        unbounded = Limits(max_depth=1 << 62, max_name=1 << 62, max_target=1 << 62)
        problems: list[dict[str, str]] = []
        for p in self.db.all_paths():
            phys = self.physical(p)
            if not os.path.lexists(phys):
                if self.db.is_valid(p):
                    problems.append({"path": p, "problem": "missing"})
                continue
            if check_contents:
                info = self.query_path_info(p)
                if info is None:
                    continue
                found: dict[str, str] | None = None
                try:
                    for _ in self._checked_chunks(info, dump_nar(phys, names=self.names, limits=unbounded), True):
                        pass
                except StoreError as e:
                    kind = "corrupt" if e.rule == "hash-changed" else "unverifiable"
                    found = {"path": p, "problem": kind, "detail": e.message}
                except (FsError, NarError) as e:
                    found = {"path": p, "problem": "unverifiable", "detail": str(e)}
                except OSError as e:
                    found = {"path": p, "problem": "unverifiable", "detail": f"cannot read: {e.strerror}"}
                if found is not None and self.db.is_valid(p):
                    problems.append(found)
        broken = {x["path"]: x for x in problems if x["problem"] in ("missing", "corrupt")}
        if not (repair and broken):
            return problems
        from .gc import root_holders
        from .locks import gc_lock

        with gc_lock(self.state_dir, exclusive=True, waiting="waiting for the big garbage collector lock..."):
            held = root_holders(self)
            from .closure import topo_sort

            for p in topo_sort(broken, self.db.references)[::-1]:  # referrers first
                x = broken[p]
                if not self.db.is_valid(p):
                    x["repair"] = "already invalid"
                    continue
                reasons = []
                referrers = sorted(self.db.referrers(p) - {p})
                if referrers:
                    more = f" and {len(referrers) - 1} more" if len(referrers) > 1 else ""
                    reasons.append(f"referenced by valid path {referrers[0]}{more}")
                if p in held:
                    reasons.append(f"held by GC root {held[p]}")
                if not reasons:
                    try:
                        self._remove_object(p)
                    except (StoreError, OSError) as e:
                        reasons.append(f"removal failed: {e}")
                if reasons:
                    x["repair"] = "not repairable"
                    x["reason"] = "; ".join(reasons)
                else:
                    x["repair"] = "invalidated"
        return problems


def _drain(events: Iterable[Event]) -> None:
    """Consume ``events`` (and every file's chunks)."""
    for ev in events:
        if isinstance(ev, File):
            for _ in ev.chunks:
                pass


def _hash_flat(events: Iterable[Event], h: hashlib._Hash, src: str) -> Iterator[Event]:
    for ev in events:
        if not isinstance(ev, File):
            raise FsError("--flat needs a regular file", path=src, rule="not-a-file")

        def chunks(ev: File = ev) -> Iterator[bytes | bytearray | memoryview]:
            for c in ev.chunks:
                h.update(c)
                yield c

        yield File(ev.name, ev.executable, ev.size, chunks(), ev.offset)
