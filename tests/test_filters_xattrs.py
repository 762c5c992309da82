"""Gitignore filters on dump/hash, xattr handling, and `nar check`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import nartool
from nartool.fs.filters import exclude_filter
from nartool.nar import nar_bytes

from .helpers import run_cli
from .test_nar_property import events_of

_cli = run_cli


def make_src(root: Path) -> Path:
    t = root / "src"
    (t / "build" / "deep").mkdir(parents=True)
    (t / "lib").mkdir()
    (t / "main.c").write_text("int main;")
    (t / "main.o").write_text("obj")
    (t / "keep.o").write_text("keep")
    (t / "build" / "deep" / "x").write_text("x")
    (t / "lib" / "a.c").write_text("a")
    (t / "lib" / "a.o").write_text("ao")
    (t / "lib" / "build").write_text("a file named build")
    return t


def test_exclude_matches_nix_dump_of_filtered_copy(tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    t = make_src(tmp_path)
    ignore = tmp_path / "ignore"
    ignore.write_text("# comment\n*.o\n!keep.o\n")
    # the same tree filtered by hand: gitignore semantics (build/ matches directories only)
    ref = tmp_path / "ref"
    shutil.copytree(t, ref, symlinks=True)
    shutil.rmtree(ref / "build")
    (ref / "main.o").unlink()
    (ref / "lib" / "a.o").unlink()
    expected = nix("nix-store", "--dump", ref).stdout
    r = _cli("nar", "dump", str(t), "--exclude", "build/", "--exclude-from", str(ignore))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    b32 = nix("nix-hash", "--type", "sha256", "--base32", ref).stdout.strip()
    r = _cli("nar", "hash", "--base32", str(t), "--exclude", "build/", "--exclude-from", str(ignore))
    assert r.stdout.strip() == b32


def test_exclude_filter_unit() -> None:
    ex = exclude_filter(["*.o", "/top-only", "dir/"])
    assert ex is not None
    assert ex(b"x/y.o", False) and ex(b"top-only", False) and not ex(b"sub/top-only", False)
    assert ex(b"a/dir", True) and not ex(b"a/dir", False)
    assert exclude_filter([]) is None


def test_xattrs_ignored_on_dump_and_stripped_on_canonical_restore(tmp_path: Path) -> None:
    f = tmp_path / "t" / "f"
    f.parent.mkdir()
    f.write_bytes(b"data")
    try:
        os.setxattr(f, "user.com.apple.quarantine", b"0081;x")
    except OSError as e:  # pragma: no cover - tmpfs without user xattrs
        pytest.skip(f"user xattrs unsupported here: {e}")
    plain = nar_bytes(events_of({b"f": b"data"}))
    assert b"".join(bytes(c) for c in nartool.api.dump_chunks(tmp_path / "t")) == plain
    r = _cli("nar", "dump", "--list-xattrs", str(tmp_path / "t"))
    assert r.stdout == plain and b"user.com.apple.quarantine" in r.stderr
    # a canonical (store-bound) restore strips attributes even if the filesystem adds some
    from nartool.fs.sink import restore_events
    from nartool.nar import NarReader

    restore_events(NarReader(plain), tmp_path / "r", canonical=True)
    assert os.listxattr(tmp_path / "r" / "f") == []
    assert (tmp_path / "r" / "f").stat().st_mode & 0o777 == 0o444
    assert (tmp_path / "r" / "f").stat().st_mtime == 1
    os.chmod(tmp_path / "r", 0o755)


def test_strip_fd_removes_attributes(tmp_path: Path) -> None:
    from nartool.fs.xattrs import list_fd, strip_fd

    f = tmp_path / "f"
    f.write_bytes(b"x")
    try:
        os.setxattr(f, "user.a", b"1")
        os.setxattr(f, "user.b", b"2")
    except OSError as e:  # pragma: no cover - tmpfs without user xattrs
        pytest.skip(f"user xattrs unsupported here: {e}")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert sorted(list_fd(fd)) == ["user.a", "user.b"]
        strip_fd(fd)
        assert list_fd(fd) == []
    finally:
        os.close(fd)


def test_check_reports_collisions(tmp_path: Path) -> None:
    nar = nar_bytes(events_of({b"A": b"", b"a": b"", "é".encode(): b"", "e\u0301".encode(): b"", b"ok": b"",
                               b"sub": {b"X": b"", b"x": b"", b"L" * 250: b"", b"l" * 250: b""}}))
    p = tmp_path / "t.nar"
    p.write_bytes(nar)
    r = _cli("nar", "check", "--json", str(p))
    assert r.returncode == 1
    out = json.loads(r.stdout)
    groups = {(c["directory"], tuple(c["names"])) for c in out["collisions"]}
    assert ("/", ("A", "a")) in groups and ("/", ("e\u0301", "é")) in groups
    assert ("/sub", ("X", "x")) in groups
    assert [t["path"] for t in out["tooLong"]] == ["/sub/" + "l" * 250]
    assert _cli("nar", "check", "--target", "linux", str(p)).returncode == 0
    clean = tmp_path / "clean.nar"
    clean.write_bytes(nar_bytes(events_of({b"a": b"", b"b": b""})))
    assert _cli("nar", "check", str(clean)).returncode == 0
    # a tree on disk works too
    nartool.restore(tmp_path / "tree", nar)
    assert _cli("nar", "check", str(tmp_path / "tree")).returncode == 1
