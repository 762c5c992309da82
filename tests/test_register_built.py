"""Paths built in place: canonicalising a tree (nartool.fs.canonical) and registering it
(LocalStore.register_built_path), checked against restores and real Nix."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from nartool.errors import FsError, InvalidPathError, StoreError
from nartool.fs import dump_nar
from nartool.fs.canonical import DIR_MODE, EXEC_MODE, FILE_MODE, MTIME_NS, canonicalise_tree
from nartool.fs.osutil import remove_at
from nartool.hashes import Hash, nix32_encode
from nartool.nar.limits import Limits
from nartool.store import LocalStore
from nartool.store.paths import ContentAddress, make_fixed_output_path
from nartool.store.types import PathInfo

Nix = Callable[..., subprocess.CompletedProcess[bytes]]
UNBOUNDED = Limits(max_depth=1 << 62, max_name=1 << 62, max_target=1 << 62)


def _nar(path: str | Path) -> bytes:
    return b"".join(bytes(c) for c in dump_nar(path, limits=UNBOUNDED))


def _xattr(path: Path) -> bool:
    try:
        os.setxattr(path, "user.nartool-test", b"1")
    except OSError:
        return False
    return True


def _meta(root: Path) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """(relative path, file type and mode, mtime) of every entry, symlinks not followed, plus
    xattrs of non-symlinks."""
    out = []
    todo = [root]
    while todo:
        p = todo.pop()
        st = os.lstat(p)
        xs: tuple[str, ...] = ()
        if not stat.S_ISLNK(st.st_mode):
            xs = tuple(sorted(os.listxattr(p)))
        out.append((str(p.relative_to(root)), st.st_mode, st.st_mtime_ns, xs))
        if stat.S_ISDIR(st.st_mode):
            todo.extend(p.iterdir())
    return sorted(out)


def _messy(top: Path, depth: int = 40) -> Path:
    top.mkdir()
    (top / "plain").write_bytes(b"plain\n")
    (top / "private").write_bytes(b"secret")
    os.chmod(top / "private", 0o600)
    (top / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(top / "suid", 0o4750)
    (top / "sgid-noexec").write_bytes(b"g")
    os.chmod(top / "sgid-noexec", 0o2640)
    (top / "only-other-x").write_bytes(b"x")
    os.chmod(top / "only-other-x", 0o601)
    (top / "unreadable").write_bytes(b"nope")
    (top / "sticky").mkdir()
    (top / "sticky" / "f").write_bytes(b"in sticky")
    os.chmod(top / "sticky", 0o1777)
    (top / "closed").mkdir()
    (top / "closed" / "g").write_bytes(b"in closed")
    os.symlink("plain", top / "link")
    os.symlink("/nonexistent/dangling", top / "dangling")
    (top / "sticky" / "hard").write_bytes(b"linked twice")
    os.link(top / "sticky" / "hard", top / "hard2")
    d = top / "deep"
    for i in range(depth):
        d = d / f"d{i}"
    d.mkdir(parents=True)
    (d / "bottom").write_bytes(b"bottom")
    os.symlink("../../..", d / "up")
    _xattr(top / "plain")
    _xattr(top / "closed")
    os.chmod(top / "unreadable", 0)
    os.chmod(top / "closed", 0)
    return top


def test_canonicalise_messy_tree_equals_store_restore(tmp_path: Path) -> None:
    tree = _messy(tmp_path / "tree")
    canonicalise_tree(tree)
    meta = _meta(tree)
    for rel, mode, mtime, xs in meta:
        assert mtime == MTIME_NS, rel
        assert xs == (), rel
        if stat.S_ISDIR(mode):
            assert stat.S_IMODE(mode) == DIR_MODE, rel
        elif stat.S_ISREG(mode):
            assert stat.S_IMODE(mode) in (FILE_MODE, EXEC_MODE), rel
    modes = {rel: stat.S_IMODE(mode) for rel, mode, *_ in meta}
    assert modes["suid"] == EXEC_MODE and modes["only-other-x"] == EXEC_MODE
    assert modes["private"] == modes["sgid-noexec"] == modes["unreadable"] == FILE_MODE
    assert (tree / "hard2").stat().st_nlink == 2  # links inside the tree are fine
    nar = _nar(tree)
    # the same NAR restored into a store gets exactly the same metadata
    with LocalStore(tmp_path / "store") as store:
        h = Hash("sha256", hashlib.sha256(nar).digest())
        path = make_fixed_output_path("tree", h, recursive=True, store_dir=store.store_dir)
        store.add_nar(PathInfo(path, h, len(nar), ca=ContentAddress("recursive", h).render()), nar)
        restored = Path(store.physical(path))
        assert _nar(restored) == nar
        # (hard links come back as two files: their link counts differ, nothing else)
        assert _meta(restored) == meta
    # idempotent
    canonicalise_tree(tree)
    assert _nar(tree) == nar and _meta(tree) == meta


def test_canonicalise_very_deep_tree(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    fds = [fd]
    try:
        for _ in range(3000):  # far deeper than the recursion limit or PATH_MAX allows
            os.mkdir("d", 0o700, dir_fd=fds[-1])
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o4755, dir_fd=fds[-1])
        os.close(leaf)
        os.chmod("leaf", 0o4755, dir_fd=fds[-1])
        canonicalise_tree(top)
        st = os.stat("leaf", dir_fd=fds[-1], follow_symlinks=False)
        assert stat.S_IMODE(st.st_mode) == EXEC_MODE and st.st_mtime_ns == MTIME_NS
        for f in fds:
            st = os.fstat(f)
            assert stat.S_IMODE(st.st_mode) == DIR_MODE and st.st_mtime_ns == MTIME_NS
    finally:
        for f in fds:
            os.close(f)
        remove_at(None, bytes(top))  # (pytest's clean-up recurses)


def test_canonicalise_refuses_before_changing_anything(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    os.chmod(tree / "f", 0o644)
    os.mkfifo(tree / "fifo")
    with pytest.raises(FsError) as e:
        canonicalise_tree(tree)
    assert e.value.rule == "unsupported-type" and "fifo" in str(e.value)
    assert stat.S_IMODE((tree / "f").stat().st_mode) == 0o644  # untouched
    os.unlink(tree / "fifo")
    outside = tmp_path / "outside"
    outside.write_bytes(b"o")
    os.chmod(outside, 0o644)
    os.link(outside, tree / "inside")
    with pytest.raises(FsError) as e:
        canonicalise_tree(tree)
    assert e.value.rule == "outside-hard-link"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="changing ownership needs root")
def test_canonicalise_owner_as_root(tmp_path: Path) -> None:
    tree = _messy(tmp_path / "t", depth=3)
    canonicalise_tree(tree, owner=(4321, 4322))
    todo = [tree]
    while todo:
        p = todo.pop()
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (4321, 4322), p
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), p
        if stat.S_ISDIR(st.st_mode):
            todo.extend(p.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_canonicalise_unprivileged_unreadable_entries() -> None:
    """As a plain user (where mode 0 really denies access): unreadable files and directories
    are opened without following symlinks, then made canonical."""
    with tempfile.TemporaryDirectory() as d:  # (pytest's tmp_path is not reachable by others)
        os.chmod(d, 0o755)
        _unprivileged(Path(d) / "t")


def _unprivileged(tree: Path) -> None:
    tree.mkdir()
    (tree / "closed" / "sub").mkdir(parents=True)
    (tree / "closed" / "sub" / "f").write_bytes(b"x")
    (tree / "unreadable").write_bytes(b"y")
    os.symlink("unreadable", tree / "link")
    os.chmod(tree / "closed" / "sub" / "f", 0o4700)
    os.chmod(tree / "unreadable", 0)
    os.chmod(tree / "closed", 0)
    for p in [tree, tree / "closed", tree / "closed" / "sub", tree / "closed" / "sub" / "f",
              tree / "unreadable", tree / "link"]:
        os.chown(p, 65534, 65534, follow_symlinks=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            canonicalise_tree(tree)
            code = 0
        except BaseException as e:
            os.write(2, f"{e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    modes = {str(p.relative_to(tree)): stat.S_IMODE(os.lstat(p).st_mode)
             for p in [tree / "closed", tree / "closed" / "sub", tree / "closed" / "sub" / "f", tree / "unreadable"]}
    assert modes == {"closed": DIR_MODE, "closed/sub": DIR_MODE, "closed/sub/f": EXEC_MODE, "unreadable": FILE_MODE}
    assert os.lstat(tree / "link").st_mtime_ns == MTIME_NS


def _built(store: LocalStore, name: str) -> str:
    return f"{store.store_dir}/{nix32_encode(os.urandom(20))}-{name}"


#: a derivation Nix made (its output path is the one its contents give)
HELLO_DRV_TEXT = ('Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[],[],"x86_64-linux",'
                  '"/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","hello"),'
                  '("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])')


def test_register_built_path_real_nix(nix: Nix, tmp_path: Path) -> None:
    root = tmp_path / "store"
    with LocalStore(root) as store:
        dep = store.add_text("dep", "dependency").path
        unused = store.add_text("unused", "not referred to").path
        drv = store.add_text("hello.drv", HELLO_DRV_TEXT).path  # a real derivation standing in for the deriver
        out = _built(store, "out")
        phys = Path(store.physical(out))
        _messy(phys, depth=5)
        (phys / "bin").mkdir()
        (phys / "bin" / "run").write_text(f"#!/bin/sh\nexec {dep}/x\n# me: {out}\n")
        os.chmod(phys / "bin" / "run", 0o755)
        os.chmod(phys / "closed", 0o755)
        info = store.register_built_path(out, reference_candidates=[dep, unused, out], deriver=drv)
        assert info.references == frozenset({dep, out})
        assert store.path_info(out) == info
        assert info.deriver == drv and info.ca is None
        assert info.nar_hash == Hash("sha256", hashlib.sha256(_nar(phys)).digest())
        # a flat content-addressed output
        data = b"fixed output\n"
        h = Hash("sha256", hashlib.sha256(data).digest())
        fixed = make_fixed_output_path("fixed", h, recursive=False, store_dir=store.store_dir)
        Path(store.physical(fixed)).write_bytes(data)
        fi = store.register_built_path(fixed, ca=ContentAddress("flat", h).render())
        assert fi.ca == ContentAddress("flat", h).render() and fi.references == frozenset()
        bad = make_fixed_output_path("bad", h, recursive=False, store_dir=store.store_dir)
        Path(store.physical(bad)).write_bytes(b"other contents")
        with pytest.raises(StoreError) as e:
            store.register_built_path(bad, ca=ContentAddress("flat", h).render())
        assert e.value.rule == "ca-mismatch" and not store.is_valid(bad)
        os.unlink(store.physical(bad))
    nix("nix-store", "--store", root, "--verify", "--check-contents")
    refs = nix("nix-store", "--store", root, "-q", "--references", out).stdout.decode().split()
    assert sorted(refs) == sorted([dep, out])
    assert nix("nix-store", "--store", root, "-q", "--deriver", out).stdout.decode().strip() == drv
    assert nix("nix-store", "--store", root, "-q", "--hash", out).stdout.decode().strip() == \
        info.nar_hash.prefixed("nix32")


def test_register_built_path_refusals(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "store") as store:
        dep = store.add_text("dep", "dependency").path
        before = set(store.all_paths())

        out = _built(store, "fifo")
        phys = Path(store.physical(out))
        phys.mkdir()
        (phys / "f").write_text(dep)
        os.mkfifo(phys / "pipe")
        with pytest.raises(FsError) as fe:
            store.register_built_path(out, reference_candidates=[dep])
        assert fe.value.rule == "unsupported-type"
        assert set(store.all_paths()) == before and not store.is_valid(out)
        os.unlink(phys / "pipe")  # the files stay, and the lock was released: it can be retried
        assert store.register_built_path(out, reference_candidates=[dep]).references == {dep}
        before.add(out)

        with pytest.raises(StoreError) as se:  # already valid
            store.register_built_path(out)
        assert se.value.rule == "already-valid"
        with pytest.raises(StoreError) as se:
            store.register_built_path(dep)
        assert se.value.rule == "already-valid"
        assert store.path_info(dep).references == frozenset()

        ghost = _built(store, "ghost")  # a well-formed store path that is not valid
        out2 = _built(store, "refs-ghost")
        Path(store.physical(out2)).write_text(f"uses {ghost} and {dep}")
        with pytest.raises(StoreError) as se:
            store.register_built_path(out2, reference_candidates=[dep, ghost])
        assert se.value.rule == "invalid-reference"
        assert set(store.all_paths()) == before and not store.is_valid(out2)

        with pytest.raises(InvalidPathError):
            store.register_built_path("/elsewhere/" + os.path.basename(out2))
        with pytest.raises(InvalidPathError):
            store.register_built_path(out2, reference_candidates=["/elsewhere/x"])
        missing = _built(store, "missing")
        with pytest.raises(StoreError) as se:
            store.register_built_path(missing)
        assert se.value.rule == "missing"

        with store.batch():  # inside a batch: registered with it
            store.register_built_path(out2, reference_candidates=[dep])
            assert not store.is_valid(out2)
        assert store.is_valid(out2) and store.query_references(out2) == {dep}
        assert set(store.all_paths()) == before | {out2}
