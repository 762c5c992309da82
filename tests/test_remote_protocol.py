"""Serve protocol, in process: the server against recorded Nix 2.8 transcripts, hostile input,
refusals and trust, group commit; the client and copy-closure over pipes (MemoryStore and
LocalStore, no subprocesses)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nartool.config import Config, UserIdentity
from nartool.errors import ProtocolError, StoreError
from nartool.nar import format as F
from nartool.nar.source import ByteSource
from nartool.remote import wire as W
from nartool.remote.client import RemoteError, ServeClient
from nartool.remote.copy import Progress, copy_closure
from nartool.remote.serve import serve_bytes, serve_command
from nartool.remote.testing import add_path, chain, dir_nar, file_nar, make_info, wire_str, wire_strs
from nartool.remote.transport import LocalTransport, PipeTransport, serve_command_line, ssh_argv
from nartool.store.local import LocalStore
from nartool.store.memory import MemoryStore
from nartool.store.signing import SecretKey, sign_path_info
from nartool.store.types import PathInfo, Store

from .helpers import cli_argv

FIX = Path(__file__).parent / "fixtures" / "serve"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
HANDSHAKE_REPLY = F.u64(W.SERVE_MAGIC_2) + F.u64(0x207)


u64 = F.u64
s = wire_str
strs = wire_strs


def hello(version: int = 0x207) -> bytes:
    return u64(W.SERVE_MAGIC_1) + u64(version)


def add_cmd(i: PathInfo, nar: bytes, *, hash_text: str | None = None, nar_size: int | None = None) -> bytes:
    return (u64(9) + s(i.path) + s(i.deriver or "") + s(hash_text or i.nar_hash.base16)
            + strs(W.sort_paths(i.references)) + u64(i.registration_time)
            + u64(len(nar) if nar_size is None else nar_size) + u64(0) + strs(sorted(i.sigs)) + s(i.ca or "") + nar)


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        st = LocalStore(tmp_path / "server")
        yield st
        st.close()


def mem() -> MemoryStore:
    return MemoryStore()


# -- recorded transcripts ---------------------------------------------------------------------


def test_transcripts_replay_byte_identical(store: Store) -> None:
    """Every session recorded between real Nix 2.8 clients and `nix-store --serve`, replayed
    in order against one initially empty store: our replies are the same bytes."""
    for sess in MANIFEST["sessions"]:
        c2s = (FIX / f"{sess['name']}.c2s").read_bytes()
        s2c = (FIX / f"{sess['name']}.s2c").read_bytes()
        code, out, err = serve_bytes(store, c2s, write=sess["write"])
        assert out == s2c, f"{sess['name']}: replies differ (got {len(out)} bytes, Nix sent {len(s2c)})"
        want_code = sess.get("exit", 0)
        assert code == want_code, f"{sess['name']}: exit {code}, Nix {want_code}: {err}"
        if sess.get("stderr"):
            assert err.strip().splitlines()[-1].startswith(sess["stderr"]), (sess["name"], err)
    paths = MANIFEST["paths"]
    assert store.query_valid_paths(paths.values()) == set(paths.values())


def test_transcript_lock_makes_temp_roots() -> None:
    st = mem()
    for name in ("copy-to", "lock"):
        serve_bytes(st, (FIX / f"{name}.c2s").read_bytes(), write=True)
    top = MANIFEST["paths"]["top"]
    assert top in st.temp_roots
    assert "/nix/store/0ab1c2d3f4g5h6i7j8k9l0m1n2p3q4r5-not-there" in st.temp_roots
    st2 = mem()
    serve_bytes(st2, (FIX / "copy-to.c2s").read_bytes(), write=True)
    st2.temp_roots.clear()
    serve_bytes(st2, (FIX / "lock-readonly.c2s").read_bytes(), write=False)
    assert not st2.temp_roots


# -- hostile and malformed input --------------------------------------------------------------


def _populated() -> tuple[MemoryStore, list[PathInfo]]:
    st = mem()
    return st, chain(st, 3)


@pytest.mark.parametrize("data, message", [
    (u64(0x390C9DEC) + u64(0x207), "protocol mismatch"),
    (u64(1 << 40), "too large for type 'j'"),
    (u64(W.SERVE_MAGIC_1)[:5], "unexpected end-of-file"),
])
def test_bad_handshake_writes_nothing(data: bytes, message: str) -> None:
    code, out, err = serve_bytes(mem(), data, write=True)
    assert (code, out) == (1, b"")
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("body, message", [
    (u64(1) + u64(0) + u64(0) + u64(1) + u64(1 << 60), "longer than 4096 bytes"),
    (u64(1) + u64(0) + u64(0) + u64(1 << 62), "absurd element count"),
    (u64(1) + u64(0) + u64(0) + strs(["/tmp/evil"]), "is not in the Nix store"),
    (u64(1) + u64(0) + u64(0) + strs(["/nix/store/short"]), "too short"),
    (u64(1) + u64(0) + u64(0) + strs(["/nix/store/" + "e" * 32 + "-a/../../etc"]), "not a valid store path"),
    (u64(3) + u64(3) + b"abc\0\0\0\0\x01", "non-zero padding"),
    (u64(1) + u64(1 << 32), "too large for type 'j'"),
    (u64(0xFFFFFFFF), "unknown serve command 4294967295"),
    (u64(2) + u64(2) + s("/nix/store/" + "0" * 32 + "-x"), "unexpected end-of-file"),
    (u64(3) + s("/nix/store/" + "0" * 32 + "-nope"), "is not valid"),
    (u64(5) + u64(0) + strs(["/nix/store/" + "0" * 32 + "-nope"]), "is not valid"),
])
def test_malformed_requests(body: bytes, message: str) -> None:
    st, _ = _populated()
    code, out, err = serve_bytes(st, hello() + body, write=True)
    assert code == 1
    assert out == HANDSHAKE_REPLY, "nothing but the handshake may have been written"
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def _bad_add(mutate: Callable[[PathInfo, bytes], bytes]) -> tuple[int, bytes, str, MemoryStore, PathInfo]:
    st, infos = _populated()
    nar = dir_nar([("a", b"hello"), ("b", b"world")])
    info = make_info("new", nar, [infos[0].path], deriver=None)
    code, out, err = serve_bytes(st, hello() + mutate(info, nar), write=True)
    return code, out, err, st, info


@pytest.mark.parametrize("name, mutate, message", [
    ("hash mismatch", lambda i, n: add_cmd(i, n, hash_text="sha256:" + "0" * 52), "hash mismatch"),
    ("bad NAR token", lambda i, n: add_cmd(i, n.replace(b"directory", b"directorz")), "unknown node type"),
    ("unsorted NAR", lambda i, n: add_cmd(i, n.replace(b"\x01\0\0\0\0\0\0\0a", b"\x01\0\0\0\0\0\0\0c")),
     "not sorted"),
    ("NAR shorter than narSize", lambda i, n: add_cmd(i, n + bytes(8), nar_size=len(n) + 8),
     "size mismatch"),
    ("NAR longer than narSize", lambda i, n: add_cmd(i, n, nar_size=len(n) - 8) + bytes(64),
     "size mismatch"),
    ("truncated NAR", lambda i, n: add_cmd(i, n)[:-40], "unexpected end-of-file"),
    ("zero narSize", lambda i, n: add_cmd(i, b"", nar_size=0), "narInfo is too old"),
    ("reference outside the store",
     lambda i, n: add_cmd(PathInfo(i.path, i.nar_hash, i.nar_size, frozenset({"/usr/bin"})), n),
     "not in the Nix store"),
    ("invalid reference",
     lambda i, n: add_cmd(PathInfo(i.path, i.nar_hash, i.nar_size, frozenset({"/nix/store/" + "1" * 32 + "-x"})),
                          n), "is not valid"),
    ("bad hash text", lambda i, n: add_cmd(i, n, hash_text="sha256:xyz"), "invalid narHash"),
    ("bad ca", lambda i, n: add_cmd(PathInfo(i.path, i.nar_hash, i.nar_size, ca="fixed:nonsense"), n),
     "invalid content address"),
])
def test_add_to_store_nar_refuses(name: str, mutate: Callable[[PathInfo, bytes], bytes], message: str) -> None:
    code, out, err, st, info = _bad_add(mutate)
    assert code == 1, name
    assert out == HANDSHAKE_REPLY, name
    assert message in err, (name, err)
    assert not st.is_valid(info.path)
    assert st.commits == 3  # the three paths of the set-up only


def test_add_to_store_nar_false_ca_claim_refused() -> None:
    """A ca field that does not match the contents is refused even for trusted users."""
    st = mem()
    nar = file_nar(b"real")
    info = make_info("x", nar, ca=True)
    other = file_nar(b"fake")
    forged = make_info("x", other)
    forged = PathInfo(info.path, forged.nar_hash, len(other), ca=info.ca)
    code, out, err = serve_bytes(st, hello() + add_cmd(forged, other), write=True)
    assert code == 1 and "ca hash mismatch" in err and not st.is_valid(info.path)


def test_add_valid_path_consumes_exactly_nar_size() -> None:
    st, infos = _populated()
    nar = st.nars[infos[0].path]
    # the NAR bytes are not even parsed for a valid path, but exactly narSize of them are skipped
    data = hello() + add_cmd(infos[0], b"\xff" * len(nar), nar_size=len(nar)) + u64(1) + u64(0) + u64(0) + strs([])
    code, out, err = serve_bytes(st, data, write=True)
    assert (code, err) == (0, "")
    assert out == HANDSHAKE_REPLY + u64(1) + u64(0)


def test_import_paths_and_export_round_trip() -> None:
    a, infos = _populated()
    stream = b"".join(bytes(c) for c in a.export_paths([i.path for i in infos]))
    b = mem()
    code, out, err = serve_bytes(b, hello() + u64(4) + stream + u64(5) + u64(0) + strs([infos[2].path]), write=True)
    assert (code, err) == (0, ""), err
    assert out[16:24] == u64(1)
    assert b.query_valid_paths(i.path for i in infos) == {i.path for i in infos}
    exported = out[24:]
    assert exported == b"".join(bytes(c) for c in a.export_paths([infos[2].path]))


def test_import_paths_bad_stream_imports_nothing() -> None:
    a, infos = _populated()
    stream = b"".join(bytes(c) for c in a.export_paths([i.path for i in infos]))
    bad = stream[:-16] + u64(7)  # a bad legacy-signature marker in the last record
    b = mem()
    code, out, err = serve_bytes(b, hello() + u64(4) + bad + u64(0), write=True)
    assert code == 1 and out == HANDSHAKE_REPLY
    assert not b.infos


# -- read-only refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    (add_cmd(make_info("x", file_nar(b"x")), file_nar(b"x")), "error: importing paths is not allowed"),
    (u64(4) + u64(0), "error: importing paths is not allowed"),
    (u64(6) + strs(["/nix/store/" + "0" * 32 + "-x"]), "error: building paths is not allowed"),
    (u64(8) + s("/nix/store/" + "0" * 32 + "-x.drv"), "error: building paths is not allowed"),
])
def test_read_only_refusals(body: bytes, message: str) -> None:
    st = mem()
    code, out, err = serve_bytes(st, hello() + body, write=False)
    assert (code, out) == (1, HANDSHAKE_REPLY)
    assert err.strip() == message
    assert not st.infos


def test_builds_need_a_local_store() -> None:
    """Builds run in a local store (the build commands themselves: tests/test_remote_build_*.py)."""
    drv = "/nix/store/" + "0" * 32 + "-x.drv"
    code, out, err = serve_bytes(mem(), hello() + u64(6) + strs([drv]) + u64(0) * 6, write=True)
    assert (code, out) == (1, HANDSHAKE_REPLY)
    assert err.startswith("error: cannot build in ") and err.strip().endswith("only a local store can build")


def test_eof_at_command_boundary_is_success() -> None:
    assert serve_bytes(mem(), hello(), write=False) == (0, HANDSHAKE_REPLY, "")


def test_old_client_version_accepted() -> None:
    st, infos = _populated()
    code, out, _ = serve_bytes(st, hello(0x100) + u64(2) + strs([infos[0].path]), write=False)
    assert code == 0
    # minor 0: no narHash/ca/sigs
    rec = s(infos[0].path) + s("") + strs([]) + u64(infos[0].nar_size) * 2 + s("")
    assert out == HANDSHAKE_REPLY + rec


# -- trust ------------------------------------------------------------------------------------

KEY = SecretKey.generate("test-key-1")
OTHER_KEY = SecretKey.generate("other-key-1")
ALICE = UserIdentity("alice", 1000, 1000, "alice")


def untrusted_config(extra: str = "") -> Config:
    return Config.from_text(f"trusted-users = root\ntrusted-public-keys = {KEY.public_key().to_text()}\n{extra}")


def _signed(info: PathInfo, key: SecretKey) -> PathInfo:
    return PathInfo(info.path, info.nar_hash, info.nar_size, info.references, info.deriver,
                    info.registration_time, sigs=frozenset({sign_path_info(info, key)}), ca=info.ca)


def test_untrusted_unsigned_refused_before_reading_nar() -> None:
    st = mem()
    nar = file_nar(b"payload")
    info = make_info("x", nar)
    # the NAR is truncated: a server that read it would report end-of-file instead
    data = hello() + add_cmd(info, nar)[: -len(nar) + 10]
    code, out, err = serve_bytes(st, data, write=True, config=untrusted_config(), user=ALICE)
    assert (code, out) == (1, HANDSHAKE_REPLY)
    assert err.strip() == (f"error: cannot add path '{info.path}' because it lacks a valid signature (user "
                           f"'{ALICE.name}' is not trusted: add 'trusted-users = {ALICE.name}' to "
                           "/etc/nartool/nartool.conf on the receiving machine, or sign the paths with a key in "
                           "its 'trusted-public-keys')")


@pytest.mark.parametrize("kind, accepted", [
    ("signed-trusted", True), ("signed-other", False), ("ca", True), ("unsigned", False),
    ("garbage-sig", False),
])
def test_untrusted_imports(kind: str, accepted: bool) -> None:
    st = mem()
    nar = file_nar(b"payload " + kind.encode())
    info = make_info("x", nar, ca=kind == "ca")
    if kind == "signed-trusted":
        info = _signed(info, KEY)
    elif kind == "signed-other":
        info = _signed(info, OTHER_KEY)
    elif kind == "garbage-sig":
        info = PathInfo(info.path, info.nar_hash, info.nar_size, sigs=frozenset({"test-key-1:AAAA"}))
    code, out, err = serve_bytes(st, hello() + add_cmd(info, nar), write=True, config=untrusted_config(), user=ALICE)
    assert (code == 0) == accepted, err
    assert st.is_valid(info.path) == accepted
    if accepted:
        assert out == HANDSHAKE_REPLY + u64(1)
        assert st.infos[info.path].sigs == info.sigs


def test_trusted_user_and_require_sigs_false() -> None:
    nar = file_nar(b"unsigned")
    info = make_info("x", nar)
    for cfg, user in ((untrusted_config(), UserIdentity("root", 0, 0, "root")),
                      (untrusted_config("require-sigs = false"), ALICE),
                      (Config.from_text("trusted-users = @staff"), UserIdentity("bob", 5, 50, "staff"))):
        st = mem()
        code, _, err = serve_bytes(st, hello() + add_cmd(info, nar), write=True, config=cfg, user=user)
        assert code == 0 and st.is_valid(info.path), err


def test_untrusted_import_paths_refused() -> None:
    a, infos = _populated()
    stream = b"".join(bytes(c) for c in a.export_paths([infos[0].path]))
    code, out, err = serve_bytes(mem(), hello() + u64(4) + stream, write=True, config=untrusted_config(), user=ALICE)
    assert (code, out) == (1, HANDSHAKE_REPLY)
    assert "carries no signatures" in err and "'alice'" in err


def test_allowed_users_gate() -> None:
    cfg = Config.from_text("allowed-users = @wheel\n")
    code, out, err = serve_bytes(mem(), hello(), write=False, config=cfg, user=ALICE)
    assert (code, out) == (1, b"")
    assert "not allowed" in err


def test_untrusted_ultimate_dropped() -> None:
    st = mem()
    nar = file_nar(b"u")
    info = _signed(make_info("x", nar), KEY)
    data = bytearray(hello() + add_cmd(info, nar))
    cmd = add_cmd(info, nar)
    # set ultimate = 1 (the word after narSize)
    off = 16 + cmd.index(u64(len(nar)) + u64(0) + strs(sorted(info.sigs))) + 8
    data[off : off + 8] = u64(1)
    code, _, err = serve_bytes(st, bytes(data), write=True, config=untrusted_config(), user=ALICE)
    assert code == 0, err
    assert st.infos[info.path].ultimate is False


# -- group commit -----------------------------------------------------------------------------


class RecordingStore(MemoryStore):
    """Notes, at every commit, how many reply bytes the server had written."""

    def __init__(self, out: io.BytesIO) -> None:
        super().__init__()
        self.out = out
        #: (reply bytes written when the batch committed, paths valid before it)
        self.at_commit: list[tuple[int, int]] = []

    @contextmanager
    def batch(self, *, keep_on_error: bool = False) -> Iterator[None]:
        outer = self._pending() is None
        before = len(self.infos)
        with super().batch(keep_on_error=keep_on_error):
            yield
        if outer:
            self.at_commit.append((len(self.out.getvalue()), before))


def test_group_commit_replies_only_after_commit() -> None:
    src = mem()
    infos = chain(src, 40, size=2000)
    data = hello() + b"".join(add_cmd(i, src.nars[i.path]) for i in infos)
    out = io.BytesIO()
    st = RecordingStore(out)
    err = io.StringIO()
    code = serve_command(st, io.BytesIO(data), out, write=True, log=err)
    assert code == 0, err.getvalue()
    assert out.getvalue() == HANDSHAKE_REPLY + u64(1) * 40
    # fewer commits than paths (buffered requests were grouped) …
    assert 1 <= st.commits < 40
    # … and no reply was written before the commit that made its path durable
    for written, before in st.at_commit:
        assert written == 16 + 8 * before
    assert all(st.is_valid(i.path) for i in infos)


def test_group_commit_over_pipes_and_sequential_client() -> None:
    src = mem()
    infos = chain(src, 60, size=5000)
    dst = mem()
    with PipeTransport(dst) as t:
        c = ServeClient(t)
        c.add_to_store_nar_many(infos, src.nar_chunks)
    assert all(dst.is_valid(i.path) for i in infos)
    assert dst.commits < 60
    # a Nix-like client that waits for every reply gets one commit per path
    dst2 = mem()
    with PipeTransport(dst2) as t:
        c = ServeClient(t)
        for i in infos:
            c.add_to_store_nar_many([i], src.nar_chunks)
    assert dst2.commits == 60


def test_group_commit_failure_acknowledges_nothing_of_the_group() -> None:
    src = mem()
    infos = chain(src, 5)
    bad = PathInfo(infos[4].path, infos[3].nar_hash, infos[4].nar_size, infos[4].references)
    data = hello() + b"".join(add_cmd(i, src.nars[i.path]) for i in infos[:4]) + add_cmd(bad, src.nars[bad.path])
    st = mem()
    code, out, err = serve_bytes(st, data, write=True)
    assert code == 1 and "hash mismatch" in err
    # all five arrived in one buffer: one group, rolled back, no reply sent
    assert out == HANDSHAKE_REPLY and not st.infos


# -- client and copy over pipes ----------------------------------------------------------------


def test_client_queries_and_dump(store: Store) -> None:
    infos = chain(store, 4)
    with PipeTransport(store, write=False) as t:
        c = ServeClient(t)
        assert c.server_version == 0x207
        assert c.query_valid_paths([i.path for i in infos] + ["/nix/store/" + "0" * 32 + "-x"]) == \
            {i.path for i in infos}
        got = c.query_path_infos(i.path for i in infos)
        for i in infos:
            assert (got[i.path].nar_hash, got[i.path].nar_size, got[i.path].references) == \
                (i.nar_hash, i.nar_size, i.references)
        assert c.query_closure([infos[-1].path]) == {i.path for i in infos}
        nar = b"".join(bytes(x) for x in c.dump_store_path(infos[2].path))
        assert nar == b"".join(bytes(x) for x in store.nar_chunks(infos[2].path))
        exported = c.export_paths([infos[1].path])
        assert exported == b"".join(bytes(x) for x in store.export_paths([infos[1].path]))


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_copy_to_and_from(store: Store, tmp_path: Path, compress: str | None) -> None:
    src = mem()
    infos = chain(src, 30, size=3000)
    extra = add_path(src, make_info("ca-thing", file_nar(b"ca"), ca=True), file_nar(b"ca"))
    events: list[Progress] = []
    with PipeTransport(store, compress=compress) as t:
        c = ServeClient(t, compress=compress)
        assert c.compressed == (compress is not None)
        r = copy_closure(src, c, [infos[-1].path, extra.path], "to", progress=events.append)
        assert len(r.copied) == 31 and r.bytes_copied == r.bytes_total == sum(i.nar_size for i in [*infos, extra])
        again = copy_closure(src, c, [infos[-1].path], "to")
        assert again.missing == [] and again.copied == []
    assert events[-1].finished and events[-1].paths_done == 31
    assert store.query_path_info(extra.path).ca == extra.ca  # type: ignore[union-attr]
    back = LocalStore(tmp_path / "back")
    with PipeTransport(store, write=False, compress=compress) as t:
        c = ServeClient(t, compress=compress)
        r = copy_closure(back, c, [infos[-1].path, extra.path], "from")
        assert sorted(r.copied) == sorted(i.path for i in [*infos, extra])
        assert copy_closure(back, c, [infos[-1].path], "from").copied == []
    for i in [*infos, extra]:
        got = back.query_path_info(i.path)
        assert got is not None and (got.nar_hash, got.references, got.ca) == (i.nar_hash, i.references, i.ca)
    assert back.verify(check_contents=True) == []
    back.close()


def test_copy_dry_run_and_include_outputs() -> None:
    src = mem()
    infos = chain(src, 5)
    dst = mem()
    with PipeTransport(dst) as t:
        r = copy_closure(src, ServeClient(t), [infos[-1].path], "to", dry_run=True)
    assert r.dry_run and len(r.missing) == 5 and r.copied == [] and not dst.infos
    assert r.bytes_total == sum(i.nar_size for i in infos)
    drv_nar = file_nar(b"Derive(...)")
    drv = add_path(src, make_info("x.drv", drv_nar), drv_nar)
    src.derivation_outputs[drv.path] = {"out": infos[1].path}
    with PipeTransport(src, write=False) as t:
        c = ServeClient(t)
        assert c.query_closure([drv.path]) == {drv.path}
        assert c.query_closure([drv.path], include_outputs=True) == {drv.path, infos[0].path, infos[1].path}


def test_copy_to_old_server_uses_import_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(W, "PROTOCOL_VERSION", 0x204)
    src = mem()
    infos = chain(src, 4)
    dst = mem()
    with PipeTransport(dst) as t:
        c = ServeClient(t)
        assert c.minor == 4
        r = copy_closure(src, c, [infos[-1].path], "to")
    assert len(r.copied) == 4 and all(dst.is_valid(i.path) for i in infos)


def test_copy_to_untrusted_server_fails_up_front() -> None:
    src = mem()
    infos = chain(src, 3)
    signed = _signed(infos[0], KEY)
    src.infos[signed.path] = signed
    dst = mem()
    with PipeTransport(dst, config=untrusted_config(), user=ALICE) as t:
        c = ServeClient(t)
        with pytest.raises(StoreError, match=r"would refuse 2 of the 3 paths to copy \(nothing was sent\)") as ei:
            copy_closure(src, c, [infos[-1].path], "to")
        assert f"cannot add path '{infos[1].path}' because it lacks a valid signature" in str(ei.value)
        assert c.ext is not None and c.ext.write and not c.ext.unsigned_ok
        # only the signed one is acceptable: copying it alone works
        r = copy_closure(src, c, [infos[0].path], "to")
        assert r.copied == [infos[0].path]
    assert set(dst.infos) == {infos[0].path}


def test_copy_to_read_only_nartool_fails_up_front() -> None:
    src = mem()
    infos = chain(src, 2)
    with PipeTransport(mem(), write=False) as t, pytest.raises(ProtocolError, match="does not accept imports"):
        copy_closure(src, ServeClient(t), [infos[-1].path], "to")


def test_remote_dies_mid_upload_names_the_error() -> None:
    class Failing(MemoryStore):
        def add_nar(self, info: PathInfo, nar: ByteSource) -> PathInfo:
            if info.path.endswith("-p3"):
                raise StoreError("disk on fire", path=info.path, rule="io")
            return super().add_nar(info, nar)

    src = mem()
    infos = chain(src, 6, size=200000)
    dst = Failing()
    with PipeTransport(dst) as t:
        c = ServeClient(t)
        with pytest.raises(RemoteError) as ei:
            copy_closure(src, c, [infos[-1].path], "to")
    assert "disk on fire" in ei.value.remote_stderr
    assert "disk on fire" in str(ei.value)
    # what was acknowledged is there; the rest is not
    assert not any(dst.is_valid(i.path) for i in infos[3:])


def test_cut_download_keeps_complete_paths_and_rerun_fetches_the_rest(tmp_path: Path) -> None:
    class Dying(MemoryStore):
        armed = True

        def nar_chunks(self, path: str) -> Iterator[bytes | bytearray | memoryview]:
            if self.armed and path.endswith("-p4"):
                it = super().nar_chunks(path)
                yield next(it)[:100]
                raise OSError("connection cut")
            yield from super().nar_chunks(path)

    remote = Dying()
    infos = chain(remote, 8, size=1000)
    local = LocalStore(tmp_path / "local")
    with PipeTransport(remote, write=False) as t, pytest.raises(RemoteError):
        copy_closure(local, ServeClient(t), [infos[-1].path], "from")
    have = local.query_valid_paths(i.path for i in infos)
    assert have == {i.path for i in infos[:4]}  # the complete ones before the cut were kept
    assert local.verify(check_contents=True) == []
    remote.armed = False
    with PipeTransport(remote, write=False) as t:
        r = copy_closure(local, ServeClient(t), [infos[-1].path], "from")
    assert sorted(r.copied) == sorted(i.path for i in infos[4:])
    local.close()


def test_client_handshake_errors(tmp_path: Path) -> None:
    with pytest.raises(RemoteError, match=r"protocol mismatch from 'banner', got 'Welcome to host"):
        ServeClient(LocalTransport(["sh", "-c", "echo Welcome to host; cat >/dev/null"], name="banner",
                                   passthrough=False))
    with pytest.raises(RemoteError, match="cannot connect to 'gone'") as ei:
        ServeClient(LocalTransport(["sh", "-c", "echo 'sh: nartool: not found' >&2; exit 127"], name="gone",
                                   passthrough=False))
    assert "nartool: not found" in ei.value.remote_stderr


def test_command_lines() -> None:
    assert serve_command_line("nartool") == "nartool serve --write"
    assert serve_command_line("nartool", "/srv/my store", "zstd") == \
        "nartool serve --write --compress zstd --store '/srv/my store'"
    assert serve_command_line("nix-store", "/srv/s") == "nix-store --serve --write --store /srv/s"
    assert serve_command_line("/opt/bin/nartool serve") == "/opt/bin/nartool serve --write"
    assert serve_command_line("python3 -m nartool") == "python3 -m nartool serve --write"
    assert serve_command_line("/w/nartool-serve", "/s") == "/w/nartool-serve --serve --write --store /s"
    assert ssh_argv("u@h", "nix-store --serve --write", ["-p", "22"], env={"NIX_SSHOPTS": " -o  A=b  -C"}) == \
        ["ssh", "u@h", "-x", "-a", "-o", "A=b", "-C", "-p", "22", "--", "nix-store --serve --write"]


def test_zstd_offer_ignored_by_plain_client() -> None:
    """A server offering zstd still talks plainly to a client that did not ask (like Nix)."""
    src = mem()
    infos = chain(src, 2)
    data = hello() + u64(1) + u64(0) + u64(0) + strs([i.path for i in infos])
    code, out, _ = serve_bytes(src, data, write=False, compress="zstd")
    assert code == 0
    assert out[:8] == u64(W.SERVE_MAGIC_2) and out[8:16] == u64(0x207 | W.VERSION_FLAG_ZSTD)
    assert out[16:] == strs(W.sort_paths(i.path for i in infos))



# -- the `nartool serve` command ---------------------------------------------------------------


def _serve_cli(tmp_path: Path, data: bytes, *args: str, conf: str = "trusted-users = root\n") -> Any:
    import subprocess

    cfg = tmp_path / "nartool.conf"
    cfg.write_text(conf)
    env = dict(os.environ, NARTOOL_CONFIG=str(cfg))
    return subprocess.run(cli_argv("serve", "--store", str(tmp_path / "st"), *args),
                          input=data, capture_output=True, env=env, timeout=60)


def test_serve_cli_session_and_errors(tmp_path: Path) -> None:
    r = _serve_cli(tmp_path, hello() + u64(1) + u64(0) + u64(0) + strs([]), "--write")
    assert (r.returncode, r.stdout, r.stderr) == (0, HANDSHAKE_REPLY + u64(0), b"")
    r = _serve_cli(tmp_path, u64(0x1234) + u64(0x207))
    assert (r.returncode, r.stdout) == (1, b"")
    assert r.stderr == b"error: protocol mismatch\n"
    nar = file_nar(b"x")
    r = _serve_cli(tmp_path, hello() + add_cmd(make_info("x", nar), nar))
    assert (r.returncode, r.stdout) == (1, HANDSHAKE_REPLY)
    assert r.stderr == b"error: importing paths is not allowed\n"
    # Nix's wrapper convention: `--serve --write --store DIR` is accepted too
    r = _serve_cli(tmp_path, hello() + add_cmd(make_info("x", nar), nar), "--serve", "--write")
    assert (r.returncode, r.stdout) == (0, HANDSHAKE_REPLY + u64(1)), r.stderr


def test_serve_cli_allowed_users(tmp_path: Path) -> None:
    r = _serve_cli(tmp_path, hello(), conf="allowed-users = nobody-at-all\ntrusted-users = nobody-at-all\n")
    assert (r.returncode, r.stdout) == (1, b"")
    assert b"is not allowed to use this store" in r.stderr


@pytest.mark.slow
def test_concurrent_group_commits_in_opposite_orders(tmp_path: Path) -> None:
    import threading

    src = mem()
    infos = []
    for k in range(8):
        nar = dir_nar([(f"f{j}", os.urandom(100_000)) for j in range(10)])
        infos.append(add_path(src, make_info(f"ind{k}", nar), nar))
    for attempt in range(4):
        dst = tmp_path / f"dst{attempt}"
        transports: list[LocalTransport] = []
        errors: list[BaseException] = []

        def go(order: list[PathInfo], dst: Path = dst, transports: list[LocalTransport] = transports,
               errors: list[BaseException] = errors) -> None:
            t = LocalTransport(cli_argv("serve", "--write", "--store", str(dst)),
                               passthrough=False)
            transports.append(t)
            try:
                ServeClient(t).add_to_store_nar_many(order, src.nar_chunks)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=go, args=(o,), daemon=True) for o in (infos, infos[::-1])]
        for th in threads:
            th.start()
        for th in threads:
            th.join(6)
        hung = any(th.is_alive() for th in threads)
        for t in transports:
            t.kill()
            t.close(timeout=1)
        assert not hung, "deadlock: both servers wait for a path lock the other holds"
        assert not errors, errors
