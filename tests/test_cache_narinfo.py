"""The narinfo format (nartool.cache.narinfo): Nix's rendering byte for byte, strict parsing."""

from __future__ import annotations

import pytest

from nartool.cache.narinfo import NarInfo, NarInfoError, check_url, nar_url
from nartool.hashes import Hash
from nartool.store.signing import SecretKey, verify_path_info
from nartool.store.types import PathInfo

#: written by Nix 2.8 (`nix copy --to file://`, signed), from the format's documentation
NIX_NARINFO = b"""StorePath: /nix/store/lakrn620x2s8rl7l7gzdif7jl4rppggx-demo-top
URL: nar/0xkh31y4jz656rmmcyh0sc8222w1nwy627j9hpf8wwyasc4b3qv1.nar.xz
Compression: xz
FileHash: sha256:0xkh31y4jz656rmmcyh0sc8222w1nwy627j9hpf8wwyasc4b3qv1
FileSize: 200684
NarHash: sha256:1ppiqvxmfawakd0qsm61slaf5w99jjlyqhl5rzakfhvxr5y2x8h8
NarSize: 200768
References: 72cp05l6xbjghphnsql5y7hk5br4in9j-demo-mid ih91g2mwkfpr54r9z3n7gfxajc29ynzz-demo-leaf
Deriver: mb1f8arc43873ff4vmq7zv1fazp053g5-demo-top.drv
Sig: demo-cache-1:5hLw51aXs3JhJ4x5+cQcPbNknslv2qqoOhZdiPBGoxGLjh/l2PiN+2nmTF+Eunkq4JZkmMbWy/z0/sG/+WXiCw==
"""

NO_REFS = (b"StorePath: /nix/store/8j2n8m8sxx51kxq3j4dgdaybzmpvmqb4-tree\n"
           b"URL: nar/1ayx96vkh9pp4hkwr5zyk61cif3h497q18j17f9235irrcx8lq2k.nar\n"
           b"Compression: none\n"
           b"FileHash: sha256:1ayx96vkh9pp4hkwr5zyk61cif3h497q18j17f9235irrcx8lq2k\n"
           b"FileSize: 216\n"
           b"NarHash: sha256:1ayx96vkh9pp4hkwr5zyk61cif3h497q18j17f9235irrcx8lq2k\n"
           b"NarSize: 216\n"
           b"References: \n"  # Nix writes the blank even when there are none
           b"CA: fixed:r:sha256:1ayx96vkh9pp4hkwr5zyk61cif3h497q18j17f9235irrcx8lq2k\n")


def test_round_trip_of_what_nix_writes() -> None:
    for text in (NIX_NARINFO, NO_REFS):
        ni = NarInfo.parse(text, where="x.narinfo")
        assert ni.render() == text
    ni = NarInfo.parse(NIX_NARINFO)
    assert ni.references == ["/nix/store/72cp05l6xbjghphnsql5y7hk5br4in9j-demo-mid",
                             "/nix/store/ih91g2mwkfpr54r9z3n7gfxajc29ynzz-demo-leaf"]
    assert ni.deriver == "/nix/store/mb1f8arc43873ff4vmq7zv1fazp053g5-demo-top.drv"
    assert (ni.compression, ni.file_size, ni.nar_size) == ("xz", 200684, 200768)
    assert ni.fingerprint() == (b"1;/nix/store/lakrn620x2s8rl7l7gzdif7jl4rppggx-demo-top;"
                                b"sha256:1ppiqvxmfawakd0qsm61slaf5w99jjlyqhl5rzakfhvxr5y2x8h8;200768;"
                                b"/nix/store/72cp05l6xbjghphnsql5y7hk5br4in9j-demo-mid,"
                                b"/nix/store/ih91g2mwkfpr54r9z3n7gfxajc29ynzz-demo-leaf")
    assert NarInfo.parse(NO_REFS).references == []


def test_lenient_where_nix_is_and_the_output_is_canonical() -> None:
    # Compression absent means bzip2; unknown-deriver means none; unknown fields are ignored;
    # unsorted references and signatures come out sorted, as Nix writes them
    text = NIX_NARINFO.replace(b"Compression: xz\n", b"").replace(
        b"Deriver: mb1f8arc43873ff4vmq7zv1fazp053g5-demo-top.drv", b"Deriver: unknown-deriver").replace(
        b"72cp05l6xbjghphnsql5y7hk5br4in9j-demo-mid ih91g2mwkfpr54r9z3n7gfxajc29ynzz-demo-leaf",
        b"ih91g2mwkfpr54r9z3n7gfxajc29ynzz-demo-leaf 72cp05l6xbjghphnsql5y7hk5br4in9j-demo-mid") + b"Future: 1\n"
    ni = NarInfo.parse(text)
    assert ni.compression == "bzip2" and ni.deriver is None
    out = ni.render()
    assert b"Compression: bzip2\n" in out and b"Deriver" not in out and b"Future" not in out
    assert b"References: 72cp05l6xbjghphnsql5y7hk5br4in9j-demo-mid ih91g2mwkfpr54r9z3n7gfxajc29ynzz" in out
    # base16 hashes are accepted and written as Nix writes them (nix32)
    h = Hash.parse("sha256:1ppiqvxmfawakd0qsm61slaf5w99jjlyqhl5rzakfhvxr5y2x8h8")
    b16 = NIX_NARINFO.replace(b"sha256:1ppiqvxmfawakd0qsm61slaf5w99jjlyqhl5rzakfhvxr5y2x8h8",
                              h.prefixed("base16").encode())
    assert NarInfo.parse(b16).render() == NIX_NARINFO
    # no FileHash/FileSize (nix-serve, harmonia on the fly) is fine, and not invented on output
    bare = b"".join(line for line in NIX_NARINFO.splitlines(True) if not line.startswith((b"FileHash", b"FileSize")))
    ni = NarInfo.parse(bare)
    assert ni.file_hash is None and ni.file_size is None and ni.render() == bare


GOOD = NIX_NARINFO


def _drop(field: bytes) -> bytes:
    return b"".join(line for line in GOOD.splitlines(True) if not line.startswith(field + b":"))


MALFORMED: dict[str, tuple[bytes, str, str | None]] = {
    # name: (narinfo, rule, field)
    "missing-narhash": (_drop(b"NarHash"), "missing-field", "NarHash"),
    "missing-storepath": (_drop(b"StorePath"), "missing-field", "StorePath"),
    "missing-url": (_drop(b"URL"), "missing-field", "URL"),
    "missing-narsize": (_drop(b"NarSize"), "missing-field", "NarSize"),
    "garbage": (b"\x00\x01garbage\n", "bad-line", None),
    "html": (b"<html><body>Not found</body></html>\n", "bad-line", None),
    "empty": (b"", "empty", None),
    "no-final-newline": (GOOD[:-1], "no-final-newline", None),
    "crlf": (GOOD.replace(b"\n", b"\r\n"), "crlf", None),
    "not-utf8": (GOOD.replace(b"Compression: xz", b"Compression: \xff"), "not-utf8", None),
    "narsize-zero": (GOOD.replace(b"NarSize: 200768", b"NarSize: 0"), "bad-size", "NarSize"),
    "narsize-negative": (GOOD.replace(b"NarSize: 200768", b"NarSize: -1"), "bad-size", "NarSize"),
    "narsize-junk": (GOOD.replace(b"NarSize: 200768", b"NarSize: 12k"), "bad-size", "NarSize"),
    "filesize-plus": (GOOD.replace(b"FileSize: 200684", b"FileSize: +200684"), "bad-size", "FileSize"),
    "narhash-bad": (GOOD.replace(b"NarHash: sha256:1pp", b"NarHash: sha256:!pp"), "bad-hash", "NarHash"),
    "narhash-md5": (GOOD.replace(b"NarHash: sha256:1ppiqvxmfawakd0qsm61slaf5w99jjlyqhl5rzakfhvxr5y2x8h8",
                                 b"NarHash: md5:00000000000000000000000000000000"), "bad-hash", "NarHash"),
    "filehash-bare": (GOOD.replace(b"FileHash: sha256:", b"FileHash: "), "bad-hash", "FileHash"),
    "storepath-bad": (GOOD.replace(b"StorePath: /nix/store/lakrn", b"StorePath: /nix/stor/lakrn"), "bad-store-path",
                      "StorePath"),
    "storepath-space": (GOOD.replace(b"-demo-top\n", b"-demo top\n", 1), "bad-store-path", "StorePath"),
    "reference-bad": (GOOD.replace(b"References: 72cp", b"References: ../etc"), "bad-reference", "References"),
    "reference-twice": (GOOD.replace(b"ih91g2mwkfpr54r9z3n7gfxajc29ynzz-demo-leaf",
                                     b"72cp05l6xbjghphnsql5y7hk5br4in9j-demo-mid"), "bad-reference", "References"),
    "references-twice": (GOOD + b"References: \n", "duplicate-field", "References"),
    "ca-twice": (NO_REFS + b"CA: fixed:r:sha256:1ayx96vkh9pp4hkwr5zyk61cif3h497q18j17f9235irrcx8lq2k\n",
                 "duplicate-field", "CA"),
    "storepath-twice": (GOOD + GOOD.splitlines(True)[0], "duplicate-field", "StorePath"),
    "ca-bad": (NO_REFS.replace(b"CA: fixed:r:", b"CA: fixed:q:"), "bad-ca", "CA"),
    "url-escapes": (GOOD.replace(b"URL: nar/", b"URL: nar/../../"), "bad-url", "URL"),
    "url-absolute": (GOOD.replace(b"URL: nar/", b"URL: /etc/"), "bad-url", "URL"),
    "url-remote": (GOOD.replace(b"URL: nar/", b"URL: http://evil/"), "bad-url", "URL"),
    "compression-unknown": (GOOD.replace(b"Compression: xz", b"Compression: rar"), "bad-compression", "Compression"),
    "deriver-bad": (GOOD.replace(b"Deriver: mb1f", b"Deriver: /mb1f"), "bad-deriver", "Deriver"),
    "sig-no-name": (GOOD.replace(b"Sig: demo-cache-1:", b"Sig: "), "bad-signature", "Sig"),
    "no-blank-after-colon": (GOOD.replace(b"NarSize: ", b"NarSize:"), "bad-line", None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_is_refused_with_field_and_line(case: str) -> None:
    data, rule, field = MALFORMED[case]
    with pytest.raises(NarInfoError) as ei:
        NarInfo.parse(data, where="lakrn620x2s8rl7l7gzdif7jl4rppggx.narinfo")
    e = ei.value
    assert e.rule == rule, str(e)
    assert e.field == field, str(e)
    assert str(e).startswith("NAR info file 'lakrn620x2s8rl7l7gzdif7jl4rppggx.narinfo' is corrupt: ")
    if rule not in ("missing-field", "empty", "too-large", "not-utf8"):
        assert e.line is not None and f"line {e.line}:" in str(e)


def test_too_large_refused_before_parsing() -> None:
    with pytest.raises(NarInfoError) as ei:
        NarInfo.parse(GOOD + b"X: " + b"a" * (16 << 20) + b"\n")
    assert ei.value.rule == "too-large"


def test_path_info_conversion_signing_and_url() -> None:
    key = SecretKey.generate("t-1")
    ni = NarInfo.parse(NIX_NARINFO)
    info = ni.to_path_info()
    assert isinstance(info, PathInfo) and info.path == ni.store_path and info.nar_size == 200768
    back = NarInfo.from_path_info(info, url=ni.url, compression="xz", file_hash=ni.file_hash, file_size=ni.file_size)
    assert back.render() == NIX_NARINFO
    back.sigs = []
    back.sign(key)
    back.sign(key)  # deterministic: once
    assert len(back.sigs) == 1 and verify_path_info(back.to_path_info(), [key.public_key()])
    fh = Hash.parse("sha256:0xkh31y4jz656rmmcyh0sc8222w1nwy627j9hpf8wwyasc4b3qv1")
    assert nar_url(fh, "xz") == ni.url
    assert nar_url(fh, "gzip").endswith(".nar") and nar_url(fh, "zstd").endswith(".nar.zst")
    assert nar_url(fh, "bzip2").endswith(".nar.bz2") and nar_url(fh, "none").endswith(".nar")
    assert check_url("nar/x.nar.xz") is None
    for bad in ("", "/x", "a/../b", "a//b", "x?y", "a\\b", "http://x/y", "a b"):
        assert check_url(bad), bad
