"""``nartool cache …``: binary caches. ``cache serve`` serves any store over HTTP."""

from __future__ import annotations

import click

from .._log import get_logger

log = get_logger("nartool.cache.server")


@click.group("cache")
def cache() -> None:
    """Binary caches (Nix's http:// substituters)."""


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter("expected ADDR:PORT (e.g. 127.0.0.1:5000, [::1]:5000, 0.0.0.0:0)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


@cache.command("serve")
@click.option("--listen", "listen", default="127.0.0.1:5000", show_default=True, metavar="ADDR:PORT",
              help="Address and port to listen on (port 0: any free port, printed on start).")
@click.option("--store", "store_uri", metavar="URI", help="The store to serve (default: the global --store).")
@click.option("--sign-key", "sign_keys", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Sign narinfos with this secret key (repeatable); signatures the store has are kept.")
@click.option("--compression", type=click.Choice(["none", "zstd"]), default="none", show_default=True,
              help="How NARs are served: as they are, or zstd-compressed on the fly.")
@click.option("--priority", type=int, default=30, show_default=True,
              help="The Priority announced in nix-cache-info (lower is preferred by Nix).")
@click.option("--writable", is_flag=True,
              help="Accept uploads (PUT, as `nix copy --to http://…` sends) from the clients the configuration "
                   "trusts (cache-serve-upload-from, cache-serve-upload-password-file); every NAR is checked "
                   "and require-sigs applies.")
@click.option("--max-connections", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Connections served at once (more wait).")
@click.option("--ready-file", type=click.Path(dir_okay=False), hidden=True,
              help="Write the URL here once listening (for scripts and tests).")
@click.pass_context
def serve(ctx: click.Context, listen: str, store_uri: str | None, sign_keys: tuple[str, ...], compression: str,
          priority: int, writable: bool, max_connections: int, ready_file: str | None) -> None:
    """Serve a store as an HTTP binary cache (like nix-serve and harmonia).

    \b
    Clients: nix-store -r PATH --option substituters http://ADDR:PORT
               --option trusted-public-keys "$(nartool key public KEYFILE)"
             nix copy --from http://ADDR:PORT PATH
             nartool copy --from http://ADDR:PORT PATH
             nix copy --to http://ADDR:PORT PATH        (with --writable)

    Routes: /nix-cache-info, /HASH.narinfo (signed with --sign-key), /nar/… (streamed
    from the store), /HASH.ls (listing), /log/DRV. ETag and Cache-Control are set;
    If-None-Match gets 304. SIGTERM or Ctrl-C stops the server after the requests in
    progress have finished.
    """
    from ..cache.server import CacheServer, ServeOptions, read_password_file
    from ..config import Config
    from ..store.signing import load_secret_key
    from ..store.uri import open_store

    obj = ctx.find_root().obj
    host, port = _listen(listen)
    config = Config.load()
    keys = [load_secret_key(f) for f in sign_keys]
    password = None
    if writable and config.cache_serve_upload_password_file:
        password = read_password_file(config.cache_serve_upload_password_file)
    options = ServeOptions(compression=compression, priority=priority, sign_keys=keys, writable=writable,
                           upload_from=config.cache_serve_upload_from, upload_password=password,
                           require_sigs=config.require_sigs, trusted_keys=dict(config.trusted_keys()),
                           max_connections=max_connections)
    uri = store_uri if store_uri is not None else getattr(obj, "store_root", None)
    store = open_store(uri, store_dir=getattr(obj, "store_dir", "/nix/store"))
    try:
        server = CacheServer(store, (host, port), options)
    except OSError as e:
        store.close()
        from ..errors import StoreError

        raise StoreError(f"cannot listen on {listen}: {e.strerror or e}", rule="listen-failed") from None
    try:
        log.info("serving %s as a binary cache on %s%s", store.uri, server.url,
                 " (writable)" if writable else "")
        if ready_file:
            import os

            tmp = f"{ready_file}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(server.url + "\n")
            os.replace(tmp, ready_file)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            log.info("shutting down")
        server.close_gracefully()
    finally:
        server.server_close()
        store.close()


__all__ = ["cache"]
