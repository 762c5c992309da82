"""The fused dumper (:func:`nartool.fs.dump_nar`) against the event path it short-cuts:
same bytes, same checks, no descriptors left, no symlink followed even when one is swapped in
mid-dump."""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import nartool
from nartool.errors import FsError, NarError
from nartool.fs import dump_events, dump_nar
from nartool.fs.casehack import CaseHackCodec
from nartool.fs.filters import exclude_filter
from nartool.nar import NarReader, nar_bytes
from nartool.nar.events import with_paths
from nartool.nar.limits import Limits
from nartool.nar.writer import write_nar

from .helpers import run_cli

SIZES = [0, 1, 7, 8, 9, 65535, 65536, 65537, (1 << 20) - 1, 1 << 20, (1 << 20) + 3, (4 << 20) + 1]


def make_tree(root: Path) -> Path:
    root.mkdir()
    for n in SIZES:
        (root / f"size-{n}").write_bytes(os.urandom(n))
    (root / "exec").write_bytes(b"#!/bin/sh\n")
    (root / "exec").chmod(0o755)
    (root / "empty-dir").mkdir()
    deep = root / "d"
    for i in range(6):
        deep = deep / f"level{i}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(os.urandom(70000))
    (root / "link-abs").symlink_to("/etc/passwd")
    (root / "link-dangling").symlink_to("no/such/thing")
    (root / "link-dir").symlink_to("d")
    os.symlink(b"x" * 1000, os.fsencode(root / "link-long"))
    (root / os.fsdecode(b"non-utf8-\xff\xfe")).write_bytes(b"raw name")
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "c").write_bytes(b"c")
    (root / "A").write_bytes(b"upper sorts first")
    return root


def joined(chunks: Iterator[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def open_fds() -> set[str]:
    gc.collect()  # abandoned generators of earlier tests close theirs when collected
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kw", [
    {},
    {"flush_size": 1},
    {"flush_size": 4 << 20, "small_file": 1 << 20, "read_chunk": 4 << 20},
    {"flush_size": 100, "small_file": 0, "read_chunk": 4099},
], ids=["default", "flush-each", "hash-sized", "tiny-reads"])
def test_same_bytes_as_event_path(tmp_path: Path, kw: dict[str, int]) -> None:
    tree = make_tree(tmp_path / "t")
    fds = open_fds()
    expected = joined(write_nar(dump_events(tree)))
    got = joined(dump_nar(tree, **kw))
    assert got == expected
    assert nar_bytes(NarReader(got)) == got  # canonical
    assert nartool.hash_path(tree).digest == hashlib.sha256(expected).digest()
    assert open_fds() == fds


def test_leaf_roots(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(os.urandom(3 << 20))
    link = tmp_path / "l"
    link.symlink_to("f")
    for p in (f, link):
        assert joined(dump_nar(p)) == joined(write_nar(dump_events(p)))
        assert nartool.hash_path(p).digest == hashlib.sha256(joined(dump_nar(p))).digest()
    with pytest.raises(FsError, match="cannot read"):
        list(dump_nar(tmp_path / "missing"))


def test_codec_and_exclude(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    (tree / "A").unlink()  # "a" is there: the case hack would refuse the pair
    (tree / "README").write_bytes(b"first")
    (tree / "readme~nix~case~hack~1").write_bytes(b"second")
    codec = CaseHackCodec()
    exclude = exclude_filter(["*.o", "/a/b/"])
    (tree / "x.o").write_bytes(b"obj")
    for names, excl in ((codec, None), (None, exclude), (codec, exclude)):
        assert joined(dump_nar(tree, names=names, exclude=excl)) == \
            joined(write_nar(dump_events(tree, names=names, exclude=excl)))
    top = {path[0] for path, _ in with_paths(NarReader(joined(dump_nar(tree, names=codec, exclude=exclude))))
           if len(path) == 1}
    assert b"x.o" not in top and b"README" in top and b"readme" in top
    assert not any(b"~nix~case~hack~" in n for n in top)


@pytest.mark.parametrize("limits, rule", [
    (Limits(max_name=10), "invalid-name"),
    (Limits(max_depth=4), "too-deep"),
    (Limits(max_target=999), "invalid-target"),
])
def test_limits_as_the_writer(tmp_path: Path, limits: Limits, rule: str) -> None:
    tree = make_tree(tmp_path / "t")
    fds = open_fds()
    with pytest.raises(NarError) as fused:
        list(dump_nar(tree, limits=limits))
    assert open_fds() == fds
    with pytest.raises(NarError) as evented:
        list(write_nar(dump_events(tree), limits=limits))
    assert fused.value.rule == evented.value.rule == rule
    assert str(fused.value).split(" (path")[0] == str(evented.value).split(" (path")[0]


def test_file_shrinking_mid_dump(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(300_000))
    (tree / "z").write_bytes(b"after")
    fds = open_fds()
    it = dump_nar(tree)
    head = next(it)  # everything up to the big file's header; its contents come next
    assert head.endswith((300_000).to_bytes(8, "little"))
    os.truncate(tree / "big", 1000)
    with pytest.raises(FsError) as e:
        list(it)
    assert e.value.rule == "size-changed"
    assert open_fds() == fds


def test_directory_swapped_for_symlink_is_not_followed(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "f").write_bytes(b"inside")
    (tree / "b").mkdir()
    (tree / "b" / "f").write_bytes(b"inside too")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    fds = open_fds()
    it = dump_nar(tree, flush_size=1)
    got = b""
    while b"inside" not in got:  # a/f has been read; b is not open yet
        got += bytes(next(it))
    (tree / "b").rename(tmp_path / "b-moved")
    (tree / "b").symlink_to(outside)
    with pytest.raises(FsError):
        for c in it:
            got += bytes(c)
    assert b"SECRET" not in got
    assert open_fds() == fds


def test_abandoned_dump_closes_descriptors(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    fds = open_fds()
    it = dump_nar(tree, flush_size=1)
    for _ in range(20):
        next(it)
    assert open_fds() != fds  # directories are open while it runs
    it.close()
    assert open_fds() == fds


def test_unsupported_member(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    os.mkfifo(tree / "fifo")
    with pytest.raises(FsError, match="fifo"):
        list(dump_nar(tree))
    assert nar_bytes(NarReader(joined(dump_nar(tmp_path / "t", exclude=lambda p, d: p == b"fifo")))) \
        == joined(write_nar(dump_events(tmp_path / "t", exclude=lambda p, d: p == b"fifo")))


def test_dump_to_descriptors(tmp_path: Path) -> None:
    """api.dump to real descriptors copies big files in the kernel: same bytes to a file, a
    pipe and an O_APPEND file (where sendfile is refused and plain copying takes over)."""
    tree = make_tree(tmp_path / "t")
    expected = joined(write_nar(dump_events(tree)))
    out = tmp_path / "out.nar"
    assert nartool.dump(tree, out) == len(expected)
    assert out.read_bytes() == expected
    with open(tmp_path / "append.nar", "ab") as f:
        f.write(b"prefix")
        assert nartool.dump(tree, f) == len(expected)
    assert (tmp_path / "append.nar").read_bytes() == b"prefix" + expected
    big = tmp_path / "t" / f"size-{(4 << 20) + 1}"
    with open(tmp_path / "single.nar", "wb") as f:
        nartool.dump(big, f)
    assert (tmp_path / "single.nar").read_bytes() == joined(write_nar(dump_events(big)))
    r, w = os.pipe()
    got = bytearray()
    import threading

    def drain() -> None:
        while data := os.read(r, 1 << 16):
            got.extend(data)

    t = threading.Thread(target=drain)
    t.start()
    with open(w, "wb") as f:
        nartool.dump(tree, f)
    t.join()
    os.close(r)
    assert bytes(got) == expected


def test_descriptor_dump_of_shrinking_file(tmp_path: Path) -> None:
    from nartool.fs.osutil import FdOutput

    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(300_000))
    with open(tmp_path / "out", "wb") as f:
        sink = FdOutput(f.fileno())
        it = dump_nar(tree, copy_file=sink.copy_from)
        sink.write(next(it))
        os.truncate(tree / "big", 1000)
        with pytest.raises(FsError) as e:
            for c in it:
                sink.write(c)
    assert e.value.rule == "size-changed" and e.value.expected == 300_000


def _restore_dev_null() -> None:
    import stat as st

    if not st.S_ISCHR(os.stat("/dev/null").st_mode):  # pragma: no cover - only after a regression
        os.unlink("/dev/null")
        os.mknod("/dev/null", 0o666 | st.S_IFCHR, os.makedev(1, 3))
        os.chmod("/dev/null", 0o666)
        raise AssertionError("/dev/null was replaced by a regular file")


@pytest.mark.parametrize("argv", [["nar", "dump"], ["nar", "dump", "--compress", "zstd"]])
def test_output_to_devices_and_pipes_writes_through(tmp_path: Path, argv: list[str]) -> None:
    """`-o /dev/null` or `-o FIFO` must write into them, never rename a temporary over them."""
    import stat as st
    import threading

    tree = make_tree(tmp_path / "t")
    try:
        r = run_cli(*argv, "-o", "/dev/null", tree)
        assert r.returncode == 0, r.stderr
    finally:
        _restore_dev_null()
    assert st.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def drain() -> None:
        with open(fifo, "rb") as f:
            while data := f.read(1 << 16):
                got.extend(data)

    t = threading.Thread(target=drain)
    t.start()
    r = run_cli(*argv, "-o", fifo, tree)
    t.join()
    assert r.returncode == 0, r.stderr
    assert st.S_ISFIFO(os.stat(fifo).st_mode)
    if "zstd" not in argv:
        assert bytes(got) == joined(write_nar(dump_events(tree)))
    else:
        assert nartool.api.detect(bytes(got[:6])) == "zstd"
    assert sorted(os.listdir(tmp_path)) == ["fifo", "t"]  # no temporaries left


def test_output_file_replaces_regular_files_atomically(tmp_path: Path) -> None:
    from nartool.fs.osutil import output_file

    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), output_file(target) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out"]
    with output_file(target, fsync=True) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out"]
    with pytest.raises(FsError, match="directory"), output_file(tmp_path):
        pass


# -- restore: big contents copied from the NAR file inside the kernel -----------------------------


def test_restore_from_file_copies_big_contents(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    nar = tmp_path / "t.nar"
    nartool.dump(tree, nar)
    with open(nar, "rb") as f:
        f.read(5)  # a NAR that does not start at offset 0 of its file
    padded = tmp_path / "padded"
    padded.write_bytes(b"HEADER" + nar.read_bytes())
    with open(padded, "rb") as f:
        f.seek(6)
        nartool.restore(tmp_path / "r1", f)
    nartool.restore(tmp_path / "r2", nar)
    with open(nar, "rb") as f:  # stdin-like: a descriptor on a plain file
        nartool.restore(tmp_path / "r3", f.read)  # a read(n) callable: no kernel copy
    for r in ("r1", "r2", "r3"):
        assert joined(dump_nar(tmp_path / r)) == nar.read_bytes(), r


def test_restore_of_truncated_file_leaves_nothing(tmp_path: Path) -> None:
    from nartool.errors import TruncatedError

    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(500_000))
    data = joined(dump_nar(tree))
    for cut in (len(data) - 300_000, len(data) - 40, len(data) - 8):
        nar = tmp_path / f"cut{cut}.nar"
        nar.write_bytes(data[:cut])
        with pytest.raises(TruncatedError):
            nartool.restore(tmp_path / "r", nar)
        assert not (tmp_path / "r").exists()
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".nar")) == ["t"]


def test_byte_source_copy_to_falls_back_for_pipes(tmp_path: Path) -> None:
    from nartool.nar.source import ByteSource

    data = os.urandom(3 << 20)
    f = tmp_path / "data"
    f.write_bytes(b"xx" + data + b"tail")
    with open(f, "rb") as fh:
        fh.seek(2)
        src = ByteSource(fh)
        assert src.read_exact(10) == data[:10]
        r, w = os.pipe()
        got = bytearray()
        import threading

        def drain() -> None:
            while chunk := os.read(r, 1 << 16):
                got.extend(chunk)

        t = threading.Thread(target=drain)
        t.start()
        n = src.copy_to(len(data) - 10, w)  # a pipe: only the buffered part goes this way
        for chunk in src.iter_chunks(len(data) - 10 - n):
            os.write(w, chunk)
        os.close(w)
        t.join()
        os.close(r)
        assert bytes(got) == data[10:]
        assert src.read_exact(4) == b"tail"
        out = tmp_path / "out"
        fh.seek(2)
        src = ByteSource(fh)
        from nartool.fs.osutil import LINUX

        with open(out, "wb") as o:
            n = src.copy_to(len(data), o.fileno())
            if LINUX:
                assert n == len(data)  # all of it in the kernel
            else:  # NARTOOL_PORTABLE=1 (or not Linux): nothing copied that way, the caller reads it
                assert n == 0
                for chunk in src.iter_chunks(len(data)):
                    o.write(chunk)
        assert out.read_bytes() == data and src.read_exact(4) == b"tail" and src.offset == len(data) + 4
