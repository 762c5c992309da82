"""Listings over NAR events: text ``ls``, Nix's ``.ls`` JSON (streamed), and ``cat``.

All of them stop reading as soon as the requested subtree is complete. Names in output are
encoded as described in ``docs/names.md`` (:func:`json_name`, :func:`text_name`).
"""

from __future__ import annotations

import json
import os
import re
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
    """Nodes at ``prefix``, as ``nix nar ls`` shows them: a leaf itself; a directory's members
    (all below with ``recursive``); with ``directory_itself`` the directory itself first, and
    then, with ``recursive`` too, everything below it (``nix nar ls -R -d`` lists the whole
    tree, like ``find . | sort``)."""
    leaf = False
    for path, depth, ev in _subtree(events, prefix):  # consumed to the end: see _subtree
        if isinstance(ev, EndDirectory):
            continue
        if depth == 0:
            if directory_itself or not isinstance(ev, Directory):
                leaf = not isinstance(ev, Directory)
                yield _entry(path, ev)
        elif leaf:
            continue
        elif recursive or (depth == 1 and not directory_itself):
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


# -- names in output (see docs/names.md) ----------------------------------------------------

_JSON_SPECIAL = re.compile("[\"\\\\\x00-\x1f\udc80-\udcff]")
_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_escape(m: re.Match[str]) -> str:
    c = m.group()
    return _JSON_SHORT.get(c) or f"\\u{ord(c):04x}"


def json_name(b: bytes) -> str:
    """A name (or symlink target) as a JSON string literal, losslessly.

    Valid UTF-8 comes out as Nix 2.8 writes it: the characters themselves, with ``"`` and ``\\``
    escaped, ``\\n``, ``\\r``, ``\\t`` and ``\\u00XX`` for the other control characters. Each byte
    that is not part of valid UTF-8 becomes the escape ``\\udcXX`` (Python's ``surrogateescape``),
    which no valid UTF-8 text produces: ``json.loads(s).encode("utf-8", "surrogateescape")``
    gives the bytes back."""
    return '"' + _JSON_SPECIAL.sub(_json_escape, b.decode("utf-8", "surrogateescape")) + '"'


def json_text(s: str) -> str:
    """A ``str`` that may carry ``surrogateescape`` bytes (e.g. from ``os.fsdecode``) as a JSON
    string literal, the same way as :func:`json_name`."""
    return '"' + _JSON_SPECIAL.sub(_json_escape, s) + '"'


def to_json(obj: object) -> str:
    """``obj`` (dicts, lists, str, int, bool, None) as compact JSON; strings via :func:`json_text`
    and bytes via :func:`json_name`. Builds the whole text, so nothing half-written escapes on an
    error."""
    if isinstance(obj, str):
        return json_text(obj)
    if isinstance(obj, (bytes, bytearray)):
        return json_name(bytes(obj))
    if isinstance(obj, dict):
        return "{" + ",".join(json_text(str(k)) + ":" + to_json(v) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in obj) + "]"
    return json.dumps(obj)


_TEXT_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f-\x9f\udc80-\udcff]")
_TEXT_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _text_escape(m: re.Match[str]) -> str:
    c = m.group()
    short = _TEXT_SHORT.get(c)
    if short:
        return short
    if "\udc80" <= c <= "\udcff":  # a byte that is not valid UTF-8
        return f"\\x{ord(c) - 0xDC00:02x}"
    return "".join(f"\\x{b:02x}" for b in c.encode())  # a control character, by its UTF-8 bytes


def text_name(b: bytes | str) -> str:
    """A name for a line of text output, unambiguously: ``\\`` doubled; ``\\n``, ``\\r``, ``\\t``;
    ``\\xNN`` for the other control characters (C0, DEL, C1: each byte of their UTF-8 form) and
    for every byte that is not valid UTF-8. Everything else is printed as is. (A ``str`` is taken
    to hold undecodable bytes as ``surrogateescape`` characters, as from ``os.fsdecode``.)"""
    s = b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else b
    return _TEXT_SPECIAL.sub(_text_escape, s)


def quoted_name(b: bytes | str) -> str:
    """:func:`text_name` in double quotes, with ``"`` escaped as ``\\"``."""
    return '"' + text_name(b).replace('"', '\\"') + '"'


# -- JSON (.ls) ---------------------------------------------------------------------------

_jstr = json_name


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
