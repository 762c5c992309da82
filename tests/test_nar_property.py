"""Property tests: random trees round trip; random damage is refused cleanly or harmless."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nartool
from nartool.errors import NarError
from nartool.nar import Directory, File, NarReader, Symlink, nar_bytes
from nartool.nar.events import END, Event

NAME_BYTES = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)

Tree = Any  # bytes (file) | tuple[str, bytes] (symlink / exec) | dict (directory)

leaf = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.just("x"), st.binary(max_size=20)),
    st.tuples(st.just("l"), st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b)),
)
trees = st.recursive(leaf, lambda kids: st.dictionaries(NAME_BYTES, kids, max_size=5), max_leaves=25)


def events_of(tree: Tree, name: bytes = b"") -> list[Event]:
    if isinstance(tree, dict):
        out: list[Event] = [Directory(name)]
        for k in sorted(tree):
            out += events_of(tree[k], k)
        return [*out, END]
    if isinstance(tree, bytes):
        return [File(name, False, len(tree), [tree] if tree else [])]
    kind, data = tree
    if kind == "x":
        return [File(name, True, len(data), [data] if data else [])]
    return [Symlink(name, data)]


def materialised(data: bytes) -> bytes:
    evs = []
    for e in NarReader(data):
        if isinstance(e, File):
            e.chunks = [b"".join(e.chunks)]
        evs.append(e)
    return nar_bytes(evs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_roundtrip_through_disk(tree: Tree) -> None:
    data = nar_bytes(events_of(tree))
    assert materialised(data) == data
    work = tempfile.mkdtemp()
    try:
        dest = os.path.join(work, "r")
        nartool.restore(dest, data)
        out = b"".join(bytes(c) for c in nartool.api.dump_chunks(dest))
        assert out == data
        assert nartool.hash_path(dest).digest == __import__("hashlib").sha256(data).digest()
    finally:
        shutil.rmtree(work)


@settings(max_examples=300, deadline=None)
@given(trees, st.data())
def test_mutations_refused_or_canonical(tree: Tree, data: st.DataObject) -> None:
    good = bytearray(nar_bytes(events_of(tree)))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    pos = data.draw(st.integers(0, len(good) - 1))
    if kind == "flip":
        good[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del good[pos:]
    elif kind == "insert":
        good[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        del good[pos:pos + data.draw(st.integers(1, 16))]
    bad = bytes(good)
    try:
        again = materialised(bad)
    except NarError:
        return
    assert again == bad  # accepted only if canonical


@settings(max_examples=60, deadline=None)
@given(trees, st.data())
def test_restore_of_damaged_nar_leaves_nothing(tree: Tree, data: st.DataObject) -> None:
    good = nar_bytes(events_of(tree))
    cut = data.draw(st.integers(0, len(good) - 1))
    work = tempfile.mkdtemp()
    try:
        try:
            nartool.restore(os.path.join(work, "r"), good[:cut])
        except NarError:
            pass
        else:
            raise AssertionError("a truncated NAR was accepted")
        assert os.listdir(work) == []
    finally:
        shutil.rmtree(work)


def test_writer_refuses_bad_event_streams() -> None:
    import pytest

    from nartool.errors import FsError

    bad = [
        ([Directory(b""), File(b"", False, 0), END], "invalid-name"),
        ([Directory(b""), File(b"a/b", False, 0), END], "invalid-name"),
        ([Directory(b""), File(b"b", False, 0), File(b"a", False, 0), END], "unsorted-entries"),
        ([Directory(b""), File(b"a", False, 0), Symlink(b"a", b"t"), END], "duplicate-entry"),
        ([Symlink(b"", b"")], "invalid-target"),
        ([Directory(b"")], "truncated"),
        ([File(b"", False, 5, [b"abc"])], "size-changed"),
        ([File(b"", False, 0), File(b"", False, 0)], "trailing-data"),
    ]
    for events, rule in bad:
        with pytest.raises((NarError, FsError)) as ei:
            nar_bytes(events)
        assert ei.value.rule == rule, (events, ei.value)
