"""``nartool`` command line entry point."""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from .process import hoist_store_option, run_guarded, status_of


class Ctx:
    """Global options, available to every subcommand as ``ctx.obj``."""

    def __init__(self, store: str | None, store_dir: str, debug: bool) -> None:
        self.store_root = store
        self.store_dir = store_dir
        self.debug = debug


# Subcommands are imported when used, so that `nartool nar hash` does not pay for the store,
# the remote protocol or cryptography at start-up.
_LAZY = {
    "nar": ("nartool.cli.nar", "nar"),
    "store": ("nartool.cli.store", "store"),
    "serve": ("nartool.cli.remote", "serve"),
    "copy-closure": ("nartool.cli.remote", "copy_closure_cmd"),
    "copy": ("nartool.cli.copy", "copy_cmd"),
    "key": ("nartool.cli.key", "key"),
    "derivation": ("nartool.cli.derivation", "derivation"),
    "cache": ("nartool.cli.cache", "cache"),
    "build": ("nartool.cli.build", "build_cmd"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY and cmd_name not in self.commands:
            module, attr = _LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nartool")
@click.option("--store", "store", metavar="URI", envvar="NARTOOL_STORE",
              help="The store: a directory (its root), local?root=DIR, memory:// or ssh://[USER@]HOST[?…] "
                   "(env NARTOOL_STORE; default: an embedded store in the user's data dir). Also accepted "
                   "after the subcommand, as Nix's --store is.")
@click.option("--store-dir", default="/nix/store", show_default=True, envvar="NARTOOL_STORE_DIR",
              help="Logical store directory of store paths.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--refresh", is_flag=True,
              help="Ask binary caches again instead of trusting stored answers (revalidates the lookup cache).")
@click.pass_context
def cli(ctx: click.Context, store: str | None, store_dir: str, debug: bool, refresh: bool) -> None:
    """nartool: Nix-compatible NAR archives, stores and closure copying.

    \b
    Groups:
      nar            dump, restore, hash, list and extract NAR archives (byte-identical to Nix)
      store          add, query, export/import, verify, sign and garbage-collect store paths
      serve          speak Nix's serve protocol on stdin/stdout (an SSH forced command)
      copy           copy closures between any two stores (`nix copy --from URI --to URI`)
      copy-closure   copy closures to or from another machine over SSH
      derivation     show and add derivations (.drv files) as Nix does
      build          build derivations in a sandbox, as nix-store --realise does
      key            generate and inspect ed25519 signing keys (Nix's format)
      cache          serve a store as an HTTP binary cache (`cache serve`)
    Run `nartool COMMAND --help` for details.
    """
    ctx.obj = Ctx(store, store_dir, debug)
    if refresh:
        from ..cache.lookup import set_refresh

        set_refresh()


def _say_interrupted() -> None:
    try:
        click.echo("interrupted", err=True)
    except OSError:  # after SIGHUP the terminal may be gone
        pass


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    args = hoist_store_option(list(argv if argv is not None else sys.argv[1:]))
    sys.exit(run_guarded(lambda: _run(args, debug), debug))


def _run(argv: list[str], debug: bool) -> int:
    """Run the CLI; returns the exit status (errors reported on stderr)."""
    try:
        rc = cli.main(args=argv, prog_name="nartool", standalone_mode=False)
        return rc if isinstance(rc, int) else 0  # ctx.exit(n) returns n without standalone mode
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        _say_interrupted()
        return 130
    except (Exception, SystemExit) as e:  # noqa: BLE001 (a broken pipe, sys.exit, errors: as the fast paths)
        return status_of(e, debug, lambda line: click.echo(line, err=True))


if __name__ == "__main__":
    main()


def serve_main() -> None:
    """``nartool-serve``: ``nartool serve`` under a name real Nix can use as ``remote-program``
    (Nix runs ``PROG --serve --write [--store DIR]``)."""
    main(["serve", *sys.argv[1:]])
