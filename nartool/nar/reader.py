"""Strict, streaming NAR reader.

Accepts only canonical NARs — exactly what ``nix-store --dump`` could have produced — so
that every accepted NAR re-serialises to identical bytes. The rules, each with the ``rule``
identifier carried by the :class:`~nartool.errors.NarError` it raises:

=====================  =====================================================================
``magic``              the stream starts with the string ``nix-archive-1``
``truncated``          the input does not end before the root node does
``trailing-data``      nothing follows the root node (standalone NARs only)
``padding``            every padding byte is zero, also where contents are skipped
``token``              the fixed keywords appear exactly where the grammar puts them
``tag-too-long``       a keyword string is at most ``max_tag`` bytes (checked before reading)
``unknown-type``       a node type is ``regular``, ``symlink`` or ``directory``
``executable-value``   the ``executable`` marker's value is the empty string
``unsorted-entries``   directory entries are in strictly increasing unsigned byte order
``duplicate-entry``    no name appears twice in a directory
``invalid-name``       names are non-empty, not ``.``/``..``, without ``/`` or NUL, ≤ ``max_name``
``invalid-target``     symlink targets are non-empty, without NUL, ≤ ``max_target``
``too-deep``           nesting stays within ``max_depth`` levels (root = level 1)
=====================  =====================================================================

Every error carries the byte offset of the offending token (always a multiple of 8). The
reader never allocates more than a bounded amount before checking a declared length:
file contents are streamed in chunks, names and targets are bounded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from ..errors import NarError
from . import format as F
from .events import END, Directory, Event, File, Symlink
from .limits import DEFAULT_LIMITS, Limits
from .source import ByteSource, ReadFn, as_source, write_all

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import BinaryIO

#: file contents up to this size are read in one piece (within the source's buffer size)
SMALL_CONTENTS = 1 << 16

_REG, _EXE, _SYM, _DIR = object(), object(), object(), object()
_HEADERS = (
    (F.HDR_REGULAR, len(F.HDR_REGULAR), _REG),
    (F.HDR_DIRECTORY, len(F.HDR_DIRECTORY), _DIR),
    (F.HDR_SYMLINK, len(F.HDR_SYMLINK), _SYM),
    (F.HDR_EXECUTABLE, len(F.HDR_EXECUTABLE), _EXE),
)
_LONGEST_HEADER = max(n for _, n, _ in _HEADERS)

_O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class FileSink:
    """Where :meth:`NarReader.events` creates small files itself (see there): ``dir_fd[0]``
    is the innermost open directory (kept current by the consumer), the modes are given to
    ``open`` (and must already be the final ones after the umask), and ``error(exc, path)``
    turns an ``OSError`` of creating or writing the file at ``path`` into the exception to
    raise (as the consumer's own file creation would). ``count[0]`` goes up by one for every
    file and symlink the reader handles, and ``every()`` (if given) is called before every
    :data:`EVERY`-th of them (a split restore rebalances its shares then).

    In a restore split across processes, ``dir_fd[0]`` is -1 where another process makes the
    directory's files: the reader then appends an order to the list ``orders[0]`` instead,
    ``(name, executable, offset, size)`` for a file (``offset``: the contents' stream offset
    in the source), or ``(name, executable, contents)`` when ``inline`` is set, or
    ``(name, target)`` for a symlink, and calls ``flush()`` when the list holds
    :data:`ORDER_BATCH` of them."""

    __slots__ = ("dir_fd", "mode_regular", "mode_executable", "error", "count", "orders", "flush", "every",
                 "inline")

    def __init__(self, dir_fd: list[int], mode_regular: int, mode_executable: int,
                 error: Callable[[OSError, bytes], BaseException], count: list[int] | None = None,
                 orders: list[list[tuple[object, ...]] | None] | None = None,
                 flush: Callable[[], None] | None = None, every: Callable[[], None] | None = None) -> None:
        self.dir_fd = dir_fd
        self.mode_regular = mode_regular
        self.mode_executable = mode_executable
        self.error = error
        self.count = count if count is not None else [0]
        self.orders = orders if orders is not None else [None]
        self.flush = flush
        self.every = every
        self.inline = False


#: see :class:`FileSink`
ORDER_BATCH = 256
EVERY = 512


_TOKEN_NAMES = {
    F.TOK_OPEN: "'('",
    F.TOK_CLOSE: "')'",
    F.TOK_TYPE: "'type'",
    F.TOK_CONTENTS: "'contents'",
    F.TOK_TARGET: "'target'",
    F.TOK_NAME: "'name'",
    F.TOK_NODE: "'node'",
    F.TOK_ENTRY: "'entry'",
}


class NarReader:
    """Iterate over the events of one NAR read from ``src``.

    ``src`` is a ``read(n)`` callable, a binary file, raw ``bytes`` or a shared
    :class:`ByteSource`. With ``standalone=True`` (the default) the input must end exactly
    after the root node; framed readers (export streams, protocols) pass
    ``standalone=False`` and continue reading from the same :class:`ByteSource`.
    """

    def __init__(
        self,
        src: ReadFn | BinaryIO | ByteSource | bytes,
        *,
        limits: Limits = DEFAULT_LIMITS,
        standalone: bool = True,
    ) -> None:
        self.src = as_source(src, "NAR")
        self.limits = limits
        self.standalone = standalone
        self.start = self.src.offset

    # -- primitives -----------------------------------------------------------------------

    def _err(self, msg: str, offset: int, rule: str, expected: object = None, got: object = None,
             path: bytes | None = None) -> NarError:
        return NarError(msg, offset=offset - self.start, rule=rule, expected=expected, got=got, path=path)

    def _read_u64(self) -> int:
        return self.src.read_u64()

    def _read_padded(self, n: int, at: int) -> bytes:
        data, pad = self.src.read_padded(n)
        if pad is not None:
            raise self._err("non-zero padding", at, "padding", expected="zero bytes", got=pad)
        return data

    def _read_tag(self) -> tuple[int, bytes]:
        at = self.src.offset
        n = self._read_u64()
        if n > self.limits.max_tag:
            raise self._err(f"keyword longer than {self.limits.max_tag} bytes", at, "tag-too-long",
                            expected=f"<= {self.limits.max_tag}", got=n)
        return at, self._read_padded(n, at)

    def _expect(self, tok: bytes, path: bytes | None = None) -> None:
        src = self.src
        n = len(tok)
        if src.match(tok):
            return
        at = src.offset
        if tok == F.TOK_MAGIC:
            got = src.peek(n)
            if len(got) < n:
                raise NarError("not a NAR: input too short for the magic", offset=0, rule="truncated",
                               expected=F.MAGIC, got=got)
            raise self._err("not a NAR: bad magic", at, "magic", expected=F.MAGIC, got=got)
        _, tag = self._read_tag()
        expected = _TOKEN_NAMES.get(tok, repr(tok))
        raise self._err(f"expected {expected}", at, "token", expected=expected, got=tag, path=path)

    def _read_bounded(self, limit: int, what: str, rule: str, path: bytes | None) -> tuple[int, bytes]:
        at = self.src.offset
        n = self._read_u64()
        if n > limit:
            raise self._err(f"{what} longer than {limit} bytes", at, rule, expected=f"<= {limit}", got=n, path=path)
        return at, self._read_padded(n, at)

    # -- grammar --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self, files: FileSink | None = None) -> Iterator[Event]:
        """The events of the NAR.

        With ``files`` (a restore's :class:`FileSink`), the small regular files and the symlinks
        that the fused fast path reads whole from the buffer inside a directory are created right
        here, in the sink's current directory, instead of being yielded as events: no
        event object, no generator round trip, the contents written straight from the read
        buffer. Everything else is yielded as usual, and the consumer must keep
        ``files.dir_fd[0]`` the descriptor of the innermost open directory (or -1, see
        :class:`FileSink`)."""
        # Hot paths compare whole fused token sequences against the buffer (``_header``,
        # ``entry ( name``, ``) )``) and fall back to token-by-token reading, which gives the
        # precise errors, whenever they do not match.
        if files is not None:
            cell, mode_reg, mode_exe, fs_error = files.dir_fd, files.mode_regular, files.mode_executable, files.error
            count, orders, flush, every = files.count, files.orders, files.flush, files.every
            inline = files.inline
        else:
            cell, mode_reg, mode_exe, fs_error = [-1], 0, 0, None
            count, orders, flush, every = [0], [None], None, None
            inline = False
        every_mask = EVERY - 1
        os_open, os_write, os_close, os_symlink, o_new = os.open, os.write, os.close, os.symlink, _O_NEWFILE
        hdr_sym, len_sym, max_target = F.HDR_SYMLINK, len(F.HDR_SYMLINK), self.limits.max_target
        view_of: bytes | None = None
        view = memoryview(b"")
        src = self.src
        lim = self.limits
        close, close2, entry_open, node = F.TOK_CLOSE, F.CLOSE2, F.ENTRY_OPEN, F.TOK_NODE
        max_depth, max_name = lim.max_depth, lim.max_name
        window, consume_to = src.window, src.consume_to  # (bound once: the per-entry path is hot)
        offset_at, start = src.offset_at, self.start
        hdr_reg, hdr_exe, PAD = F.HDR_REGULAR, F.HDR_EXECUTABLE, F.PAD
        len_reg, len_exe = len(hdr_reg), len(hdr_exe)
        self._expect(F.TOK_MAGIC)
        # one [last entry name, path] per open directory
        stack: list[list[bytes]] = []
        refilled = False
        # how much to buffer before each entry: enough for any entry's header when the input
        # is a whole NAR (reading ahead is harmless there); a framed NAR is followed by more
        # of a stream that may not come before a reply, so only what the next token may need
        ahead = 4096 if self.standalone else 64
        name = b""
        path = b""
        while True:
            # -- one node, named `name`, at `path`
            if len(stack) >= max_depth:
                raise self._err(f"nesting deeper than {max_depth} levels", src.offset, "too-deep",
                                expected=f"<= {max_depth}", got=len(stack) + 1, path=path)
            kind = self._header(path)
            if kind is _DIR:
                yield Directory(name)
                stack.append([b"", path])
            else:
                if kind is _SYM:
                    tat, target = self._read_bounded(lim.max_target, "symlink target", "invalid-target", path)
                    why = F.validate_target(target, lim.max_target)
                    if why:
                        raise self._err(why, tat, "invalid-target", got=target, path=path)
                    yield Symlink(name, target)
                else:
                    size = self._read_u64()
                    offset = src.offset - self.start
                    if size <= SMALL_CONTENTS:
                        # read at once: the consumer gets a tuple, nothing to drain later
                        data = src.read_exact(size) if size else b""
                        pad = (-size) & 7
                        if pad:
                            at = src.offset
                            p = src.read_exact(pad)
                            if p != F.PAD[pad]:
                                raise self._err("non-zero padding", at, "padding", expected="zero bytes", got=p,
                                                path=path)
                        yield File(name, kind is _EXE, size, (data,) if size else (), offset)
                    else:
                        chunks = _Contents(self, size, offset, path)
                        yield File(name, kind is _EXE, size, chunks, offset)
                        chunks.finish()
                if not stack:
                    self._expect(close, path)  # end of the node
                    self._finish()
                    return
                if not src.match(close2):  # (fast: end of the node, end of the entry holding it)
                    self._expect(close, path)
                    self._expect(close, path)

            # -- inside the innermost open directory: the next entry, or its end
            while True:
                top = stack[-1]
                dpath = top[1]
                buf, pos = window(ahead)
                if buf.startswith(entry_open, pos):
                    # fast: `entry ( name` NAME `node` all in the buffer, lengths and padding right
                    npos = pos + 56
                    n = int.from_bytes(buf[pos + 48 : npos], "little")
                    nend = npos + ((n + 7) & ~7)
                    if 0 < n <= max_name and buf.startswith(node, nend) and \
                            buf[npos + n : nend] == F.PAD[nend - npos - n]:
                        name = buf[npos : npos + n]
                        consume_to(nend + 16)
                        if b"/" in name or b"\0" in name or name == b"." or name == b"..":
                            raise self._err(F.validate_name(name, max_name) or "invalid entry name",
                                            src.offset_at(pos + 48), "invalid-name", got=name, path=dpath)
                        last = top[0]
                        if name <= last:
                            consume_to(pos + 48)  # report it as the slow path does
                        else:
                            top[0] = name
                            path = dpath + b"/" + name if dpath else name
                            # fast: a whole small regular file and the end of its entry, `( type
                            # regular [executable ""] contents SIZE DATA PAD ) )`, in the buffer
                            j = nend + 16
                            if buf.startswith(hdr_reg, j):
                                j += len_reg
                                exe = False
                            elif buf.startswith(hdr_exe, j):
                                j += len_exe
                                exe = True
                            elif fs_error is not None and buf.startswith(hdr_sym, j):
                                # restoring: a whole symlink, `( type symlink target T PAD ) )`
                                j += len_sym
                                t = int.from_bytes(buf[j : j + 8], "little")
                                tstart = j + 8
                                tend = tstart + t
                                tpend = tend + (-t & 7)
                                if not 0 < t <= max_target or len(stack) >= max_depth or \
                                        not buf.startswith(close2, tpend) or buf[tend:tpend] != PAD[tpend - tend]:
                                    break  # (the slow path gives the exact error)
                                target = buf[tstart:tend]
                                if b"\0" in target:
                                    break
                                consume_to(tpend + 32)
                                k = count[0] = count[0] + 1
                                if not k & every_mask and every is not None:
                                    every()
                                if cell[0] >= 0:
                                    try:
                                        os_symlink(target, name, dir_fd=cell[0])
                                    except OSError as e:
                                        raise fs_error(e, path) from e
                                else:  # another process's (a split restore)
                                    q = orders[0]
                                    q.append((name, target))  # type: ignore[union-attr]
                                    if len(q) >= ORDER_BATCH:  # type: ignore[arg-type]
                                        flush()  # type: ignore[misc]
                                continue
                            else:
                                break
                            size = int.from_bytes(buf[j : j + 8], "little")
                            dstart = j + 8
                            dend = dstart + size
                            pend = dend + (-size & 7)
                            if size > SMALL_CONTENTS or len(stack) >= max_depth or not \
                                    buf.startswith(close2, pend) or buf[dend:pend] != PAD[pend - dend]:
                                if pend + 32 > len(buf) and size <= SMALL_CONTENTS and not refilled:
                                    # the file runs past the buffer: buffer it all, and again
                                    top[0] = last
                                    consume_to(pos)
                                    window(pend + 32 - pos)
                                    refilled = True
                                    continue
                                break  # (the slow path reads on, and gives the exact error)
                            refilled = False
                            consume_to(pend + 32)
                            if fs_error is None:
                                yield File(name, exe, size, (buf[dstart:dend],) if size else (),
                                           offset_at(dstart) - start)
                                continue
                            # restoring: create the file here, with its final mode at open
                            k = count[0] = count[0] + 1
                            if not k & every_mask and every is not None:
                                every()
                            dfd = cell[0]
                            if dfd < 0:  # another process's (a split restore)
                                q = orders[0]
                                if inline:
                                    q.append((name, exe, buf[dstart:dend]))  # type: ignore[union-attr]
                                else:
                                    q.append((name, exe, offset_at(dstart), size))  # type: ignore[union-attr]
                                if len(q) >= ORDER_BATCH:  # type: ignore[arg-type]
                                    flush()  # type: ignore[misc]
                                continue
                            try:
                                fd = os_open(name, o_new, mode_exe if exe else mode_reg, dir_fd=dfd)
                                try:
                                    if size:
                                        if view_of is not buf:  # (a view per buffer: no copy per file)
                                            view, view_of = memoryview(buf), buf
                                        k = os_write(fd, view[dstart:dend])
                                        if k != size:
                                            write_all(fd, view[dstart + k : dend])
                                finally:
                                    os_close(fd)
                            except OSError as e:
                                raise fs_error(e, path) from e
                            continue
                    consume_to(pos + 48)
                    tag = b"entry"
                elif buf.startswith(close, pos):
                    consume_to(pos + 16)
                    tag = b")"
                else:
                    at, tag = self._read_tag()
                    if tag == b"entry":
                        self._expect(F.TOK_OPEN, dpath)
                        self._expect(F.TOK_NAME, dpath)
                if tag == b")":
                    stack.pop()
                    yield END
                    if not stack:
                        self._finish()
                        return
                    self._expect(close, dpath)  # end of the entry holding the directory
                    continue
                if tag != b"entry":
                    raise self._err("expected 'entry' or ')'", at, "token", expected="'entry' or ')'",
                                    got=tag, path=dpath)
                nat, name = self._read_bounded(max_name, "entry name", "invalid-name", dpath)
                if not name or b"/" in name or b"\0" in name or name == b"." or name == b"..":
                    raise self._err(F.validate_name(name, max_name) or "invalid entry name", nat, "invalid-name",
                                    got=name, path=dpath)
                last = top[0]
                if name <= last:  # b"" (no entry yet) sorts before every valid name
                    if name == last:
                        raise self._err("duplicate entry name", nat, "duplicate-entry", got=name, path=dpath)
                    raise self._err("directory entries not sorted", nat, "unsorted-entries",
                                    expected=f"a name after {last!r}", got=name, path=dpath)
                top[0] = name
                path = dpath + b"/" + name if dpath else name
                self._expect(F.TOK_NODE, path)
                break

    def _header(self, path: bytes) -> object:
        """The node's kind, from ``(`` up to its payload (after ``contents`` or ``target``)."""
        src = self.src
        buf, pos = src.window(_LONGEST_HEADER)
        for hdr, n, kind in _HEADERS:
            if buf.startswith(hdr, pos):
                src.consume_to(pos + n)
                return kind
        # token by token, for the exact error
        self._expect(F.TOK_OPEN, path)
        self._expect(F.TOK_TYPE, path)
        at, tag = self._read_tag()
        if tag == b"directory":
            return _DIR
        if tag == b"symlink":
            self._expect(F.TOK_TARGET, path)
            return _SYM
        if tag != b"regular":
            raise self._err("unknown node type", at, "unknown-type",
                            expected="'regular', 'symlink' or 'directory'", got=tag, path=path)
        at, tag = self._read_tag()
        executable = False
        if tag == b"executable":
            executable = True
            vat = src.offset
            vlen = self._read_u64()
            if vlen != 0:
                raise self._err("executable marker has a non-empty value", vat, "executable-value",
                                expected=b"", got=f"{vlen} bytes", path=path)
            at, tag = self._read_tag()
        if tag != b"contents":
            raise self._err("expected 'contents'", at, "token",
                            expected="'contents'" if executable else "'executable' or 'contents'",
                            got=tag, path=path)
        return _EXE if executable else _REG

    def _finish(self) -> None:
        src = self.src
        if self.standalone and not src.at_eof():
            raise self._err("trailing data after the NAR", src.offset, "trailing-data",
                            expected="end of input", got=src.peek(16))


class _Contents:
    """The chunks of one file's contents; the reader drains what the consumer leaves."""

    __slots__ = ("reader", "remaining", "size", "offset", "path", "_started")

    def __init__(self, reader: NarReader, size: int, offset: int, path: bytes) -> None:
        self.reader = reader
        self.size = size
        self.remaining = size
        self.offset = offset
        self.path = path
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("file contents can be iterated only once")
        self._started = True
        for chunk in self.reader.src.iter_chunks(self.remaining):
            self.remaining -= len(chunk)
            yield chunk
        self._padding()

    def copy_to(self, out_fd: int) -> int:
        """Write the whole contents to ``out_fd`` (inside the kernel where the source allows,
        see :meth:`ByteSource.copy_to`); returns the number of bytes written."""
        if self._started:
            raise RuntimeError("file contents can be iterated only once")
        self._started = True
        src = self.reader.src
        done = src.copy_to(self.remaining, out_fd)
        self.remaining -= done
        for chunk in src.iter_chunks(self.remaining):
            write_all(out_fd, chunk)
            self.remaining -= len(chunk)
            done += len(chunk)
        self._padding()
        return done

    def _padding(self) -> None:
        pad = (-self.size) & 7
        if pad:
            at = self.reader.src.offset
            p = self.reader.src.read_exact(pad)
            if p != F.PAD[pad]:
                raise self.reader._err("non-zero padding", at, "padding", expected="zero bytes", got=p,
                                       path=self.path)
        self.remaining = -1

    def finish(self) -> None:
        """Skip unread contents (checking their padding)."""
        if self.remaining < 0:
            return
        if self.remaining:
            self.reader.src.skip(self.remaining)
            self.remaining = 0
        self._padding()


def nar_passthrough(src: ByteSource, limits: Limits = DEFAULT_LIMITS) -> Iterator[bytes]:
    """The original bytes of exactly one NAR read from ``src``, validated by :class:`NarReader`
    (``standalone=False``: whatever follows the NAR stays in ``src``) as they pass: the output
    is the input itself, never a re-encoding, and only what the reader accepted is yielded.
    Raises as the reader does; bytes after an error are not yielded."""
    segments: list[bytes] = []
    start = src.offset
    head = src.peek(src.buffered())  # already buffered before the tap: begins at ``start``
    if head:
        segments.append(head)
    src.tap_raw(segments.append)
    sent = start  # stream offset of the next byte to yield
    seg_at = start  # stream offset of segments[0]

    def flush() -> Iterator[bytes]:
        nonlocal sent, seg_at
        upto = src.offset
        while sent < upto and segments:
            seg = segments[0]
            lo = sent - seg_at
            hi = min(len(seg), upto - seg_at)
            if hi > lo:
                yield seg[lo:hi]
                sent = seg_at + hi
            if hi >= len(seg):
                segments.pop(0)
                seg_at += len(seg)
            else:
                break

    try:
        for ev in NarReader(src, standalone=False, limits=limits):
            if isinstance(ev, File):
                for _ in ev.chunks:
                    yield from flush()
            yield from flush()
        yield from flush()
    finally:
        src.tap_raw(None)
