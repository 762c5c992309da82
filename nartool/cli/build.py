"""``nartool build`` (realise derivations, as ``nix-store --realise``) and ``nartool store log``."""

from __future__ import annotations

import sys

import click

from .common import open_store


@click.command(name="build")
@click.argument("targets", nargs=-1, required=True, metavar="DRV|DRV!OUT[,OUT…]…")
@click.option("--option", "options", nargs=2, multiple=True, metavar="NAME VALUE",
              help="Set a build setting (Nix's names, e.g. sandbox, max-silent-time, sandbox-paths).")
@click.option("--keep-going", "-k", is_flag=True, help="Keep building what does not depend on a failed build.")
@click.option("--max-jobs", "-j", metavar="N", help="How many builds run at once (or 'auto').")
@click.option("--cores", metavar="N", help="NIX_BUILD_CORES of the builders.")
@click.option("--max-silent-time", metavar="SECONDS", help="Kill a builder silent for this long.")
@click.option("--timeout", metavar="SECONDS", help="Kill a builder running for this long.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.pass_context
def build_cmd(ctx: click.Context, targets: tuple[str, ...], options: tuple[tuple[str, str], ...], keep_going: bool,
              max_jobs: str | None, cores: str | None, max_silent_time: str | None, timeout: str | None,
              as_json: bool) -> None:
    """Build derivations (.drv store paths, or DRV!OUT,… for some outputs) and print
    their output paths. Input derivations are built first; valid outputs are not rebuilt. The
    build log goes to stderr; a failed build exits with Nix's status (100 build failure, 101
    timeout, 102 hash mismatch, 1 otherwise)."""
    if sys.platform == "linux":
        # the sandbox zygote's start-up overlaps with the imports below and the store's opening
        from ..build import zygote
        zygote.prestart()
    from .fastbuild import run_build

    store = open_store(ctx)
    status = run_build(store, targets, options, keep_going=keep_going, max_jobs=max_jobs, cores=cores,
                       max_silent_time=max_silent_time, timeout=timeout, as_json=as_json, echo=click.echo)
    if status:
        ctx.exit(status)


@click.command(name="log")
@click.argument("path", metavar="PATH|DRV")
@click.pass_context
def store_log(ctx: click.Context, path: str) -> None:
    """Print the stored build log of a derivation, or of the derivation that built PATH (as
    nix-store -l)."""
    from ..build import read_log
    from ..errors import StoreError
    from ..store.local import LocalStore

    store = open_store(ctx)
    if not isinstance(store, LocalStore):
        from ..errors import UnsupportedError

        raise UnsupportedError(store.uri, "build logs (they are kept in a local store)")
    p = store.follow(path)
    drvs = [p] if p.endswith(".drv") else []
    if not drvs:
        info = store.query_path_info(p)
        if info is not None and info.deriver:
            drvs.append(info.deriver)
        drvs += sorted(store.db.derivers_of_output(p) - set(drvs))
    for d in drvs:
        try:
            data = read_log(store.state_dir, d)
        except StoreError:
            continue
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    raise StoreError(f"build log of '{p}' is not available", path=p, rule="no-log")
