"""The two-threaded hash (:func:`nartool.fs.source.hash_nar`): the NAR is built in place in
buffers filled and hashed by two threads in turn. It must hash exactly the bytes
:func:`~nartool.fs.source.dump_nar` produces (and real Nix hashes), whatever the buffer size and
wherever files and framing fall across buffers; an error met by either thread must surface in
the caller, unchanged, with no thread and no descriptor left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nartool.errors import FsError, NarError
from nartool.fs import source
from nartool.fs.casehack import CaseHackCodec
from nartool.fs.filters import exclude_filter
from nartool.fs.source import dump_nar, hash_nar
from nartool.nar import format as F
from nartool.nar.limits import Limits

from .conftest import require
from .helpers import nix_env


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def nar_of(path: Path, **kw: Any) -> bytes:
    return b"".join(bytes(c) for c in dump_nar(path, **kw))


def check(path: Path, algo: str = "sha256", **kw: Any) -> None:
    """hash_nar agrees with the NAR dump_nar makes, and leaves nothing behind."""
    nar = nar_of(path, **kw)
    threads, fds = threading.active_count(), open_fds()
    h, size = hash_nar(path, algo, **kw)
    assert (h.digest, size) == (hashlib.new(algo, nar).digest(), len(nar))
    assert threading.active_count() == threads
    assert open_fds() == fds


@pytest.fixture
def batch(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> int:
    """Small buffers (and a small threshold for sharing a file), to cross many boundaries."""
    size = int(getattr(request, "param", 64))
    monkeypatch.setattr(source, "HASH_BATCH", size)
    monkeypatch.setattr(source, "SHARED_FILE", 2 * size)
    return size


# ---- random trees --------------------------------------------------------------------------

NAMES = st.binary(min_size=1, max_size=10).filter(lambda b: b"/" not in b and b"\0" not in b
                                                  and b not in (b".", b".."))
# a file: (executable, size, seed); contents are derived from the seed
FILES = st.tuples(st.booleans(), st.integers(0, 700), st.integers(0, 255))
LINKS = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)
TREES = st.recursive(st.one_of(FILES, LINKS),
                     lambda kids: st.dictionaries(NAMES, kids, max_size=6), max_leaves=30)


def contents(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def materialise(tree: Any, path: Path) -> None:
    p = os.fsencode(path)
    if isinstance(tree, dict):
        os.mkdir(p)
        for name, kid in tree.items():
            materialise(kid, Path(os.fsdecode(p + b"/" + name)))
    elif isinstance(tree, bytes):
        os.symlink(tree, p)
    else:
        executable, size, seed = tree
        with open(p, "wb") as f:
            f.write(contents(size, seed))
        os.chmod(p, 0o755 if executable else 0o644)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(NAMES, TREES, max_size=6), size=st.sampled_from([1, 7, 64, 333, 4096]))
def test_random_trees_hash_as_their_nar(tmp_path_factory: pytest.TempPathFactory,
                                        monkeypatch: pytest.MonkeyPatch, tree: Any, size: int) -> None:
    monkeypatch.setattr(source, "HASH_BATCH", size)
    monkeypatch.setattr(source, "SHARED_FILE", 2 * size)
    root = tmp_path_factory.mktemp("t") / "root"
    materialise(tree, root)
    check(root)
    for kid in sorted(root.iterdir())[:2]:  # leaves and subtrees as roots too
        check(kid)


@pytest.mark.nix
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(NAMES, TREES, min_size=1, max_size=6))
def test_random_trees_hash_as_nix_does(tmp_path_factory: pytest.TempPathFactory,
                                       monkeypatch: pytest.MonkeyPatch, tree: Any) -> None:
    require("NIX", shutil.which("nix-hash") is not None, "nix-hash (Nix 2.8) not installed")
    monkeypatch.setattr(source, "HASH_BATCH", 100)
    root = tmp_path_factory.mktemp("t") / "root"
    materialise(tree, root)
    want = subprocess.run(["nix-hash", "--type", "sha256", str(root)], capture_output=True, text=True,
                          check=True, env=nix_env()).stdout.strip()
    assert hash_nar(root)[0].base16 == want


# ---- boundaries ----------------------------------------------------------------------------

HEAD = len(F.TOK_MAGIC + F.HDR_REGULAR) + 8  # a file root's NAR before its contents
TAIL = len(F.CLOSE)  # ... and after them (plus padding)


@pytest.mark.parametrize("batch", [64, 4096], indirect=True)
def test_file_roots_at_buffer_boundaries(tmp_path: Path, batch: int) -> None:
    """Files whose NAR ends exactly at, just before and just after a buffer boundary, and files
    around the size where both threads start sharing the work."""
    sizes = {0, 1, batch - 1, batch, batch + 1, 2 * batch, 3 * batch + 5}
    for k in (1, 2, 3, 8):  # NAR = HEAD + size + pad + TAIL == k * batch
        for d in (-8, 0, 8):
            n = k * batch - HEAD - TAIL + d
            if n >= 0:
                sizes.add(n)
    for share in (source.SHARED_FILE - HEAD - TAIL, source.SHARED_FILE):
        sizes.update({share - 1, share, share + 1})
    for n in sorted(s for s in sizes if s >= 0):
        p = tmp_path / f"f{n}"
        p.write_bytes(contents(n, n))
        check(p)
        p.chmod(0o755)
        check(p, "sha512")


@pytest.mark.parametrize("batch", [1, 64, 1000, 1 << 20], indirect=True)
def test_trees_at_buffer_boundaries(tmp_path: Path, batch: int) -> None:
    root = tmp_path / "t"
    root.mkdir()
    sizes = {0, 1, 63, 64, 65, 999, 1000, 1001, 4096}
    if batch > 1:  # (byte-sized buffers: small files only, or this takes minutes)
        sizes |= {65536, 65537, (1 << 20) - 1, 1 << 20, (1 << 20) + 9}
    for n in sorted(sizes):
        (root / f"s{n:08}").write_bytes(contents(n, n))
    (root / "x").write_bytes(b"#!/bin/sh\n")
    (root / "x").chmod(0o755)
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "f").write_bytes(b"deep")
    (root / "l").symlink_to("s00000001")
    os.symlink(b"t" * 4095, os.fsencode(root / "long"))
    (root / "empty").mkdir()
    check(root)


def test_default_buffers(tmp_path: Path) -> None:
    """The real sizes: a tree of many small files and a few big ones, and a big file root."""
    root = tmp_path / "t"
    root.mkdir()
    for i in range(400):
        (root / f"f{i:03}").write_bytes(contents(i * 37 % 9000, i))
    for n in (source.HASH_BATCH - 1, source.HASH_BATCH * 3 + 11):
        (root / f"big{n}").write_bytes(contents(n, n))
    check(root)
    check(root / f"big{source.HASH_BATCH * 3 + 11}")
    big = tmp_path / "big"
    big.write_bytes(os.urandom(2 * source.SHARED_FILE + 12345))
    check(big)


def test_names_codec_excludes_and_limits(tmp_path: Path, batch: int) -> None:
    root = tmp_path / "t"
    (root / "sub").mkdir(parents=True)
    (root / "README").write_bytes(b"upper")
    (root / "readme~nix~case~hack~1").write_bytes(b"lower")
    (root / "sub" / "a.o").write_bytes(b"object")
    (root / "sub" / "a.c").write_bytes(b"source" * 30)
    codec, excl = CaseHackCodec(), exclude_filter(("*.o",), ())
    check(root, names=codec, exclude=excl)
    assert b"object" not in nar_of(root, exclude=excl) and b"~nix~" not in nar_of(root, names=codec)
    for limits, rule in [(Limits(max_depth=2), "too-deep"), (Limits(max_name=3), "invalid-name"),
                         (Limits(max_target=2), "invalid-target")]:
        if rule == "invalid-target":
            (root / "sub" / "link").symlink_to("abc")
        with pytest.raises(NarError) as dumped:
            nar_of(root, limits=limits)
        threads, fds = threading.active_count(), open_fds()
        with pytest.raises(NarError) as hashed:
            hash_nar(root, limits=limits)
        assert (hashed.value.rule, str(hashed.value)) == (dumped.value.rule, str(dumped.value)) == (
            rule, str(dumped.value))
        assert threading.active_count() == threads and open_fds() == fds


# ---- errors --------------------------------------------------------------------------------

@contextmanager
def spy(target: Path, action: Callable[[int], None], call: str = "readv") -> Iterator[list[str]]:
    """Call ``action(nth)`` at each ``os.readv`` of ``target`` (before it), or after each
    ``os.fstat`` of it, by any thread; yields the names of the threads that did."""
    real_readv, real_fstat = os.readv, os.fstat
    ino = target.stat().st_ino
    seen: list[str] = []

    def readv(fd: int, bufs: Any) -> int:
        if real_fstat(fd).st_ino == ino:
            seen.append(threading.current_thread().name)
            action(len(seen))
        return real_readv(fd, bufs)

    def fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if st.st_ino == ino:
            seen.append(threading.current_thread().name)
            action(len(seen))
        return st

    if call == "readv":
        os.readv = readv
    else:
        os.fstat = fstat
    try:
        yield seen
    finally:
        os.readv, os.fstat = real_readv, real_fstat


def many_batches_tree(root: Path, victim_at: int) -> Path:
    """Small files around a bigger one, so that with small buffers the victim falls in many
    places (and is read by either thread)."""
    root.mkdir()
    for i in range(60):
        (root / f"f{i:02}").write_bytes(contents(50 + i, i))
    victim = root / f"f{victim_at:02}v"
    victim.write_bytes(contents(5000, 1))
    return victim


def no_leaks() -> Callable[[], None]:
    threads, fds = threading.active_count(), open_fds()

    def after() -> None:
        assert threading.active_count() == threads
        assert open_fds() == fds

    return after


@pytest.mark.parametrize("victim_at", [0, 7, 30, 59])
def test_a_file_shrinking_while_hashed(tmp_path: Path, batch: int, victim_at: int) -> None:
    victim = many_batches_tree(tmp_path / "t", victim_at)
    check_leaks = no_leaks()
    with spy(victim, lambda nth: os.truncate(victim, 200) if nth == 3 else None), pytest.raises(FsError) as e:
        hash_nar(tmp_path / "t")
    assert str(e.value).startswith("file changed size while being read")
    assert (e.value.rule, e.value.path, e.value.expected) == ("size-changed", os.fsencode(victim), 5000)
    assert isinstance(e.value.got, int) and e.value.got < 5000
    check_leaks()


def truncate(path: Path, nth: int) -> None:
    os.truncate(path, 1234)


@pytest.mark.parametrize("root_is_file", [True, False])
def test_shrinking_fails_as_the_dump_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          root_is_file: bool) -> None:
    """A file truncated between its fstat and its read: the hash fails exactly as the
    single-threaded dump (message, sizes, path)."""
    errors = []
    for run in ("dump", "hash"):
        base = tmp_path / run
        if root_is_file:
            base.write_bytes(contents(5000, 1))
            victim = base
        else:
            victim = many_batches_tree(base, 20)
        with spy(victim, partial(truncate, victim), call="fstat"), pytest.raises(FsError) as e:
            if run == "dump":
                nar_of(base)
            else:
                monkeypatch.setattr(source, "HASH_BATCH", 1000)
                monkeypatch.setattr(source, "SHARED_FILE", 2000)
                hash_nar(base)
        errors.append((str(e.value).replace(run, "X"), e.value.rule, e.value.expected, e.value.got))
    assert errors[0] == errors[1]
    assert errors[0][1:] == ("size-changed", 5000, 1234)


def test_a_file_growing_while_hashed_is_hashed_at_its_first_size(tmp_path: Path, batch: int) -> None:
    victim = many_batches_tree(tmp_path / "t", 30)
    want = nar_of(tmp_path / "t")

    def grow(nth: int) -> None:
        if nth == 2:
            with open(victim, "ab") as f:
                f.write(b"more" * 1000)

    with spy(victim, grow):
        h, size = hash_nar(tmp_path / "t")
    assert (h.digest, size) == (hashlib.sha256(want).digest(), len(want))


def eio(nth: int) -> None:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.parametrize("victim_at", [0, 7, 30, 59])
@pytest.mark.parametrize("batch", [64, 4096], indirect=True)
def test_an_unreadable_file_mid_tree(tmp_path: Path, batch: int, victim_at: int) -> None:
    victim = many_batches_tree(tmp_path / "t", victim_at)
    check_leaks = no_leaks()
    with spy(victim, eio) as readers, pytest.raises(FsError) as e:
        hash_nar(tmp_path / "t")
    assert str(e.value).startswith("cannot read: Input/output error")
    assert (e.value.rule, e.value.path) == ("io", os.fsencode(victim))
    assert readers
    check_leaks()


def test_errors_met_by_either_thread(tmp_path: Path, batch: int) -> None:
    seen: set[str] = set()
    for victim_at in range(0, 60, 3):
        root = tmp_path / f"t{victim_at}"
        victim = many_batches_tree(root, victim_at)
        check_leaks = no_leaks()
        with spy(victim, eio) as readers, pytest.raises(FsError, match="cannot read"):
            hash_nar(root)
        check_leaks()
        seen.update(readers)
    assert seen == {"MainThread", "nartool-hash"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission(tmp_path: Path, batch: int) -> None:
    victim = many_batches_tree(tmp_path / "t", 30)
    victim.chmod(0)
    check_leaks = no_leaks()
    with pytest.raises(FsError) as e:
        hash_nar(tmp_path / "t")
    assert (e.value.rule, e.value.path) == ("io", os.fsencode(victim))
    check_leaks()


def test_an_exclude_callback_raising_in_either_thread(tmp_path: Path, batch: int) -> None:
    """Directories are listed (and the filter called) by whichever thread walks on."""
    root = tmp_path / "t"
    for d in range(30):
        (root / f"d{d:02}").mkdir(parents=True)
        for i in range(3):
            (root / f"d{d:02}" / f"f{i}").write_bytes(contents(40 + i, d))
    threads: set[str] = set()
    for at in range(30):
        def exclude(rel: bytes, is_dir: bool, at: int = at) -> bool:
            if rel == f"d{at:02}/f1".encode():
                threads.add(threading.current_thread().name)
                raise KeyError(rel)
            return False

        check_leaks = no_leaks()
        with pytest.raises(KeyError):
            hash_nar(root, exclude=exclude)
        check_leaks()
    assert threads == {"MainThread", "nartool-hash"}


def test_a_failing_update_is_raised_in_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 batch: int) -> None:
    """Whatever goes wrong in either thread (here: the digest itself) reaches the caller."""
    root = tmp_path / "t"
    many_batches_tree(root, 10)
    real_new = hashlib.new

    class Failing:
        def __init__(self, algo: str, fail_at: int) -> None:
            self.h, self.n, self.fail_at = real_new(algo), 0, fail_at

        def update(self, b: Any) -> None:
            self.n += 1
            if self.n == self.fail_at:
                raise MemoryError(f"injected in {threading.current_thread().name}")
            self.h.update(b)

        def digest(self) -> bytes:
            return self.h.digest()

    for fail_at in (1, 2, 3, 10, 11):
        monkeypatch.setattr(hashlib, "new", lambda algo, fail_at=fail_at: Failing(algo, fail_at))
        check_leaks = no_leaks()
        with pytest.raises(MemoryError, match="injected"):
            hash_nar(root)
        check_leaks()


def test_an_interrupt_in_the_caller_stops_the_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     batch: int) -> None:
    """KeyboardInterrupt in the caller's thread (raised by one of its reads here): the helper
    stops and the walk's descriptors are closed."""
    root = tmp_path / "t"
    many_batches_tree(root, 10)
    real = os.readv
    for nth in (1, 5, 15, 40):
        calls = iter(range(1 << 30))

        def readv(fd: int, bufs: Any, nth: int = nth, calls: Iterator[int] = calls) -> int:
            if threading.current_thread() is threading.main_thread() and next(calls) == nth:
                raise KeyboardInterrupt
            return real(fd, bufs)

        monkeypatch.setattr(os, "readv", readv)
        check_leaks = no_leaks()
        with pytest.raises(KeyboardInterrupt):
            hash_nar(root)
        check_leaks()


def test_the_hash_never_follows_symlinks(tmp_path: Path, batch: int) -> None:
    root = tmp_path / "t"
    many_batches_tree(root, 3)
    (tmp_path / "l").symlink_to(root)
    check(tmp_path / "l")
    (root / "to-dir").symlink_to(root)
    check(root)


class LongNames:
    """A name codec whose logical names are far longer than a filesystem allows."""

    def dump_names(self, dir_path: bytes, disk_names: list[bytes]) -> list[tuple[bytes, bytes]]:
        return sorted((d * (300 // len(d) + 1 + i % 3), d) for i, d in enumerate(disk_names))

    def restore_namer(self, dir_path: bytes) -> Any:
        raise NotImplementedError


def test_names_longer_than_255_bytes_where_limits_allow(tmp_path: Path, batch: int) -> None:
    root = tmp_path / "t"
    many_batches_tree(root, 5)
    (root / "sub").mkdir()
    (root / "sub" / "x").write_bytes(b"x")
    check(root, names=LongNames(), limits=Limits(max_name=5000))
    with pytest.raises(NarError) as e:
        hash_nar(root, names=LongNames())
    assert e.value.rule == "invalid-name"


def files_of_others(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Make every file refuse O_NOATIME, as files one does not own do, and files named
    ``*-unreadable`` refuse to open at all; returns the list of refused O_NOATIME opens."""
    real_open = os.open
    refused: list[bytes] = []

    def open_(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_NOATIME and not flags & os.O_DIRECTORY:
            refused.append(os.fsencode(path))
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        if os.fsencode(path).endswith(b"-unreadable"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", open_)
    return refused


@pytest.mark.skipif(not getattr(os, "O_NOATIME", 0), reason="no O_NOATIME here")
def test_files_of_others_are_not_tried_with_noatime_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          batch: int) -> None:
    """O_NOATIME is refused for files one does not own: after the first refusal the walk opens
    without it (one failed open per walk, not one per file); a file that cannot be opened at all
    still fails the hash with the dump's error."""
    root = tmp_path / "t"
    victim = many_batches_tree(root, 40)
    refused = files_of_others(monkeypatch)
    want = nar_of(root)
    refused.clear()
    h, size = hash_nar(root)
    assert (h.digest, size) == (hashlib.sha256(want).digest(), len(want))
    assert len(refused) == 1
    victim.rename(root / "f40v-unreadable")
    for tries in range(2):  # the first file refused O_NOATIME, or was opened after that
        if tries:
            (root / "f00").unlink()  # ... then a file before it
        refused.clear()
        check_leaks = no_leaks()
        with pytest.raises(FsError) as e:
            hash_nar(root)
        assert str(e.value).startswith("cannot read: Permission denied")
        assert (e.value.rule, e.value.path) == ("io", os.fsencode(root / "f40v-unreadable"))
        check_leaks()


@pytest.mark.skipif(not getattr(os, "O_NOATIME", 0), reason="no O_NOATIME here")
def test_the_dump_tries_noatime_once_for_files_of_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dump does as the hash: after the first file that refuses O_NOATIME (one does not own
    it), the rest are opened without it, with the same bytes; an unreadable file still fails
    the dump with its path."""
    root = tmp_path / "t"
    many_batches_tree(root, 40)
    want = nar_of(root)
    refused = files_of_others(monkeypatch)
    assert nar_of(root) == want and len(refused) == 1
    (root / "f40v").rename(root / "f40v-unreadable")
    with pytest.raises(FsError) as e:
        nar_of(root)
    assert (e.value.rule, e.value.path) == ("io", os.fsencode(root / "f40v-unreadable"))
