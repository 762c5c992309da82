"""The public Python API for NAR work: :func:`dump`, :func:`restore`, :func:`hash_path`,
:func:`ls` and :func:`cat`.

Inputs may be paths, binary files, ``read(n)`` callables or ``bytes``; compressed NARs
(zstd, xz, bzip2, gzip) are detected by their magic bytes. Everything streams.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack

from .fs.source import Exclude, NameCodec, dump_nar
from .nar.limits import DEFAULT_LIMITS, Limits
from .nar.reader import NarReader
from .nar.source import ReadFn

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)

# (imported where used, so that `nartool nar hash` does not load compression, listing or
# thread-pipeline code at start-up)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

    from .hashes import Hash
    from .nar import listing
    from .nar.events import Event

PathLike = str | bytes | os.PathLike[str]
if TYPE_CHECKING:
    NarInput = PathLike | BinaryIO | ReadFn

# names this module used to import eagerly (some callers reach them through it)
_LAZY = {"compressor": "nartool.compression", "detect": "nartool.compression",
         "open_decompressed": "nartool.compression", "restore_events": "nartool.fs.sink", "Hash": "nartool.hashes",
         "Event": "nartool.nar.events", "pipelined": "nartool.pipeline"}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "NarInput":  # (made at first use: it needs typing)
        from typing import BinaryIO

        return PathLike | BinaryIO | ReadFn
    if name == "listing":
        return importlib.import_module("nartool.nar.listing")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dump_chunks(
    path: PathLike,
    *,
    compress: str = "none",
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Iterator[bytes | bytearray | memoryview]:
    """The NAR of ``path`` as an iterator of chunks (optionally compressed)."""
    chunks = dump_nar(path, names=names, exclude=exclude, limits=limits)
    if compress == "none":
        return chunks  # a producer thread only pays off when the consumer works without the GIL
    from .compression import compressor
    from .pipeline import pipelined

    return compressor(pipelined(chunks), compress)


def dump(
    path: PathLike,
    out: PathLike | BinaryIO,
    *,
    compress: str = "none",
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Write the NAR of ``path`` to ``out`` (a path or binary file); returns bytes written.

    A path destination that is a regular file (or new) is written to a temporary sibling and
    renamed when complete; a device or pipe (``/dev/null``, a FIFO) is written directly.
    """
    if not isinstance(out, (str, bytes, os.PathLike)):
        return _dump_to(path, out, compress, names, exclude, limits)
    from .fs.osutil import output_file

    with output_file(out) as f:
        return _dump_to(path, f, compress, names, exclude, limits)


def _dump_to(path: PathLike, out: BinaryIO, compress: str, names: NameCodec | None, exclude: Exclude | None,
             limits: Limits) -> int:
    fd = None
    if compress == "none":
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
    if fd is None:
        total = 0
        w = out.write
        for c in dump_chunks(path, compress=compress, names=names, exclude=exclude, limits=limits):
            w(c)
            total += len(c)
        return total
    # a real descriptor: big files' contents go from file to output inside the kernel
    from .fs.source import dump_to_fd

    out.flush()
    return dump_to_fd(path, fd, names=names, exclude=exclude, limits=limits)


def hash_path(
    path: PathLike,
    algo: str = "sha256",
    *,
    names: NameCodec | None = None,
    exclude: Exclude | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Hash:
    """The hash of the NAR serialisation of ``path`` (what ``nix-hash --type ALGO`` computes)."""
    from .fs.source import hash_nar

    return hash_nar(path, algo, names=names, exclude=exclude, limits=limits)[0]


def _open(src: NarInput | bytes, stack: ExitStack) -> ReadFn | BinaryIO:
    """A reader for a NAR input, decompressing when needed. Plain seekable files are
    returned as they are so that skipping file contents can seek."""
    from .compression import detect, open_decompressed

    if isinstance(src, (bytes, bytearray, memoryview)):
        f: BinaryIO = io.BytesIO(bytes(src))
    elif isinstance(src, (str, bytes, os.PathLike)):
        f = stack.enter_context(open(src, "rb"))  # noqa: SIM115
    elif callable(src):
        return open_decompressed(src)[0]
    else:
        f = src
    try:
        seekable = f.seekable()
    except (AttributeError, ValueError, OSError):
        seekable = False
    if seekable:
        pos = f.tell()
        head = f.read(6)
        f.seek(pos)
        if detect(head) == "none":
            return f
    else:
        _widen_pipe(f)
    return open_decompressed(f)[0]


def _widen_pipe(f: object) -> None:
    """Give a pipe we read 1 MiB of room (the default is 64 KiB), so that its writer runs ahead
    of us instead of taking turns with us; best effort."""
    try:
        fd = f.fileno()  # type: ignore[attr-defined]
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass


def read_events(src: NarInput | bytes, stack: ExitStack, *, limits: Limits = DEFAULT_LIMITS) -> Iterator[Event]:
    return NarReader(_open(src, stack), limits=limits).events()


def restore(
    dest: PathLike,
    src: NarInput | bytes,
    *,
    names: NameCodec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Restore the NAR read from ``src`` at ``dest`` (which must not exist). All or nothing."""
    from .fs.sink import restore_events

    with ExitStack() as stack:
        # (the reader itself, not its events: restore_events then lets it create small files)
        restore_events(NarReader(_open(src, stack), limits=limits), dest, names=names)


def ls(src: NarInput | bytes, path: str | bytes = "/", *, recursive: bool = False,
       directory: bool = False) -> list[listing.Entry]:
    """Entries of the NAR at ``path`` (see :func:`nartool.nar.listing.entries`)."""
    from .nar import listing

    with ExitStack() as stack:
        return list(listing.entries(read_events(src, stack), listing.split_path(path), recursive, directory))


def cat(src: NarInput | bytes, path: str | bytes) -> Iterator[bytes]:
    """Stream the contents of the regular file at ``path`` inside the NAR."""
    from .nar import listing

    with ExitStack() as stack:
        yield from listing.cat(read_events(src, stack), listing.split_path(path))
