"""Differential tests against real Nix 2.8 on generated trees with awkward content."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import nartool
from nartool.compression import METHODS

from .helpers import run_cli

_cli = run_cli


def build_awkward(root: Path) -> Path:
    """A tree with the names, sizes and link kinds that break naive implementations."""
    t = os.fsencode(root / "tree")
    os.mkdir(t)

    def f(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        p = os.path.join(t, rel)
        with open(p, "wb") as fh:
            fh.write(data)
        os.chmod(p, mode)

    for n in list(range(0, 18)) + [63, 64, 65, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20, (1 << 20) + 3]:
        f(b"size-%d" % n, os.urandom(n))
    names = [b"\x01ctl", b"new\nline", b"tab\tname", b"\xff\xfe non-utf8", "unicodé-ñ-日本".encode(), b"n" * 255,
             b"-dash", b".hidden", b"A", b"a", b"Z", b"_", b"~tilde", b"\xc3\xa9", b"sp ace", b"\x7f"]
    for n in names:
        f(n, n)
    f(b"exec-u", b"#!/bin/sh\n", 0o700)
    f(b"exec-all", b"x", 0o755)
    f(b"not-exec", b"x", 0o654)
    # execute-only: readable by root alone (the NAR is the same either way: only the x bit counts)
    f(b"exec-empty", b"", 0o100 if os.geteuid() == 0 else 0o500)
    os.symlink(b"dangling/target", os.path.join(t, b"l-dangling"))
    os.symlink(b"/absolute/path", os.path.join(t, b"l-absolute"))
    os.symlink(b"x" * 1000, os.path.join(t, b"l-long"))
    os.symlink(b"\xff\x01weird", os.path.join(t, b"l-weird"))
    os.mkdir(os.path.join(t, b"empty"))
    d = os.path.join(t, b"deep")
    for i in range(40):
        d = os.path.join(d, b"d%d" % i)
    os.makedirs(d)
    f(os.path.join(d, b"leaf"), b"leaf")
    return root / "tree"


@pytest.fixture
def awkward(tmp_path: Path) -> Path:
    return build_awkward(tmp_path)


def test_dump_identical(awkward: Path, nix) -> None:  # type: ignore[no-untyped-def]
    theirs = nix("nix-store", "--dump", awkward).stdout
    assert _cli("nar", "dump", awkward).stdout == theirs
    out = awkward.parent / "ours.nar"
    nartool.dump(awkward, out)
    assert out.read_bytes() == theirs


@pytest.mark.parametrize("kind", ["file", "exec", "symlink", "empty-dir"])
def test_dump_single_objects(tmp_path: Path, kind: str, nix) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "obj"
    if kind == "symlink":
        os.symlink("somewhere", p)
    elif kind == "empty-dir":
        p.mkdir()
    else:
        p.write_bytes(b"content" * 3)
        p.chmod(0o755 if kind == "exec" else 0o644)
    assert _cli("nar", "dump", p).stdout == nix("nix-store", "--dump", p).stdout


def test_hash_identical(awkward: Path, nix) -> None:  # type: ignore[no-untyped-def]
    b16 = nix("nix-hash", "--type", "sha256", awkward).stdout.decode().strip()
    b32 = nix("nix-hash", "--type", "sha256", "--base32", awkward).stdout.decode().strip()
    sri = nix("nix", "hash", "path", awkward).stdout.decode().strip()
    assert _cli("nar", "hash", "--base16", awkward).stdout.decode().strip() == b16
    assert _cli("nar", "hash", "--base32", awkward).stdout.decode().strip() == b32
    assert _cli("nar", "hash", awkward).stdout.decode().strip() == sri
    sha512 = nix("nix-hash", "--type", "sha512", "--base32", awkward).stdout.decode().strip()
    assert _cli("nar", "hash", "--type", "sha512", "--base32", awkward).stdout.decode().strip() == sha512


def test_restore_both_ways(awkward: Path, nix) -> None:  # type: ignore[no-untyped-def]
    work = awkward.parent
    data = nix("nix-store", "--dump", awkward).stdout
    # ours restores what Nix dumped; Nix re-dumps it identically
    r = _cli("nar", "restore", work / "ours", input=data)
    assert r.returncode == 0, r.stderr
    assert nix("nix-store", "--dump", work / "ours").stdout == data
    # Nix restores; we re-dump identically
    nix("nix-store", "--restore", work / "theirs", input=data)
    assert _cli("nar", "dump", work / "theirs").stdout == data
    # same modes as Nix gives (umask applies, exec gets all x bits)
    for rel in ("exec-u", "not-exec", "size-3"):
        assert (work / "ours" / rel).stat().st_mode == (work / "theirs" / rel).stat().st_mode


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_compressed_roundtrip(awkward: Path, method: str, nix) -> None:  # type: ignore[no-untyped-def]
    work = awkward.parent
    comp = work / f"t.nar.{method}"
    assert _cli("nar", "dump", "--compress", method, "-o", comp, awkward).returncode == 0
    assert _cli("nar", "restore", work / "r", comp).returncode == 0
    assert _cli("nar", "dump", work / "r").stdout == nix("nix-store", "--dump", awkward).stdout


def _utf8_tree(tmp_path: Path) -> Path:
    t = tmp_path / "u"
    (t / "sub" / "deeper").mkdir(parents=True)
    (t / "a").write_bytes(b"hello\n")
    (t / "empty").write_bytes(b"")
    os.symlink("a", t / "link")
    (t / "sub" / "run").write_bytes(b"#!/bin/sh\n")
    (t / "sub" / "run").chmod(0o755)
    (t / "sub" / "deeper" / "ünï").write_bytes(b"x" * 100)
    (t / "new\nline\"q").write_bytes(b"q")
    return t


@pytest.mark.parametrize("args", [
    ["/"], ["-R", "/"], ["-l", "/"], ["-lR", "/"], ["/sub"], ["-R", "/sub"], ["-l", "/a"], ["-d", "/sub"],
    ["-dl", "/"], ["-l", "/link"], ["/sub/deeper"], ["-d", "/a"],
])
def test_ls_text_identical(tmp_path: Path, args: list[str], nix) -> None:  # type: ignore[no-untyped-def]
    t = _utf8_tree(tmp_path)
    nar = tmp_path / "t.nar"
    nar.write_bytes(nix("nix-store", "--dump", t).stdout)
    theirs = nix("nix", "nar", "ls", *args[:-1], nar, args[-1]).stdout
    assert _cli("nar", "ls", nar, *args).stdout == theirs


@pytest.mark.parametrize("args", [["/"], ["-R", "/"], ["/sub"], ["-R", "/sub"], ["/a"], ["/link"]])
def test_ls_json_identical(tmp_path: Path, args: list[str], nix) -> None:  # type: ignore[no-untyped-def]
    t = _utf8_tree(tmp_path)
    nar = tmp_path / "t.nar"
    nar.write_bytes(nix("nix-store", "--dump", t).stdout)
    theirs = nix("nix", "nar", "ls", "--json", *args[:-1], nar, args[-1]).stdout
    ours = _cli("nar", "ls", "--json", nar, *args).stdout
    assert json.loads(ours) == json.loads(theirs)
    assert ours.rstrip(b"\n") == theirs  # same member order and escaping, too


def test_ls_missing_path_fails(tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    t = _utf8_tree(tmp_path)
    nar = tmp_path / "t.nar"
    nar.write_bytes(nix("nix-store", "--dump", t).stdout)
    assert nix("nix", "nar", "ls", nar, "/nope", check=False).returncode != 0
    r = _cli("nar", "ls", nar, "/nope")
    assert r.returncode == 1 and b"not found" in r.stderr


@pytest.mark.parametrize("path", ["/a", "/empty", "/sub/run", "/sub/deeper/ünï"])
def test_cat_identical(tmp_path: Path, path: str, nix) -> None:  # type: ignore[no-untyped-def]
    t = _utf8_tree(tmp_path)
    nar = tmp_path / "t.nar"
    nar.write_bytes(nix("nix-store", "--dump", t).stdout)
    assert _cli("nar", "cat", nar, path).stdout == nix("nix", "nar", "cat", nar, path).stdout


def test_cat_directory_refused(tmp_path: Path) -> None:
    t = _utf8_tree(tmp_path)
    nar = tmp_path / "t.nar"
    nartool.dump(t, nar)
    r = _cli("nar", "cat", nar, "/sub")
    assert r.returncode == 1 and b"not a regular file" in r.stderr
