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

from .narbuild import dir_, entry, link, nar, reg, toks


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


# -- the restore fast path: small files created by the reader itself ---------------------------

import shutil  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nartool  # noqa: E402
from nartool.errors import FsError, NartoolError  # noqa: E402
from nartool.fs.sink import _Builder, restore_events  # noqa: E402
from nartool.nar.reader import FileSink  # noqa: E402

from .test_nar_property import events_of as tree_events  # noqa: E402
from .test_nar_property import tree_strategy  # noqa: E402


def tree_state(root: str) -> list[tuple[str, int, bytes]]:
    """Every entry under ``root``: relative path, mode, contents or target."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in sorted(dirs + files):
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                body = os.fsencode(os.readlink(p))
            elif stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    body = f.read()
            else:
                body = b""
            out.append((os.path.relpath(p, root), st_.st_mode, body))
    return sorted(out)


def restore_both(data: bytes, step: int | None) -> tuple[Any, Any]:
    """Restore ``data`` through the fast path (the reader given to restore_events) and the
    general one (its events only); each outcome is the tree's state or the error's fields."""
    outcomes = []
    for fast in (True, False):
        work = tempfile.mkdtemp()
        try:
            dest = os.path.join(work, "r")
            reader = NarReader(data if step is None else dribble(data, step))
            try:
                restore_events(reader if fast else reader.events(), dest)
            except NartoolError as e:
                outcomes.append((type(e), e.rule, getattr(e, "offset", None), e.path, str(e)))
                assert os.listdir(work) == []  # all or nothing
            else:
                outcomes.append(tree_state(dest))
        finally:
            shutil.rmtree(work)
    return outcomes[0], outcomes[1]


NAME = st.binary(min_size=1, max_size=10).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
trees = tree_strategy(NAME, file_max=300, exec_max=100, dir_max=6, max_leaves=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_restore_fast_path_as_the_general_one(tree: Any, data: st.DataObject) -> None:
    good = bytearray(nar_bytes(tree_events(tree)))  # type: ignore[arg-type]
    kind = data.draw(st.sampled_from(["none", "flip", "truncate", "insert", "delete"]))
    pos = data.draw(st.integers(0, len(good) - 1))
    if kind == "flip":
        good[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del good[pos:]
    elif kind == "insert":
        good[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del good[pos:pos + data.draw(st.integers(1, 16))]
    step = data.draw(st.sampled_from([None, 1, 7, 8, 64, 200]))
    fast, general = restore_both(bytes(good), step)
    assert fast == general
    if kind == "none":
        assert isinstance(fast, list)


@pytest.mark.parametrize("step", [None, 1, 5, 8, 13, 1000, 65537])
def test_restore_fast_path_many_files(step: int | None) -> None:
    # files straddling the 64 KiB read buffer are buffered whole and taken by the fast path too
    fast, general = restore_both(many_files(), step)
    assert fast == general
    assert isinstance(fast, list) and len(fast) == 400 + 8


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_restore_fast_path_errors(case: tuple[str, bytes, str | None, int | None]) -> None:
    fast, general = restore_both(case[1], None)
    assert fast == general
    assert not isinstance(fast, list)
    if case[2] is not None:
        assert fast[1] == case[2] and fast[2] == case[3]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o007])
def test_restore_modes_as_nix(umask: int) -> None:
    # Nix: created with 0666 minus the umask, executables then get all three x bits
    data = nar(dir_(entry(b"e", reg(b"#!", executable=True)), entry(b"r", reg(b"data"))))
    old = os.umask(umask)
    try:
        fast, general = restore_both(data, None)
    finally:
        os.umask(old)
    assert fast == general
    modes = {p: stat.S_IMODE(m) for p, m, _ in fast}
    assert modes == {"e": (0o666 & ~umask) | 0o111, "r": 0o666 & ~umask}


def test_file_sink_only_when_nothing_more_is_needed() -> None:
    old = os.umask(0o022)
    try:
        assert _Builder(-1, b"x", names=None, canonical=False, fsync=False).file_sink() is not None
        assert _Builder(-1, b"x", names=None, canonical=True, fsync=False).file_sink() is None
        assert _Builder(-1, b"x", names=None, canonical=False, fsync=True).file_sink() is None
        assert _Builder(-1, b"x", names=None, canonical=False, fsync=False,
                        on_file=lambda _p, _n: None).file_sink() is None
        os.umask(0o077)  # x bits masked: executables need a chmod after all
        assert _Builder(-1, b"x", names=None, canonical=False, fsync=False).file_sink() is None
    finally:
        os.umask(old)


def test_restore_fast_path_creation_error() -> None:
    # a creation failure inside the reader is reported as the builder reports its own
    data = nar(dir_(entry(b"a", reg(b"1")), entry(b"b", reg(b"2"))))
    got = []
    for fast in (True, False):
        work = tempfile.mkdtemp()
        pfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            b = _Builder(pfd, b"r", names=None, canonical=False, fsync=False)
            reader = NarReader(data)
            files = b.file_sink() if fast else None
            assert (files is not None) == fast
            with pytest.raises(FsError) as ei:
                for ev in reader.events(files):
                    b.feed(ev)
                    if isinstance(ev, Directory):  # the name is taken behind the reader's back
                        os.close(os.open(os.path.join(work, "r", "b"), os.O_CREAT | os.O_WRONLY))
            b.close_all()
            got.append((ei.value.rule, ei.value.path, str(ei.value)))
            with open(os.path.join(work, "r", "a"), "rb") as f:
                assert f.read() == b"1"
        finally:
            os.close(pfd)
            shutil.rmtree(work)
    assert got[0] == got[1]
    assert got[0][:2] == ("exists", b"b")


@pytest.mark.parametrize("step", [None, 1000])
def test_small_files_are_not_yielded_with_a_file_sink(step: int | None) -> None:
    data = many_files()
    work = tempfile.mkdtemp()
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        b = _Builder(fd, b"r", names=None, canonical=False, fsync=False)
        files = b.file_sink()
        assert isinstance(files, FileSink)
        reader = NarReader(data if step is None else dribble(data, step))
        kinds = []
        for ev in reader.events(files):
            kinds.append(type(ev))
            b.feed(ev)
        b.close_all()
        # only the big files (70000 bytes) and the directories come out as events; the small
        # files and the symlinks are made by the reader
        big = sum(1 for ev in NarReader(data) if isinstance(ev, File) and ev.size > 65536)
        assert kinds.count(File) == big
        assert kinds.count(Symlink) == 0
        assert kinds.count(Directory) == 9
        assert len(os.listdir(os.path.join(work, "r"))) == 400
        assert os.readlink(os.path.join(work, "r", "f0050", "l")) == "../t"
    finally:
        os.close(fd)
        shutil.rmtree(work)
    with tempfile.TemporaryDirectory() as d:
        nartool.restore(os.path.join(d, "r"), data)
        assert b"".join(bytes(c) for c in nartool.api.dump_chunks(os.path.join(d, "r"))) == data


SYMLINK_CASES = [
    ("nul-in-target", nar(dir_(entry(b"a", link(b"x\0y")))), "invalid-target"),
    ("bad-padding", nar(dir_(entry(b"a", link(b"xyz")))).replace(b"xyz\0\0\0\0\0", b"xyz\0\0\0\0\1"), "padding"),
    ("target-too-long", nar(dir_(entry(b"a", link(b"t" * 4096)))), "invalid-target"),
    ("not-closed", nar(dir_(entry(b"a", link(b"t")), entry(b"b", link(b"u")))).replace(
        toks("t", ")", ")"), toks("t", ")", "entry"), 1), "token"),
]


@pytest.mark.parametrize("step", [None, 1, 9])
@pytest.mark.parametrize("case", SYMLINK_CASES, ids=[c[0] for c in SYMLINK_CASES])
def test_restore_fast_path_symlink_errors(case: tuple[str, bytes, str], step: int | None) -> None:
    fast, general = restore_both(case[1], step)
    assert fast == general
    assert not isinstance(fast, list) and fast[1] == case[2]


def test_restore_fast_path_symlinks() -> None:
    data = nar(dir_(entry(b"a", link(b"/abs/target")), entry(b"b", dir_(entry(b"c", link(b"../a")))),
                    entry(b"d", link(b"x" * 4095))))
    fast, general = restore_both(data, None)
    assert fast == general
    assert [(p, body) for p, _, body in fast] == [("a", b"/abs/target"), ("b", b""), ("b/c", b"../a"),
                                                  ("d", b"x" * 4095)]
