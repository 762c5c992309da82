"""One malformed NAR per rule of the strict reader: exact error class, rule, message and offset.

Each case is also fed to ``nar restore`` and ``nar ls`` through the CLI: non-zero exit, one
line on stderr, no traceback and nothing left behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nartool.errors import NarError, TruncatedError
from nartool.nar import END, Directory, File, NarReader, Symlink, nar_bytes
from nartool.nar.limits import Limits

from .helpers import run_cli
from .narbuild import MAGIC, dir_, entry, link, nar, reg, s, toks

GOOD = nar(dir_(entry(b"a", reg(b"hello")), entry(b"b", link(b"a")), entry(b"c", dir_(entry(b"x", reg(b""))))))


def deep(levels: int) -> bytes:
    node = reg(b"x")
    for _ in range(levels - 1):
        node = dir_(entry(b"d", node))
    return nar(node)


# (id, data, error class, rule, message fragment, offset or None)
CASES = [
    ("bad-magic", s("nix-archive-2") + reg(), NarError, "magic", "bad magic", 0),
    ("magic-long-prefix", toks(14) + b"nix-archive-1\0\0\0" + reg(), NarError, "magic", "bad magic", 0),
    ("empty-input", b"", NarError, "truncated", "too short", 0),
    ("truncated-header", GOOD[:50], TruncatedError, "truncated", "unexpected end", None),
    ("truncated-contents", nar(reg(b"hello world"))[:100], TruncatedError, "truncated", "unexpected end", None),
    ("truncated-padding", nar(reg(b"hello"))[:101 + 2], TruncatedError, "truncated", "unexpected end", None),
    ("truncated-before-close", GOOD[:-8], TruncatedError, "truncated", "unexpected end", None),
    ("trailing-data", GOOD + b"\0" * 8, NarError, "trailing-data", "trailing data", len(GOOD)),
    ("trailing-nar", GOOD + GOOD, NarError, "trailing-data", "trailing data", len(GOOD)),
    ("unsorted", nar(dir_(entry(b"b", reg()), entry(b"a", reg()))), NarError, "unsorted-entries", "not sorted", None),
    ("dup-regular", nar(dir_(entry(b"a", reg()), entry(b"a", reg()))), NarError, "duplicate-entry", "duplicate", None),
    ("dup-symlink", nar(dir_(entry(b"a", link(b"t")), entry(b"a", link(b"t")))), NarError, "duplicate-entry",
     "duplicate", None),
    ("dup-directory", nar(dir_(entry(b"a", dir_()), entry(b"a", dir_()))), NarError, "duplicate-entry",
     "duplicate", None),
    ("dup-mixed", nar(dir_(entry(b"a", dir_()), entry(b"a", reg()))), NarError, "duplicate-entry", "duplicate", None),
    ("name-empty", nar(dir_(entry(b"", reg()))), NarError, "invalid-name", "empty entry name", 128),
    ("name-dot", nar(dir_(entry(b".", reg()))), NarError, "invalid-name", "'.' or '..'", 128),
    ("name-dotdot", nar(dir_(entry(b"..", reg()))), NarError, "invalid-name", "'.' or '..'", 128),
    ("name-slash", nar(dir_(entry(b"a/b", reg()))), NarError, "invalid-name", "'/'", 128),
    ("name-nul", nar(dir_(entry(b"a\0b", reg()))), NarError, "invalid-name", "NUL", 128),
    ("name-too-long", nar(dir_(entry(b"n" * 256, reg()))), NarError, "invalid-name", "longer than 255", 128),
    ("padding-name", MAGIC + toks("(", "type", "directory", "entry", "(", "name") + toks(1) + b"a\0\0\0\0\0\0\1",
     NarError, "padding", "non-zero padding", 128),
    ("padding-contents", MAGIC + toks("(", "type", "regular", "contents", 3) + b"abc\0\0\0\0\1" + toks(")"),
     NarError, "padding", "non-zero padding", 99),
    ("padding-tag", MAGIC + toks(1) + b"(x\0\0\0\0\0\0", NarError, "padding", "non-zero padding", 24),
    ("unknown-type", nar(toks("(", "type", "fifo", ")")), NarError, "unknown-type", "unknown node type", 56),
    ("unknown-tag-in-dir", nar(toks("(", "type", "directory", "bogus", ")")), NarError, "token",
     "expected 'entry' or ')'", 80),
    ("regular-without-contents", nar(toks("(", "type", "regular", ")")), NarError, "token", "'contents'", 72),
    ("contents-twice", nar(toks("(", "type", "regular", "contents", "ab", "contents", "cd", ")")), NarError, "token",
     "expected ')'", 104),
    ("executable-after-contents", nar(toks("(", "type", "regular", "contents", "ab", "executable", "", ")")),
     NarError, "token", "expected ')'", 104),
    ("executable-nonempty", nar(toks("(", "type", "regular", "executable", "x", "contents", "", ")")), NarError,
     "executable-value", "non-empty", 96),
    ("executable-in-dir", nar(toks("(", "type", "directory", "executable", "", ")")), NarError, "token",
     "expected 'entry' or ')'", 80),
    ("type-twice", nar(toks("(", "type", "regular", "type", "regular", "contents", "", ")")), NarError, "token",
     "'contents'", 72),
    ("no-type", nar(toks("(", ")")), NarError, "token", "expected 'type'", 40),
    ("symlink-without-target", nar(toks("(", "type", "symlink", ")")), NarError, "token", "expected 'target'", 72),
    ("symlink-empty-target", nar(link(b"")), NarError, "invalid-target", "empty symlink target", 88),
    ("symlink-nul-target", nar(link(b"a\0b")), NarError, "invalid-target", "NUL", 88),
    ("symlink-target-too-long", nar(link(b"t" * 4096)), NarError, "invalid-target", "longer than 4095", 88),
    ("tag-too-long", MAGIC + toks(33) + b"x" * 40, NarError, "tag-too-long", "longer than 32", 24),
    ("tag-huge-length", MAGIC + toks(2**60), NarError, "tag-too-long", "longer than 32", 24),
    ("name-huge-length", MAGIC + toks("(", "type", "directory", "entry", "(", "name", 2**62), NarError,
     "invalid-name", "longer than 255", 128),
    ("target-huge-length", MAGIC + toks("(", "type", "symlink", "target", 2**62), NarError, "invalid-target",
     "longer than 4095", 88),
    ("contents-beyond-input", MAGIC + toks("(", "type", "regular", "contents", 2**40) + b"abc", TruncatedError,
     "truncated", "unexpected end", None),
    ("node-before-name", nar(toks("(", "type", "directory", "entry", "(", "node") + reg() + toks(")", ")")),
     NarError, "token", "expected 'name'", 112),
    ("two-names", nar(toks("(", "type", "directory", "entry", "(", "name", "a", "name", "b", "node") + reg()
                      + toks(")", ")")), NarError, "token", "expected 'node'", 144),
    ("two-nodes-in-entry", nar(toks("(", "type", "directory", "entry", "(", "name", "a", "node") + reg()
                               + toks("node") + reg() + toks(")", ")")), NarError, "token", "expected ')'", None),
    ("name-after-node", nar(toks("(", "type", "directory", "entry", "(", "node") + reg() + toks("name", "a", ")", ")")),
     NarError, "token", "expected 'name'", 112),
    ("entry-without-paren", nar(toks("(", "type", "directory", "entry", "name", "a")), NarError, "token",
     "expected '('", 96),
    ("depth-65", deep(65), NarError, "too-deep", "deeper than 64", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed(case: tuple[str, bytes, type, str, str, int | None]) -> None:
    _, data, cls, rule, fragment, offset = case
    with pytest.raises(NarError) as ei:
        for ev in NarReader(data):
            if isinstance(ev, File):
                for _ in ev.chunks:
                    pass
    e = ei.value
    assert type(e) is cls, (type(e), e)
    assert e.rule == rule, str(e)
    assert fragment in str(e), str(e)
    if offset is not None:
        assert e.offset == offset, str(e)
    if e.offset is not None and rule not in ("truncated", "padding"):
        assert e.offset % 8 == 0


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_skipping_contents(case: tuple[str, bytes, type, str, str, int | None]) -> None:
    """The same errors when contents are skipped rather than read (as `ls` does)."""
    _, data, cls, rule, _, _ = case
    with pytest.raises(cls) as ei:
        for _ in NarReader(data):
            pass
    assert ei.value.rule == rule


def _dribble(data: bytes, step: int) -> Callable[[int], bytes]:
    """A read(n) that never returns more than ``step`` bytes: token boundaries fall
    everywhere relative to the reader's buffer (its fused fast paths must not care)."""
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + min(n, step)]
        pos += len(chunk)
        return chunk

    return read


@pytest.mark.parametrize("step", [1, 3, 7, 8, 13, 64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_in_small_reads(case: tuple[str, bytes, type, str, str, int | None], step: int) -> None:
    """Same error class, rule and offset whatever the read sizes."""
    _, data, cls, rule, fragment, offset = case
    with pytest.raises(NarError) as ei:
        for ev in NarReader(_dribble(data, step)):
            if isinstance(ev, File):
                for _ in ev.chunks:
                    pass
    assert type(ei.value) is cls and ei.value.rule == rule and fragment in str(ei.value), str(ei.value)
    if offset is not None:
        assert ei.value.offset == offset


@pytest.mark.parametrize("step", [1, 5, 8, 100])
def test_valid_nar_in_small_reads(step: int) -> None:
    good = nar_bytes([Directory(b""), File(b"a", True, 3, [b"abc"]), Directory(b"d"),
                      Symlink(b"l", b"target"), File(b"z" * 255, False, 70000, [bytes(70000)]), END,
                      File(b"e", False, 0), END])
    events = []
    for ev in NarReader(_dribble(good, step)):
        if isinstance(ev, File):
            ev.chunks = [b"".join(ev.chunks)]
        events.append(ev)
    assert nar_bytes(events) == good


def test_depth_64_is_accepted_and_limit_configurable() -> None:
    assert sum(1 for _ in NarReader(deep(64))) > 0
    with pytest.raises(NarError, match="deeper than 10"):
        list(NarReader(deep(11), limits=Limits(max_depth=10)))
    list(NarReader(deep(11), limits=Limits(max_depth=11)))


def test_limits_configurable_for_names() -> None:
    data = nar(dir_(entry(b"abcdef", reg())))
    with pytest.raises(NarError, match="longer than 5"):
        list(NarReader(data, limits=Limits(max_name=5)))


def test_never_allocates_declared_length() -> None:
    """A 2**60-byte file declared over a tiny input fails fast (streamed, not allocated)."""
    data = MAGIC + toks("(", "type", "regular", "contents", 2**60) + b"x" * 100
    with pytest.raises(TruncatedError):
        for ev in NarReader(data):
            assert isinstance(ev, File)
            for _ in ev.chunks:
                pass


_cli = run_cli


CLI_CASES = [c for c in CASES if c[0] in {
    "bad-magic", "truncated-contents", "trailing-data", "unsorted", "dup-directory", "name-dotdot", "name-slash",
    "padding-contents", "symlink-empty-target", "tag-huge-length", "depth-65", "two-nodes-in-entry",
}]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_restore_leaves_nothing(case: tuple[str, bytes, type, str, str, int | None], tmp_path: Path) -> None:
    data = case[1]
    dest = tmp_path / "out"
    r = _cli("nar", "restore", str(dest), input=data)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == [], "restore left something behind"
    r = _cli("nar", "ls", "-R", "-", input=data)
    assert r.returncode == 1 and r.stderr.decode().startswith("error: ")


def test_cli_debug_shows_traceback(tmp_path: Path) -> None:
    r = _cli("--debug", "nar", "restore", str(tmp_path / "o"), input=b"junk" * 10)
    assert r.returncode == 1 and b"Traceback" in r.stderr
