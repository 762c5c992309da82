"""Shared CLI plumbing: error reporting, binary stdout, progress."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any, BinaryIO

import click

from ..errors import NartoolError


def stdout_bin() -> BinaryIO:
    return sys.stdout.buffer


def refuse_binary_to_tty(what: str) -> None:
    if sys.stdout.isatty():
        raise click.UsageError(f"refusing to write {what} to a terminal; use -o FILE or a redirection")


def write_chunks(chunks: Iterable[bytes | bytearray | memoryview], out: BinaryIO) -> int:
    n = 0
    for c in chunks:
        out.write(c)
        n += len(c)
    out.flush()
    return n


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


def fsdecode(b: bytes) -> str:
    return os.fsdecode(b)


def report_error(e: BaseException, debug: bool) -> int:
    """Print one line for a known error; a traceback only with ``--debug``."""
    if debug:
        import traceback

        traceback.print_exception(e)
    if isinstance(e, NartoolError):
        msg = str(e)
    elif isinstance(e, OSError):
        msg = f"{e.strerror or e}" + (f": {e.filename!r}" if e.filename else "")
    else:
        msg = f"internal error: {type(e).__name__}: {e}" + ("" if debug else " (run with --debug for a traceback)")
    click.echo(f"error: {msg}", err=True)
    return 1


def open_store(ctx: click.Context, *, case_hack: bool | None = None) -> Any:
    """The :class:`~nartool.store.local.LocalStore` chosen by the global ``--store`` /
    ``--store-dir`` options (default: the embedded store), closed when the command ends."""
    from ..store.local import LocalStore, default_root

    obj = ctx.find_root().obj
    root = getattr(obj, "store_root", None) or default_root()
    if case_hack is None:
        case_hack = ctx.meta.get("nartool.store_case_hack")
    store = LocalStore(root, getattr(obj, "store_dir", "/nix/store"), case_hack=case_hack)
    ctx.call_on_close(store.close)
    return store
