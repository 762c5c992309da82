"""Store unit tests: path computation (spec vectors), derivations, db, add/import/export, GC."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nartool.errors import ExportFormatError, HashFormatError, InvalidPathError, NarError, StoreError
from nartool.hashes import Hash
from nartool.nar import format as F
from nartool.store import LocalStore, PathInfo
from nartool.store import export as X
from nartool.store.closure import topo_sort
from nartool.store.derivation import DerivationError, parse_derivation, parse_derivation_strict
from nartool.store.gc import add_indirect_root, collect_garbage, find_roots
from nartool.store.paths import (
    ContentAddress,
    StorePath,
    ca_matches,
    make_fixed_output_path,
    make_text_path,
    validate_name,
)
from nartool.store.refs import RefScanner, scan_references

SHA = lambda b: Hash("sha256", hashlib.sha256(b).digest())  # noqa: E731
ABC_NAR = bytes.fromhex("11a71b4754d812f4aea20161c533bdaa112ac5c853013e65d3aa9640b5735230")


# -- paths ------------------------------------------------------------------------------------


def test_spec_vectors() -> None:
    assert make_fixed_output_path("abc", Hash("sha256", ABC_NAR), recursive=True) == \
        "/nix/store/xzq37kpjpibgfqcsxyvc9kfa6s5aiykp-abc"
    assert make_fixed_output_path("abc", SHA(b"abc"), recursive=False) == \
        "/nix/store/0y839a054fcnhjcd2w1pb6a4k4fl38iw-abc"
    assert make_fixed_output_path("abc", Hash("sha1", hashlib.sha1(b"abc").digest()), recursive=False) == \
        "/nix/store/4m8jzc77isfnw2l9w1hk7a98zpirgrwv-abc"
    assert make_text_path("note.txt", SHA(b"a note")) == "/nix/store/si9qjiyx4s0yblv8q97dkjbyjcr798xx-note.txt"
    assert ContentAddress("flat", SHA(b"abc")).render() == "fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
    assert ContentAddress("recursive", Hash("sha256", ABC_NAR)).render() == \
        "fixed:r:sha256:0c2jffsl15masdjkw0akr32jl4daplrwaq81lapg84nqai3ip9qi"


def test_ca_matches() -> None:
    p = "/nix/store/0y839a054fcnhjcd2w1pb6a4k4fl38iw-abc"
    ca = "fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
    assert ca_matches(p, ca, [])
    assert not ca_matches(p.replace("-abc", "-abd"), ca, [])
    assert not ca_matches(p, None, [])
    assert not ca_matches(p, "garbage", [])


@pytest.mark.parametrize("name,rule", [("", "bad-name"), ("a b", "bad-name"), ("x" * 212, "bad-name"),
                                       ("é", "bad-name"), ("a/b", "bad-name")])
def test_bad_names(name: str, rule: str) -> None:
    with pytest.raises(InvalidPathError) as ei:
        validate_name(name)
    assert ei.value.rule == rule


def test_name_limits() -> None:
    validate_name("x" * 211)
    validate_name(".dot")
    validate_name("a+-._?=Z9")


@pytest.mark.parametrize("path,fragment", [
    ("/tmp/x", "not in the store"),
    ("/nix/store/short-x", "too short"),
    ("/nix/store/xzq37kpjpibgfqcsxyvc9kfa6s5aiyke-abc", "invalid hash part"),  # 'e' is not nix32
    ("/nix/store/xzq37kpjpibgfqcsxyvc9kfa6s5aiykp_abc", "lacks '-'"),
    ("/nix/store/xzq37kpjpibgfqcsxyvc9kfa6s5aiykp-abc/sub", "below a store path"),
    ("/nix/store/xzq37kpjpibgfqcsxyvc9kfa6s5aiykp-a\0b", "NUL"),
])
def test_bad_paths(path: str, fragment: str) -> None:
    with pytest.raises(InvalidPathError) as ei:
        StorePath.parse(path)
    assert fragment in str(ei.value)


HELLO_DRV = ('Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[],[],"x86_64-linux",'
             '"/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","hello"),'
             '("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])')


def test_derivation_round_trip_and_hashes() -> None:
    d = parse_derivation(HELLO_DRV)
    assert d.unparse() == HELLO_DRV.encode()
    masked = hashlib.sha256(d.unparse(mask_outputs=True)).hexdigest()
    assert masked == "1142b64dfc10c25b923658cd6a75f2eb8603497ca6e5c3fe3c77c3b7cc7ba923"
    assert make_text_path("hello.drv", SHA(HELLO_DRV.encode())) == \
        "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
    esc = parse_derivation(HELLO_DRV.replace('"echo hi > $out"', '"a\\n\\t\\"q\\\\"'))
    assert esc.args[1] == 'a\n\t"q\\'
    assert esc.unparse() == HELLO_DRV.replace('"echo hi > $out"', '"a\\n\\t\\"q\\\\"').encode()


@pytest.mark.parametrize("bad", ["", "Derive(", HELLO_DRV.replace("Derive", "Derivx"),
                                 HELLO_DRV[:-2], '"unterminated'])
def test_bad_derivations(bad: str) -> None:
    with pytest.raises(DerivationError) as ei:
        parse_derivation(bad)
    assert ei.value.offset is not None


def test_trailing_data_refused_only_in_strict_mode() -> None:
    """Nix 2.8 ignores bytes after the closing parenthesis; the strict parser does not."""
    assert parse_derivation(HELLO_DRV + "x").unparse() == HELLO_DRV.encode()
    with pytest.raises(DerivationError) as ei:
        parse_derivation_strict((HELLO_DRV + "x").encode())
    assert ei.value.offset == len(HELLO_DRV)


# -- references -------------------------------------------------------------------------------


H1 = "xzq37kpjpibgfqcsxyvc9kfa6s5aiykp"
H2 = "0y839a054fcnhjcd2w1pb6a4k4fl38iw"


@given(st.binary(max_size=200), st.binary(max_size=200), st.integers(1, 64))
@settings(max_examples=200, deadline=None)
def test_ref_scanner_split_anywhere(pre: bytes, post: bytes, step: int) -> None:
    data = pre + b"/nix/store/" + H1.encode() + b"-x" + post
    s = RefScanner([H1, H2])
    for i in range(0, len(data), step):
        s.update(data[i : i + step])
    assert H1 in s.found
    assert (H2 in s.found) == (H2.encode() in data)


def test_ref_scanner_only_candidates_and_runs() -> None:
    refs = scan_references([b"zz" + H2.encode() + H1.encode()[:31]], ["/nix/store/" + H1 + "-a",
                                                                      "/nix/store/" + H2 + "-b"], "/nix/store")
    assert refs == {"/nix/store/" + H2 + "-b"}


def test_topo_sort_export_order() -> None:
    refs = {"/s/c": {"/s/b", "/s/a"}, "/s/b": {"/s/a"}, "/s/a": {"/s/a"}}
    assert topo_sort(["/s/c", "/s/a", "/s/b"], lambda p: refs[p]) == ["/s/a", "/s/b", "/s/c"]
    with pytest.raises(StoreError):
        topo_sort(["/s/x", "/s/y"], lambda p: {"/s/x": {"/s/y"}, "/s/y": {"/s/x"}}[p])


# -- LocalStore -------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    s = LocalStore(tmp_path / "root", case_hack=False)
    yield s  # type: ignore[misc]
    s.close()


def make_tree(root: Path) -> Path:
    t = root / "tree"
    (t / "sub").mkdir(parents=True)
    (t / "a").write_bytes(b"hello\n")
    (t / "sub" / "x").write_bytes(b"x" * 10000)
    os.chmod(t / "sub" / "x", 0o4755)
    os.symlink("a", t / "link")
    return t


def store_entries(s: LocalStore) -> set[str]:
    return set(os.listdir(s.real_store_dir))


def test_add_canonical_and_idempotent(store: LocalStore, tmp_path: Path) -> None:
    t = make_tree(tmp_path)
    info = store.add_path(t)
    assert info.path.endswith("-tree") and info.ca and info.ca.startswith("fixed:r:sha256:")
    again = store.add_path(t)
    assert again.path == info.path
    phys = Path(store.physical(info.path))
    for p in [phys, phys / "sub", phys / "a", phys / "sub" / "x"]:
        stt = os.lstat(p)
        assert stt.st_mtime == 1
        assert stat.S_IMODE(stt.st_mode) in (0o444, 0o555)
    assert stat.S_IMODE(os.lstat(phys / "sub" / "x").st_mode) == 0o555  # setuid dropped
    assert os.lstat(phys / "link").st_mtime == 1
    assert store_entries(store) == {info.path.rsplit("/", 1)[1]}  # no temporaries, no locks left
    assert store.verify(check_contents=True) == []


def test_add_flat_and_text(store: LocalStore, tmp_path: Path) -> None:
    f = tmp_path / "abc"
    f.write_bytes(b"abc")
    assert store.add_path(f, flat=True).path == "/nix/store/0y839a054fcnhjcd2w1pb6a4k4fl38iw-abc"
    assert store.add_path(f).path == "/nix/store/xzq37kpjpibgfqcsxyvc9kfa6s5aiykp-abc"
    assert store.add_text("note.txt", b"a note").path == "/nix/store/si9qjiyx4s0yblv8q97dkjbyjcr798xx-note.txt"
    with pytest.raises(Exception, match="regular file"):
        store.add_path(make_tree(tmp_path), flat=True)
    assert len(store.all_paths()) == 3


def _nar_of(data: bytes) -> bytes:
    return F.TOK_MAGIC + F.HDR_REGULAR + F.u64(len(data)) + data + F.PAD[(-len(data)) & 7] + F.CLOSE


def _info(store: LocalStore, name: str, nar: bytes, refs: frozenset[str] = frozenset()) -> PathInfo:
    h = SHA(nar)
    path = make_fixed_output_path(name, SHA(name.encode()), recursive=False)
    return PathInfo(path, h, len(nar), refs)


def test_add_nar_checks_and_leaves_nothing(store: LocalStore) -> None:
    nar = _nar_of(b"payload")
    info = _info(store, "p", nar)
    before = store_entries(store)
    bad = PathInfo(info.path, SHA(b"other"), len(nar))
    with pytest.raises(StoreError) as ei:
        store.add_nar(bad, nar)
    assert ei.value.rule == "hash-mismatch"
    with pytest.raises(StoreError) as ei:
        store.add_nar(PathInfo(info.path, info.nar_hash, len(nar) + 8), nar)
    assert ei.value.rule == "size-mismatch"
    with pytest.raises(NarError):
        store.add_nar(info, nar[:-9])
    with pytest.raises(StoreError) as ei:
        store.add_nar(PathInfo(info.path, info.nar_hash, len(nar), frozenset({"/nix/store/" + H1 + "-gone"})), nar)
    assert ei.value.rule == "invalid-reference"
    assert store_entries(store) == before and store.all_paths() == []
    assert store.add_nar(info, nar).path == info.path
    assert store.is_valid(info.path)
    # already valid: the NAR is still consumed from the shared stream
    src = io.BytesIO(nar + b"TRAILER")
    from nartool.nar.source import ByteSource

    bs = ByteSource(src)
    store.add_nar(info, bs)
    assert bs.read_exact(7) == b"TRAILER"


def test_bad_ca_claim_refused(store: LocalStore) -> None:
    nar = _nar_of(b"abc")
    p = "/nix/store/0y839a054fcnhjcd2w1pb6a4k4fl38iw-abc"
    good = PathInfo(p, SHA(nar), len(nar), ca="fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s")
    lie = PathInfo(p, SHA(_nar_of(b"abd")), len(_nar_of(b"abd")), ca=good.ca)
    with pytest.raises(StoreError) as ei:
        store.add_nar(lie, _nar_of(b"abd"))
    assert ei.value.rule == "ca-mismatch"
    store.add_nar(good, nar)
    assert store.path_info(p).ca == good.ca


def _export(store: LocalStore, paths: list[str]) -> bytes:
    return b"".join(bytes(c) for c in store.export_paths(paths))


def _chain(store: LocalStore, n: int) -> list[str]:
    """n text paths, each referring to the previous one."""
    out: list[str] = []
    for i in range(n):
        out.append(store.add_text(f"p{i}", f"data {i} {out[-1] if out else ''}".encode(), out[-1:]).path)
    return out


def test_export_import_round_trip(store: LocalStore, tmp_path: Path) -> None:
    chain = _chain(store, 5)
    stream = _export(store, chain[::-1])
    assert _export(store, chain) == stream  # dependency order whatever the request order
    other = LocalStore(tmp_path / "other", case_hack=False)
    assert other.import_paths(stream) == chain
    assert other.closure([chain[-1]]) == chain
    assert other.path_info(chain[3]).references == frozenset({chain[2]})
    assert _export(other, chain) == stream
    assert other.import_paths(stream) == chain  # idempotent
    other.close()


def _record(path: str, refs: list[str], nar: bytes, deriver: str | None = None) -> bytes:
    return b"".join(bytes(c) for c in X.record_chunks(path, refs, deriver, [nar]))


GOOD_PATH = "/nix/store/" + H1 + "-good"


@pytest.mark.parametrize("stream,rule", [
    (F.u64(2), "marker"),
    (b"", "truncated"),
    (F.u64(1) + _nar_of(b"x")[:-3], "truncated"),
    (F.u64(1) + _nar_of(b"x") + F.u64(0x1234), "magic"),
    (_record("/tmp/evil", [], _nar_of(b"x")) + F.u64(0), "bad-path"),
    (_record(GOOD_PATH, ["/nix/store/" + H2 + "-missing"], _nar_of(b"x")) + F.u64(0), "invalid-reference"),
    (_record(GOOD_PATH, [], _nar_of(b"x")), "truncated"),  # no end marker
    (_record(GOOD_PATH, [], _nar_of(b"x"))[:-3], "truncated"),
    (F.u64(1) + _nar_of(b"x") + F.u64(X.EXPORT_MAGIC) + F.u64(1 << 40), "too-long"),
    (F.u64(1) + _nar_of(b"x") + F.u64(X.EXPORT_MAGIC) + F.u64(1) + b"/\x01\0\0\0\0\0\0", "padding"),
    (_record(GOOD_PATH, [], _nar_of(b"x"))[:-8] + F.u64(7) + F.u64(0), "marker"),
])
def test_malformed_export_streams(store: LocalStore, stream: bytes, rule: str) -> None:
    # a valid first record, then the bad one: all or nothing
    first = _record("/nix/store/" + H2 + "-first", [], _nar_of(b"first"))
    before = store_entries(store)
    with pytest.raises((ExportFormatError, StoreError, NarError)) as ei:
        store.import_paths(first + stream)
    assert ei.value.rule == rule, str(ei.value)
    assert store.all_paths() == []
    assert store_entries(store) == before


def _add_contents(store: LocalStore, path: str, contents: bytes) -> PathInfo:
    """Add a regular file with ``contents`` at ``path`` (e.g. an input-addressed output)."""
    nar = b"".join(F.enc_str(x) for x in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"))
    info = PathInfo(path=path, nar_hash=Hash("sha256", hashlib.sha256(nar).digest()), nar_size=len(nar))
    return store.add_nar(info, nar)


def test_closure_include_outputs(store: LocalStore) -> None:
    drv = store.add_text("hello.drv", HELLO_DRV.encode())  # the output path its contents give
    out = _add_contents(store, "/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello", b"hi\n")
    assert store.query_derivation_outputs(drv.path) == {"out": out.path}
    assert store.closure([drv.path]) == [drv.path]
    assert set(store.closure([drv.path], include_outputs=True)) == {drv.path, out.path}


def test_batch_registers_together_or_not_at_all(store: LocalStore) -> None:
    with pytest.raises(RuntimeError), store.batch():
        a = store.add_text("a", b"a")
        assert not store.db.is_valid(a.path)  # registered only at the end of the batch
        raise RuntimeError("boom")
    assert store.all_paths() == [] and store_entries(store) == set()
    with store.batch():
        a = store.add_text("a", b"a")
        b = store.add_text("b", b"b", [a.path])  # refers to a path of the same batch
    assert store.query_references(b.path) == {a.path}


def test_verify_and_repair(store: LocalStore) -> None:
    a, b = _chain(store, 2)
    os.chmod(store.physical(a), 0o644)
    with open(store.physical(a), "ab") as f:
        f.write(b"tamper")
    assert store.verify() == []
    probs = store.verify(check_contents=True)
    assert [p["path"] for p in probs] == [a] and probs[0]["problem"] == "corrupt"
    probs = store.verify(check_contents=True, repair=True)
    # a has a valid (intact) referrer b: not repairable, both kept
    assert probs[0]["repair"] == "not repairable" and b in probs[0]["reason"]
    assert sorted(store.all_paths()) == sorted([a, b])
    store._remove_object(b)
    store = reopen(store)  # drop this process's temp roots (they hold a too)
    assert store.verify(check_contents=True, repair=True)[0]["repair"] == "invalidated"
    assert store.all_paths() == []
    c = store.add_text("c", b"c")
    os.chmod(store.real_store_dir, 0o755)
    os.unlink(store.physical(c.path))
    assert store.verify() == [{"path": c.path, "problem": "missing"}]


def test_case_hack_remembered(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "r", case_hack=True)
    s.close()
    s = LocalStore(tmp_path / "r")
    assert s.case_hack
    s.close()
    with pytest.raises(StoreError) as ei:
        LocalStore(tmp_path / "r", case_hack=False)
    assert ei.value.rule == "case-hack-mismatch"


def test_case_hack_store_round_trip(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    (t / "Makefile").write_bytes(b"1")
    nar = b""
    plain = LocalStore(tmp_path / "plain", case_hack=False)
    info = plain.add_path(t)
    nar = b"".join(bytes(c) for c in plain.nar_chunks(info.path))
    s = LocalStore(tmp_path / "ci", case_hack=True)
    s.add_nar(info, nar)
    assert b"".join(bytes(c) for c in s.nar_chunks(info.path)) == nar
    assert s.verify(check_contents=True) == []
    plain.close()
    s.close()


# -- GC ---------------------------------------------------------------------------------------


def reopen(store: LocalStore) -> LocalStore:
    store.close()
    return LocalStore(store.root, case_hack=False)


def test_own_temp_roots_protect(store: LocalStore) -> None:
    p = store.add_text("fresh", b"f").path
    assert collect_garbage(store).deleted == []  # added by this process: temp-rooted while it lives
    assert store.is_valid(p)


def test_gc_roots_of_every_kind(store: LocalStore, tmp_path: Path) -> None:
    a, b = _chain(store, 2)  # b -> a
    c = store.add_text("c", b"c").path
    d = store.add_text("d", b"d").path
    e = store.add_text("e", b"e").path
    dead = store.add_text("dead", b"x").path
    store = reopen(store)  # this process's temp roots (everything it added) end with the store
    gcroots = Path(store.state_dir) / "gcroots"
    os.symlink(b + "/sub/does-not-exist", gcroots / "direct")  # a sub-path roots the object
    (gcroots / "dir").mkdir()
    (gcroots / "dir" / c.rsplit("/", 1)[1]).write_bytes(b"")  # regular-file root, by name
    link = tmp_path / "result"
    add_indirect_root(store, str(link), d)
    os.symlink("../../store", gcroots / "relative")  # not a root
    store.temp_root(e)
    roots = find_roots(store, runtime=False)
    assert {b, c, d} <= roots.paths()
    assert e in roots.temp
    res = collect_garbage(store)
    assert res.deleted == [dead]
    assert set(store.all_paths()) == {a, b, c, d, e}
    os.unlink(link)  # dropping the indirect root's link frees d and removes the stale auto link
    res = collect_garbage(store)
    assert res.deleted == [d]
    assert os.listdir(gcroots / "auto") == []


def test_delete_refuses_live(store: LocalStore) -> None:
    a, b = _chain(store, 2)
    store = reopen(store)
    with pytest.raises(StoreError) as ei:
        collect_garbage(store, paths=[a])
    assert ei.value.rule == "referenced"
    os.symlink(b, Path(store.state_dir) / "gcroots" / "r")
    with pytest.raises(StoreError) as ei:
        collect_garbage(store, paths=[a, b])
    assert ei.value.rule == "alive"
    os.unlink(Path(store.state_dir) / "gcroots" / "r")
    assert sorted(collect_garbage(store, paths=[a, b]).deleted) == sorted([a, b])


def test_gc_sweeps_leftovers(store: LocalStore) -> None:
    leftover = Path(store.real_store_dir) / ("1" * 32 + "-nartool-tmp")
    leftover.mkdir()
    (leftover / "f").write_bytes(b"x")
    (Path(store.real_store_dir) / ("2" * 32 + "-gone.lock")).write_bytes(b"")
    keep = store.add_text("keep", b"k").path
    store = reopen(store)
    os.symlink(keep, Path(store.state_dir) / "gcroots" / "k")
    collect_garbage(store)
    assert store_entries(store) == {keep.rsplit("/", 1)[1]}


def test_gc_max_freed(store: LocalStore) -> None:
    for i in range(10):
        store.add_text(f"x{i}", b"y" * 1000)
    store = reopen(store)
    res = collect_garbage(store, max_freed=2500)
    assert 2 <= len(res.deleted) < 10


def test_gc_tolerates_unreadable_roots(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable entry while scanning roots is reported, not fatal, and the other roots count.
    (As root nothing is unreadable by mode bits, so the failing readlink is simulated.)"""
    a = store.add_text("a", b"a").path
    b = store.add_text("b", b"b").path
    store = reopen(store)
    gcroots = Path(store.state_dir) / "gcroots"
    os.symlink(a, gcroots / "good")
    os.symlink(b, gcroots / "unreadable")
    real = os.readlink

    def readlink(p: str | os.PathLike[str], *args: object, **kw: object) -> str:
        if os.fspath(p).endswith("unreadable"):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real(p, *args, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(os, "readlink", readlink)
    res = collect_garbage(store, action="print-dead")
    assert any("unreadable" in p and "Permission denied" in p for p in res.problems)
    assert a in res.live and b in res.dead


# -- hash text forms --------------------------------------------------------------------------

_ABC = {"sha256": "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=", "md5": "kAFQmDzST7DWlj99KOF/cg==",
        "sha1": "qZk+NkcGgWq6PiVxeFDCbJzQ2J0="}
_S = _ABC["sha256"].rstrip("=")
HASH_TEXTS = [
    f"sha256-{_S}=", f"sha256-{_S}", f"sha256-{_S}==", f"sha256-{_S}===", f"sha256-{_S}=junk!",
    f"sha256-{_S}\n", f"sha256-{_S[:20]}\n{_S[20:]}", f"sha256-{_S[:42]}3",  # spare bits are ignored
    f"sha256-{_S[:42]}", f"sha256-{_S}A", f"sha256-={_S}", f"sha256-{_S[:20]}={_S[20:]}", f"sha256-{_S}*",
    f"sha256-{_S} =", "sha256-", f"sha256:{_S}", f"sha256:{_S}=", f"sha256:{_S[:42]}==",
    "md5-kAFQmDzST7DWlj99KOF/cg", "md5-kAFQmDzST7DWlj99KOF/cg=", "md5-kAFQmDzST7DWlj99KOF/cg====",
    "sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0", "sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0==",
    "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
    "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a ",
]


@pytest.mark.nix
def test_hash_parse_accepts_what_nix_accepts(nix) -> None:  # type: ignore[no-untyped-def]
    """SRI padding missing, short or long (and the rest of Nix 2.8's base64 leniency): accepted
    exactly when ``nix hash to-base16`` accepts it, with the same digest."""
    for text in HASH_TEXTS:
        r = nix("nix", "hash", "to-base16", text, check=False)
        try:
            ours: str | None = Hash.parse(text).base16
        except HashFormatError:
            ours = None
        theirs = r.stdout.decode().strip() if r.returncode == 0 else None
        assert ours == theirs, (text, r.stderr)


def test_hash_sri_padding_and_text_forms() -> None:
    h = SHA(b"abc")
    for text in (f"sha256-{_S}", f"sha256-{_S}=", f"sha256-{_S}=="):
        assert Hash.parse(text) == h
    for bad in (f"sha256-{_S[:42]}", f"sha256:{_S}", f"sha256-{_S}?"):
        with pytest.raises(HashFormatError):
            Hash.parse(bad)
    assert str(h) == "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
    assert f"{h}" == str(h) and "\\x" not in repr(h)
    assert eval(repr(h), {"Hash": Hash}) == h  # noqa: S307


def test_closure_query_matches_the_level_by_level_walk(store: LocalStore) -> None:
    # LocalStore answers a closure with one recursive query; the generic walk is the reference
    from nartool.store.base import BaseStore

    chain = _chain(store, 30)
    side = store.add_text("side", b"side", [chain[3], chain[7]]).path
    lone = store.add_text("lone", b"lone").path
    for start in ([chain[-1]], [side], [side, lone], [chain[0]], [lone, chain[10], side]):
        fast = store.query_closure_set(start)
        slow = BaseStore.query_closure_set(store, start)
        assert fast == slow
        assert set(fast) == set(store.closure(start)) == store.query_closure_paths(start)
    assert len(store.query_closure_set([chain[-1]])) == 30
    assert store.query_path_infos([side, lone, "/nix/store/" + "0" * 32 + "-missing"]) == {
        side: store.path_info(side), lone: store.path_info(lone)}
    for query in (store.query_closure_set, store.query_closure_paths):
        with pytest.raises(StoreError) as e:
            query([side, "/nix/store/" + "0" * 32 + "-missing"])
        assert e.value.rule == "invalid-path"
