"""The case-hack adapter: Nix's naming where Nix is right, lossless where it is not."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nartool
from nartool.errors import CaseCollisionError, FsError
from nartool.fs.casehack import MARKER, CaseHackCodec, decode, encode, fold
from nartool.nar import nar_bytes

from .helpers import run_cli
from .test_nar_property import events_of

CH = CaseHackCodec()


def restore_names(nar: bytes, dest: Path) -> set[bytes]:
    nartool.restore(dest, nar, names=CH)
    return set(os.listdir(os.fsencode(dest)))


def dump(path: Path) -> bytes:
    return b"".join(bytes(c) for c in nartool.api.dump_chunks(path, names=CH))


NIX_CASES = [
    [b"A", b"a"],
    [b"FOO", b"Foo", b"foo"],
    [b"A", b"AB", b"B", b"a", b"aB", b"ab", b"b"],
    [b"L", b"l", b"other"],
]


@pytest.mark.parametrize("names", NIX_CASES)
def test_same_names_as_nix(names: list[bytes], tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    tree = {n: n + b"\n" for n in names}
    tree[b"D"] = {b"x": b"1"}
    tree[b"d"] = {b"X": b"2", b"x": b"3"}
    nar = nar_bytes(events_of(tree))
    ours = restore_names(nar, tmp_path / "ours")
    nix("nix-store", "--option", "use-case-hack", "true", "--restore", tmp_path / "theirs", input=nar)
    assert ours == set(os.listdir(os.fsencode(tmp_path / "theirs")))
    assert set(os.listdir(tmp_path / "ours" / "d~nix~case~hack~1")) == set(
        os.listdir(tmp_path / "theirs" / "d~nix~case~hack~1"))
    # both dump each other's trees back to the same NAR
    assert dump(tmp_path / "ours") == nar
    assert dump(tmp_path / "theirs") == nar
    theirs_dump = nix("nix-store", "--option", "use-case-hack", "true", "--dump", tmp_path / "ours").stdout
    assert theirs_dump == nar


def test_lossless_where_nix_fails(tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    """Nix 2.8 fails (File exists) or loses names on these; we round trip them."""
    for i, names in enumerate([[b"A", b"a", b"a~nix~case~hack~1"], [b"a~nix~case~hack~1"],
                               [b"foo~nix~case~hack~bar"], [b"A", b"A~nix~case~hack~1", b"a"],
                               [b"ZZZ~nix~case~hack~1", b"zzz~nix~case~hack~1"], [b"x~nix~case~hack", b"X"]]):
        nar = nar_bytes(events_of({n: n for n in names}))
        dest = tmp_path / f"r{i}"
        restore_names(nar, dest)
        assert dump(dest) == nar, names
    nix_res = nix("nix-store", "--option", "use-case-hack", "true", "--restore", tmp_path / "n",
                  input=nar_bytes(events_of({n: n for n in [b"A", b"a", b"a~nix~case~hack~1"]})), check=False)
    assert nix_res.returncode != 0  # the reason this escape exists


def test_unicode_variants_collide(tmp_path: Path) -> None:
    nfc, nfd = "été".encode(), "e\u0301te\u0301".encode()
    assert fold(nfc) == fold(nfd) and fold("É".encode()) == fold("é".encode())
    nar = nar_bytes(events_of({nfc: b"1", nfd: b"2", "É".encode(): b"3", "é".encode(): b"4"}))
    names = restore_names(nar, tmp_path / "r")
    assert len({fold(decode(n)[0]) + bytes([decode(n)[1]]) for n in names}) == 4
    assert sum(1 for n in names if MARKER in n) == 2
    assert dump(tmp_path / "r") == nar


def test_too_long_once_suffixed(tmp_path: Path) -> None:
    nar = nar_bytes(events_of({b"A" * 250: b"", b"a" * 250: b""}))
    with pytest.raises(FsError, match="exceed 255"):
        nartool.restore(tmp_path / "r", nar, names=CH)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("disk", [
    [b"a~nix~case~hack~1"],                      # rank 1 with no rank 0
    [b"a", b"a~nix~case~hack~2"],                # gap
    [b"a", b"A~nix~case~hack~1"],                # rank order contradicts byte order (A < a)
    [b"a", b"a~nix~case~hack~x"],                # escape flag on a name that needs none... maps to "a" twice
    [b"a~nix~case~hack~"],                       # empty tail
    [b"a~nix~case~hack~01"],                     # leading zero
    [b"a~nix~case~hack~1b"],                     # junk after the number
    [b"a~nix~case~hack~x", b"a"],
])
def test_inconsistent_trees_refused(disk: list[bytes], tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    for n in disk:
        (Path(os.fsdecode(os.path.join(os.fsencode(t), n)))).write_bytes(b"")
    with pytest.raises((CaseCollisionError, FsError)):
        dump(t)


NAMES = st.lists(st.sampled_from([b"a", b"A", b"b", b"B", b"~", b"x", b"1", b"nix", b"case", b"hack",
                                  b"~nix~case~hack~", b"~NIX~Case~hack~", b"\xc3\xa9", b"e\xcc\x81"]),
                 min_size=1, max_size=6).map(b"".join).filter(lambda n: n not in (b".", b".."))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(NAMES, st.one_of(st.binary(max_size=4), st.dictionaries(NAMES, st.binary(max_size=3),
                                                                             max_size=4)), max_size=8))
def test_roundtrip_any_names(tree: dict[bytes, object]) -> None:
    for n in tree:
        for r in (0, 1, 7):
            assert decode(encode(n, r)) == (n, r)
    nar = nar_bytes(events_of(tree))
    work = Path(tempfile.mkdtemp())
    try:
        nartool.restore(work / "r", nar, names=CH)
        on_disk = os.listdir(os.fsencode(work / "r"))
        # no two on-disk names collide on a case/normalisation-insensitive filesystem
        assert len({fold(n) for n in on_disk}) == len(on_disk)
        assert dump(work / "r") == nar
    finally:
        shutil.rmtree(work)


def test_cli_flags_and_env(tmp_path: Path) -> None:
    import subprocess

    nar = nar_bytes(events_of({b"A": b"1", b"a": b"2"}))

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return run_cli(*args, input=nar, env=env)

    assert run("nar", "restore", "--case-hack", str(tmp_path / "a")).returncode == 0
    assert sorted(os.listdir(tmp_path / "a")) == ["A", "a~nix~case~hack~1"]
    assert run("nar", "restore", str(tmp_path / "b"), env={"NARTOOL_CASE_HACK": "1"}).returncode == 0
    assert sorted(os.listdir(tmp_path / "b")) == ["A", "a~nix~case~hack~1"]
    assert run("nar", "restore", str(tmp_path / "c")).returncode == 0  # ext4/tmpfs: detected case-sensitive
    assert sorted(os.listdir(tmp_path / "c")) == ["A", "a"]
    r = run("nar", "dump", "--case-hack", str(tmp_path / "a"))
    assert r.stdout == nar
    r = run("nar", "hash", "--base32", "--case-hack", str(tmp_path / "a"))
    r2 = run("nar", "hash", "--base32", str(tmp_path / "c"))
    assert r.stdout == r2.stdout and r.returncode == 0
