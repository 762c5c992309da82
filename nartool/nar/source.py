"""A buffered byte source with an exact offset, shared by every framed reader.

Protocol and export-stream readers create one :class:`ByteSource` over their input and
pass it to :class:`nartool.nar.reader.NarReader`, which then consumes exactly the bytes of
one NAR and leaves the rest buffered for the caller.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable, Iterator

from ..errors import NarError, TruncatedError

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import BinaryIO

ReadFn = Callable[[int], bytes]

_COPY_FALLBACK = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF,
                  errno.EPERM)
BUF_SIZE = 1 << 16
_COPY_MAX = 1 << 30
CHUNK_SIZE = 1 << 20
_ZERO_PAD = tuple(bytes(i) for i in range(8))


class ByteSource:
    """Reads from a ``read(n)`` callable or a binary file object, tracking the offset.

    ``error_class`` is raised for truncation (a subclass of it when it is ``NarError``).
    """

    __slots__ = ("_read", "_buf", "_pos", "_base", "_file", "_eof", "what", "_fd", "_origin", "_untapped",
                 "_sendfile")

    def __init__(self, src: ReadFn | BinaryIO | ByteSource, what: str = "input") -> None:
        if isinstance(src, ByteSource):
            raise TypeError("already a ByteSource")
        self._file: BinaryIO | None = None
        if callable(src):
            self._read: ReadFn = src
        else:
            self._file = src
            self._read = src.read
        self._untapped: ReadFn | None = None
        self._buf = b""
        self._pos = 0
        self._base = 0  # offset of _buf[0]
        self._eof = False
        self.what = what
        # a plain, seekable file: big contents can be copied inside the kernel (copy_to)
        self._fd = -1
        self._sendfile = False  # copy_to: copy_file_range refused, sendfile (file to file) instead
        self._origin = 0
        if self._file is not None and _kernel_copy():
            try:
                if self._file.seekable():
                    self._origin = self._file.tell()
                    self._fd = self._file.fileno()
            except (AttributeError, OSError, ValueError):
                self._fd = -1

    # -- public contract for other modules (wire framing, NAR reader, export reader) ---------
    #
    # Other modules use only these members (never ``_buf``/``_pos``/``_base``/``_read``):
    # ``offset``, ``read_exact``, ``peek``, ``at_eof``, ``skip``, ``iter_chunks``, ``copy_to``,
    # ``buffered``, ``take_buffered``, ``raw_read`` and the framing helpers ``read_u64`` /
    # ``read_padded`` below.

    @property
    def offset(self) -> int:
        """Stream offset of the next byte to be consumed."""
        return self._base + self._pos

    def buffered(self) -> int:
        """How many bytes are buffered and not yet consumed (readable without blocking)."""
        return len(self._buf) - self._pos

    def take_buffered(self) -> bytes:
        """Remove and return what is buffered but not consumed; the offset advances past it.
        Used to hand the rest of the input over to another decoder (e.g. a zstd session)."""
        rest = bytes(self._buf[self._pos :])
        self._base += len(self._buf)
        self._buf = b""
        self._pos = 0
        return rest

    @property
    def raw_read(self) -> ReadFn:
        """The underlying ``read(n)``: reading from it bypasses this source (call
        :meth:`take_buffered` first and stop using this source afterwards)."""
        return self._read

    def tap_raw(self, tap: Callable[[bytes], None] | None) -> None:
        """From now on, call ``tap`` with every block read from the underlying input, in order
        (``None``: stop). Blocks may run past what is consumed; offsets are the caller's to
        track (the first tapped byte is at ``offset + buffered()`` when tapping starts). A
        kernel copy (:meth:`copy_to`) and a seeking :meth:`skip` bypass the tap."""
        if self._untapped is not None:
            self._read, self._untapped = self._untapped, None
        if tap is None:
            return
        raw = self._untapped = self._read

        def read(n: int) -> bytes:
            data = raw(n)
            if data:
                tap(data)
            return data

        self._read = read

    def read_u64(self) -> int:
        """One little-endian u64 word (:class:`TruncatedError` at EOF)."""
        return int.from_bytes(self.read_exact(8), "little")

    def read_padded(self, n: int) -> tuple[bytes, bytes | None]:
        """The body of a framed string: ``n`` bytes and the padding after them up to the next
        multiple of 8, as ``(data, bad_padding)`` where ``bad_padding`` is None when the
        padding is all zero, else the padding bytes (the caller reports it in its own terms).
        Shared by the NAR reader, the export-stream reader and the serve wire.
        :class:`TruncatedError` at EOF."""
        padded = self.read_exact((n + 7) & ~7)
        pad = padded[n:]
        return padded[:n], (None if pad == _ZERO_PAD[len(pad)] else pad)

    # -- zero-copy access to the buffer, for hot parsing loops (the NAR reader) -------------

    def window(self, want: int = 0) -> tuple[bytes, int]:
        """``(buf, i)``: the internal buffer and the index in it of the next unconsumed byte,
        after buffering at least ``want`` bytes when the input has them. Read-only, and valid
        only until the next call that consumes or reads (then ask again)."""
        if len(self._buf) - self._pos < want:
            self._fill(want)
        return self._buf, self._pos

    def consume_to(self, i: int) -> None:
        """Consume up to index ``i`` of the buffer last returned by :meth:`window`
        (``i`` may also move back within it, to re-read bytes already seen). ``i`` must lie
        within that buffer (``0 <= i <= len(buf)``): not checked, this is the hot path."""
        self._pos = i

    def offset_at(self, i: int) -> int:
        """Stream offset of index ``i`` of the buffer last returned by :meth:`window`."""
        return self._base + i

    def match(self, tok: bytes) -> bool:
        """Consume ``tok`` if the input goes on with exactly it; else consume nothing."""
        n = len(tok)
        if self._buf.startswith(tok, self._pos) or self.peek(n) == tok:
            self._pos += n
            return True
        return False

    def _fill(self, want: int) -> bool:
        """Ensure at least ``want`` bytes are buffered; False if EOF came first."""
        avail = len(self._buf) - self._pos
        if avail >= want:
            return True
        parts = [self._buf[self._pos :]] if avail else []
        self._base += self._pos
        have = avail
        while have < want and not self._eof:
            data = self._read(max(BUF_SIZE, want - have))
            if not data:
                self._eof = True
                break
            parts.append(data)
            have += len(data)
        self._buf = b"".join(parts) if len(parts) != 1 else parts[0]
        self._pos = 0
        return have >= want

    def read_exact(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        if not self._fill(n):
            raise TruncatedError(
                f"unexpected end of {self.what}", offset=self._base + len(self._buf), expected=f"{n} more bytes",
                got=f"{len(self._buf) - self._pos} bytes", rule="truncated",
            )
        b = self._buf[: n]
        self._pos = n
        return b

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes without consuming them (fewer only at EOF)."""
        self._fill(n)
        return self._buf[self._pos : self._pos + n]

    def at_eof(self) -> bool:
        return not self._fill(1)

    def iter_chunks(self, n: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield exactly ``n`` bytes in chunks, without buffering them all."""
        avail = len(self._buf) - self._pos
        if avail:
            take = min(avail, n)
            b = self._buf[self._pos : self._pos + take]
            self._pos += take
            n -= take
            yield b
        if not n:
            return
        # the buffer is empty now: read straight from the underlying stream
        self._base += len(self._buf)
        self._buf = b""
        self._pos = 0
        while n:
            data = self._read(min(n, chunk_size)) if not self._eof else b""
            if not data:
                self._eof = True
                raise TruncatedError(
                    f"unexpected end of {self.what}", offset=self._base, expected=f"{n} more bytes",
                    got="end of input", rule="truncated",
                )
            if len(data) > n:  # a read() that returned more than asked: keep the rest
                self._buf = data[n:]
                data = data[:n]
                self._base += n
                n = 0
            else:
                self._base += len(data)
                n -= len(data)
            yield data

    def copy_to(self, n: int, out_fd: int) -> int:
        """Write up to the next ``n`` bytes to ``out_fd``: what is buffered with ``write``, the
        rest with ``copy_file_range`` when the source is a plain file (no trip through Python;
        a reflink where the filesystem shares extents), or ``sendfile`` where that is refused
        (e.g. from one filesystem to another). Returns how many bytes were consumed;
        the caller reads the rest as usual (e.g. where the kernel refuses the copy)."""
        done = 0
        avail = len(self._buf) - self._pos
        if avail:
            take = min(avail, n)
            write_all(out_fd, memoryview(self._buf)[self._pos : self._pos + take])
            self._pos += take
            done = take
        if done == n or self._fd < 0 or self._eof:
            return done
        self._base += len(self._buf)
        self._buf = b""
        self._pos = 0
        try:
            while done < n:
                # at most 1 GiB a call: a declared size up to 2^64 - 1 does not fit a C ssize_t
                want = n - done if n - done < _COPY_MAX else _COPY_MAX
                try:
                    if self._sendfile:
                        k = os.sendfile(out_fd, self._fd, self._origin + self._base, want)
                    else:
                        k = os.copy_file_range(self._fd, out_fd, want, self._origin + self._base)
                except OSError as e:
                    if e.errno in _COPY_FALLBACK:
                        if not self._sendfile:  # e.g. across filesystems: sendfile copies any file
                            self._sendfile = True
                            continue
                        self._fd = -1  # not between these two: plain reads from now on
                        break
                    raise
                if k == 0:
                    self._eof = True
                    raise TruncatedError(
                        f"unexpected end of {self.what}", offset=self._base, expected=f"{n - done} more bytes",
                        got="end of input", rule="truncated",
                    )
                self._base += k
                done += k
        finally:
            assert self._file is not None
            self._file.seek(self._origin + self._base)  # reads go on after what was copied
        return done

    def file_position(self) -> tuple[int, int] | None:
        """``(fd, origin)`` when the source reads a regular file that other processes may read
        by offset (``pread``): its descriptor, and the file offset of the source's first byte
        (stream offset 0). ``None`` for any other source."""
        if self._fd < 0 or self._untapped is not None:
            return None
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                return None
        except OSError:
            return None
        return self._fd, self._origin

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes, seeking when the underlying file allows it."""
        avail = len(self._buf) - self._pos
        if n <= avail:
            self._pos += n
            return
        f = self._file
        if f is not None and n - avail > BUF_SIZE:
            try:
                seekable = f.seekable()
            except (AttributeError, ValueError, OSError):
                seekable = False
            if seekable:
                target = self._base + len(self._buf) + (n - avail)
                cur = f.tell()
                end = f.seek(0, io.SEEK_END)
                f.seek(cur)
                remaining_in_file = end - cur
                if n - avail > remaining_in_file:
                    raise TruncatedError(
                        f"unexpected end of {self.what}", offset=self._base + len(self._buf) + remaining_in_file,
                        expected=f"{n - avail - remaining_in_file} more bytes", got="end of input", rule="truncated",
                    )
                f.seek(cur + (n - avail))
                self._base = target
                self._buf = b""
                self._pos = 0
                return
        for _ in self.iter_chunks(n):
            pass


def _kernel_copy() -> bool:
    """Whether ``copy_file_range`` may be used (Linux, unless NARTOOL_PORTABLE=1)."""
    from ..fs.osutil import LINUX  # (imported late: osutil imports this module)

    return LINUX and hasattr(os, "copy_file_range")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (short writes happen on pipes and sockets)."""
    n = os.write(fd, data)
    if n < len(data):
        view = memoryview(data)[n:]
        while view:
            view = view[os.write(fd, view):]


def as_source(src: ReadFn | BinaryIO | ByteSource | bytes, what: str = "input") -> ByteSource:
    if isinstance(src, ByteSource):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        return ByteSource(io.BytesIO(bytes(src)), what)
    return ByteSource(src, what)


def fd_reader(fd: int) -> ReadFn:
    def read(n: int) -> bytes:
        return os.read(fd, n)

    return read


__all__ = ["ByteSource", "as_source", "fd_reader", "write_all", "NarError"]


def chunk_reader(chunks: Iterator[bytes | bytearray | memoryview]) -> ReadFn:
    """A ``read(n)`` callable over an iterator of chunks (e.g. a store's ``nar_chunks``), for
    :class:`ByteSource`: returns at most ``n`` bytes, ``b""`` once the chunks are exhausted."""
    buf = bytearray()

    def read(n: int) -> bytes:
        while not buf:
            c = next(chunks, None)
            if c is None:
                return b""
            buf.extend(c)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    return read
