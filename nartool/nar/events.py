"""The flat event stream that every NAR producer and consumer speaks.

A NAR is a pre-order walk of one filesystem object. The stream is:

* :class:`Directory` — a directory node starts; its members follow, then
* :class:`EndDirectory` — the most recent open directory ends;
* :class:`File` — a regular file; its bytes are in ``chunks`` (an iterable of bytes-like
  objects that together hold exactly ``size`` bytes);
* :class:`Symlink` — a symbolic link with its raw ``target``.

Every node event carries ``name``: the raw entry name inside its parent directory, or
``b""`` for the root. Names and targets are ``bytes`` end to end.

When a stream comes from :class:`nartool.nar.reader.NarReader`, a file's ``chunks`` must be
consumed (or abandoned) before asking for the next event; the reader skips whatever is left.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Directory:
    __slots__ = ("name",)
    kind = "directory"

    def __init__(self, name: bytes) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Directory({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Directory) and other.name == self.name

    __hash__ = None  # type: ignore[assignment]


class EndDirectory:
    __slots__ = ()
    kind = "end"

    def __repr__(self) -> str:
        return "EndDirectory()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EndDirectory)

    __hash__ = None  # type: ignore[assignment]


END = EndDirectory()


class File:
    __slots__ = ("name", "executable", "size", "chunks", "offset")
    kind = "regular"

    def __init__(
        self,
        name: bytes,
        executable: bool,
        size: int,
        chunks: Iterable[bytes | bytearray | memoryview] = (),
        offset: int | None = None,
    ) -> None:
        self.name = name
        self.executable = executable
        self.size = size
        self.chunks = chunks
        #: byte offset of the first content byte in the NAR (``narOffset``), when known
        self.offset = offset

    def __repr__(self) -> str:
        return f"File({self.name!r}, executable={self.executable}, size={self.size})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, File)
            and (other.name, other.executable, other.size) == (self.name, self.executable, self.size)
        )

    __hash__ = None  # type: ignore[assignment]


class Symlink:
    __slots__ = ("name", "target")
    kind = "symlink"

    def __init__(self, name: bytes, target: bytes) -> None:
        self.name = name
        self.target = target

    def __repr__(self) -> str:
        return f"Symlink({self.name!r}, {self.target!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Symlink) and (other.name, other.target) == (self.name, self.target)

    __hash__ = None  # type: ignore[assignment]


Event = Directory | EndDirectory | File | Symlink
Node = Directory | File | Symlink


def with_paths(events: Iterable[Event]) -> Iterator[tuple[tuple[bytes, ...], Event]]:
    """Pair each event with the path components of its node (``()`` for the root).

    :class:`EndDirectory` gets the path of the directory it closes.
    """
    stack: list[bytes] = []
    depth_is_root = True
    for ev in events:
        if isinstance(ev, EndDirectory):
            yield tuple(stack), ev
            if stack:
                stack.pop()
            continue
        if depth_is_root:
            depth_is_root = False
            yield (), ev
            continue
        path = (*stack, ev.name)
        yield path, ev
        if isinstance(ev, Directory):
            stack.append(ev.name)
