"""``nartool build`` (realise derivations, as ``nix-store --realise``) and ``nartool store log``."""

from __future__ import annotations

import sys
from typing import Any

import click

from .common import echo_json, open_store


def _stderr_write(data: bytes) -> None:
    try:
        sys.stderr.flush()
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
    except (OSError, ValueError):
        pass


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
    from ..build import BuildOptions, BuildStatus, build_paths, exit_status
    from ..build.goal import SUCCESS
    from ..store.local import LocalStore

    store = open_store(ctx)
    if not isinstance(store, LocalStore):
        from ..errors import UnsupportedError

        raise UnsupportedError(store.uri, "builds (they need a local store)")
    overrides = dict(options)
    for name, value in (("max-jobs", max_jobs), ("cores", cores), ("max-silent-time", max_silent_time),
                        ("timeout", timeout)):
        if value is not None:
            overrides[name] = value
    opts = BuildOptions.from_config(None, overrides, keep_going=keep_going)
    tty = sys.stderr.isatty()
    paths = [store.follow(t.split("!", 1)[0]) + (("!" + t.split("!", 1)[1]) if "!" in t else "") for t in targets]

    def notice(msg: str) -> None:
        if msg.startswith("error: "):
            msg = msg.replace("\n", "\n       ")  # Nix indents an error's further lines under its text
        _stderr_write(msg.encode("utf-8", "surrogateescape") + b"\n")

    def on_failure(drv: str, r: Any) -> None:
        notice(f"error: {r.error_msg}")

    every: dict[str, Any] = {}
    results = build_paths(store, paths, opts, log=_stderr_write, notice=notice, keep_colours=tty,
                          on_failure=on_failure, all_results=every)
    failed = [(t, r) for t, r in zip(paths, results, strict=True) if r.status not in SUCCESS]
    out: list[dict[str, Any]] = []
    for t, r in zip(paths, results, strict=True):
        drv_path, _, wanted = t.partition("!")
        outs = store.query_derivation_outputs(drv_path)
        if wanted and wanted != "*":
            outs = {k: v for k, v in outs.items() if k in wanted.split(",")}
        ok = r.status in SUCCESS
        out.append({"drvPath": drv_path, "outputs": outs if ok else {}, "status": BuildStatus(r.status).name,
                    **({"error": r.error_msg} if not ok else {})})
        if ok and not as_json and not failed:  # (as nix-store -r: no paths at all after a failure)
            for _, p in sorted(outs.items()):
                click.echo(p)
    if as_json:
        echo_json(out)
    if failed:
        if len(failed) == 1 and failed[0][1].error_msg:
            notice(f"error: {failed[0][1].error_msg}")
        else:
            # as Nix: every failed target's error, the first one's last, then the summary (sorted)
            for _, r in failed[1:] + failed[:1]:
                if r.error_msg:  # (not for a target that was never started)
                    notice(f"error: {r.error_msg}")
            notice("error: build of " + ", ".join(f"'{t}'" for t in sorted({t for t, _ in failed})) + " failed")
        ctx.exit(exit_status(every.values()))


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
