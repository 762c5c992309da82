"""``nartool copy --from URI --to URI PATH…``: copy closures between any two stores (``nix copy``)."""

from __future__ import annotations

import sys

import click

from .common import report_copy


@click.command("copy")
@click.option("--from", "src_uri", metavar="URI", help="The store to copy from (default: --store).")
@click.option("--to", "dst_uri", metavar="URI", help="The store to copy to (default: --store).")
@click.argument("paths", nargs=-1, required=True)
@click.option("--no-check-sigs", is_flag=True,
              help="Do not require signatures of what a local destination receives.")
@click.option("--include-outputs", is_flag=True, help="Also copy the valid outputs of derivations in the closure.")
@click.option("--dry-run", is_flag=True, help="Only show what would be copied.")
@click.option("-s", "--substitute-on-destination", "substitute", is_flag=True,
              help="First let the destination fetch what it lacks from the configured `substituters` (binary "
                   "caches, signatures checked); only the rest is copied from the source (as `nix copy -s`).")
@click.option("-v", "--verbose", count=True,
              help="More output (repeatable): -v also prints the summary line when stderr is not a terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (camelCase keys).")
@click.option("--refresh", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, param, value: _refresh(value),
              help="Ask binary caches again instead of trusting stored answers (as the global --refresh).")
@click.pass_context
def copy_cmd(ctx: click.Context, src_uri: str | None, dst_uri: str | None, paths: tuple[str, ...],
             no_check_sigs: bool, include_outputs: bool, dry_run: bool, substitute: bool, verbose: int,
             as_json: bool) -> None:
    """Copy the closures of PATHs from one store to another, like `nix copy`.

    \b
    Stores are URIs: a directory or local?root=DIR, memory://, or
    ssh://[USER@]HOST[?remote-program=PROG&remote-store=DIR&ssh-key=FILE&compress=true]
    (a serve-protocol server: `nartool serve`, or `nix-store --serve` with
    remote-program=nix-store). --from and --to default to the global --store.

    Only the paths the destination lacks are copied, in dependency order; towards or from
    an ssh store the requests are pipelined (about one round trip for the whole closure).
    A local destination checks what it receives like Nix: with `require-sigs` (default true)
    every path must be content-addressed or signed by a key in `trusted-public-keys`, or
    the copy is refused before anything is transferred; --no-check-sigs skips this. An ssh
    destination decides for itself (a nartool server is asked before anything is sent).

    On a terminal a progress line is shown; otherwise Nix's log lines go to stderr:
    `copying N paths...` and `copying path '…' to 'URI'...` per path (`from 'URI'` when the
    destination is local, `from 'A' to 'B'` between two non-local stores).
    """
    from ..store.ops import copy_paths
    from ..store.uri import open_store

    if src_uri is None and dst_uri is None:
        raise click.UsageError("you must pass '--from' and/or '--to'")
    obj = ctx.find_root().obj
    default = getattr(obj, "store_root", None)
    store_dir = getattr(obj, "store_dir", "/nix/store")
    src = open_store(src_uri if src_uri is not None else default, store_dir=store_dir)
    ctx.call_on_close(src.close)
    dst = open_store(dst_uri if dst_uri is not None else default, store_dir=store_dir)
    ctx.call_on_close(dst.close)
    store_paths = [src.follow(p) for p in paths]
    check_sigs = False
    keys = {}
    if not no_check_sigs and dst.checks_signatures_locally:
        from ..config import Config

        config = Config.load()
        check_sigs = config.require_sigs
        keys = dict(config.trusted_keys())
    if substitute and not dry_run:
        from ..cache.substitute import substitute_paths

        substitute_paths(dst, src.closure(store_paths, include_outputs=include_outputs))
    show = sys.stderr.isatty() and not as_json
    progress = None
    log = None
    if show:
        from .remote import _ProgressLine

        progress = _ProgressLine()
    elif not as_json:
        from .remote import NixLog

        # Nix names a local store's side implicitly: "to 'DST'" from it, "from 'SRC'" into it
        def is_local(uri: str) -> bool:
            return uri == "local" or uri.startswith("local?")

        def shown(uri: str) -> str:  # Nix names an ssh store by its host only
            return uri.partition("?")[0] if uri.startswith("ssh://") else uri

        log = NixLog(None if is_local(src.uri) else shown(src.uri),
                     None if is_local(dst.uri) and not is_local(src.uri) else shown(dst.uri))
    result = copy_paths(src, dst, store_paths, include_outputs=include_outputs, check_sigs=check_sigs,
                        trusted_keys=keys, dry_run=dry_run, progress=progress,
                        on_start=log.start if log else None, on_path=log.path if log else None)
    report_copy(result, as_json=as_json, json_extra={"from": src.uri, "to": dst.uri},
                where=f"from {src.uri} to {dst.uri}", dry_run=dry_run, verbose=bool(show or verbose))


def _refresh(value: bool) -> None:
    if value:
        from ..cache.lookup import set_refresh

        set_refresh()


__all__ = ["copy_cmd"]
