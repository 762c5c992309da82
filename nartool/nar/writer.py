"""NAR writer: turns an event stream into canonical NAR bytes, yielded in chunks.

The writer validates what it is given — entry order, names, targets, depth, file sizes —
so a buggy or racing source can never produce a NAR that a strict reader would refuse.
Small tokens are coalesced into buffers of at least ``flush_size`` bytes; large file
chunks are passed through without copying.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..errors import FsError, NarError
from . import format as F
from .events import Directory, EndDirectory, Event, File, Symlink
from .limits import DEFAULT_LIMITS, Limits

FLUSH_SIZE = 1 << 20
_U64 = int.to_bytes


def write_nar(
    events: Iterable[Event], *, limits: Limits = DEFAULT_LIMITS, flush_size: int = FLUSH_SIZE
) -> Iterator[bytes | bytearray | memoryview]:
    """Yield the bytes of the NAR described by ``events`` (which must describe one root)."""
    out = bytearray(F.TOK_MAGIC)
    stack: list[bytes] = []  # last entry name per open directory
    paths: list[bytes] = []
    seen_root = False
    done = False
    max_name = limits.max_name
    max_depth = limits.max_depth
    for ev in events:
        if done:
            raise NarError("events continue after the root node", rule="trailing-data")
        cls = ev.__class__
        if cls is EndDirectory:
            if not stack:
                raise NarError("end of directory without a directory", rule="token")
            stack.pop()
            paths.pop()
            if stack:
                out += F.CLOSE2
            else:
                out += F.CLOSE
                done = True
            continue
        name = ev.name  # type: ignore[union-attr]
        if stack:
            if not name or len(name) > max_name or b"/" in name or b"\0" in name or name in (b".", b".."):
                why = F.validate_name(name, max_name)
                raise NarError(why or "invalid entry name", rule="invalid-name", got=name, path=paths[-1])
            last = stack[-1]
            if name <= last:
                parent = paths[-1]
                if name == last:
                    raise NarError("duplicate entry name", rule="duplicate-entry", got=name, path=parent)
                raise NarError("directory entries not sorted", rule="unsorted-entries",
                               expected=f"a name after {last!r}", got=name, path=parent)
            stack[-1] = name
            out += F.ENTRY_OPEN
            n = len(name)
            out += _U64(n, 8, "little")
            out += name
            out += F.PAD[(-n) & 7]
            out += F.NODE
        elif seen_root:
            raise NarError("events continue after the root node", rule="trailing-data")
        seen_root = True
        if len(stack) >= max_depth:
            raise NarError(f"nesting deeper than {max_depth} levels", rule="too-deep",
                           expected=f"<= {max_depth}", got=len(stack) + 1, path=_join(paths, name))
        if cls is File:
            assert isinstance(ev, File)
            size = ev.size
            out += F.HDR_EXECUTABLE if ev.executable else F.HDR_REGULAR
            out += _U64(size, 8, "little")
            written = 0
            for chunk in ev.chunks:
                ln = len(chunk)
                written += ln
                if ln >= flush_size:
                    if out:
                        yield out
                        out = bytearray()
                    yield chunk
                else:
                    out += chunk
                    if len(out) >= flush_size:
                        yield out
                        out = bytearray()
            if written != size:
                raise FsError("file changed size while being read", expected=size, got=written,
                              path=_join(paths, name), rule="size-changed")
            out += F.PAD[(-size) & 7]
            out += F.CLOSE2 if stack else F.CLOSE
            done = not stack
        elif cls is Symlink:
            assert isinstance(ev, Symlink)
            target = ev.target
            why = F.validate_target(target, limits.max_target)
            if why:
                raise NarError(why, rule="invalid-target", got=target, path=_join(paths, name))
            out += F.HDR_SYMLINK
            n = len(target)
            out += _U64(n, 8, "little")
            out += target
            out += F.PAD[(-n) & 7]
            out += F.CLOSE2 if stack else F.CLOSE
            done = not stack
        elif cls is Directory:
            out += F.HDR_DIRECTORY
            stack.append(b"")
            paths.append(_join(paths, name) if paths else name)
        else:
            raise TypeError(f"not a NAR event: {ev!r}")
        if len(out) >= flush_size:
            yield out
            out = bytearray()
    if not done:
        raise NarError("event stream ended before the root node did", rule="truncated")
    if out:
        yield out


def _join(paths: list[bytes], name: bytes) -> bytes:
    if not paths:
        return name
    parent = paths[-1]
    return parent + b"/" + name if parent else name


def nar_bytes(events: Iterable[Event], *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The whole NAR as one bytes object (for tests and small inputs)."""
    return b"".join(bytes(c) for c in write_nar(events, limits=limits))
