"""Substituters: fetching paths from binary caches (or any store) instead of copying or building them.

:func:`substitute_paths` is what ``copy-closure -s`` and builds call: for each wanted path the
destination lacks, the substituters (``substituters`` in the configuration, or given) are
asked in priority order — ``?priority=N`` on the URI, else the cache's ``Priority``, else 0;
lower first, ties in the listed order, as Nix orders them. The first one that has the path
*and* whose copy of its closure is acceptable supplies it: with ``require-sigs`` (default)
every path that has to move must be content-addressed or signed by a key in
``trusted-public-keys``, unless the substituter's URI says ``?trusted=1``. A substituter that
cannot be reached (:class:`~nartool.cache.backend.CacheUnavailableError`, a failing ssh
connection) costs its connect timeout once and is skipped for the rest of the call; any other
failure of one substituter (a corrupt narinfo, a NAR not matching it) is logged and the next
one is tried. Nothing is registered that was not completely fetched and checked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._log import get_logger
from ..errors import NartoolError, ProtocolError, StoreError
from ..store.base import BaseStore
from ..store.ops import copy_paths, unsigned_refusals
from ..store.types import PathInfo
from .backend import CacheUnavailableError

if TYPE_CHECKING:
    from ..config import Config
    from ..store.signing import PublicKey

log = get_logger("nartool.cache")


def priority_of(store: BaseStore) -> int:
    """A substituter's priority (0 for stores that are not binary caches, as Nix's default)."""
    from .store import BinaryCacheStore

    if isinstance(store, BinaryCacheStore):
        return store.priority
    return 0


def is_trusted_substituter(store: BaseStore) -> bool:
    from .store import BinaryCacheStore

    return isinstance(store, BinaryCacheStore) and store.trusted


#: substituter URIs found unreachable in this process: skipped by every later call
_DEAD: set[str] = set()
_DEAD_LOCK = threading.Lock()


def forget_dead_substituters() -> None:
    """Try every substituter again (they are remembered as dead for the process's lifetime)."""
    with _DEAD_LOCK:
        _DEAD.clear()


@dataclass
class Substituters:
    """Opened substituters in priority order, remembering the dead ones (for the process)."""

    stores: list[BaseStore]
    dead: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)  # id(store) -> the URI it was opened from

    @classmethod
    def open(cls, uris: Iterable[str], *, store_dir: str, config: Config | None = None) -> Substituters:
        """Open ``uris`` and order them; a URI that cannot be opened is warned about and
        skipped, one found dead earlier in this process is skipped silently. ``config`` goes to
        the openers (``open_store(…, config=)``) for their timeouts and credentials."""
        from ..store.uri import open_store

        opened: list[BaseStore] = []
        names: dict[int, str] = {}
        for uri in uris:
            with _DEAD_LOCK:
                if uri in _DEAD:
                    continue
            try:
                st = open_store(uri, store_dir=store_dir, **({"config": config} if config is not None else {}))
            except NartoolError as e:
                log.warning("warning: substituter '%s' is unusable: %s", uri, e)
                continue
            opened.append(st)
            names[id(st)] = uri
        subs = cls(opened, names=names)
        subs.stores = subs._ordered()
        for st in opened:
            if st not in subs.stores:  # dropped while ordering: unusable
                st.close()
        return subs

    @staticmethod
    def order(stores: Sequence[BaseStore]) -> list[BaseStore]:
        """``stores`` by priority (stable); unreachable or unusable ones left out."""
        return Substituters(list(stores))._ordered()

    def _ordered(self) -> list[BaseStore]:
        keyed = []
        for i, s in enumerate(self.stores):
            try:
                pr = priority_of(s)
            except CacheUnavailableError as e:
                self.kill(s, e.message)
                continue
            except StoreError as e:  # e.g. a StoreDir mismatch: Nix warns and skips it
                log.warning("warning: substituter '%s' is unusable: %s", s.uri, e)
                continue
            keyed.append((pr, i, s))
        return [s for _, _, s in sorted(keyed, key=lambda t: (t[0], t[1]))]

    def alive(self) -> list[BaseStore]:
        return [s for s in self.stores if id(s) not in self.dead]

    def kill(self, store: BaseStore, why: object) -> None:
        if id(store) not in self.dead:
            self.dead.add(id(store))
            with _DEAD_LOCK:
                _DEAD.add(self.names.get(id(store), store.uri))
            log.warning("warning: substituter '%s' is unreachable, skipping it: %s", store.uri, why)

    def close(self) -> None:
        for s in self.stores:
            s.close()


def _unreachable(e: BaseException) -> bool:
    return isinstance(e, (CacheUnavailableError, ProtocolError, ConnectionError, TimeoutError))


def substitute_paths(store: BaseStore, paths: Iterable[str], config: Config | None = None, *,
                     substituters: Substituters | Sequence[str] | None = None,
                     trusted_keys: dict[str, PublicKey] | None = None,
                     require_sigs: bool | None = None) -> set[str]:
    """Fetch into ``store`` those of ``paths`` (and their closures) it lacks from the
    substituters; returns every path that was added (requested paths and their references).
    ``config`` (default: :meth:`Config.load`) gives ``substituters``, ``substitute``,
    ``trusted-public-keys`` and ``require-sigs``; the keyword arguments override them.
    Paths no substituter can supply are simply left out of the result."""
    if config is None:
        from ..config import Config

        config = Config.load()
    if substituters is None and not config.substitute:
        return set()
    subs_given = isinstance(substituters, Substituters)
    if isinstance(substituters, Substituters):
        subs = substituters
    else:
        subs = Substituters.open(config.substituters if substituters is None else substituters,
                                 store_dir=store.store_dir, config=config)
    keys = dict(config.trusted_keys()) if trusted_keys is None else trusted_keys
    sigs_needed = config.require_sigs if require_sigs is None else require_sigs
    check_locally = store.checks_signatures_locally
    added: set[str] = set()
    try:
        wanted = [p for p in dict.fromkeys(paths)]
        valid = store.query_valid_paths(wanted) if wanted else set()
        todo = [p for p in wanted if p not in valid]
        for sub in subs.stores:
            if not todo:
                break
            if id(sub) in subs.dead:
                continue
            try:
                have = sub.query_valid_paths(todo)
            except NartoolError as e:
                if _unreachable(e):
                    subs.kill(sub, e)
                else:
                    log.warning("warning: substituter '%s' failed: %s", sub.uri, e)
                continue
            except OSError as e:
                subs.kill(sub, e)
                continue
            for p in [p for p in todo if p in have]:
                try:
                    closure = sub.query_closure_set([p])
                    local = store.query_valid_paths(closure)
                    moving: list[PathInfo] = [i for q, i in closure.items() if q not in local]
                    if sigs_needed and check_locally and not is_trusted_substituter(sub):
                        refused = unsigned_refusals(moving, store.store_dir, keys)
                        if refused:
                            log.warning("warning: the substitute for '%s' from '%s' is not signed by any of the keys in "
                                        "'trusted-public-keys'", refused[0][0], sub.uri)
                            continue
                    r = copy_paths(sub, store, [p], check_sigs=False)
                    added.update(r.copied)
                    todo.remove(p)
                except NartoolError as e:
                    if _unreachable(e):
                        subs.kill(sub, e)
                        break
                    log.warning("warning: cannot substitute '%s' from '%s': %s", p, sub.uri, e)
                except OSError as e:
                    subs.kill(sub, e)
                    break
        return added
    finally:
        if not subs_given:
            subs.close()


__all__ = ["substitute_paths", "Substituters", "priority_of", "forget_dead_substituters"]
