"""The multi-threaded NAR paths keep the guarantees of the single-threaded ones: the same bytes
and hashes (against the NAR itself and real Nix), errors for files that shrink, no descriptor
left open after success, failure or abandonment."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import nartool
from nartool.errors import FsError
from nartool.fs import source
from nartool.fs.source import (
    OpenFile,
    dump_nar,
    dump_nar_handing_off,
    dump_to_fd,
    hash_nar,
    read_open_file,
)

from .conftest import require
from .helpers import nix_env


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def make_tree(root: Path) -> Path:
    """Small and big files (above SMALL_FILE, several HASH_PIECEs), executables,
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


def test_hash_nar_equals_hash_of_the_nar(tree: Path) -> None:
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


def test_a_file_shorter_than_announced_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1000)
    f = OpenFile(os.open(p, os.O_RDONLY), 5000, b"f")
    before = open_fds()
    with pytest.raises(FsError) as e:
        read_open_file(f, lambda b: None, bytearray(256))
    assert e.value.rule == "size-changed" and e.value.got == 1000
    assert f.fd == -1 and len(open_fds()) == len(before) - 1


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
def test_hash_agrees_with_nix(tree: Path) -> None:
    require("NIX", shutil.which("nix-hash") is not None, "nix-hash (Nix 2.8) not installed")
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


def test_restore_big_file_across_filesystems(tmp_path: Path) -> None:
    """A NAR file on one filesystem restored onto another (copy_file_range refuses: sendfile)."""
    import tempfile

    if not os.access("/dev/shm", os.W_OK) or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "f.nar").write_bytes(nar_bytes(tmp_path / "f"))
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        with open(tmp_path / "f.nar", "rb") as f:
            nartool.restore(other / "r", f)
            assert f.tell() == os.path.getsize(tmp_path / "f.nar")
        assert (other / "r").read_bytes() == data
    finally:
        shutil.rmtree(other)
