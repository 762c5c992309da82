"""The reader's fused fast path for whole small files inside directories (``entry ( name … node
( type regular [executable ""] contents … ) )`` read from the buffer in one go) accepts exactly
what the token-by-token path accepts, with the same events and the same errors at the same
offsets, wherever the buffer boundaries fall."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from nartool.errors import NarError
from nartool.nar import END, Directory, File, NarReader, Symlink, nar_bytes

from .narbuild import dir_, entry, nar, reg, toks


def dribble(data: bytes, step: int) -> Callable[[int], bytes]:
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + min(n, step)]
        pos += len(chunk)
        return chunk

    return read


def events_of(src: object) -> list[object]:
    out: list[object] = []
    for ev in NarReader(src):  # type: ignore[arg-type]
        if isinstance(ev, File):
            ev.chunks = [b"".join(ev.chunks)]
        out.append(ev)
    return out


def many_files() -> bytes:
    rnd = __import__("random").Random(5)
    evs = [Directory(b"")]
    for i in range(400):
        n = rnd.choice([0, 1, 7, 8, 9, 100, 1000, 5000, 70000])
        if i % 50 == 0:
            evs.append(Directory(b"f%04d" % i))
            evs.append(Symlink(b"l", b"../t"))
            evs.append(END)
        else:
            evs.append(File(b"f%04d" % i, i % 3 == 0, n, [os.urandom(n)]))
    evs.append(END)
    return nar_bytes(evs)


@pytest.mark.parametrize("step", [None, 1, 5, 8, 13, 1000, 65537])
def test_same_events_whatever_the_reads(step: int | None) -> None:
    good = many_files()
    want = events_of(good)
    got = events_of(good if step is None else dribble(good, step))
    assert nar_bytes(got) == good  # type: ignore[arg-type]
    assert [(type(e), getattr(e, "offset", None)) for e in got] == [(type(e), getattr(e, "offset", None))
                                                                     for e in want]


BAD_PAD = toks("entry", "(", "name", "a", "node", "(", "type", "regular", "contents", 3) + b"abc\0\0\0\0\1" + \
    toks(")", ")")
CASES = [
    # (id, NAR, rule, offset)
    ("padding", nar(toks("(", "type", "directory") + BAD_PAD + toks(")")), "padding", 235),
    ("executable-value", nar(toks("(", "type", "directory", "entry", "(", "name", "a", "node", "(", "type", "regular",
                                  "executable", "x", "contents", "", ")", ")", ")")), "executable-value", 232),
    ("not-closed", nar(toks("(", "type", "directory", "entry", "(", "name", "a", "node", "(", "type", "regular",
                            "contents", "ab", "entry", ")")), "token", 240),
    ("half-closed", nar(toks("(", "type", "directory", "entry", "(", "name", "a", "node", "(", "type", "regular",
                             "contents", "ab", ")", "entry", ")")), "token", 256),
    ("contents-too-long", nar(dir_(entry(b"a", reg(b"x")))).replace(toks(1) + b"x", toks(9) + b"x", 1), None, None),
    ("unsorted-after-fast", nar(dir_(entry(b"b", reg(b"1")), entry(b"a", reg(b"2")))), "unsorted-entries", 320),
]


@pytest.mark.parametrize("step", [None, 1, 3, 8, 11, 64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_errors_as_the_slow_path(case: tuple[str, bytes, str | None, int | None], step: int | None) -> None:
    _, data, rule, offset = case
    with pytest.raises(NarError) as ei:
        events_of(data if step is None else dribble(data, step))
    if rule is not None:
        assert ei.value.rule == rule, str(ei.value)
    if offset is not None:
        assert ei.value.offset == offset, str(ei.value)
