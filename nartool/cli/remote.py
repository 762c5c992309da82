"""``nartool serve`` and ``nartool copy-closure``: Nix's serve protocol, both ends."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .common import fmt_bytes, open_store, report_copy


def _open_store(ctx: click.Context, store: str | None) -> Any:
    if store:
        from ..store.local import LocalStore

        obj = ctx.find_root().obj
        st = LocalStore(store, getattr(obj, "store_dir", "/nix/store"))
        ctx.call_on_close(st.close)
        return st
    return open_store(ctx)


@click.command()
@click.option("--write", is_flag=True, help="Allow imports (AddToStoreNar, ImportPaths) and builds (BuildDerivation, BuildPaths; see docs/remote-builds.md).")
@click.option("--store", "store", metavar="ROOT", help="Store root (overrides the global --store; as Nix's --store DIR).")
@click.option("--compress", type=click.Choice(["zstd"]), default=None,
              help="Offer a zstd-compressed session (only nartool clients take it up).")
@click.option("--serve", "_serve", is_flag=True, hidden=True, help="Ignored (for `nix-store --serve` wrappers).")
@click.option("-v", "--verbose", is_flag=True,
              help="Say on stderr, once at start-up, which trust rules apply to the login user.")
@click.pass_context
def serve(ctx: click.Context, write: bool, store: str | None, compress: str | None, _serve: bool,
          verbose: bool) -> None:
    """Speak Nix's serve protocol on stdin/stdout, like `nix-store --serve [--write]`.

    Trust: users outside `trusted-users` may import only paths signed by a key in
    `trusted-public-keys`, or content-addressed ones, so ordinary build outputs from an
    untrusted login user are refused. To accept them, add `trusted-users = USER` to
    /etc/nartool/nartool.conf (only that system file counts here; a user's own configuration is
    ignored, except root's), or sign the paths. `allowed-users` decides who may be served at
    all. -v prints the rules that apply to the login user.

    \b
    As an ssh forced command, by absolute path (sshd's PATH lacks ~/.local/bin):
      command="/home/u/.local/bin/nartool serve --write" ssh-ed25519 AAAA…
    Real Nix clients call the `nartool-serve` command installed next to `nartool` (it is
    `nartool serve`; no wrapper script needed):
      nix-copy-closure --to 'host?remote-program=/home/u/.local/bin/nartool-serve' PATH

    Errors are `error: …` on stderr with exit status 1; stdout carries protocol bytes only.
    """
    from ..config import Config, UserIdentity
    from ..remote.serve import serve_command

    # protocol bytes only on fd 1: anything printed by mistake goes to stderr instead
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto_in = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115
    config = Config.load_for_serve()  # trust only from the system file (see nartool.config)
    user = UserIdentity.current()
    if verbose:
        click.echo(trust_summary(config, user, write), err=True)
    st = _open_store(ctx, store)
    code = serve_command(st, proto_in, proto_out, write=write, config=config, user=user,
                         log=sys.stderr, compress=compress)
    proto_out.close()
    if code:
        # (not ctx.exit: nartool.cli.main runs click with standalone_mode=False and drops its result)
        sys.exit(code)


def trust_summary(config: Any, user: Any, write: bool) -> str:
    """One line for ``serve -v``: the trust rules that apply to ``user`` in this session."""
    from ..config import SYSTEM_CONFIG

    allowed = config.is_allowed(user)
    trusted = config.is_trusted(user)
    keys = len(config.trusted_keys())
    files = ", ".join(config.sources) if config.sources else f"none ({SYSTEM_CONFIG} absent: built-in defaults)"
    parts = [f"nartool serve: user '{user.name}'",
             "allowed" if allowed else "NOT allowed ('allowed-users')",
             "trusted" if trusted else "not trusted",
             f"require-sigs = {'true' if config.require_sigs else 'false'}",
             f"{keys} trusted public key{'' if keys == 1 else 's'}",
             "imports allowed (--write)" if write else "read-only (no --write)"]
    line = ", ".join(parts) + f"; configuration: {files}"
    if allowed and write and not trusted and config.require_sigs:
        line += (f"; unsigned paths will be refused (add 'trusted-users = {user.name}' to {SYSTEM_CONFIG} "
                 "to accept them, or sign them with a key in its 'trusted-public-keys')")
    return line


def parse_host(spec: str) -> tuple[str, dict[str, str]]:
    """``[USER@]HOST[?key=value&…]`` → (login, params), as Nix's ``ssh://`` store URIs."""
    if spec.startswith("ssh://"):
        spec = spec[len("ssh://"):]
    host, _, query = spec.partition("?")
    if not host:
        raise click.UsageError("empty host")
    from urllib.parse import parse_qsl  # (here: `nartool serve` starts without it)

    return host, dict(parse_qsl(query, keep_blank_values=True))


class _ProgressLine:
    def __init__(self) -> None:
        self.shown = False

    def __call__(self, p: Any) -> None:
        eta = p.eta
        eta_s = f"ETA {int(eta)}s" if eta is not None and not p.finished else ""
        line = (f"[{p.paths_done}/{p.paths_total} paths, {fmt_bytes(p.bytes_done)}/{fmt_bytes(p.bytes_total)}, "
                f"{fmt_bytes(p.rate)}/s{', ' + eta_s if eta_s else ''}]")
        sys.stderr.write("\r\x1b[K" + line)
        if p.finished:
            sys.stderr.write("\n")
        sys.stderr.flush()
        self.shown = True


class NixLog:
    """Nix's log lines for a copy, on stderr, for when it is not a terminal (cron, CI):
    ``copying N paths...`` once, then ``copying path '…' to 'URI'...`` (or ``from``, or
    ``from 'A' to 'B'``) per path; Nix 2.8's wording. A path's line is written when it is
    durable on the destination (the transfers are pipelined, so starts are not meaningful)."""

    def __init__(self, src: str | None, dst: str | None) -> None:
        self.src = src
        self.dst = dst

    def start(self, infos: list[Any]) -> None:
        sys.stderr.write(f"copying {len(infos)} paths...\n")
        sys.stderr.flush()

    def path(self, path: str) -> None:
        if self.src is None:
            where = f"to '{self.dst}'"
        elif self.dst is None:
            where = f"from '{self.src}'"
        else:
            where = f"from '{self.src}' to '{self.dst}'"
        sys.stderr.write(f"copying path '{path}' {where}...\n")
        sys.stderr.flush()


@click.command("copy-closure")
@click.option("--to", "to_host", metavar="[USER@]HOST", help="Copy the closure of PATHs to HOST.")
@click.option("--from", "from_host", metavar="[USER@]HOST", help="Copy the closure of PATHs from HOST.")
@click.argument("paths", nargs=-1, required=True)
@click.option("--include-outputs", is_flag=True, help="Also copy the valid outputs of derivations in the closure.")
@click.option("--dry-run", is_flag=True, help="Only show what would be copied.")
@click.option("--compress", type=click.Choice(["zstd"]), default=None,
              help="Compress the session with zstd (only towards a nartool server; ignored for Nix).")
@click.option("--gzip", "ssh_compress", is_flag=True,
              help="Let ssh compress the connection (ssh -C), which is what nix-copy-closure 2.8 does with "
                   "--gzip (its ?compress=true); the NARs themselves are not gzipped. Same as ?compress=true.")
@click.option("--bzip2", "bzip2", is_flag=True,
              help="As nix-copy-closure 2.8: warns that it is not implemented and falls back to --gzip.")
@click.option("--xz", "xz", is_flag=True,
              help="As nix-copy-closure 2.8: warns that it is not implemented and falls back to --gzip.")
@click.option("-s", "--use-substitutes", is_flag=True,
              help="Let the receiving side first fetch what it lacks from its `substituters` (binary caches, "
                   "in priority order, signatures checked by it); only the rest is sent over the connection. "
                   "With --from that is the local store; with --to the remote (nix-store --serve, or nartool "
                   "serve with substituters in its system configuration).")
@click.option("-v", "--verbose", count=True,
              help="More output (repeatable): -v also prints the summary line when stderr is not a terminal.")
@click.option("--ssh-opt", "ssh_opts", multiple=True, metavar="OPT", help="Extra ssh argument (repeatable).")
@click.option("--remote-program", default=None, metavar="PROG",
              help="Remote server: `nartool` (default, runs `nartool serve --write`) or e.g. `nix-store` "
                   "(runs `nix-store --serve --write`). Also ?remote-program=PROG in the host.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def copy_closure_cmd(ctx: click.Context, to_host: str | None, from_host: str | None, paths: tuple[str, ...],
                     include_outputs: bool, dry_run: bool, compress: str | None, ssh_compress: bool,
                     bzip2: bool, xz: bool, use_substitutes: bool, verbose: int, ssh_opts: tuple[str, ...], remote_program: str | None,
                     as_json: bool) -> None:
    """Copy the closure of PATHs to or from another machine over ssh, like `nix-copy-closure`.

    HOST may carry Nix's store-URI parameters: `?remote-program=PROG`, `?remote-store=DIR`
    (the remote runs with `--store DIR`), `?ssh-key=FILE`, `?compress=true` (ssh -C). The host
    `localhost` runs the remote command locally without ssh, as Nix does. NIX_SSHOPTS is
    honoured (split on whitespace). Only missing paths are transferred, in dependency order,
    pipelined; a nartool server's trust settings are checked before anything is sent.

    On a terminal a progress line is shown; otherwise (cron, CI) Nix's log lines go to stderr:
    `copying N paths...` and `copying path '…' to 'ssh://HOST'...` (`from` with --from) per path.
    """
    from ..remote.client import ServeClient
    from ..remote.copy import copy_closure
    from ..remote.transport import is_nartool_program, open_transport, serve_command_line

    if bool(to_host) == bool(from_host):
        raise click.UsageError("give exactly one of --to HOST and --from HOST")
    direction = "to" if to_host else "from"
    host, params = parse_host(to_host or from_host or "")
    program = remote_program or params.get("remote-program") or "nartool"
    nartool_remote = is_nartool_program(program)
    use_compress = compress if nartool_remote else None
    if compress and not nartool_remote:
        click.echo(f"warning: --compress {compress} needs a nartool remote; sending uncompressed", err=True)
    command = serve_command_line(program, params.get("remote-store"), use_compress)
    opts = list(ssh_opts)
    if params.get("ssh-key"):
        opts += ["-i", params["ssh-key"]]
    for flag, given in (("--bzip2", bzip2), ("--xz", xz)):
        if given:
            click.echo(f"warning: '{flag}' is not implemented, falling back to gzip (ssh -C)", err=True)
    if ssh_compress or bzip2 or xz or params.get("compress") == "true":
        opts.append("-C")
    local = open_store(ctx)
    if direction == "to":
        store_paths = [local.follow(p) for p in paths]
    else:
        from ..store.paths import StorePath

        store_paths = [StorePath.parse(p, local.store_dir).full(local.store_dir) for p in paths]
    transport = open_transport(host, command, opts)
    show = sys.stderr.isatty() and not as_json
    log = None
    if not show and not as_json:
        uri = f"ssh://{host}"
        log = NixLog(None, uri) if direction == "to" else NixLog(uri, None)
    try:
        client = ServeClient(transport, store_dir=local.store_dir, compress=use_compress)
        if use_substitutes and direction == "from" and not dry_run:
            from ..cache.substitute import substitute_paths
            from ..remote.store import SSHStore

            remote = SSHStore.from_client(client, probe_ext=False)
            substitute_paths(local, remote.closure(store_paths, include_outputs=include_outputs))
        result = copy_closure(local, client, store_paths, direction, include_outputs=include_outputs,
                              substitute=use_substitutes and direction == "to",
                              dry_run=dry_run, progress=_ProgressLine() if show else None,
                              on_start=log.start if log else None, on_path=log.path if log else None)
    finally:
        transport.close()
    report_copy(result, as_json=as_json, json_extra={"host": host, "remoteCommand": command},
                where=f"{direction} {host}", dry_run=dry_run, verbose=bool(show or verbose))


__all__ = ["serve", "copy_closure_cmd", "parse_host", "NixLog"]
