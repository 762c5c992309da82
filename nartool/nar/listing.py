"""Listings over NAR events: text ``ls``, Nix's ``.ls`` JSON (streamed), and ``cat``.

All of them stop reading as soon as the requested subtree is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import NartoolError
from .events import Directory, EndDirectory, Event, File, Symlink, with_paths

Path = tuple[bytes, ...]


class PathNotFound(NartoolError):
    pass


def split_path(path: bytes | str) -> Path:
    """``/a/b`` → ``(b"a", b"b")``; ``/`` and ``""`` → ``()``. ``.`` components are dropped."""
    if isinstance(path, str):
        path = os.fsencode(path)
    parts = tuple(p for p in path.split(b"/") if p and p != b".")
    if b".." in parts:
        raise NartoolError("'..' is not allowed in a path inside a NAR", path=path, rule="bad-path")
    return parts


def show_path(path: Path) -> bytes:
    return b"/" + b"/".join(path)


@dataclass
class Entry:
    """One node of a listing."""

    path: Path
    type: str
    size: int = 0
    executable: bool = False
    target: bytes = b""
    nar_offset: int | None = None


def _entry(path: Path, ev: Event) -> Entry:
    if isinstance(ev, File):
        return Entry(path, "regular", ev.size, ev.executable, nar_offset=ev.offset)
    if isinstance(ev, Symlink):
        return Entry(path, "symlink", target=ev.target)
    return Entry(path, "directory")


def _subtree(events: Iterable[Event], prefix: Path) -> Iterator[tuple[Path, int, Event]]:
    """(path, depth below prefix, event) for the subtree at ``prefix``.

    The rest of the stream is still read (contents skipped, by seeking where possible) so
    that a malformed NAR is refused even when the damage lies outside the listed subtree.
    """
    plen = len(prefix)
    found = False
    done = False
    for path, ev in with_paths(events):
        if done or path[:plen] != prefix:
            continue
        depth = len(path) - plen
        if depth == 0:
            found = True
        yield path, depth, ev
        if depth == 0 and not isinstance(ev, Directory):
            done = True  # a leaf, or the end of the directory at prefix
    if not found:
        raise PathNotFound("path not found in NAR", path=show_path(prefix), rule="not-found")


def entries(events: Iterable[Event], prefix: Path = (), recursive: bool = False,
            directory_itself: bool = False) -> Iterator[Entry]:
    """Nodes at ``prefix``: a leaf itself; a directory's members (all below with
    ``recursive``); or just the directory with ``directory_itself``."""
    only_root = directory_itself
    for path, depth, ev in _subtree(events, prefix):  # consumed to the end: see _subtree
        if isinstance(ev, EndDirectory):
            continue
        if depth == 0:
            if directory_itself or not isinstance(ev, Directory):
                only_root = True
                yield _entry(path, ev)
        elif not only_root and (recursive or depth == 1):
            yield _entry(path, ev)


def cat(events: Iterable[Event], path: Path) -> Iterator[bytes]:
    """The contents of the regular file at ``path`` (streamed)."""
    for _, depth, ev in _subtree(events, path):
        if depth == 0:
            if isinstance(ev, File):
                for chunk in ev.chunks:
                    yield bytes(chunk)
                continue  # the rest of the stream is still validated
            kind = "directory" if isinstance(ev, Directory) else "symlink"
            raise NartoolError(f"not a regular file but a {kind}", path=show_path(path), rule="not-a-file")


# -- JSON (.ls) ---------------------------------------------------------------------------

def _jstr(b: bytes) -> str:
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        raise NartoolError("a name or target is not valid UTF-8; a JSON listing cannot hold it", got=b,
                           rule="not-utf8") from None
    return json.dumps(s, ensure_ascii=False)


def _jleaf(ev: File | Symlink) -> str:
    if isinstance(ev, File):
        s = '{"type":"regular","size":' + str(ev.size)
        if ev.executable:
            s += ',"executable":true'
        if ev.offset:
            s += f',"narOffset":{ev.offset}'
        return s + "}"
    return '{"type":"symlink","target":' + _jstr(ev.target) + "}"


def json_listing(events: Iterable[Event], prefix: Path = (), recursive: bool = True,
                 wrap: bool = False) -> Iterator[str]:
    """Stream the JSON listing (Nix 2.8 member order) of the node at ``prefix``.

    ``wrap`` gives the ``.ls`` file form ``{"version":1,"root":…}``. Without ``recursive``,
    members that are directories appear as ``{}``, as in ``nix nar ls --json``.
    """
    if wrap:
        yield '{"version":1,"root":'
    first: list[bool] = []  # per open, listed directory: no member written yet
    for path, depth, ev in _subtree(events, prefix):
        if isinstance(ev, EndDirectory):
            if recursive or depth == 0:
                first.pop()
                yield "}}"
            continue
        if depth > 1 and not recursive:
            continue
        if depth > 0:
            if first[-1]:
                first[-1] = False
                yield _jstr(path[-1]) + ":"
            else:
                yield "," + _jstr(path[-1]) + ":"
        if depth == 1 and not recursive:
            yield "{}"  # as `nix nar ls --json` without -R: members are not described
        elif isinstance(ev, Directory):
            first.append(True)
            yield '{"type":"directory","entries":{'
        else:
            yield _jleaf(ev)
    if wrap:
        yield "}"
