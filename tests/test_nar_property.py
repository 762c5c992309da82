"""Property tests: random trees round trip; random damage is refused cleanly or harmless."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any

import pytest
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

def tree_strategy(names: st.SearchStrategy[bytes] = NAME_BYTES, *, file_max: int = 40, exec_max: int = 20,
                  dir_max: int = 5, max_leaves: int = 25) -> st.SearchStrategy[Tree]:
    """Trees: files (bytes), ("x", bytes) executables, ("l", target) symlinks, dicts by name."""
    leaf = st.one_of(
        st.binary(max_size=file_max),
        st.tuples(st.just("x"), st.binary(max_size=exec_max)),
        st.tuples(st.just("l"), st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b)),
    )
    return st.recursive(leaf, lambda kids: st.dictionaries(names, kids, max_size=dir_max), max_leaves=max_leaves)


trees = tree_strategy()


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


@settings(max_examples=150, deadline=None)
@given(tree=trees, tail=st.binary(max_size=40), step=st.integers(min_value=1, max_value=300),
       big=st.booleans())
def test_passthrough_yields_the_input_bytes(tree: Tree, tail: bytes, step: int, big: bool) -> None:
    """nar_passthrough gives back exactly the NAR's own bytes (not a re-encoding), leaves what
    follows in the source, whatever the read sizes; with a big file the contents stream."""
    from nartool.nar.reader import nar_passthrough
    from nartool.nar.source import ByteSource

    evs = events_of(tree)
    if big:
        evs = [File(b"", False, 300_000, [bytes(range(256)) * 1171 + b"\x01" * 224])]
    data = nar_bytes(evs)
    blob = data + tail
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = blob[pos : pos + min(n, step)]
        pos += len(out)
        return out

    src = ByteSource(read)
    src.peek(min(len(blob), step))  # something already buffered before the NAR is read
    out = b"".join(nar_passthrough(src))
    assert out == data
    assert src.offset == len(data)
    assert src.read_exact(len(tail)) == tail and src.at_eof()


def test_passthrough_refuses_what_the_reader_refuses() -> None:
    from nartool.nar.reader import nar_passthrough
    from nartool.nar.source import ByteSource

    good = nar_bytes(events_of({b"a": b"y", b"b": b"x"}))
    swapped = good.replace(b"\x01\x00\x00\x00\x00\x00\x00\x00a", b"\x01\x00\x00\x00\x00\x00\x00\x00c", 1)
    padded = good[:-9] + b"\x01" + good[-8:]
    for bad in (good[:-8], swapped, padded):
        with pytest.raises(NarError) as want:
            list(NarReader(ByteSource(io.BytesIO(bad)), standalone=False))
        with pytest.raises(NarError) as got:
            b"".join(nar_passthrough(ByteSource(io.BytesIO(bad))))
        assert (got.value.rule, got.value.offset) == (want.value.rule, want.value.offset)
