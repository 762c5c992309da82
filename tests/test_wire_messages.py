"""The serve protocol's messages (nartool/remote/messages.py): write→read round trips, and
byte-for-byte agreement with what real Nix 2.8 sent in the recorded sessions
(tests/fixtures/serve)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nartool.errors import ProtocolError
from nartool.hashes import Hash
from nartool.nar.source import ByteSource
from nartool.remote import messages as M
from nartool.remote import wire as W

SD = "/nix/store"
FIXTURES = Path(__file__).parent / "fixtures" / "serve"
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"

names = st.text("abcdefghijklmnopqrstuvwxyz0123456789+-._?=", min_size=1, max_size=40).filter(
    lambda s: not s.startswith("."))
store_paths = st.builds(lambda h, n: f"{SD}/{h}-{n}", st.text(NIX32, min_size=32, max_size=32), names)
hashes = st.binary(min_size=32, max_size=32).map(lambda d: Hash("sha256", d))
sigs = st.frozensets(st.text("abcdefghijklmnopqrstuvwxyz.-:0123456789+/=", min_size=1, max_size=60), max_size=3)
cas = st.one_of(st.none(), hashes.map(lambda h: "fixed:r:sha256:" + h.nix32), hashes.map(lambda h: "text:" + h.prefixed()))
u64s = st.integers(0, 2**64 - 1)


def _encode(write: Callable[[W.Writer], object]) -> bytes:
    out = io.BytesIO()
    w = W.Writer(out)
    write(w)
    w.flush()
    return out.getvalue()


def _src(data: bytes) -> ByteSource:
    return ByteSource(io.BytesIO(data), "test input")


# -- round trips ----------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(store_paths, st.one_of(st.none(), store_paths), st.frozensets(store_paths, max_size=4), u64s, u64s,
       hashes, cas, sigs, st.sampled_from([3, 4, 5, 7]))
def test_path_info_record_round_trip(path: str, deriver: str | None, refs: frozenset[str], dl: int, size: int,
                                     h: Hash, ca: str | None, sg: frozenset[str], minor: int) -> None:
    if minor < 4:
        rec = M.PathInfoRecord(path, deriver, refs, dl, size)
    else:
        rec = M.PathInfoRecord(path, deriver, refs, dl, size, h, ca, sg)
    data = _encode(_reply_writer([rec], minor))
    src = _src(data)
    assert M.PathInfoRecord.read(src, SD, minor) == rec
    assert M.PathInfoRecord.read(src, SD, minor) is None
    assert src.at_eof()


@settings(max_examples=80, deadline=None)
@given(store_paths, st.one_of(st.none(), store_paths), hashes, st.frozensets(store_paths, max_size=4), u64s,
       u64s, st.booleans(), sigs, cas)
def test_add_to_store_nar_header_round_trip(path: str, deriver: str | None, h: Hash, refs: frozenset[str],
                                            reg: int, size: int, ultimate: bool, sg: frozenset[str],
                                            ca: str | None) -> None:
    hdr = M.AddToStoreNarHeader(path, deriver, h, refs, reg, size, ultimate, sg, ca)
    src = _src(_encode(hdr.write))
    assert M.AddToStoreNarHeader.read(src, SD) == hdr
    assert src.at_eof()
    assert M.AddToStoreNarHeader.from_info(hdr.to_info()) == hdr


@settings(max_examples=80, deadline=None)
@given(store_paths, hashes, u64s, st.frozensets(store_paths, max_size=4), sigs, cas)
def test_check_importable_entry_round_trip(path: str, h: Hash, size: int, refs: frozenset[str],
                                           sg: frozenset[str], ca: str | None) -> None:
    e = M.CheckImportableEntry(path, h, size, refs, sg, ca)
    src = _src(_encode(e.write))
    assert M.CheckImportableEntry.read(src, SD) == e
    assert src.at_eof()
    assert M.CheckImportableEntry.from_info(e.to_info()) == e


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(list(M.BuildStatus)), st.text(max_size=50), st.integers(0, 2**32 - 1), st.booleans(),
       u64s, u64s, st.lists(st.tuples(st.text(min_size=1, max_size=20), st.text(max_size=60)), max_size=3,
                           unique_by=lambda t: t[0]),
       st.sampled_from([2, 3, 5, 6, 7]))
def test_build_result_round_trip(status: M.BuildStatus, msg: str, times: int, nondet: bool, start: int, stop: int,
                                 outs: list[tuple[str, str]], minor: int) -> None:
    full = M.BuildResult(int(status), msg, times, nondet, start, stop, tuple(sorted(outs)))
    src = _src(_encode(lambda w: M.write_build_result(w, full, minor)))
    got = M.read_build_result(src, minor)
    assert src.at_eof()
    if minor >= 6:
        assert got == full
    elif minor >= 3:
        assert got == M.BuildResult(int(status), msg, times, nondet, start, stop)
    else:
        assert got == M.BuildResult(int(status), msg)


@settings(max_examples=40, deadline=None)
@given(u64s, u64s, u64s, st.integers(0, 2**32 - 1), st.booleans(), st.booleans(), st.sampled_from([0, 2, 3, 6, 7]))
def test_build_settings_round_trip(silent: int, timeout: int, log: int, repeat: int, enforce: bool, keep: bool,
                                   minor: int) -> None:
    bs = M.BuildSettings(silent, timeout, log, repeat, enforce, keep)
    src = _src(_encode(lambda w: bs.write(w, minor)))
    got = M.BuildSettings.read(src, minor)
    assert src.at_eof()
    want = M.BuildSettings(silent, timeout, log if minor >= 2 else 0, repeat if minor >= 3 else 0,
                           enforce and minor >= 3, keep and minor >= 7)
    assert got == want


@settings(max_examples=40, deadline=None)
@given(store_paths, st.lists(st.tuples(names, store_paths), max_size=3, unique_by=lambda t: t[0]),
       st.frozensets(store_paths, max_size=3), st.lists(st.text(max_size=20), max_size=3),
       st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=30), max_size=4))
def test_build_derivation_request_round_trip(drv_path: str, outs: list[tuple[str, str]], srcs: frozenset[str],
                                             args: list[str], env: dict[str, str]) -> None:
    from nartool.store.derivation import BasicDerivation

    drv = BasicDerivation(sorted((n, p, "", "") for n, p in outs), sorted(srcs, key=str.encode), "x86_64-linux",
                          "/bin/sh", args, sorted(env.items()))
    req = M.BuildDerivationRequest(drv_path, drv, M.BuildSettings(1, 2, 3, 0, False, True))
    data = _encode(lambda w: req.write(w, 7))
    src = _src(data)
    assert M.BuildDerivationRequest.read(src, SD, 7) == req
    assert src.at_eof()
    # the derivation part is exactly BasicDerivation's own wire form
    assert BasicDerivation.from_wire(drv.to_wire())[0] == drv
    assert drv.to_wire() in data


def test_build_status_values_match_the_doc() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "serve-protocol.md").read_text()
    listed = doc[doc.index("Status values: "):].split(".\n", 1)[0].replace("\n", " ")
    for s in M.BuildStatus:
        camel = "".join(part.capitalize() for part in s.name.split("_"))
        assert f"{s.value} {camel}" in listed, (s, listed)


def test_record_without_hash_is_refused_from_minor_4() -> None:
    rec = M.PathInfoRecord(f"{SD}/{'a' * 32}-x", None, frozenset(), 1, 1)
    data = _encode(lambda w: rec.write(w, 3)) + _encode(lambda w: w.str_("").str_("").u64(0))
    with pytest.raises(ProtocolError, match="NAR hash is now mandatory"):
        M.PathInfoRecord.read(_src(data), SD, 4)


def test_bad_hash_in_header_is_reported_at_its_offset() -> None:
    h = Hash("sha256", bytes(32))
    hdr = M.AddToStoreNarHeader(f"{SD}/{'a' * 32}-x", None, h, frozenset(), 0, 8, False, frozenset(), None)
    data = _encode(hdr.write).replace(h.base16.encode(), b"z" * 64)
    with pytest.raises(ProtocolError, match="invalid narHash") as ei:
        M.AddToStoreNarHeader.read(_src(data), SD)
    assert ei.value.offset == 56 + 8  # after the framed path and the empty deriver


# -- the recorded real-Nix sessions ----------------------------------------------------------

def _candidates(data: bytes) -> list[int]:
    """Offsets of framed strings that hold a store path (where a message may start)."""
    out = []
    i = data.find(SD.encode() + b"/")
    while i >= 0:
        if i >= 8:
            n = int.from_bytes(data[i - 8 : i], "little")
            if 0 < n < 300:
                out.append(i - 8)
        i = data.find(SD.encode() + b"/", i + 1)
    return out


def _reply_writer(records: list[M.PathInfoRecord], minor: int) -> Callable[[W.Writer], None]:
    def write(w: W.Writer) -> None:
        for r in records:
            r.write(w, minor)
        M.PathInfoRecord.write_end(w)

    return write


def _client_minor(name: str) -> int:
    c2s = (FIXTURES / f"{name}.c2s").read_bytes()
    return W.version_minor(int.from_bytes(c2s[8:16], "little"))


@pytest.mark.parametrize("name", ["queries", "queries-v203", "copy-from", "nix-copy-from"])
def test_query_path_infos_reply_of_real_nix_round_trips_byte_for_byte(name: str) -> None:
    """Every QueryPathInfos reply Nix 2.8's server sent: reading it and writing it again gives
    the recorded bytes (path order, downloadSize, the narHash encoding, sigs)."""
    s2c = (FIXTURES / f"{name}.s2c").read_bytes()
    minor = _client_minor(name)
    replies = 0
    for start in _candidates(s2c):
        src = ByteSource(io.BytesIO(s2c[start:]), "transcript")
        records = []
        try:
            while (rec := M.PathInfoRecord.read(src, SD, minor)) is not None:
                records.append(rec)
        except ProtocolError:
            continue
        if not records:
            continue
        end = start + src.offset
        again = _encode(_reply_writer(records, minor))
        assert again == s2c[start:end]
        replies += 1
    assert replies, f"no QueryPathInfos reply found in {name}.s2c"


def _headers(c2s: bytes) -> list[tuple[int, int, M.AddToStoreNarHeader]]:
    """Every AddToStoreNar header in a client's transcript, with its byte range."""
    cmd = W.enc_u64(W.CMD_ADD_TO_STORE_NAR)
    out = []
    for start in _candidates(c2s):
        if c2s[start - 8 : start] != cmd:
            continue
        src = ByteSource(io.BytesIO(c2s[start:]), "transcript")
        hdr = M.AddToStoreNarHeader.read(src, SD)
        out.append((start, start + src.offset, hdr))
    return out


def test_add_to_store_nar_header_of_real_nix_round_trips_byte_for_byte() -> None:
    """Every AddToStoreNar header Nix 2.8's nix-copy-closure sent re-encodes to the recorded bytes
    (base16 narHash, sorted references and sigs, ultimate 0)."""
    c2s = (FIXTURES / "copy-to.c2s").read_bytes()
    headers = _headers(c2s)
    assert len(headers) == 4  # bars-dep, bars-mid, bars-top, f.txt
    for start, end, hdr in headers:
        assert _encode(hdr.write) == c2s[start:end]
        assert hdr.nar_size > 0 and not hdr.ultimate


def test_add_to_store_nar_headers_of_the_crafted_session_are_read() -> None:
    """The crafted add-nar session sends its narHash in two encodings (base16, sha256:nix32):
    both read to the same message, which writes base16."""
    c2s = (FIXTURES / "add-nar.c2s").read_bytes()
    headers = _headers(c2s)
    assert len(headers) >= 2
    for start, end, hdr in headers:
        again = _encode(hdr.write)
        assert M.AddToStoreNarHeader.read(_src(again), SD) == hdr
        if c2s[start:end] != again:
            assert hdr.nar_hash.prefixed("nix32").encode() in c2s[start:end]


# -- the byte source's public contract (shared by the wire, NAR and export readers) ----------

def test_byte_source_public_contract() -> None:
    data = b"abc\0\0\0\0\0" + b"xy\0\0\0\0\0\1" + (7).to_bytes(8, "little") + b"rest"
    f = io.BytesIO(data)
    src = ByteSource(f, "t")
    assert src.read_padded(3) == (b"abc", None)
    assert src.read_padded(2) == (b"xy", b"\0\0\0\0\0\1")  # non-zero padding handed back to the caller
    assert src.buffered() == len(data) - 16
    assert src.read_u64() == 7
    buf, i = src.window(4)
    assert buf[i : i + 4] == b"rest"
    src.consume_to(i + 1)
    assert src.offset == src.offset_at(i + 1) == 25
    assert src.match(b"es") and not src.match(b"zz") and src.offset == 27
    assert src.take_buffered() == b"t" and src.buffered() == 0 and src.offset == 28
    assert src.raw_read(10) == b""  # the underlying reader, at its end


def test_framed_string_errors_of_each_reader_come_from_the_shared_reader() -> None:
    """The wire, the NAR reader and the export reader all reject non-zero padding."""
    from nartool.errors import ExportFormatError, NarError
    from nartool.nar.reader import NarReader
    from nartool.store.export import read_str as export_read_str

    bad = (2).to_bytes(8, "little") + b"ab\0\0\0\0\0\1"
    with pytest.raises(ProtocolError, match="non-zero padding"):
        W.read_bytes(_src(bad), "f")
    with pytest.raises(ExportFormatError, match="padding"):
        export_read_str(_src(bad), "name")
    nar = (13).to_bytes(8, "little") + b"nix-archive-1\0\0\1"
    with pytest.raises(NarError):
        list(NarReader(io.BytesIO(nar)))
