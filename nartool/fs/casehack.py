"""The case hack: restore NARs losslessly onto case-insensitive filesystems.

Restore: per directory, entries whose names fold onto a name already restored get the
suffix ``~nix~case~hack~N`` (N = the entry's rank in its group: 1, 2, …), exactly as Nix
does for ASCII case. Dump: suffixes are removed and entries re-sorted by their NAR name.

Where this extends Nix (see ``docs/case-hack.md``):

* **Folding.** Names are grouped by Unicode case folding of their NFD form (UTF-8 names),
  because HFS+ and APFS treat ``É``/``é`` and NFC/NFD spellings as one name. For names that
  differ only in ASCII case, groups and numbers are exactly Nix's.
* **Escape.** Nix restores a NAR name that already contains ``~nix~case~hack~`` verbatim
  and cuts it on dump, losing the name. Here, a name containing the marker in any letter
  case (or ending in ``~nix~case~hack``, which would form one with a suffix) is *escaped*: every ``~`` in it is doubled and the tail gets an ``x`` flag:
  ``a~nix~case~hack~1`` → ``a~~nix~~case~~hack~~1~nix~case~hack~x``. A doubled name
  cannot contain the marker, so every on-disk name holds at most one marker, at its tail,
  followed by ``[x][N]``. Hence every valid NAR round trips, and no generated name can
  equal (even case-insensitively) another entry's name.
"""

from __future__ import annotations

import re

from ..errors import CaseCollisionError, FsError

MARKER = b"~nix~case~hack~"
_TAIL = re.compile(rb"(x)?([1-9][0-9]*)?\Z")
MAX_NAME = 255


def fold(name: bytes) -> bytes:
    """The key under which a case-insensitive filesystem compares names."""
    try:
        s = name.decode("utf-8")
    except UnicodeDecodeError:
        return name.lower()  # bytes.lower folds ASCII only, as Nix's strcasecmp
    import unicodedata  # (here: only a case-insensitive store needs it)

    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", s).casefold()).encode("utf-8")


def needs_escape(name: bytes) -> bool:
    """True when the name holds the marker, or would form one with an appended suffix
    (it ends in ``~nix~case~hack``), in any letter case."""
    return (name + MARKER).lower().find(MARKER) < len(name)


def encode(name: bytes, rank: int) -> bytes:
    """On-disk name for the ``rank``-th member (0 = first) of a fold group."""
    if needs_escape(name):
        body, flag = name.replace(b"~", b"~~"), b"x"
    else:
        body, flag = name, b""
    if not flag and not rank:
        return name
    return body + MARKER + flag + (str(rank).encode() if rank else b"")


def decode(disk: bytes) -> tuple[bytes, int]:
    """``(NAR name, rank)`` of an on-disk name; :class:`FsError` if it cannot be ours."""
    i = disk.find(MARKER)
    if i < 0:
        return disk, 0
    m = _TAIL.match(disk, i + len(MARKER))
    if m is None or m.end() == i + len(MARKER):
        raise FsError("name has a malformed case-hack suffix", got=disk, rule="case-hack-suffix")
    body = disk[:i]
    rank = int(m.group(2)) if m.group(2) else 0
    if m.group(1):
        if re.search(rb"(?<!~)~(~~)*(?!~)", body):
            raise FsError("escaped case-hack name has an undoubled '~'", got=disk, rule="case-hack-suffix")
        body = body.replace(b"~~", b"~")
    return body, rank


class CaseHackCodec:
    """A :class:`nartool.fs.source.NameCodec` for case-insensitive filesystems."""

    def dump_names(self, dir_path: bytes, disk_names: list[bytes]) -> list[tuple[bytes, bytes]]:
        by_name: dict[bytes, bytes] = {}
        ranks: dict[bytes, dict[int, bytes]] = {}
        for d in disk_names:
            name, rank = decode(d)
            other = by_name.get(name)
            if other is not None:
                raise CaseCollisionError("two entries map to the same NAR name", path=dir_path,
                                         expected=other, got=d, rule="case-hack-duplicate")
            by_name[name] = d
            group = ranks.setdefault(fold(name), {})
            if rank in group:
                raise CaseCollisionError("two entries carry the same case-hack rank", path=dir_path,
                                         expected=group[rank], got=d, rule="case-hack-inconsistent")
            group[rank] = d
        for members in ranks.values():
            if sorted(members) != list(range(len(members))):
                some = members[max(members)]
                raise CaseCollisionError("case-hack suffixes are inconsistent (a rank has no lower-ranked sibling)",
                                         path=dir_path, got=some, rule="case-hack-inconsistent")
        pairs = sorted(by_name.items())
        # the ranks must follow NAR order within each group, as a restore assigned them
        seen: dict[bytes, int] = {}
        for name, d in pairs:
            k = fold(name)
            expect = seen.get(k, 0)
            if decode(d)[1] != expect:
                raise CaseCollisionError("case-hack rank does not match the name's order in its group",
                                         path=dir_path, expected=expect, got=d, rule="case-hack-inconsistent")
            seen[k] = expect + 1
        return pairs

    def restore_namer(self, dir_path: bytes) -> _Namer:
        return _Namer(dir_path)


class _Namer:
    __slots__ = ("dir_path", "counts")

    def __init__(self, dir_path: bytes) -> None:
        self.dir_path = dir_path
        self.counts: dict[bytes, int] = {}

    def disk_name(self, logical: bytes) -> bytes:
        k = fold(logical)
        rank = self.counts.get(k, 0)
        self.counts[k] = rank + 1
        disk = encode(logical, rank)
        if len(disk) > MAX_NAME:
            raise FsError(f"name would exceed {MAX_NAME} bytes once case-hacked", path=self.dir_path,
                          got=disk, rule="case-hack-too-long")
        return disk


def resolve(mode: bool | None, path: str | bytes, *, restore: bool) -> tuple[CaseHackCodec | None, bool]:
    """The codec to use for dumping from / restoring to ``path``, and whether it was
    chosen automatically. ``mode``: True/False forces it; None reads ``NARTOOL_CASE_HACK``
    (``0``/``1``) and otherwise probes the filesystem."""
    import os

    from .detect import is_case_insensitive, nearest_existing_dir

    if mode is None:
        env = os.environ.get("NARTOOL_CASE_HACK", "")
        if env in ("0", "1"):
            mode = env == "1"
        elif env:
            raise FsError("NARTOOL_CASE_HACK must be 0 or 1", got=env, rule="bad-setting")
    if mode is not None:
        return (CaseHackCodec() if mode else None), False
    p = os.fsencode(path)
    where = nearest_existing_dir(os.path.dirname(os.path.abspath(p)) if restore or not os.path.isdir(p) else p)
    return (CaseHackCodec(), True) if is_case_insensitive(where) else (None, False)


def check_events(events: object, target: str = "macos") -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Collisions a restore on ``target`` would have to hack around, and names that would
    exceed 255 bytes once suffixed. ``target`` is ``macos`` (case- and normalisation-
    insensitive) or ``linux`` (case-sensitive: nothing collides)."""
    from ..nar.events import Directory, EndDirectory, with_paths

    collisions: list[dict[str, object]] = []
    too_long: list[dict[str, object]] = []
    if target == "linux":
        for _ in events:  # type: ignore[attr-defined]
            pass
        return collisions, too_long
    groups: list[dict[bytes, list[bytes]]] = []
    paths: list[tuple[bytes, ...]] = []
    for path, ev in with_paths(events):  # type: ignore[arg-type]
        if isinstance(ev, EndDirectory):
            g = groups.pop()
            dpath = b"/" + b"/".join(paths.pop())
            for members in g.values():
                if len(members) > 1:
                    collisions.append({"directory": dpath, "names": members})
            continue
        if path and groups:
            name = path[-1]
            members = groups[-1].setdefault(fold(name), [])
            disk = encode(name, len(members))
            members.append(name)
            if len(disk) > MAX_NAME:
                too_long.append({"path": b"/" + b"/".join(path), "length": len(disk)})
        if isinstance(ev, Directory):
            groups.append({})
            paths.append(path)
    return collisions, too_long
