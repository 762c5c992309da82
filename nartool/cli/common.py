"""Shared CLI plumbing: error reporting, binary stdout, progress."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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


@contextmanager
def held_stdout() -> Iterator[BinaryIO]:
    """A binary stream whose contents reach stdout only when the block completes: output that
    must not be half-printed (a listing of a NAR that turns out to be malformed). It is held in
    memory up to 4 MiB, in an anonymous temporary file beyond, so memory stays flat."""
    import shutil
    import tempfile  # (here: every command imports this module, few need these)

    with tempfile.SpooledTemporaryFile(max_size=4 << 20) as buf:
        yield buf  # type: ignore[misc]
        buf.seek(0)
        out = stdout_bin()
        shutil.copyfileobj(buf, out, 1 << 20)
        out.flush()


def echo_json(obj: Any) -> None:
    import json

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


#: ``nartool store`` commands that need a local store (its files, roots or database)
LOCAL_ONLY_COMMANDS = frozenset({"gc", "add-root", "delete", "verify"})


def open_store(ctx: click.Context, *, case_hack: bool | None = None) -> Any:
    """The store named by the global ``--store URI`` (also accepted after the subcommand) and
    ``--store-dir``: a directory or ``local?root=DIR`` (default: the embedded store),
    ``memory://``, or ``ssh://HOST?…`` (see :mod:`nartool.store.uri`); closed when the command
    ends. Commands that work on a local store's files refuse other kinds cleanly."""
    from ..errors import UnsupportedError
    from ..store.uri import open_store as open_uri

    obj = ctx.find_root().obj
    if case_hack is None:
        case_hack = ctx.meta.get("nartool.store_case_hack")
    store = open_uri(getattr(obj, "store_root", None), store_dir=getattr(obj, "store_dir", "/nix/store"),
                     case_hack=case_hack)
    ctx.call_on_close(store.close)
    if store.scheme != "local" and ctx.info_name in LOCAL_ONLY_COMMANDS:
        raise UnsupportedError(store.uri, f"'{ctx.command_path}' (it needs a local store)")
    return store


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class ByteProgress:
    """``[label: N MiB, R MiB/s]`` on stderr while bytes flow, only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        import time

        self.label = label
        self.enabled = sys.stderr.isatty()
        self.n = 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.n += n
        if not self.enabled:
            return
        import time

        now = time.monotonic()
        if now - self.last >= 0.2:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-6)
            sys.stderr.write(f"\r\x1b[K[{self.label}: {fmt_bytes(self.n)}, {fmt_bytes(rate)}/s]")
            sys.stderr.flush()

    def chunks(self, it: Iterable[bytes | bytearray | memoryview]) -> Iterable[bytes | bytearray | memoryview]:
        for c in it:
            self.add(len(c))
            yield c
        self.done()

    def reader(self, read: Any) -> Any:
        def r(k: int) -> bytes:
            b: bytes = read(k)
            self.add(len(b))
            return b

        return r

    def done(self) -> None:
        if self.enabled and self.n:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def report_copy(result: Any, *, as_json: bool, json_extra: dict[str, Any], where: str, dry_run: bool,
                verbose: bool) -> None:
    """What ``copy`` and ``copy-closure`` print once a copy (or dry run) finished: the JSON
    result, the paths a dry run would copy, or a summary line (on a terminal or when asked)."""
    if as_json:
        echo_json({**result.to_dict(), **json_extra})
        return
    if dry_run:
        for p in result.missing:
            click.echo(p)
        click.echo(f"would copy {len(result.missing)} paths ({fmt_bytes(result.bytes_total)}) {where}", err=True)
        return
    if verbose or os.environ.get("NARTOOL_VERBOSE"):
        click.echo(f"copied {len(result.copied)} of {len(result.closure)} paths ({fmt_bytes(result.bytes_copied)}) "
                   f"{where} in {result.seconds:.2f}s", err=True)
