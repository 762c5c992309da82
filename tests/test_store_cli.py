"""`nartool store …` through the CLI: output formats, the embedded default store, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import zstandard

from .helpers import run_cli

run = run_cli


def test_default_store_is_embedded_in_xdg_data(tmp_path: Path) -> None:
    f = tmp_path / "hello"
    f.write_bytes(b"hi")
    r = run("store", "add", f, env={"XDG_DATA_HOME": str(tmp_path / "data"), "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    p = r.stdout.decode().strip()
    assert (tmp_path / "data/nartool/store/nix/var/nix/db/db.sqlite").exists()
    assert (tmp_path / "data/nartool/store" / p.lstrip("/")).exists()


def test_archive_and_restore_closure(tmp_path: Path) -> None:
    """The README's archival recipe: export a closure to a zstd file, import it elsewhere."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "f").write_bytes(b"x" * 100000)
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    p = run("--store", s1, "store", "add", a).stdout.decode().strip()
    arch = tmp_path / "closure.zst"
    r = run("--store", s1, "store", "export", "-r", p, "--compress", "zstd", "-o", arch)
    assert r.returncode == 0, r.stderr
    assert arch.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert len(zstandard.ZstdDecompressor().decompressobj().decompress(arch.read_bytes())) > 100000
    r = run("--store", s2, "store", "import", arch, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [p]
    r = run("--store", s2, "store", "verify", "--check-contents")
    assert r.returncode == 0, r.stderr


def test_query_formats(tmp_path: Path) -> None:
    s = tmp_path / "s"
    from nartool.store import LocalStore

    st = LocalStore(s)
    a = st.add_text("a", b"a").path
    b = st.add_text("b", b"b", [a]).path
    st.close()
    assert run("--store", s, "store", "query", "--references", b).stdout.decode().split() == [a]
    assert run("--store", s, "store", "query", "--referrers", a).stdout.decode().split() == [b]
    assert run("--store", s, "store", "query", "--requisites", b).stdout.decode().split() == [a, b]
    tree = run("--store", s, "store", "query", "--tree", b).stdout.decode()
    assert tree.splitlines() == [b, "└───" + a]
    assert f'"{a.rsplit("/", 1)[1]}" -> "{b.rsplit("/", 1)[1]}"' in run("--store", s, "store", "query", "--graph",
                                                                        b).stdout.decode()
    info = json.loads(run("--store", s, "store", "query", "--json", b).stdout)
    assert info[0]["references"] == [a] and info[0]["narHash"].startswith("sha256-")
    sizes = json.loads(run("--store", s, "store", "query", "--size", "--json", a, b).stdout)
    assert set(sizes) == {a, b}
    # a result symlink or a path inside a store path is accepted like a store path
    link = tmp_path / "result"
    os.symlink(b, link)
    assert run("--store", s, "store", "query", "--hash", link).returncode == 0
    assert run("--store", s, "store", "query", "--hash", b + "/sub/x").returncode == 0


def test_errors_are_one_line(tmp_path: Path) -> None:
    s = tmp_path / "s"
    for args in (["store", "query", "/tmp/not-in-store"], ["store", "query", "/nix/store/short"],
                 ["store", "dump", "/nix/store/" + "a" * 32 + "-missing"], ["store", "import", "/dev/null"],
                 ["store", "add", "--name", "bad name", "/etc/hostname"]):
        r = run("--store", s, *args)
        assert r.returncode != 0, args
        err = r.stderr.decode()
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err


def test_gc_cli(tmp_path: Path) -> None:
    s = tmp_path / "s"
    f = tmp_path / "f"
    f.write_bytes(b"f")
    p = run("--store", s, "store", "add", f).stdout.decode().strip()
    assert run("--store", s, "store", "gc", "--print-dead").stdout.decode().split() == [p]
    assert run("--store", s, "store", "add-root", tmp_path / "keep", p).returncode == 0
    roots = run("--store", s, "store", "gc", "--print-roots").stdout.decode()
    assert f"{tmp_path / 'keep'} -> {p}" in roots
    assert run("--store", s, "store", "gc", "--print-dead").stdout == b""
    r = run("--store", s, "store", "delete", p)
    assert r.returncode == 1 and b"alive" in r.stderr
    os.unlink(tmp_path / "keep")
    r = run("--store", s, "store", "gc", "--json")
    assert json.loads(r.stdout)["paths"] == [p]
