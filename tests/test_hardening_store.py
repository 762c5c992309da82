"""Store hardening: ``verify --repair`` never deletes intact or needed paths, and nothing in
root finding or deletion recurses (trees of any depth, written by Nix or found under
``gcroots``)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nartool.fs import osutil
from nartool.store import LocalStore
from nartool.store import gc as gcmod
from nartool.store.gc import add_indirect_root, collect_garbage, find_roots

from .helpers import run_cli

Nix = Callable[..., subprocess.CompletedProcess[bytes]]
DEEP = 1200  # more levels than Python's default recursion limit (1000)


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--store", root, *args, text=True, timeout=300)


def deep_tree(top: Path, depth: int = DEEP, leaf: bytes = b"leaf") -> Path:
    """``top/d/d/…/d/f``: ``depth`` nested directories (made one by one: ``os.makedirs``
    itself recurses)."""
    p = os.fspath(top)
    os.mkdir(p)
    for _ in range(depth):
        p += "/d"
        os.mkdir(p)
    with open(p + "/f", "wb") as f:
        f.write(leaf)
    return top


def reopen(store: LocalStore) -> LocalStore:
    """The same store without this process's temp roots (as a fresh process sees it)."""
    store.close()
    return LocalStore(store.root, case_hack=False)


def entries(store: LocalStore) -> set[str]:
    return set(os.listdir(store.real_store_dir)) - {".links"}


def base(path: str) -> str:
    return path.rsplit("/", 1)[1]


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """Empty ``tmp_path`` afterwards with remove_at: pytest's own clean-up recurses and cannot
    remove trees this deep."""
    yield
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            osutil.remove_at(fd, os.fsencode(name))
    finally:
        os.close(fd)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(tmp_path / "root", case_hack=False)
    yield s  # type: ignore[misc]
    s.close()


def tamper_file(store: LocalStore, path: str) -> None:
    phys = store.physical(path)
    os.chmod(phys, 0o644)
    with open(phys, "ab") as f:
        f.write(b"tampered")


def tamper_dir(store: LocalStore, path: str) -> None:
    phys = store.physical(path)
    os.chmod(phys, 0o755)
    with open(os.path.join(phys, "extra"), "wb") as f:
        f.write(b"tampered")


# -- item 2: verify --check-contents --repair ----------------------------------------------


@pytest.mark.nix
def test_verify_repair_keeps_deep_nix_path(nix: Nix, tmp_path: Path) -> None:
    """A path Nix 2.8 wrote with ~1200 nested directories is intact: verify finds nothing and
    --repair deletes nothing (it, a referrer or the root). Old code: "corrupt" (nartool's own
    64-level NAR bound), then all three deleted."""
    root = tmp_path / "nixroot"
    src = deep_tree(tmp_path / "deep")
    shallow = deep_tree(tmp_path / "mid", 100)
    deep = nix("nix-store", "--store", root, "--add", src).stdout.decode().strip()
    mid = nix("nix-store", "--store", root, "--add", shallow).stdout.decode().strip()
    st = LocalStore(root, case_hack=False)
    referrer = st.add_text("user", deep.encode(), [deep]).path
    st = reopen(st)
    os.symlink(deep, os.path.join(st.state_dir, "gcroots", "deep"))
    before = sorted(st.all_paths())
    assert st.verify(check_contents=True) == []
    st.close()
    r = cli(root, "store", "verify", "--check-contents", "--repair", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    st = LocalStore(root, case_hack=False)
    assert sorted(st.all_paths()) == before and {deep, mid, referrer} <= set(before)
    assert os.path.exists(st.physical(deep) + "/d" * DEEP + "/f")
    st.close()
    v = nix("nix-store", "--store", root, "--verify", "--check-contents", check=False)
    assert v.returncode == 0 and b"error" not in v.stderr, v.stderr
    assert nix("nix-store", "--store", root, "-q", "--hash", deep).returncode == 0


def test_verify_deep_path_is_checked_not_skipped(store: LocalStore, tmp_path: Path) -> None:
    """Depth is no reason to give up: a deep path whose contents changed is found corrupt,
    an intact one passes."""
    a = store.add_path(deep_tree(tmp_path / "a", 300)).path
    b = store.add_path(deep_tree(tmp_path / "b", 300, b"other")).path
    leaf = store.physical(b) + "/d" * 300 + "/f"
    os.chmod(leaf, 0o644)
    with open(leaf, "ab") as f:
        f.write(b"!")
    probs = store.verify(check_contents=True)
    assert [(p["path"], p["problem"]) for p in probs] == [(b, "corrupt")]
    assert a not in {p["path"] for p in probs}


def test_verify_repair_never_deletes_needed_paths(store: LocalStore, tmp_path: Path) -> None:
    """Broken paths held by a permanent, an indirect or a runtime root, or referred to by a
    valid path, are reported as not repairable and kept (with their referrers); only unneeded
    broken paths are invalidated. Old code deleted every broken path and all its referrers."""
    rooted = store.add_text("rooted", b"rooted").path
    indirect = store.add_text("indirect", b"indirect").path
    dep = store.add_text("dep", b"dep").path
    user = store.add_text("user", dep.encode(), [dep]).path
    loose = store.add_text("loose", b"loose").path
    gone = store.add_text("gone", b"gone").path
    dirp = store.add_path(deep_tree(tmp_path / "cwd", 3)).path
    intact = store.add_text("intact", b"intact").path
    store = reopen(store)
    os.symlink(rooted, os.path.join(store.state_dir, "gcroots", "r"))
    add_indirect_root(store, os.fspath(tmp_path / "result"), indirect)
    for p in (rooted, indirect, dep, loose):
        tamper_file(store, p)
    tamper_dir(store, dirp)
    os.chmod(store.real_store_dir, 0o755)
    os.unlink(store.physical(gone))
    proc = subprocess.Popen(["sleep", "60"], cwd=store.physical(dirp))  # a runtime root
    try:
        probs = {p["path"]: p for p in store.verify(check_contents=True, repair=True)}
    finally:
        proc.kill()
        proc.wait()
    assert set(probs) == {rooted, indirect, dep, loose, gone, dirp}
    assert probs[gone]["problem"] == "missing" and probs[gone]["repair"] == "invalidated"
    assert probs[loose]["problem"] == "corrupt" and probs[loose]["repair"] == "invalidated"
    for p in (rooted, indirect, dep, dirp):
        assert probs[p]["problem"] == "corrupt" and probs[p]["repair"] == "not repairable", probs[p]
    assert "held by GC root" in probs[rooted]["reason"] and "gcroots/r" in probs[rooted]["reason"]
    assert "held by GC root" in probs[indirect]["reason"]
    assert "held by GC root /proc/" in probs[dirp]["reason"]
    assert user in probs[dep]["reason"]
    assert set(store.all_paths()) == {rooted, indirect, dep, user, dirp, intact}
    for p in (rooted, indirect, dep, user, dirp, intact):
        assert os.path.lexists(store.physical(p))
    assert not os.path.lexists(store.physical(loose))


def test_verify_repair_cli_exit_status(store: LocalStore, tmp_path: Path) -> None:
    """The CLI exits 1 while a broken path is kept (and says why), 0 once every broken path was
    invalidated."""
    dep = store.add_text("dep", b"dep").path
    user = store.add_text("user", dep.encode(), [dep]).path
    store = reopen(store)
    tamper_file(store, dep)
    root = Path(store.root)
    store.close()
    r = cli(root, "store", "verify", "--check-contents", "--repair")
    assert r.returncode == 1
    assert "not repairable" in r.stderr and user in r.stderr
    st = LocalStore(root, case_hack=False)
    assert set(st.all_paths()) == {dep, user}
    st._remove_object(user)  # nothing needs dep any more
    st.close()
    r = cli(root, "store", "verify", "--check-contents", "--repair", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"path": dep, "problem": "corrupt", "detail": "hash of path has changed",
                                     "repair": "invalidated"}]


def test_unverifiable_is_not_corrupt(store: LocalStore, tmp_path: Path) -> None:
    """Contents that cannot be dumped (here a FIFO appeared) are reported unverifiable, not
    corrupt, and --repair leaves the path alone. Old code: "corrupt", then deleted."""
    p = store.add_path(deep_tree(tmp_path / "t", 2)).path
    store = reopen(store)
    phys = store.physical(p)
    os.chmod(phys, 0o755)
    os.mkfifo(os.path.join(phys, "fifo"))
    probs = store.verify(check_contents=True, repair=True)
    assert [(x["path"], x["problem"]) for x in probs] == [(p, "unverifiable")]
    assert "repair" not in probs[0]
    assert store.is_valid(p) and os.path.exists(os.path.join(phys, "d", "d", "f"))
    root = Path(store.root)
    store.close()
    r = cli(root, "store", "verify", "--check-contents", "--repair")
    assert r.returncode == 1 and "unverifiable" in r.stderr


# -- item 7: no recursion in root finding or deletion --------------------------------------


def test_deep_gcroots_tree(store: LocalStore) -> None:
    """Roots deep inside a ~1200-level directory under gcroots (a symlink and a file named
    after a store path) still count; the rest is collected. Old code: RecursionError."""
    linked = store.add_text("linked", b"linked").path
    named = store.add_text("named", b"named").path
    dead = store.add_text("dead", b"dead").path
    store = reopen(store)
    p = os.path.join(store.state_dir, "gcroots", "deep")
    os.mkdir(p)
    for _ in range(DEEP):
        p += "/x"
        os.mkdir(p)
    os.symlink(linked, p + "/link")
    open(p + "/" + base(named), "w").close()
    roots = find_roots(store, runtime=False)
    assert roots.problems == []
    assert roots.paths() == {linked, named}
    assert p + "/link" in roots.roots
    res = collect_garbage(store)
    assert res.deleted == [dead] and res.problems == []
    assert set(store.all_paths()) == {linked, named}
    r = cli(Path(store.root), "store", "gc", "--print-roots")
    assert r.returncode == 0 and f"{p}/link -> {linked}" in r.stdout, r.stderr


def test_root_scan_with_few_descriptors(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root walk climbs back through directories whose descriptors were closed (reopened
    from an open ancestor): roots in side branches at every level are all found."""
    monkeypatch.setattr(gcmod, "DirChain", functools.partial(osutil.DirChain, window=3, stride=3))
    paths = [store.add_text(f"p{i}", f"p{i}".encode()).path for i in range(12)]
    store = reopen(store)
    p = os.path.join(store.state_dir, "gcroots", "t")
    os.mkdir(p)
    for i, sp in enumerate(paths):
        os.mkdir(p + "/side")
        os.symlink(sp, p + "/side/l")
        p += f"/n{i}"
        os.mkdir(p)
    assert find_roots(store, runtime=False).paths() == set(paths)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="runtime roots come from /proc")
def test_every_runtime_root_counts(store: LocalStore, tmp_path: Path) -> None:
    """Each store path a running process uses is a root of its own. Old code filed them all
    under one location, so only the first one found counted and the GC took the others."""
    dirs = [store.add_path(deep_tree(tmp_path / f"d{i}", 1)).path for i in range(3)]
    store = reopen(store)
    procs = [subprocess.Popen(["sleep", "60"], cwd=store.physical(d)) for d in dirs]
    try:
        assert set(dirs) <= find_roots(store).paths()
        assert collect_garbage(store).deleted == []
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()
    assert sorted(collect_garbage(store).deleted) == sorted(dirs)


@pytest.mark.nix
def test_gc_deletes_deep_nix_path(nix: Nix, tmp_path: Path) -> None:
    """A dead path Nix wrote with ~1200 nested directories is collected completely, and real
    Nix still verifies the store. Old code: RecursionError, path half deleted."""
    root = tmp_path / "nixroot"
    deep = nix("nix-store", "--store", root, "--add", deep_tree(tmp_path / "deep")).stdout.decode().strip()
    keep = nix("nix-store", "--store", root, "--add", deep_tree(tmp_path / "keep", 5)).stdout.decode().strip()
    st = LocalStore(root, case_hack=False)
    os.symlink(keep, os.path.join(st.state_dir, "gcroots", "keep"))
    res = collect_garbage(st)
    assert res.deleted == [deep] and res.problems == []
    assert not os.path.lexists(st.physical(deep)) and os.path.exists(st.physical(keep))
    st.close()
    nix("nix-store", "--store", root, "--verify", "--check-contents")
    assert nix("nix-store", "--store", root, "-q", "--hash", deep, check=False).returncode != 0


def test_gc_after_interrupted_deletion(store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection interrupted half-way through deleting a deep path leaves a half-deleted tree;
    the next collection removes it. Old code: every run failed with RecursionError."""
    deep = store.add_path(deep_tree(tmp_path / "deep")).path
    keep = store.add_text("keep", b"keep").path
    store = reopen(store)
    os.symlink(keep, os.path.join(store.state_dir, "gcroots", "keep"))
    real_rmdir = os.rmdir
    calls = [0]

    def rmdir(*a: object, **kw: object) -> None:
        calls[0] += 1
        if calls[0] > DEEP // 2:
            raise KeyboardInterrupt
        real_rmdir(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rmdir", rmdir)
    with pytest.raises(KeyboardInterrupt):
        collect_garbage(store)
    monkeypatch.setattr(os, "rmdir", real_rmdir)
    assert os.path.lexists(store.physical(deep))  # half deleted
    res = collect_garbage(store)
    assert res.problems == []
    assert entries(store) == {base(keep)}
    assert store.all_paths() == [keep]


# -- remove_at ------------------------------------------------------------------------------


def _open_fds(under: Path) -> int:
    """Descriptors of this process open on something under ``under`` (other threads of the test
    run may open and close unrelated descriptors meanwhile)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(os.fspath(under) + "/"):
                n += 1
        except OSError:
            pass
    return n


def _deep_locked_tree(tmp_path: Path, outside: Path) -> Path:
    """``t/d/d/…``: DEEP read-only levels, each with a file and a symlink to ``outside``, and
    now and then an unreadable (mode 0) directory."""
    top = tmp_path / "t"
    p = os.fspath(top)
    os.mkdir(p)
    for i in range(DEEP):
        os.symlink(outside, p + "/link")
        with open(p + "/f", "wb") as f:
            f.write(b"x")
        if i % 100 == 0:
            os.mkdir(p + "/locked")
            os.chmod(p + "/locked", 0)
        p += "/d"
        os.mkdir(p)
    q = os.fspath(top)
    for _ in range(DEEP):
        os.chmod(q, 0o555)
        q += "/d"
    return top


def test_remove_at_deep_read_only_tree(tmp_path: Path) -> None:
    """remove_at removes a deep tree of read-only (and unreadable) directories, never following
    symlinks; nothing there is fine. Old code: RecursionError."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    top = _deep_locked_tree(tmp_path, outside)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        osutil.remove_at(dfd, b"t")
        osutil.remove_at(dfd, b"t")  # already gone
        os.symlink(outside, tmp_path / "s")
        osutil.remove_at(dfd, b"s")  # a symlink to a directory: only the link goes
    finally:
        os.close(dfd)
    assert not os.path.lexists(top) and not os.path.lexists(tmp_path / "s")
    assert (outside / "keep").read_bytes() == b"k"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_remove_at_bounded_descriptors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However deep the tree, remove_at keeps only about depth/stride + window descriptors open
    (closed levels are reopened on the way back up) and leaks none."""
    outside = tmp_path / "outside"
    outside.mkdir()
    top = _deep_locked_tree(tmp_path, outside)
    seen = [0]

    class Counting(osutil.DirChain):
        def push(self, name: bytes, *, writable: bool = False) -> int:
            fd = super().push(name, writable=writable)
            seen[0] = max(seen[0], sum(1 for x in self.fds if x >= 0))
            return fd

    monkeypatch.setattr(osutil, "DirChain", functools.partial(Counting, window=8, stride=8))
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = _open_fds(tmp_path)
        osutil.remove_at(dfd, b"t")
        assert _open_fds(tmp_path) == before
    finally:
        os.close(dfd)
    assert not os.path.lexists(top)
    assert 0 < seen[0] <= DEEP // 8 + 8 + 2
