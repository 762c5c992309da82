"""Copy closures between a local store and a serve-protocol remote (``nix-copy-closure``).

A thin front end over :func:`nartool.store.ops.copy_paths` with the remote as a store
(:class:`nartool.remote.store.SSHStore` over an open :class:`ServeClient`):

``--to``: the closure is computed locally; one ``QueryValidPaths`` finds what the remote lacks
(carrying nartool's announcement probe); the missing paths go out in dependency order as
pipelined ``AddToStoreNar`` commands.

``--from``: one ``QueryClosure`` and one ``QueryPathInfos``; the local store's validity is checked
locally; pipelined ``DumpStorePath`` requests, each NAR imported with ``add_nar`` (checking the
queried hash, size and content address from the stream) inside ``local.batch()`` groups, so a
cut connection leaves only complete, verified, registered paths behind and a rerun fetches
just the rest. Whenever the next read from the remote would block, the open group is committed
first (``commit_pending``), so a slow or stalled server never keeps local paths locked and
unregistered.

Trust is settled before any NAR byte moves: a nartool server announces whether it accepts
imports and unsigned paths (see :mod:`nartool.remote.serve`); when it would refuse some
paths, the copy fails up front naming them. Real Nix servers announce nothing (they import
unsigned paths, or their daemon decides).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..store.ops import BATCH_BYTES, BATCH_PATHS, CopyResult, Progress, ProgressFn, copy_paths
from ..store.types import PathInfo, Store
from .client import ServeClient
from .store import SSHStore


def copy_closure(local: Store, client: ServeClient, paths: Iterable[str], direction: str = "to", *,
                 include_outputs: bool = False, dry_run: bool = False, progress: ProgressFn | None = None,
                 check_trust: bool = True, on_start: Callable[[list[PathInfo]], None] | None = None,
                 on_path: Callable[[str], None] | None = None, substitute: bool = False) -> CopyResult:
    """Copy the closure of ``paths`` to (``direction="to"``) or from (``"from"``) the remote.
    Signatures are not checked on the receiving local side (as ``nix-copy-closure``); a nartool
    server applies its own trust rules, asked before anything is sent unless not ``check_trust``.
    ``substitute`` (``nix-copy-closure -s`` towards the remote): its validity query asks the remote
    to fetch missing paths from its own substituters first."""
    if direction not in ("to", "from"):
        raise ValueError("direction must be 'to' or 'from'")
    remote = SSHStore.from_client(client, probe_ext=check_trust)
    remote.substitute = substitute  # "to": the remote first fetches what it lacks from its substituters
    if direction == "to":
        return copy_paths(local, remote, paths, include_outputs=include_outputs, dry_run=dry_run,
                          progress=progress, direction="to", on_start=on_start, on_path=on_path)
    return copy_paths(remote, local, paths, include_outputs=include_outputs, dry_run=dry_run,
                      progress=progress, direction="from", on_start=on_start, on_path=on_path)


__all__ = ["copy_closure", "CopyResult", "Progress", "ProgressFn", "BATCH_PATHS", "BATCH_BYTES"]
