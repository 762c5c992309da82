"""The multi-threaded NAR paths keep the guarantees of the single-threaded ones: the same bytes
and hashes (against the NAR itself and real Nix), errors for files that shrink, no descriptor
left open after success, failure or abandonment."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nartool
import nartool.errors
from nartool.errors import FsError
from nartool.fs import sink, source
from nartool.fs.source import (
    OpenFile,
    dump_nar,
    dump_nar_handing_off,
    dump_to_fd,
    hash_nar,
    read_open_file,
    read_open_file_ahead,
)

from .conftest import require
from .helpers import cli_env, nix_env


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def make_tree(root: Path) -> Path:
    """Small and big files (above SMALL_FILE and above a lowered THREADED_READ), executables,
    symlinks, empty files and directories, nesting."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"hello\n")
    (root / "mid").write_bytes(os.urandom(source.SMALL_FILE + 3))
    (root / "big").write_bytes(os.urandom(3 * source.HASH_PIECE + 5))
    (root / "exe").write_bytes(os.urandom(source.SMALL_FILE * 2 + 1))
    (root / "exe").chmod(0o755)
    (root / "link").symlink_to("small")
    sub = root / "a" / "b"
    sub.mkdir(parents=True)
    (root / "emptydir").mkdir()
    for i in range(300):
        (sub / f"f{i:03}").write_bytes(os.urandom(i * 97 % 5000))
    (sub / "zbig").write_bytes(os.urandom(source.SMALL_FILE * 5 + 7))
    return root


def nar_bytes(path: Path) -> bytes:
    return b"".join(bytes(c) for c in dump_nar(path))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "t")


@pytest.mark.parametrize("threaded_read", [1 << 40, 1])
def test_hash_nar_equals_hash_of_the_nar(tree: Path, monkeypatch: pytest.MonkeyPatch, threaded_read: int) -> None:
    monkeypatch.setattr(source, "THREADED_READ", threaded_read)  # 1: every handed-off file read ahead
    nar = nar_bytes(tree)
    before = open_fds()
    h, size = hash_nar(tree)
    assert (h.digest, size) == (hashlib.sha256(nar).digest(), len(nar))
    for p in [tree / "big", tree / "small", tree / "link", tree / "emptydir", tree / "a"]:
        nar = nar_bytes(p)
        assert hash_nar(p)[0].digest == hashlib.sha256(nar).digest()
        assert hash_nar(p, "sha512")[0].digest == hashlib.sha512(nar).digest()
    assert open_fds() == before


def test_handing_off_yields_the_same_nar(tree: Path) -> None:
    out = bytearray()
    handed = 0
    for item in dump_nar_handing_off(tree):
        if isinstance(item, OpenFile):
            handed += 1
            assert item.size > source.SMALL_FILE
            read_open_file(item, out.extend, bytearray(1000))
            assert item.fd == -1
        else:
            out += item
    assert handed == 4
    assert bytes(out) == nar_bytes(tree)


@pytest.mark.parametrize("reader", ["inline", "ahead"])
def test_a_file_shorter_than_announced_is_an_error(tmp_path: Path, reader: str) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1000)
    f = OpenFile(os.open(p, os.O_RDONLY), 5000, b"f")
    before = open_fds()
    with pytest.raises(FsError) as e:
        if reader == "inline":
            read_open_file(f, lambda b: None, bytearray(256))
        else:
            read_open_file_ahead(f, lambda b: None, piece=256, ahead=3)
    assert e.value.rule == "size-changed" and e.value.got == 1000
    assert f.fd == -1 and len(open_fds()) == len(before) - 1


def test_read_ahead_passes_consumer_errors_and_closes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(100_000))
    f = OpenFile(os.open(p, os.O_RDONLY), 100_000, b"f")
    seen = []

    def consume(b: memoryview) -> None:
        seen.append(bytes(b))
        if len(seen) == 3:
            raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError):
        read_open_file_ahead(f, consume, piece=1000, ahead=4)
    assert f.fd == -1
    assert b"".join(seen) == p.read_bytes()[:3000]


def test_read_ahead_gives_the_file(tmp_path: Path) -> None:
    data = os.urandom(1_000_003)
    p = tmp_path / "f"
    p.write_bytes(data)
    out = bytearray()
    assert read_open_file_ahead(OpenFile(os.open(p, os.O_RDONLY), len(data), b"f"), out.extend, piece=4096) == len(data)
    assert out == data


def test_abandoned_hand_off_closes_descriptors(tree: Path) -> None:
    before = open_fds()
    it = dump_nar_handing_off(tree)
    held = [x for x in it if isinstance(x, OpenFile)]
    assert len(held) == 4 and all(f.fd >= 0 for f in held)
    del held, it
    assert open_fds() == before


def test_hash_errors_leave_no_descriptor(tmp_path: Path) -> None:
    t = make_tree(tmp_path / "t")
    os.mkfifo(t / "a" / "b" / "zz-fifo")
    before = open_fds()
    with pytest.raises(FsError) as e:
        hash_nar(t)
    assert e.value.rule == "unsupported-type"
    assert open_fds() == before


def test_hash_never_follows_a_symlinked_root_or_member(tmp_path: Path) -> None:
    t = make_tree(tmp_path / "t")
    (tmp_path / "l").symlink_to(t)
    assert hash_nar(tmp_path / "l")[0].digest == hashlib.sha256(nar_bytes(tmp_path / "l")).digest()
    assert hash_nar(tmp_path / "l")[0] != hash_nar(t)[0]


@pytest.mark.nix
def test_hash_agrees_with_nix(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require("NIX", shutil.which("nix-hash") is not None, "nix-hash (Nix 2.8) not installed")
    monkeypatch.setattr(source, "THREADED_READ", 2 * source.HASH_PIECE)
    for p in [tree, tree / "big", tree / "exe"]:
        want = subprocess.run(["nix-hash", "--type", "sha256", str(p)], capture_output=True, text=True, check=True,
                              env=nix_env()).stdout.strip()
        assert nartool.hash_path(p).base16 == want


@pytest.mark.parametrize("dest", ["file", "pipe"])
def test_dump_to_fd_writes_the_nar(tree: Path, tmp_path: Path, dest: str) -> None:
    want = nar_bytes(tree)
    before = open_fds()
    if dest == "file":
        out = tmp_path / "out.nar"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            assert dump_to_fd(tree, fd) == len(want)
        finally:
            os.close(fd)
        assert out.read_bytes() == want
    else:
        reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert reader.stdin is not None and reader.stdout is not None
        import threading

        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(reader.stdout.read()))  # type: ignore[union-attr]
        t.start()
        assert dump_to_fd(tree, reader.stdin.fileno()) == len(want)
        reader.stdin.close()
        t.join()
        reader.wait()
        reader.stdout.close()
        assert got[0] == want
    assert open_fds() == before


def test_dump_to_fd_errors_leave_no_descriptor(tmp_path: Path) -> None:
    t = make_tree(tmp_path / "t")
    os.mkfifo(t / "a" / "b" / "zz-fifo")
    before = open_fds()
    with open(tmp_path / "out", "wb") as f, pytest.raises(FsError) as e:
        dump_to_fd(t, f.fileno())
    assert e.value.rule == "unsupported-type"
    assert open_fds() == before


# -- restore: files of at least OFFLOAD_MIN bytes are finished by a writer thread ------------------


def offload_tree(root: Path) -> Path:
    root.mkdir()
    for i in range(40):
        d = root / f"d{i % 4}"
        d.mkdir(exist_ok=True)
        n = sink.OFFLOAD_MIN + i * 3001 if i % 3 else 100 + i
        (d / f"f{i:02}").write_bytes(os.urandom(n))
        if i % 5 == 0:
            (d / f"f{i:02}").chmod(0o755)
    (root / "big").write_bytes(os.urandom(3 << 20))  # above the reader's in-memory size: copied from the NAR
    (root / "link").symlink_to("big")
    return root


def threads() -> int:
    import threading

    return threading.active_count()


@pytest.mark.parametrize("how", ["path", "pipe", "bytes"])
def test_restore_with_writer_thread_is_exact(tmp_path: Path, how: str) -> None:
    t = offload_tree(tmp_path / "t")
    want = nar_bytes(t)
    (tmp_path / "t.nar").write_bytes(want)
    before, nthreads = open_fds(), threads()
    dest = tmp_path / "r"
    if how == "path":
        nartool.restore(dest, tmp_path / "t.nar")
    elif how == "bytes":
        nartool.restore(dest, want)
    else:
        r, w = os.pipe()
        import threading

        feeder = threading.Thread(target=lambda: (os.write(w, want), os.close(w)))
        feeder.start()
        with open(r, "rb") as f:
            nartool.restore(dest, f)
        feeder.join()
    assert nar_bytes(dest) == want
    assert os.stat(dest / "d0" / "f00").st_mode & 0o111 == 0o111
    assert open_fds() == before and threads() == nthreads
    assert sorted(os.listdir(tmp_path)) == ["r", "t", "t.nar"]


@pytest.mark.parametrize("damage", ["truncated", "padding"])
def test_failed_restore_with_writer_thread_leaves_nothing(tmp_path: Path, damage: str) -> None:
    t = offload_tree(tmp_path / "t")
    good = nar_bytes(t)
    # the big file's contents are near the end: cut inside them, or spoil the padding of a file after them
    if damage == "truncated":
        bad = good[: len(good) - (1 << 20)]
    else:
        i = good.index(b"f38")  # 130422 bytes: read from the NAR's file by the writer thread
        size_at = good.index(toks_contents(), i) + len(toks_contents())
        size = int.from_bytes(good[size_at : size_at + 8], "little")
        assert size % 8, "the test needs a file with padding"
        pad_at = size_at + 8 + size
        bad = good[:pad_at] + b"\1" + good[pad_at + 1 :]
    (tmp_path / "bad.nar").write_bytes(bad)
    before, nthreads = open_fds(), threads()
    with pytest.raises(nartool.errors.NarError) as e:
        nartool.restore(tmp_path / "r", tmp_path / "bad.nar")
    assert e.value.rule == ("truncated" if damage == "truncated" else "padding")
    assert sorted(os.listdir(tmp_path)) == ["bad.nar", "t"]
    assert open_fds() == before and threads() == nthreads


def toks_contents() -> bytes:
    return len(b"contents").to_bytes(8, "little") + b"contents"


def test_writer_thread_errors_fail_the_restore(tmp_path: Path) -> None:
    """A write refused in the writer thread (here: beyond RLIMIT_FSIZE) fails the whole restore."""
    t = offload_tree(tmp_path / "t")
    (tmp_path / "t.nar").write_bytes(nar_bytes(t))
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({2 << 20}, {2 << 20}))"
    code = limit + "; import sys; sys.argv = ['nartool', 'nar', 'restore', sys.argv[1], sys.argv[2]]; " \
        "from nartool.cli.main import main; main()"
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r"), str(tmp_path / "t.nar")],
                       capture_output=True, text=True, env=cli_env())
    assert p.returncode == 1, p.stderr
    assert "cannot create: File too large" in p.stderr and "big" in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["t", "t.nar"]


@pytest.mark.parametrize("how", [0, 1, 2])
def test_copy_range_every_way(tmp_path: Path, how: int) -> None:
    data = os.urandom(300_000)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as s, open(tmp_path / "dst", "wb") as d:
        s.seek(5)
        sink.copy_range(s.fileno(), d.fileno(), 1000, 200_000, b"x", how)
        assert s.tell() == 5
        with pytest.raises(nartool.errors.NarError) as e:
            sink.copy_range(s.fileno(), d.fileno(), 250_000, 60_000, b"x", how)
        assert e.value.rule == "truncated"
    assert (tmp_path / "dst").read_bytes()[:200_000] == data[1000:201_000]
