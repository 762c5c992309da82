"""Hostile peers of the serve protocol (issue 16): content addresses checked from the NAR
stream only (never by reading restored files back), derivations parsed without following
symlinks, weak content addresses and big derivations from untrusted users, and a stalled
client that must not keep a path locked."""

from __future__ import annotations

import getpass
import hashlib
import io
import os
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nartool.config import Config, UserIdentity
from nartool.errors import NartoolError, StoreError
from nartool.hashes import Hash
from nartool.nar import format as F
from nartool.remote import wire as W
from nartool.remote.client import ServeClient
from nartool.remote.copy import copy_closure
from nartool.remote.serve import serve_command
from nartool.remote.testing import file_nar, make_info, nar_hash, wire_str, wire_strs
from nartool.remote.transport import PipeTransport
from nartool.store.local import LocalStore
from nartool.store.locks import PathLock
from nartool.store.memory import MemoryStore
from nartool.store.paths import ContentAddress, make_fixed_output_path
from nartool.store.signing import SecretKey, sign_path_info
from nartool.store.types import PathInfo, Store

from .helpers import cli_argv
from .narbuild import link, nar

u64 = F.u64
s = wire_str
strs = wire_strs
HANDSHAKE_REPLY = u64(W.SERVE_MAGIC_2) + u64(0x207)
KEY = SecretKey.generate("test-key-1")
ALICE = UserIdentity("alice", 1000, 1000, "alice")
HELLO_DRV = ('Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[],[],"x86_64-linux",'
             '"/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","hello"),'
             '("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])')


def hello(version: int = 0x207) -> bytes:
    return u64(W.SERVE_MAGIC_1) + u64(version)


def add_cmd(i: PathInfo, nar_bytes: bytes, *, nar_size: int | None = None) -> bytes:
    return (u64(9) + s(i.path) + s(i.deriver or "") + s(i.nar_hash.base16)
            + strs(W.sort_paths(i.references)) + u64(i.registration_time)
            + u64(len(nar_bytes) if nar_size is None else nar_size) + u64(0) + strs(sorted(i.sigs))
            + s(i.ca or "") + nar_bytes)


def untrusted() -> dict[str, Any]:
    cfg = Config.from_text(f"trusted-users = root\ntrusted-public-keys = {KEY.public_key().to_text()}\n")
    return {"config": cfg, "user": ALICE}


def serve_threaded(store: Store, data: bytes, timeout: float = 20.0, **kw: Any) -> tuple[int, bytes, str]:
    """One session in a thread; fails (instead of hanging the test run) when it does not end."""
    result: list[tuple[int, bytes, str]] = []

    def go() -> None:
        out, err = io.BytesIO(), io.StringIO()
        code = serve_command(store, io.BytesIO(data), out, log=err, write=True, **kw)
        result.append((code, out.getvalue(), err.getvalue()))

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "the serve session hangs"
    return result[0]


def flat_info(name: str, content: bytes, nar_bytes: bytes, algo: str = "sha256") -> PathInfo:
    """A path claiming ``fixed:<algo>:H(content)`` whose NAR is ``nar_bytes``."""
    h = Hash(algo, hashlib.new(algo, content).digest())
    path = make_fixed_output_path(name, h, recursive=False)
    return PathInfo(path, nar_hash(nar_bytes), len(nar_bytes), registration_time=1700000000,
                    ca=ContentAddress("flat", h).render())


@pytest.fixture
def local(tmp_path: Path) -> Any:
    st = LocalStore(tmp_path / "server")
    yield st
    st.close()


# -- 1. content addresses come from the NAR stream, never from restored files ----------------


def test_flat_ca_symlink_to_matching_file_is_not_registered(local: LocalStore, tmp_path: Path) -> None:
    """A symlink whose target hashes to the claimed flat address: refused, and (unlike when the
    check read the restored object back) the open group does not register it anyway."""
    target = tmp_path / "mine"
    target.write_bytes(b"what the flat hash promises\n")
    bad = nar(link(str(target).encode()))
    info = flat_info("poison", target.read_bytes(), bad)
    code, out, err = serve_threaded(local, hello() + add_cmd(info, bad), **untrusted())
    assert not local.is_valid(info.path)
    assert not os.path.lexists(local.physical(info.path))
    assert (code, out) == (1, HANDSHAKE_REPLY), err
    assert "needs a single regular file" in err and "symlink" in err
    assert local.verify(check_contents=True) == []


def test_flat_ca_refusal_is_the_same_whatever_the_target(local: LocalStore, tmp_path: Path) -> None:
    """No oracle on server files (does it exist, does it hash to a guess) and no hang on a
    device or FIFO: every symlink is refused with the same message, before anything is read."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root-only secret\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    claimed = secret.read_bytes()  # the uploader's guess of the secret's contents
    messages = set()
    for i, target in enumerate([str(secret), str(tmp_path / "absent"), "/dev/zero", str(fifo), "/etc/hostname"]):
        bad = nar(link(target.encode()))
        info = flat_info(f"probe{i}", claimed, bad)
        code, out, err = serve_threaded(local, hello() + add_cmd(info, bad), timeout=10, **untrusted())
        assert (code, out) == (1, HANDSHAKE_REPLY), (target, err)
        assert not local.is_valid(info.path)
        messages.add(err.replace(info.path, "PATH"))
    assert len(messages) == 1, messages


def test_text_and_flat_ca_need_one_regular_file(local: LocalStore) -> None:
    from .narbuild import dir_, entry, reg

    d = nar(dir_(entry(b"f", reg(b"x"))))
    info = flat_info("adir", b"x", d)
    with pytest.raises(StoreError, match="single regular file.*directory"):
        local.add_nar(info, d)
    good = file_nar(b"x")
    ok = flat_info("afile", b"x", good)
    assert local.add_nar(ok, good).path == ok.path
    assert local.all_paths() == [ok.path]


def test_recursive_non_sha256_ca_hashed_from_the_stream(local: LocalStore) -> None:
    good = file_nar(b"recursive sha512")
    h = Hash("sha512", hashlib.sha512(good).digest())
    path = make_fixed_output_path("r", h, recursive=True)
    info = PathInfo(path, nar_hash(good), len(good), ca=ContentAddress("recursive", h).render())
    other = file_nar(b"something else")
    with pytest.raises(StoreError, match="ca hash mismatch"):
        local.add_nar(PathInfo(path, nar_hash(other), len(other), ca=info.ca), other)
    assert local.add_nar(info, good).path == path


@pytest.mark.parametrize("via", ["serve", "add_nar"])
def test_drv_symlink_is_never_opened(local: LocalStore, tmp_path: Path, via: str) -> None:
    """A `*.drv` path whose NAR is a symlink to a FIFO: never opened through the link (which
    blocked forever, holding the path's lock) - refused, as a derivation must be a regular
    file, and nothing is left behind."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    bad = nar(link(str(fifo).encode()))
    info = make_info("x.drv", bad)
    if via == "serve":
        code, out, err = serve_threaded(local, hello() + add_cmd(info, bad), timeout=10)
        assert code != 0 and "derivation" in err, (code, err)
    else:
        done: list[object] = []

        def add() -> None:
            try:
                local.add_nar(info, bad)
            except StoreError as e:
                done.append(e)

        th = threading.Thread(target=add, daemon=True)
        th.start()
        th.join(10)
        assert done, "add_nar hangs"
        assert isinstance(done[0], StoreError) and "regular file" in str(done[0])
    assert not local.is_valid(info.path)
    assert not os.path.lexists(local.physical(info.path))
    PathLock(local.physical(info.path), wait=False).release()


def test_drv_outputs_still_recorded_from_add_nar(local: LocalStore) -> None:
    good = file_nar(HELLO_DRV.encode())
    info = make_info("hello.drv", good)
    local.add_nar(info, good)
    assert local.query_derivation_outputs(info.path) == {"out": "/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"}


def test_memory_store_checks_content_addresses() -> None:
    st = MemoryStore()
    good = file_nar(b"flat")
    info = flat_info("f", b"flat", good)
    forged_nar = file_nar(b"not flat")
    with pytest.raises(StoreError, match="ca hash mismatch"):
        st.add_bytes(PathInfo(info.path, nar_hash(forged_nar), len(forged_nar), ca=info.ca), forged_nar)
    link_nar = nar(link(b"/etc/passwd"))
    with pytest.raises(StoreError, match="single regular file"):
        st.add_bytes(PathInfo(info.path, nar_hash(link_nar), len(link_nar), ca=info.ca), link_nar)
    with pytest.raises(StoreError, match="does not reproduce"):
        st.add_bytes(PathInfo(make_info("g", good).path, nar_hash(good), len(good), ca=info.ca), good)
    assert not st.infos
    st.add_bytes(info, good)
    assert st.is_valid(info.path)


def test_copy_from_hostile_server(tmp_path: Path) -> None:
    """A server lying about a flat content address (the client side runs the same check)."""
    target = tmp_path / "mine"
    target.write_bytes(b"promised\n")
    remote = MemoryStore()
    ok_nar = file_nar(b"honest")
    ok = make_info("honest", ok_nar)
    remote.add_bytes(ok, ok_nar)
    bad = nar(link(str(target).encode()))
    info = flat_info("liar", target.read_bytes(), bad)
    # planted directly: MemoryStore itself would refuse it now
    remote.infos[info.path] = info
    remote.nars[info.path] = bad
    lst = LocalStore(tmp_path / "local")
    try:
        with PipeTransport(remote, write=False) as t, pytest.raises(NartoolError, match="single regular file"):
            copy_closure(lst, ServeClient(t), [ok.path, info.path], "from")
        assert not lst.is_valid(info.path)
        assert not os.path.lexists(lst.physical(info.path))
        assert lst.verify(check_contents=True) == []
    finally:
        lst.close()


# -- 3. weak content addresses and big derivations from untrusted users -----------------------


@pytest.mark.parametrize("algo, recursive", [("md5", False), ("sha1", False), ("sha1", True)])
def test_untrusted_weak_ca_needs_a_signature(algo: str, recursive: bool) -> None:
    content = b"weakly addressed " + algo.encode()
    good = file_nar(content)
    h = Hash(algo, hashlib.new(algo, good if recursive else content).digest())
    path = make_fixed_output_path("w", h, recursive=recursive)
    info = PathInfo(path, nar_hash(good), len(good), registration_time=1700000000,
                    ca=ContentAddress("recursive" if recursive else "flat", h).render())
    st = MemoryStore()
    code, out, err = serve_threaded(st, hello() + add_cmd(info, good), **untrusted())
    assert (code, out) == (1, HANDSHAKE_REPLY)
    assert f"uses {algo}, which is too weak" in err and path in err
    assert not st.is_valid(path)
    # a valid signature still works, and trusted users are not affected
    signed = PathInfo(path, info.nar_hash, info.nar_size, registration_time=info.registration_time,
                      sigs=frozenset({sign_path_info(info, KEY)}), ca=info.ca)
    code, _, err = serve_threaded(st, hello() + add_cmd(signed, good), **untrusted())
    assert code == 0 and st.is_valid(path), err
    st2 = MemoryStore()
    code, _, err = serve_threaded(st2, hello() + add_cmd(info, good))
    assert code == 0 and st2.is_valid(path), err


def test_untrusted_sha512_ca_accepted() -> None:
    good = file_nar(b"strong")
    h = Hash("sha512", hashlib.sha512(b"strong").digest())
    path = make_fixed_output_path("s", h, recursive=False)
    info = PathInfo(path, nar_hash(good), len(good), registration_time=1, ca=ContentAddress("flat", h).render())
    st = MemoryStore()
    code, _, err = serve_threaded(st, hello() + add_cmd(info, good), **untrusted())
    assert code == 0 and st.is_valid(path), err


def test_untrusted_big_drv_refused_before_reading_nar() -> None:
    info = make_info("big.drv", file_nar(b"x"))
    big = 16 << 20
    info = PathInfo(info.path, info.nar_hash, big + 1, registration_time=1,
                    sigs=frozenset({sign_path_info(PathInfo(info.path, info.nar_hash, big + 1), KEY)}))
    data = hello() + add_cmd(info, b"", nar_size=big + 1)  # the NAR is not even sent
    st = MemoryStore()
    code, out, err = serve_threaded(st, data, **untrusted())
    assert (code, out) == (1, HANDSHAKE_REPLY)
    assert err.strip() == (f"error: cannot add path '{info.path}': derivations over 16 MiB (NAR size) are only "
                           "accepted from trusted users, and user 'alice' is not one")


# -- 2. a stalled client does not keep a path locked ------------------------------------------


class _Session:
    """``nartool serve --write`` in a subprocess on pipes, with optional zstd framing."""

    def __init__(self, tmp_path: Path, zstd: bool) -> None:
        cfg = tmp_path / "nartool.conf"
        cfg.write_text(f"trusted-users = {getpass.getuser()}\n")
        env = dict(os.environ, NARTOOL_CONFIG=str(cfg))
        args = ["--compress", "zstd"] if zstd else []
        self.root = tmp_path / "st"
        self.p = subprocess.Popen(cli_argv("serve", "--write", "--store", str(self.root),
                                   *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env)
        self.zstd = zstd
        self.got = b""
        self.dec: Any = None
        assert self.p.stdin is not None
        self.p.stdin.write(hello(0x207 | (W.VERSION_FLAG_ZSTD if zstd else 0)))
        self.p.stdin.flush()
        reply = self.read(16, 30)
        assert reply[8:16] == u64(0x207 | (W.VERSION_FLAG_ZSTD if zstd else 0)), reply
        self.got = b""
        if zstd:
            import zstandard

            self.c = zstandard.ZstdCompressor().compressobj()
            self.dec = zstandard.ZstdDecompressor().decompressobj()

    def send(self, data: bytes) -> None:
        assert self.p.stdin is not None
        if self.zstd:
            import zstandard

            data = self.c.compress(data) + self.c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def read(self, n: int, timeout: float) -> bytes:
        """Up to ``n`` reply bytes, waiting at most ``timeout`` seconds."""
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        end = time.monotonic() + timeout
        while len(self.got) < n:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            raw = os.read(fd, 1 << 16)
            if not raw:
                break
            self.got += self.dec.decompress(raw) if self.dec is not None else raw
        out, self.got = self.got[:n], self.got[n:]
        return out

    def close(self) -> tuple[int, bytes]:
        assert self.p.stdin is not None
        if not self.p.stdin.closed:
            self.p.stdin.close()
        try:
            self.p.wait(30)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        assert self.p.stderr is not None and self.p.stdout is not None
        err = self.p.stderr.read()
        self.p.stderr.close()
        self.p.stdout.close()
        return self.p.returncode, err


@pytest.mark.parametrize("zstd", [False, True])
def test_stalled_client_does_not_hold_a_path_lock(tmp_path: Path, zstd: bool) -> None:
    """One complete upload, then only the start of a second request: the first path must become
    valid (and its lock free, and its `1` sent) while the server waits for the rest."""
    if zstd:
        pytest.importorskip("zstandard")
    first = file_nar(b"first upload\n")
    info1 = make_info("first", first)
    second = file_nar(b"second upload\n")
    info2 = make_info("second", second)
    sess = _Session(tmp_path, zstd)
    try:
        sess.send(add_cmd(info1, first) + add_cmd(info2, second)[:60])
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline:
            with LocalStore(sess.root) as other:
                if other.is_valid(info1.path):
                    ok = True
                    break
            time.sleep(0.1)
        assert ok, "the first path is still not registered while the client stalls"
        with LocalStore(sess.root) as other:
            PathLock(other.physical(info1.path), wait=False).release()  # nobody holds it
        assert sess.read(8, 10) == u64(1)  # acknowledged, as it is durable
        # the session still works: finish the second request
        sess.send(add_cmd(info2, second)[60:])
        assert sess.read(8, 10) == u64(1)
    finally:
        code, err = sess.close()
    assert code == 0, err
    with LocalStore(sess.root) as other:
        assert other.is_valid(info2.path)
        assert other.verify(check_contents=True) == []


def test_stalled_import_paths_does_not_hold_a_path_lock(tmp_path: Path) -> None:
    """ImportPaths (command 4): one complete record, then only the start of the next one: the
    first path must be committed (valid, lock free) while the server waits for the rest."""
    first, second = file_nar(b"first record\n"), file_nar(b"second record\n")
    info1, info2 = make_info("first", first), make_info("second", second)
    ms = MemoryStore()
    ms.add_nar(info1, first)
    ms.add_nar(info2, second)
    exp1 = b"".join(bytes(c) for c in ms.export_paths([info1.path]))
    exp2 = b"".join(bytes(c) for c in ms.export_paths([info2.path]))
    stream = exp1[:-8] + exp2  # one stream, two records
    sess = _Session(tmp_path, False)
    try:
        sess.send(u64(W.CMD_IMPORT_PATHS) + stream[: len(exp1) - 8 + 60])
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline and not ok:
            with LocalStore(sess.root) as other:
                ok = other.is_valid(info1.path)
            time.sleep(0.1)
        assert ok, "the first record's path is still not registered while the client stalls"
        with LocalStore(sess.root) as other:
            PathLock(other.physical(info1.path), wait=False).release()  # nobody holds it
        sess.send(stream[len(exp1) - 8 + 60 :])
        assert sess.read(8, 10) == u64(1)
    finally:
        code, err = sess.close()
    assert code == 0, err
    with LocalStore(sess.root) as other:
        assert other.is_valid(info2.path)
        assert other.verify(check_contents=True) == []


def test_stalled_server_does_not_hold_a_local_path_lock(tmp_path: Path) -> None:
    """copy-closure --from: the server sends one NAR, then stalls before the next one; the
    complete path must become valid locally (and its lock free) while the client waits."""
    from nartool.remote.testing import chain

    release = threading.Event()

    class Stalling(MemoryStore):
        def nar_chunks(self, path: str) -> Any:
            if path.endswith("-p1"):
                release.wait(30)
            yield from super().nar_chunks(path)

    remote = Stalling()
    infos = chain(remote, 2)
    local_root = tmp_path / "local"
    LocalStore(local_root).close()
    errors: list[BaseException] = []

    def go() -> None:
        try:
            with LocalStore(local_root) as lst, PipeTransport(remote, write=False) as t:
                copy_closure(lst, ServeClient(t), [infos[-1].path], "from")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline and not ok:
            with LocalStore(local_root) as other:
                ok = other.is_valid(infos[0].path)
            time.sleep(0.1)
        assert ok, "the first path is still not registered while the server stalls"
        with LocalStore(local_root) as other:
            PathLock(other.physical(infos[0].path), wait=False).release()
    finally:
        release.set()
        th.join(30)
    assert not th.is_alive() and not errors, errors
    with LocalStore(local_root) as other:
        assert other.query_valid_paths(i.path for i in infos) == {i.path for i in infos}
