"""Differential tests: nartool's store and real Nix 2.8 (`nix-store --store ROOT`) read and
write the same stores."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nartool.store import LocalStore
from tests.test_nar_diff import build_awkward

from .helpers import run_cli

pytestmark = pytest.mark.nix
Nix = Callable[..., subprocess.CompletedProcess[bytes]]


cli = run_cli


def lines(b: bytes) -> list[str]:
    return b.decode().split()


def test_add_paths_equal_nix(nix: Nix, tmp_path: Path) -> None:
    tree = build_awkward(tmp_path)
    f = tmp_path / "abc"
    f.write_bytes(b"abc")
    root = tmp_path / "ours"
    ours = cli("--store", root, "store", "add", tree, f)
    assert ours.returncode == 0, ours.stderr
    theirs = nix("nix-store", "--store", tmp_path / "theirs", "--add", tree, f)
    assert lines(ours.stdout) == lines(theirs.stdout)
    flat = cli("--store", root, "store", "add", "--flat", f)
    assert lines(flat.stdout) == lines(nix("nix-store", "--store", tmp_path / "theirs", "--add-fixed", "sha256",
                                           f).stdout)
    # real Nix reads our store: verify contents, hashes, references, dump
    nix("nix-store", "--store", root, "--verify", "--check-contents")
    for p in lines(ours.stdout):
        assert nix("nix-store", "--store", root, "-q", "--hash", p).stdout == \
            nix("nix-store", "--store", tmp_path / "theirs", "-q", "--hash", p).stdout
    p = lines(ours.stdout)[0]
    assert nix("nix-store", "--store", root, "-q", "--references", p).stdout == b""
    assert nix("nix", "--store", str(root), "path-info", "--json", p).returncode == 0


def _import_closure(nix: Nix, tmp_path: Path) -> tuple[Path, list[str], bytes]:
    """A real-Nix store holding a 3-path closure with references and a deriver, plus its export."""
    nroot = tmp_path / "nixstore"
    f = tmp_path / "dep"
    f.write_text("dep")
    dep = lines(nix("nix-store", "--store", nroot, "--add", f).stdout)[0]
    # a store path referring to dep: build it through an export stream Nix imports
    from nartool.hashes import Hash
    from nartool.nar import nar_bytes
    from nartool.nar.events import END, Directory, File, Symlink
    from nartool.store import export as X
    from nartool.store.paths import make_store_path

    records = []
    prev = [dep]
    paths = [dep]
    for name in ("mid", "top"):
        body = " ".join(prev).encode()
        nar = nar_bytes([Directory(b""), File(b"bin", True, len(body), [body]), Symlink(b"dep", dep.encode()), END])
        import hashlib

        p = make_store_path("output:out", Hash("sha256", hashlib.sha256(name.encode()).digest()), name)
        records.append(b"".join(bytes(c) for c in X.record_chunks(p, prev, p + ".drv", [nar])))
        prev = prev + [p]
        paths.append(p)
    stream = b"".join(records) + X.end_chunk()
    nix("nix-store", "--store", nroot, "--import", input=stream)
    return nroot, paths, nix("nix-store", "--store", nroot, "--export", *paths).stdout


def test_we_read_nix_stores(nix: Nix, tmp_path: Path) -> None:
    nroot, paths, stream = _import_closure(nix, tmp_path)
    s = LocalStore(nroot)
    assert s.closure([paths[-1]]) == paths
    assert s.verify(check_contents=True) == []
    assert s.path_info(paths[-1]).deriver == paths[-1] + ".drv"
    assert s.query_references(paths[2]) == {paths[0], paths[1]}
    ours = b"".join(bytes(c) for c in s.export_paths(paths))
    theirs = nix("nix-store", "--store", nroot, "--export", *paths).stdout
    assert ours == theirs
    # dump equals Nix's dump of the same path
    for p in paths:
        assert b"".join(bytes(c) for c in s.nar_chunks(p)) == nix("nix-store", "--store", nroot, "--dump",
                                                                   nroot / p.lstrip("/")).stdout
    s.close()
    # and keeps working after we wrote to it: nix verifies the shared store
    s = LocalStore(nroot)
    s.add_text("ours", b"added by nartool", [paths[0]])
    s.close()
    nix("nix-store", "--store", nroot, "--verify", "--check-contents")


def test_nix_reads_our_imports_and_roots(nix: Nix, tmp_path: Path) -> None:
    _, paths, stream = _import_closure(nix, tmp_path)
    root = tmp_path / "ours"
    r = cli("--store", root, "store", "import", input=stream)
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == paths
    nix("nix-store", "--store", root, "--verify", "--check-contents")
    assert lines(nix("nix-store", "--store", root, "-q", "--requisites", paths[-1]).stdout) == paths
    assert sorted(lines(nix("nix-store", "--store", root, "-q", "--references", paths[-1]).stdout)) == \
        sorted(paths[:2])
    assert nix("nix-store", "--store", root, "-q", "--deriver", paths[-1]).stdout.decode().strip() == \
        paths[-1] + ".drv"
    assert nix("nix-store", "--store", root, "--export", *paths).stdout == stream
    # export by us == export by nix of our store
    ours = cli("--store", root, "store", "export", *paths)
    assert ours.stdout == nix("nix-store", "--store", root, "--export", *paths).stdout
    # roots: an indirect root made by us is seen by Nix's GC; Nix deletes nothing live
    link = tmp_path / "result"
    assert cli("--store", root, "store", "add-root", link, paths[-1]).returncode == 0
    roots = nix("nix-store", "--store", root, "--gc", "--print-roots").stdout.decode()
    assert f"{link} -> {paths[-1]}" in roots
    dead = nix("nix-store", "--store", root, "--gc", "--print-dead").stdout.decode().split()
    assert not set(dead) & set(paths)
    # a regular-file root (named after a store path) protects in both implementations
    os.unlink(link)
    rootfile = root / "nix/var/nix/gcroots" / paths[1].rsplit("/", 1)[1]
    rootfile.write_bytes(b"")
    ours_dead = lines(cli("--store", root, "store", "gc", "--print-dead").stdout)
    nix_dead = nix("nix-store", "--store", root, "--gc", "--print-dead").stdout.decode().split()
    assert ours_dead == [paths[2]]
    assert paths[2] in nix_dead and paths[1] not in nix_dead
    r = cli("--store", root, "store", "gc")
    assert r.returncode == 0, r.stderr
    assert lines(cli("--store", root, "store", "query", "--requisites", paths[1]).stdout) == paths[:2]
    nix("nix-store", "--store", root, "--verify", "--check-contents")


def test_nix_gc_respects_our_store(nix: Nix, tmp_path: Path) -> None:
    """Nix's collector on a store we populated: it deletes exactly the unrooted paths and our
    database stays consistent with the disk afterwards."""
    root = tmp_path / "ours"
    s = LocalStore(root)
    a = s.add_text("a", b"a").path
    b = s.add_text("b", b"b", [a]).path
    c = s.add_text("c", b"c").path
    os.symlink(b, root / "nix/var/nix/gcroots/keep")
    s.close()
    nix("nix-store", "--store", root, "--gc")
    s = LocalStore(root)
    assert set(s.all_paths()) == {a, b}
    assert not os.path.exists(s.physical(c))
    assert s.verify(check_contents=True) == []
    s.close()


def test_drv_registration_matches_nix(nix: Nix, tmp_path: Path) -> None:
    drv = ('Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[],[],"x86_64-linux",'
           '"/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","hello"),'
           '("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])')
    f = tmp_path / "hello.drv"
    f.write_text(drv)
    theirs = nix("nix-store", "--store", tmp_path / "n", "--add", f).stdout  # as a source, not text; for data
    assert theirs
    s = LocalStore(tmp_path / "ours")
    p = s.add_text("hello.drv", drv.encode()).path
    assert p == "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
    s.close()
    out = nix("nix-store", "--store", tmp_path / "ours", "-q", "--outputs", p).stdout.decode().split()
    assert out == ["/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"]


def test_scanned_references_are_nix_compatible(nix: Nix, tmp_path: Path) -> None:
    """`store add --scan-references`: references found in the NAR (contents, symlink targets,
    file names, across chunk boundaries) are registered, the path is the `source:<refs>` one,
    and real Nix agrees (verify, --references, and the path reproduces from its ca)."""
    root = tmp_path / "ours"
    s = LocalStore(root)
    a = s.add_text("a", b"a").path
    b = s.add_text("b", b"b").path
    c = s.add_text("c", b"c").path
    s.close()
    t = tmp_path / "t"
    t.mkdir()
    (t / "script").write_bytes(b"x" * ((1 << 20) - 10) + f"exec {a}/bin/x\n".encode())  # spans 1 MiB chunks
    os.symlink(b, t / "link")
    (t / c.rsplit("/", 1)[1][:32]).write_bytes(b"")  # a hash part only as a file name
    r = cli("--store", root, "store", "add", "--scan-references", "--json", t)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)[0]
    assert sorted(info["references"]) == sorted([a, b, c])
    from nartool.store.paths import ca_matches

    assert ca_matches(info["path"], info["ca"], info["references"])
    nix("nix-store", "--store", root, "--verify", "--check-contents")
    assert sorted(lines(nix("nix-store", "--store", root, "-q", "--references", info["path"]).stdout)) == \
        sorted([a, b, c])
    plain = cli("--store", root, "store", "add", t).stdout.decode().strip()
    assert plain != info["path"]  # without references it is the `nix-store --add` path
    assert plain == lines(nix("nix-store", "--store", tmp_path / "n", "--add", t).stdout)[0]
