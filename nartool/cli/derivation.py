"""``nartool derivation …``: show and add ``.drv`` files as Nix does (docs/derivations.md)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .common import open_store


@click.group()
def derivation() -> None:
    """Show and add derivations (.drv files), byte-compatible with Nix.

    A `.drv` is read as bytes (it need not be UTF-8); in JSON, bytes that are not valid UTF-8
    appear as \\udcXX escapes (docs/names.md). See docs/derivations.md.
    """


def _pretty(obj: Any, depth: int = 0) -> str:
    """JSON laid out as Nix 2.8's writer indents it (two spaces, ``"key": value``, empty
    containers as ``{}`` / ``[]``); strings as :func:`~nartool.nar.listing.json_text` writes
    them."""
    from ..nar.listing import json_text

    if isinstance(obj, str):
        return json_text(obj)
    if isinstance(obj, bool):
        return "true" if obj else "false"
    pad = "\n" + "  " * (depth + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        body = ",".join(f"{pad}{json_text(str(k))}: {_pretty(v, depth + 1)}" for k, v in obj.items())
        return "{" + body + "\n" + "  " * depth + "}"
    if isinstance(obj, list):
        if not obj:
            return "[]"
        return "[" + ",".join(pad + _pretty(v, depth + 1) for v in obj) + "\n" + "  " * depth + "]"
    return json.dumps(obj)


class _Lazy:
    """The --store store, opened on first use (plain .drv files need none)."""

    def __init__(self, ctx: click.Context) -> None:
        self.ctx = ctx
        self.st: Any = None

    def __call__(self) -> Any:
        if self.st is None:
            self.st = open_store(self.ctx)
        return self.st


def _store_dir(ctx: click.Context) -> str:
    return getattr(ctx.find_root().obj, "store_dir", "/nix/store")


@derivation.command(name="show")
@click.argument("drvs", metavar="DRV...", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Also show the derivations they depend on (their closure).")
@click.pass_context
def show(ctx: click.Context, drvs: tuple[str, ...], recursive: bool) -> None:
    """Print derivations as JSON, exactly as Nix 2.8's `nix show-derivation` does.

    Each DRV is a `.drv` store path in the --store store (a store path that is not a `.drv`
    stands for its deriver), or a `.drv` file anywhere (shown under its absolute path; with
    -r its inputs are read from the store). Output is sorted by path; bytes that are not
    UTF-8 are written as \\udcXX escapes.
    """
    from ..errors import StoreError
    from ..store.closure import closure_set
    from ..store.derivation import (
        DRV_READ_MAX,
        DerivationError,
        drv_name_from_path,
        parse_derivation,
        read_derivation,
    )

    store = _Lazy(ctx)
    sd = _store_dir(ctx)
    shown: dict[str, Any] = {}
    store_paths: set[str] = set()
    for arg in drvs:
        if arg.startswith(sd + "/") or (os.path.islink(arg) and os.readlink(arg).startswith(sd + "/")):
            p = store().follow(arg)
            if not p.endswith(".drv"):
                info = store().path_info(p)
                if not info.deriver:
                    raise StoreError("path has no deriver", path=p, rule="no-deriver")
                p = info.deriver
            store_paths.add(p)
            continue
        with open(arg, "rb") as f:
            data = f.read(DRV_READ_MAX + 1)
        if len(data) > DRV_READ_MAX:
            raise DerivationError("derivation too large", path=arg, rule="too-large")
        try:
            d = parse_derivation(data, drv_name_from_path(arg))
        except DerivationError as e:
            e.path = arg
            raise
        shown[os.path.abspath(arg)] = d
        if recursive:
            store_paths |= {p for p in d.references() if p.endswith(".drv")}
    if recursive and store_paths:
        st = store()
        store_paths = {p for p in closure_set(store_paths, st.query_references) if p.endswith(".drv")}
    for p in store_paths:
        shown[p] = read_derivation(store(), p)
    out = {p: shown[p].to_json(sd) for p in sorted(shown, key=lambda k: k.encode("utf-8", "surrogateescape"))}
    sys.stdout.buffer.write((_pretty(out) + "\n").encode("utf-8", "surrogateescape"))
    sys.stdout.buffer.flush()


@derivation.command(name="add")
@click.option("--dry-run", is_flag=True, help="Print the .drv path without adding it.")
@click.pass_context
def add(ctx: click.Context, dry_run: bool) -> None:
    """Add a derivation read as JSON from stdin; print its .drv store path.

    The JSON is one derivation in `nix show-derivation`'s form (the object itself, or an
    object with one path key holding it), with its output paths empty or left out and the
    env variables that carry them empty. The output paths are computed exactly as Nix's
    `derivation` does (input-addressed: from the hash modulo of the derivation, reading the
    input derivations from the store; fixed-output: from `hashAlgo` and `hash`), and the
    `.drv` is added as a text path referring to its inputSrcs and inputDrvs. The name is
    the JSON's `name` key, else env.name.
    """
    from ..store.derivation import Derivation, DerivationError, compute_outputs, store_resolver

    raw = sys.stdin.buffer.read()
    try:
        obj = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as e:
        raise DerivationError(f"invalid JSON on stdin: {e}", rule="bad-json") from None
    name = None
    if isinstance(obj, dict) and "outputs" not in obj and len(obj) == 1:
        (key, obj), = obj.items()
        base = key.rsplit("/", 1)[-1]
        if base.endswith(".drv") and "-" in base:
            name = base.split("-", 1)[1][:-4]
    drv = Derivation.from_json(obj, name)
    st = open_store(ctx)
    full = compute_outputs(drv, store_resolver(st), st.store_dir)
    path = full.store_path(st.store_dir)
    if not dry_run:
        data = full.unparse()
        add_text = getattr(st, "add_text", None)
        if add_text is not None:
            info = add_text(full.name + ".drv", data, full.references())
        else:  # any other store: the NAR of the text, with its content address
            info = st.add_nar(_text_info(path, data, full.references()), _text_nar(data))
        if info.path != path:  # pragma: no cover - both are make_text_path over the same bytes
            raise DerivationError("the store chose another path", expected=path, got=info.path, rule="internal")
    click.echo(path)


def _text_nar(data: bytes) -> bytes:
    from ..nar import nar_bytes
    from ..nar.events import File

    return nar_bytes([File(b"", False, len(data), [data])])


def _text_info(path: str, data: bytes, references: set[str]) -> Any:
    import hashlib

    from ..hashes import Hash
    from ..store.paths import ContentAddress
    from ..store.types import PathInfo

    nar = _text_nar(data)
    return PathInfo(path, Hash("sha256", hashlib.sha256(nar).digest()), len(nar), frozenset(references),
                    ca=ContentAddress("text", Hash("sha256", hashlib.sha256(data).digest())).render())
