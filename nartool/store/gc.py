"""GC roots and garbage collection, compatible with Nix 2.8's (``docs/store.md``, GC roots and Garbage collection).

Roots, found under ``<state>/gcroots`` and ``<state>/profiles`` (recursively):

* a symlink whose target *string* is in the store dir roots the store object holding the
  target (even a sub-path that does not exist);
* a symlink pointing outside the store to a link ``L`` roots what ``L`` points to (one level,
  the ``--add-root --indirect`` scheme with ``gcroots/auto``); stale auto links are removed;
* a **regular file** whose *name* is a store path's base name roots that path (no readlink);
* temporary roots of live processes (``temproots/<pid>``) and, on Linux, runtime roots:
  store paths held open, mapped or used as cwd/executable by running processes.

The collector takes ``gc.lock`` exclusively, serves ``gc-socket/socket`` so processes that
add temp roots meanwhile are heard, loads the whole reference graph once (two table scans),
marks the closure of the roots live (keeping the derivers of live paths, as Nix's
``keep-derivations``), then deletes the rest referrers-first, one short transaction per path,
re-checking the temp roots just before each deletion. Unreadable entries while scanning roots
are reported, not fatal. The database is never VACUUMed.

Nothing here recurses: root directories are walked, and trees deleted, with explicit stacks,
each directory opened relative to its parent without following symlinks, so any depth (a tree
Nix wrote, a deep directory under ``gcroots``) is handled.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InvalidPathError, StoreError
from ..fs.osutil import DirChain, remove_at
from ..hashes import nix32_encode
from .closure import topo_sort
from .locks import gc_lock, read_temp_roots
from .paths import HASH_PART_LEN, StorePath, to_store_path

if TYPE_CHECKING:
    from .local import LocalStore


@dataclass
class Roots:
    #: root location (a link, a file, or for a runtime root the ``/proc`` entry) → store path
    roots: dict[str, str] = field(default_factory=dict)
    temp: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def paths(self) -> set[str]:
        return set(self.roots.values())


def _in_store(store: LocalStore, target: str) -> str | None:
    if not target.startswith(store.store_dir + "/"):
        return None
    try:
        return to_store_path(target, store.store_dir)
    except InvalidPathError:
        return None


def find_roots(store: LocalStore, *, runtime: bool = True) -> Roots:
    """All permanent roots (and, with ``runtime``, the runtime roots); temp roots separately."""
    r = Roots()
    for top in ("gcroots", "profiles"):
        _scan_roots(store, os.path.join(store.state_dir, top), r)
    temp, problems = read_temp_roots(store.state_dir)
    r.temp = temp
    r.problems.extend(problems)
    if runtime:
        for where, p in _runtime_roots(store):
            r.roots.setdefault(where, p)
    return r


def _scan_roots(store: LocalStore, d: str, r: Roots) -> None:
    """Find the roots under ``d``, however deep: an explicit stack, every directory opened
    relative to its parent without following symlinks (see :class:`DirChain`)."""
    try:
        top = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as err:
        r.problems.append(f"cannot read root directory {d!r}: {err.strerror}")
        return
    auto_dir = os.path.join(store.state_dir, "gcroots", "auto")
    chain = DirChain(top)
    try:
        stack = [(d, _scan_root_dir(store, top, d, d == auto_dir, r))]
        while stack:
            path, subdirs = stack[-1]
            if not subdirs:
                stack.pop()
                if stack:
                    chain.pop()
                continue
            name = subdirs.pop()
            cpath = path + "/" + name
            try:
                fd = chain.push(os.fsencode(name))
            except OSError as err:
                if err.errno != errno.ENOENT:  # vanished since the listing
                    r.problems.append(f"cannot read root directory {cpath!r}: {err.strerror}")
                continue
            stack.append((cpath, _scan_root_dir(store, fd, cpath, cpath == auto_dir, r)))
    except OSError as err:  # an ancestor replaced while we were below it
        r.problems.append(f"cannot read root directory {d!r}: {err.strerror}")
    finally:
        chain.close()
        os.close(top)


def _scan_root_dir(store: LocalStore, fd: int, path: str, is_auto: bool, r: Roots) -> list[str]:
    """Record the roots among the entries of the open directory ``fd`` (at ``path``); returns
    the names of its subdirectories."""
    subdirs: list[str] = []
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as err:
        r.problems.append(f"cannot read root directory {path!r}: {err.strerror}")
        return subdirs
    for e in entries:
        p = path + "/" + e.name
        try:
            if e.is_symlink():
                target = os.readlink(e.name, dir_fd=fd)
                sp = _in_store(store, target)
                if sp is not None:
                    if store.is_valid(sp):
                        r.roots[p] = sp
                    continue
                # indirect: a link to a link outside the store (a relative target is resolved
                # from this directory's descriptor, an absolute one as it is)
                link = os.path.join(path, target)
                try:
                    st = os.lstat(target, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    if is_auto:
                        os.unlink(e.name, dir_fd=fd)  # stale auto root
                    continue
                if stat.S_ISLNK(st.st_mode):
                    sp = _in_store(store, os.readlink(target, dir_fd=fd))
                    if sp is not None and store.is_valid(sp):
                        r.roots[link] = sp
            elif e.is_dir(follow_symlinks=False):
                subdirs.append(e.name)
            elif e.is_file(follow_symlinks=False):
                try:
                    sp = StorePath.from_base(e.name).full(store.store_dir)
                except InvalidPathError:
                    continue
                if store.is_valid(sp):
                    r.roots[p] = sp
        except OSError as ex:
            if ex.errno == errno.ENOENT:  # vanished since the listing (e.g. an add-root's temporary link)
                continue
            r.problems.append(f"cannot read root {p!r}: {ex.strerror}")
    return subdirs


def _runtime_roots(store: LocalStore) -> Iterable[tuple[str, str]]:
    """Store paths used by running processes (Linux ``/proc``): exe, cwd, open fds, maps; each
    with a location of its own (``/proc/PID/fd/N``, ``/proc/PID/maps:PATH``, ...), so that every
    one of them counts as a root."""
    if not sys.platform.startswith("linux"):
        return
    real = store.real_store_dir + "/"
    me = os.getpid()

    def hit(s: str) -> str | None:
        if s.startswith(real):
            try:
                return to_store_path(store.store_dir + "/" + s[len(real) :], store.store_dir)
            except InvalidPathError:
                return None
        return None

    try:
        pids = [int(x) for x in os.listdir("/proc") if x.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid == me:
            continue
        base = f"/proc/{pid}"
        links = []
        for name in ("exe", "cwd"):
            links.append(f"{base}/{name}")
        try:
            links.extend(f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd"))
        except OSError:
            pass
        for link in links:
            try:
                sp = hit(os.readlink(link))
            except OSError:
                continue
            if sp and store.is_valid(sp):
                yield link, sp
        mapped: set[str] = set()
        try:
            with open(f"{base}/maps") as f:
                for line in f:
                    i = line.find(real)
                    if i >= 0:
                        sp = hit(line[i:].strip())
                        if sp and sp not in mapped and store.is_valid(sp):
                            mapped.add(sp)
                            yield f"{base}/maps:{sp}", sp
        except OSError:
            pass


# -- adding roots ---------------------------------------------------------------------------


def add_indirect_root(store: LocalStore, link: str, path: str) -> str:
    """``nix-store --add-root LINK --indirect``: ``LINK → path`` plus ``gcroots/auto/<h> → LINK``.

    Refuses a link inside the store dir, and an existing file or a link that does not point into
    the store. Returns the auto root's location.

    Waits while a collection runs (``gc.lock`` shared, as Nix's ``syncWithGC`` did): a collector
    scans permanent roots before temp roots, so a root made during its run, by a process that then
    drops its temp root, would be seen by neither scan. A caller that holds a temp root on
    ``path`` keeps it alive while waiting; otherwise it may be collected meanwhile, and then it is
    refused as not valid."""
    link = os.path.abspath(link)
    with gc_lock(store.state_dir, exclusive=False, waiting="waiting for the garbage collector to finish..."):
        return _add_indirect_root(store, link, path)


def _add_indirect_root(store: LocalStore, link: str, path: str) -> str:
    if link.startswith(store.real_store_dir + "/") or link.startswith(store.store_dir + "/"):
        raise StoreError("creating a root inside the store is not allowed", path=link, rule="root-in-store")
    if not store.is_valid(path):
        raise StoreError("path is not valid", path=path, rule="invalid-path")
    if os.path.lexists(link) and (not os.path.islink(link) or _in_store(store, os.readlink(link)) is None):
        raise StoreError("cannot create a root here: something else exists", path=link, rule="exists")
    tmp = f"{link}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    os.symlink(path, tmp)
    os.replace(tmp, link)
    h = nix32_encode(hashlib.sha1(link.encode()).digest())
    auto = os.path.join(store.state_dir, "gcroots", "auto", h)
    tmp = f"{auto}.tmp-{os.getpid()}"
    os.symlink(link, tmp)
    os.replace(tmp, auto)
    return auto


# -- collecting -----------------------------------------------------------------------------


@dataclass
class GCResult:
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    live: set[str] = field(default_factory=set)
    dead: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _GCSocket:
    """Serves ``gc-socket/socket`` while collecting: each ``<path>\\n`` adds a temp root."""

    def __init__(self, state_dir: str, on_root: Callable[[str], None]) -> None:
        d = os.path.join(state_dir, "gc-socket")
        os.makedirs(d, exist_ok=True)
        self.path = os.path.join(d, "socket")
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.sock.listen(64)
        self.on_root = on_root
        self.stop = False
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, name="nartool-gc-socket", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._conns_lock:
                if self.stop:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        # (a client keeps its connection for many roots: one per process, as Nix's clients do)
        with conn:
            buf = b""
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self.on_root(line.decode("utf-8", "replace"))
                    try:
                        conn.sendall(b"1")
                    except OSError:
                        return

    def close(self) -> None:
        """Stop serving: no new connections, and every open one is shut down, so that a client
        holding one learns the collection ended instead of having roots acknowledged for it."""
        with self._conns_lock:
            self.stop = True
            conns, self._conns = self._conns, set()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _hash_part(store: LocalStore, path: str) -> str:
    return path[len(store.store_dir) + 1 : len(store.store_dir) + 1 + HASH_PART_LEN]


def collect_garbage(store: LocalStore, *, action: str = "delete", max_freed: int | None = None,
                    paths: Iterable[str] | None = None, on_delete: Callable[[str], None] | None = None) -> GCResult:
    """Collect garbage. ``action``: ``delete``, ``print-dead`` or ``print-live`` (no deletion).

    With ``paths``, only those are deleted, and any that is live (reachable from a root, temp
    root, or referenced by a valid path outside the set) is refused: nothing is deleted then.
    """
    t0 = time.monotonic()
    res = GCResult()
    with gc_lock(store.state_dir, exclusive=True, waiting="waiting for the big garbage collector lock..."):
        mutex = threading.Lock()
        temp_hashes: set[str] = set()

        def on_root(p: str) -> None:
            with mutex:
                temp_hashes.add(_hash_part(store, p))

        sock = _GCSocket(store.state_dir, on_root) if action == "delete" else None
        try:
            _collect(store, res, action, max_freed, paths, mutex, temp_hashes, on_delete)
        finally:
            if sock is not None:
                sock.close()
    res.seconds = time.monotonic() - t0
    return res


def _collect(store: LocalStore, res: GCResult, action: str, max_freed: int | None, paths: Iterable[str] | None,
             mutex: threading.Lock, temp_hashes: set[str], on_delete: Callable[[str], None] | None) -> None:
    roots = find_roots(store)
    res.problems.extend(roots.problems)
    with mutex:
        temp_hashes.update(_hash_part(store, p) for p in roots.temp if p.startswith(store.store_dir + "/"))
    ids, refs, sizes, derivers = store.db.load_graph_full()
    by_path = {p: i for i, p in ids.items()}
    start = [(by_path[p], where) for where, p in roots.roots.items() if p in by_path]
    with mutex:
        start.extend((i, "{temp}") for i, p in ids.items() if _hash_part(store, p) in temp_hashes)
    live_ids = _mark(ids, refs, derivers, by_path, start).keys()
    res.live = {ids[i] for i in live_ids}
    if paths is not None:
        wanted = [store.follow(p) for p in paths]
        for p in wanted:
            if p not in by_path:
                raise StoreError("path is not valid", path=p, rule="invalid-path")
            if by_path[p] in live_ids:
                raise StoreError("cannot delete path since it is still alive (reachable from a GC root)", path=p,
                                 rule="alive")
        wset = set(wanted)
        for p in wanted:
            others = store.db.referrers(p) - wset
            if others:
                raise StoreError("cannot delete path since it is still referenced", path=p, rule="referenced",
                                 got=sorted(others)[0])
        dead = wset
    else:
        dead = {p for i, p in ids.items() if i not in live_ids}
    order = topo_sort(dead, lambda p: (ids[r] for r in refs.get(by_path[p], ())))[::-1]  # referrers first
    res.dead = order
    if action != "delete":
        return
    for p in order:
        if max_freed is not None and res.bytes_freed >= max_freed:
            return
        with mutex:
            if _hash_part(store, p) in temp_hashes:
                continue
            try:
                store._remove_object(p)
            except StoreError as e:  # gained a referrer meanwhile
                res.problems.append(f"{p}: {e.message}")
                continue
        res.deleted.append(p)
        res.bytes_freed += sizes.get(by_path[p], 0)
        if on_delete is not None:
            on_delete(p)
    if paths is None:
        _sweep_invalid(store, res, mutex, temp_hashes, max_freed)


def _mark(ids: dict[int, str], refs: dict[int, list[int]], derivers: dict[int, str], by_path: dict[str, int],
          start: Iterable[tuple[int, str]]) -> dict[int, str]:
    """The live paths (ids): the closure of ``start`` over references and derivers (Nix's
    ``keep-derivations``), each with the root location it was first reached from."""
    live: dict[int, str] = {}
    todo = list(start)
    while todo:
        i, where = todo.pop()
        if i in live:
            continue
        live[i] = where
        todo.extend((j, where) for j in refs.get(i, ()) if j not in live)
        d = derivers.get(i)
        if d is not None and d in by_path:
            todo.append((by_path[d], where))
    return live


def root_holders(store: LocalStore) -> dict[str, str]:
    """Every valid path a GC root keeps alive (permanent, indirect, temp or runtime root;
    directly, or through references and derivers as the collector counts them) → the location
    of a root holding it (a link, a file, a ``/proc`` entry or ``{temp}``).

    Exact only while ``gc.lock`` is held exclusively (no root can be added meanwhile)."""
    roots = find_roots(store)
    ids, refs, _, derivers = store.db.load_graph_full()
    by_path = {p: i for i, p in ids.items()}
    temp_hashes = {_hash_part(store, p) for p in roots.temp if p.startswith(store.store_dir + "/")}
    start = [(by_path[p], where) for where, p in roots.roots.items() if p in by_path]
    start.extend((i, "{temp}") for i, p in ids.items() if _hash_part(store, p) in temp_hashes)
    return {ids[i]: where for i, where in _mark(ids, refs, derivers, by_path, start).items()}


def _sweep_invalid(store: LocalStore, res: GCResult, mutex: threading.Lock, temp_hashes: set[str],
                   max_freed: int | None) -> None:
    """Delete store-dir entries that are not valid paths (leftovers of interrupted adds, stale
    locks), unless temp-rooted. Entries that don't parse as store paths are deleted too, as Nix
    does, except ``.links``."""
    fd = store._store_fd
    for name in os.listdir(fd):
        if max_freed is not None and res.bytes_freed >= max_freed:
            return
        if name == ".links":
            continue
        try:
            sp = StorePath.from_base(name)
            full = sp.full(store.store_dir)
        except InvalidPathError:
            sp, full = None, None
        with mutex:
            if sp is not None and sp.hash_part in temp_hashes:
                continue
            if full is not None and store.is_valid(full):
                continue
            try:
                size = remove_at(fd, name.encode(), count=True)  # what the sweep really freed
            except OSError as e:
                if e.errno != errno.ENOENT:
                    res.problems.append(f"cannot delete {name!r}: {e.strerror}")
                continue
        res.bytes_freed += size
