"""``file://`` binary caches (nartool.cache): byte-identical to Nix 2.8's, read both ways with real
Nix, every check a reader must make (malformed narinfos, NARs not matching them, signatures,
decompression bounded), the URL parameters, and the CLI."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from nartool.cache.narinfo import NarInfo, nar_url
from nartool.cache.store import BinaryCacheStore
from nartool.errors import NarError, StoreError
from nartool.hashes import Hash
from nartool.store import ops
from nartool.store.local import LocalStore
from nartool.store.signing import PublicKey, load_secret_key
from nartool.store.uri import open_store

from .cachekit import FIXTURES, KEY_SEC, make_closure, pub_key, run_nix, tree_files
from .helpers import run_cli

GOLDEN = FIXTURES / "golden"
#: the libzstd (ZSTD_versionNumber) of the Nix 2.8 that made the golden files
GOLDEN_ZSTD_VERSION = 10504
#: URL parameters of each golden cache ({key}: the test key file)
VARIANTS = {
    "xz-listing-signed": "compression=xz&write-nar-listing=1&secret-key={key}",
    "zstd": "compression=zstd",
    "bzip2-signed": "compression=bzip2&secret-key={key}",
    "none-listing": "compression=none&write-nar-listing=1",
}


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("closure")
    return d / "store", make_closure(d / "store", d)


def keys() -> dict[str, PublicKey]:
    k = PublicKey.parse(pub_key())
    return {k.name: k}


def nartool_push(root: Path, dest: Path, params: str, paths: list[str]) -> BinaryCacheStore:
    cache = open_store(f"file://{dest}?{params.format(key=KEY_SEC)}")
    assert isinstance(cache, BinaryCacheStore)
    with LocalStore(root) as src:
        ops.copy_paths(src, cache, paths)
    return cache


def nix_push(root: Path, dest: Path, params: str, paths: list[str]) -> None:
    run_nix("nix", "copy", "--store", root, "--to", f"file://{dest}?{params.format(key=KEY_SEC)}", *paths)


# -- byte identity -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_identical_to_golden_files_made_by_nix(closure: tuple[Path, dict[str, str]], tmp_path: Path,
                                               variant: str) -> None:
    """Offline: the files of ``nix copy --to file://`` (Nix 2.8, kept in tests/fixtures) for the
    same closure and key. ``NARTOOL_REGEN_CACHE_GOLDEN=1`` remakes them with real Nix."""
    root, paths = closure
    gold = GOLDEN / variant
    if os.environ.get("NARTOOL_REGEN_CACHE_GOLDEN") == "1":
        shutil.rmtree(gold, ignore_errors=True)
        nix_push(root, gold, VARIANTS[variant], [paths["ia"]])
    assert gold.is_dir(), "golden files missing: run with NARTOOL_REGEN_CACHE_GOLDEN=1 (needs Nix 2.8)"
    if "zstd" in variant:
        # zstd's bytes depend on the library version: the goldens were made by Nix linked to 1.5.4
        from nartool.cache.store import SystemZstd

        lib = SystemZstd.library()
        if lib is None or lib.ZSTD_versionNumber() != GOLDEN_ZSTD_VERSION:
            pytest.skip(f"zstd golden files need the system libzstd {GOLDEN_ZSTD_VERSION} (Debian 12's, as Nix's)")
    nartool_push(root, tmp_path / "c", VARIANTS[variant], [paths["ia"]])
    want, got = tree_files(gold), tree_files(tmp_path / "c")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    assert {p.name for p in (tmp_path / "c").iterdir() if p.is_dir()} >= {"nar", "log", "realisations"}


@pytest.mark.parametrize("params", ["compression=xz&write-nar-listing=1&secret-key={key}", "compression=zstd",
                                    "compression=bzip2&write-nar-listing=1", "compression=none&secret-key={key}",
                                    "compression=zstd&compression-level=9", "compression=xz&compression-level=2",
                                    "compression=bzip2&compression-level=3"])
def test_identical_to_nix_live(closure: tuple[Path, dict[str, str]], tmp_path: Path, params: str) -> None:
    root, paths = closure
    nix_push(root, tmp_path / "nix", params, [paths["ia"]])
    nartool_push(root, tmp_path / "nt", params, [paths["ia"]])
    assert tree_files(tmp_path / "nt") == tree_files(tmp_path / "nix")
    assert sorted(p.name for p in (tmp_path / "nt").rglob("*") if p.is_dir()) == \
        sorted(p.name for p in (tmp_path / "nix").rglob("*") if p.is_dir())


def test_existing_signatures_kept_and_merged_as_nix(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A path already signed in the store: both tools write its signatures plus the new one, sorted."""
    from nartool.store.signing import SecretKey, sign_path_info

    root, paths = closure
    store = tmp_path / "store"
    shutil.copytree(root, store, symlinks=True)
    other = SecretKey.generate("aaa-other-1")
    with LocalStore(store) as st:
        st.add_signatures(paths["ia"], [sign_path_info(st.path_info(paths["ia"]), other)])
    nix_push(store, tmp_path / "nix", "compression=zstd&secret-key={key}", [paths["ia"]])
    nartool_push(store, tmp_path / "nt", "compression=zstd&secret-key={key}", [paths["ia"]])
    assert tree_files(tmp_path / "nt") == tree_files(tmp_path / "nix")
    ni = NarInfo.parse((tmp_path / "nt" / f"{paths['ia'][11:43]}.narinfo").read_bytes())
    assert [s.split(":")[0] for s in sorted(ni.sigs)] == ["aaa-other-1", "nartool-test-cache-1"]


def test_gzip_differs_from_nix_only_in_the_header_time(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    nix_push(root, tmp_path / "nix", "compression=gzip", [paths["ia"]])
    nartool_push(root, tmp_path / "nt", "compression=gzip", [paths["ia"]])
    for p in paths.values():
        hp = p[11:43]
        a = NarInfo.parse((tmp_path / "nix" / f"{hp}.narinfo").read_bytes())
        b = NarInfo.parse((tmp_path / "nt" / f"{hp}.narinfo").read_bytes())
        fa, fb = (tmp_path / "nix" / a.url).read_bytes(), (tmp_path / "nt" / b.url).read_bytes()
        assert a.url.endswith(".nar") and b.url.endswith(".nar") and a.compression == b.compression == "gzip"
        assert fa[:4] + fa[8:] == fb[:4] + fb[8:]  # bytes 4..7: the write time
        assert gzip.decompress(fa) == gzip.decompress(fb)
        a.file_hash, a.file_size, a.url = b.file_hash, b.file_size, b.url
        assert a.render() == b.render()


# -- real Nix reads what nartool writes ------------------------------------------------------------


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2", "gzip", "none"])
def test_nix_substitutes_and_copies_from_a_nartool_cache(closure: tuple[Path, dict[str, str]], tmp_path: Path,
                                                        compression: str) -> None:
    root, paths = closure
    cache = tmp_path / "cache"
    nartool_push(root, cache, f"compression={compression}&secret-key={{key}}&write-nar-listing=1", [paths["ia"]])
    opts = ["--option", "substituters", f"file://{cache}", "--option", "trusted-public-keys", pub_key()]
    r = run_nix("nix-store", "--store", tmp_path / "r1", "-r", paths["ia"], *opts)
    assert paths["ia"] in r.stdout
    run_nix("nix-store", "--store", tmp_path / "r1", "--verify", "--check-contents")
    q = run_nix("nix-store", "--store", tmp_path / "r1", "-qR", paths["ia"]).stdout.split()
    assert sorted(q) == sorted(paths.values())
    run_nix("nix", "copy", "--from", f"file://{cache}", "--store", tmp_path / "r2", paths["ia"], *opts)
    run_nix("nix-store", "--store", tmp_path / "r2", "--verify", "--check-contents")
    with LocalStore(root) as a, LocalStore(tmp_path / "r2") as b:
        for p in paths.values():
            assert b"".join(a.nar_chunks(p)) == b"".join(b.nar_chunks(p))


def test_nix_refuses_an_unsigned_nartool_cache_as_we_do(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """The oracle agrees with our policy: without a trusted signature neither substitutes."""
    root, paths = closure
    cache = tmp_path / "cache"
    nartool_push(root, cache, "compression=zstd", [paths["ia"]])
    r = run_nix("nix-store", "--store", tmp_path / "r", "-r", paths["ia"], "--option", "substituters",
                f"file://{cache}", check=False)
    assert r.returncode != 0 and "not signed by any of the keys" in r.stderr
    with LocalStore(tmp_path / "mine") as dst, pytest.raises(StoreError) as ei:
        ops.copy_paths(cache_store(cache), dst, [paths["ia"]], check_sigs=True, trusted_keys={})
    assert ei.value.rule == "untrusted"


def cache_store(d: Path, params: str = "") -> BinaryCacheStore:
    st = open_store(f"file://{d}" + (f"?{params}" if params else ""))
    assert isinstance(st, BinaryCacheStore)
    return st


# -- nartool reads what Nix writes -----------------------------------------------------------------


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2", "gzip", "none"])
def test_nartool_copies_from_a_nix_cache(closure: tuple[Path, dict[str, str]], tmp_path: Path,
                                         compression: str) -> None:
    root, paths = closure
    cache = tmp_path / "cache"
    nix_push(root, cache, f"compression={compression}&secret-key={{key}}&write-nar-listing=1", [paths["ia"]])
    with LocalStore(tmp_path / "dst") as dst, LocalStore(root) as src:
        r = ops.copy_paths(cache_store(cache), dst, [paths["ia"]], check_sigs=True, trusted_keys=keys())
        assert sorted(r.copied) == sorted(paths.values())
        for p in paths.values():
            assert b"".join(dst.nar_chunks(p)) == b"".join(src.nar_chunks(p))
            a, b = src.path_info(p), dst.path_info(p)
            assert (a.references, a.deriver, a.ca) == (b.references, b.deriver, b.ca)
        assert len(dst.path_info(paths["ia"]).sigs) == 1


# -- reading checks -------------------------------------------------------------------------------


def _resign(cache: Path, path: str, edit: Callable[[NarInfo], None]) -> None:
    f = cache / f"{path[11:43]}.narinfo"
    ni = NarInfo.parse(f.read_bytes())
    edit(ni)
    ni.sigs = []
    ni.sign(load_secret_key(KEY_SEC))
    f.write_bytes(ni.render())


def _edit_text(cache: Path, path: str, fn: Callable[[bytes], bytes]) -> None:
    f = cache / f"{path[11:43]}.narinfo"
    f.write_bytes(fn(f.read_bytes()))


def _nar_file(cache: Path, path: str) -> Path:
    return cache / NarInfo.parse((cache / f"{path[11:43]}.narinfo").read_bytes()).url


def _replace_nar(cache: Path, path: str, data: bytes, compression: str) -> None:
    fh = Hash("sha256", __import__("hashlib").sha256(data).digest())
    url = nar_url(fh, compression)
    (cache / url).write_bytes(data)

    def edit(ni: NarInfo) -> None:
        ni.url, ni.compression, ni.file_hash, ni.file_size = url, compression, fh.prefixed("nix32"), len(data)

    _resign(cache, path, edit)


def _write(f: Path, data: bytes) -> None:
    f.write_bytes(data)


def _flip_middle(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x55
    f.write_bytes(bytes(b))


def _bomb(cache: Path, path: str) -> None:
    data = zstandard.ZstdCompressor().compress(b"\0" * (256 << 20))
    _replace_nar(cache, path, data, "zstd")


#: corruption of the top path's narinfo or NAR → the rule the copy fails with (None: accepted),
#: and whether the failure comes before anything is transferred
CORRUPTIONS: dict[str, tuple[Callable[[Path, str], None], str | None, bool]] = {
    "missing-narhash": (lambda c, p: _edit_text(c, p, lambda t: b"".join(
        x for x in t.splitlines(True) if not x.startswith(b"NarHash"))), "missing-field", True),
    "garbage": (lambda c, p: _edit_text(c, p, lambda t: b"PNG garbage\n"), "bad-line", True),
    "no-final-newline": (lambda c, p: _edit_text(c, p, lambda t: t[:-1]), "no-final-newline", True),
    "crlf": (lambda c, p: _edit_text(c, p, lambda t: t.replace(b"\n", b"\r\n")), "crlf", True),
    "wrong-narhash-resigned": (lambda c, p: _resign(c, p, lambda n: setattr(
        n, "nar_hash", "sha256:" + "0" * 52)), "hash-mismatch", False),
    "wrong-narsize-resigned": (lambda c, p: _resign(c, p, lambda n: setattr(n, "nar_size", n.nar_size + 8)),
                               "size-mismatch", False),
    "wrong-filehash": (lambda c, p: _resign(c, p, lambda n: setattr(n, "file_hash", "sha256:" + "1" * 52)),
                       "file-hash-mismatch", False),
    "wrong-filesize": (lambda c, p: _resign(c, p, lambda n: setattr(n, "file_size", (n.file_size or 0) + 1)),
                       "file-size-mismatch", False),
    "nar-deleted": (lambda c, p: _nar_file(c, p).unlink(), "nar-missing", False),
    "nar-corrupted": (lambda c, p: _flip_middle(_nar_file(c, p)), "file-hash-mismatch", False),
    "nar-corrupted-filehash-fixed": (lambda c, p: _replace_nar(c, p, _corrupt_xz(_nar_file(c, p)), "xz"),
                                     "corrupt-nar", False),
    "nar-of-another-path": (lambda c, p: _replace_nar(c, p, lzma.compress(b"nix-archive-1"), "xz"),
                            "size-mismatch", False),
    "decompression-bomb": (_bomb, "size-mismatch", False),
    "storepath-other-name": (lambda c, p: _edit_text(c, p, lambda t: t.replace(b"-ia\n", b"-other\n", 1)),
                             "narinfo-path-mismatch", True),
    "url-escapes": (lambda c, p: _edit_text(c, p, lambda t: t.replace(b"URL: nar/", b"URL: nar/../../../etc/")),
                    "bad-url", True),
    "storedir-other": (lambda c, p: _write(c / "nix-cache-info", b"StoreDir: /other/store\n"),
                       "store-dir-mismatch", True),
    "unsigned": (lambda c, p: _edit_text(c, p, lambda t: b"".join(
        x for x in t.splitlines(True) if not x.startswith(b"Sig:"))), "untrusted", True),
    "signed-by-another-key": (lambda c, p: _edit_text(c, p, lambda t: t.replace(
        b"Sig: nartool-test-cache-1:", b"Sig: other-key-1:")), "untrusted", True),
    "signature-of-other-data": (lambda c, p: _edit_text(c, p, lambda t: t.replace(
        b"Deriver: 1111", b"Deriver: 2222")), None, False),  # the deriver is not signed: Nix agrees
    "compression-lies": (lambda c, p: _edit_text(c, p, lambda t: t.replace(b"Compression: xz", b"Compression: zstd")),
                         None, False),
    "compression-absent": (lambda c, p: _edit_text(c, p, lambda t: t.replace(b"Compression: xz\n", b"")), None,
                           False),
}


def _corrupt_xz(f: Path) -> bytes:
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x55
    return bytes(b)


@pytest.fixture(scope="module")
def signed_cache(closure: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, paths = closure
    d = tmp_path_factory.mktemp("signed") / "cache"
    nartool_push(root, d, "compression=xz&secret-key={key}", [paths["ia"]])
    return d


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_cache_refused_and_nothing_bad_registered(closure: tuple[Path, dict[str, str]], signed_cache: Path,
                                                           tmp_path: Path, case: str) -> None:
    _, paths = closure
    cache = tmp_path / "cache"
    shutil.copytree(signed_cache, cache)
    corrupt, rule, up_front = CORRUPTIONS[case]
    corrupt(cache, paths["ia"])
    t0 = time.monotonic()
    with LocalStore(tmp_path / "dst") as dst:
        if rule is None:
            ops.copy_paths(cache_store(cache), dst, [paths["ia"]], check_sigs=True, trusted_keys=keys())
            assert dst.is_valid(paths["ia"])
            return
        with pytest.raises(StoreError) as ei:
            ops.copy_paths(cache_store(cache), dst, [paths["ia"]], check_sigs=True, trusted_keys=keys())
        assert ei.value.rule == rule, str(ei.value)
        assert not dst.is_valid(paths["ia"])
        if up_front:
            assert dst.query_valid_paths(paths.values()) == set()
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("method", ["zstd", "xz", "bzip2", "gzip"])
def test_decompression_is_bounded_in_memory(closure: tuple[Path, dict[str, str]], signed_cache: Path,
                                            tmp_path: Path, method: str) -> None:
    import tracemalloc

    _, paths = closure
    cache = tmp_path / "cache"
    shutil.copytree(signed_cache, cache)
    if method == "zstd":
        _bomb(cache, paths["ia"])  # 256 MiB of zeros
    else:
        zeros = b"\0" * (64 << 20)
        packed = {"xz": lzma.compress, "bzip2": bz2.compress, "gzip": gzip.compress}[method](zeros)
        del zeros
        _replace_nar(cache, paths["ia"], packed, method)
    st = cache_store(cache)
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match="larger than its NarSize"):
            for _ in st.nar_chunks(paths["ia"]):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak


def test_last_chunk_withheld_until_checked(closure: tuple[Path, dict[str, str]], signed_cache: Path,
                                           tmp_path: Path) -> None:
    """A consumer never receives the whole NAR of a file that fails its FileHash."""
    _, paths = closure
    cache = tmp_path / "cache"
    shutil.copytree(signed_cache, cache)
    _resign(cache, paths["tree"], lambda n: setattr(n, "file_hash", "sha256:" + "1" * 52))
    info = cache_store(cache).path_info(paths["tree"])
    got = 0
    with pytest.raises(StoreError) as ei:
        for c in cache_store(cache).nar_chunks(paths["tree"]):
            got += len(c)
    assert ei.value.rule == "file-hash-mismatch" and got < info.nar_size


# -- parameters and the store API --------------------------------------------------------------------


def test_url_parameters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="nartool.cache"):
        st = cache_store(tmp_path / "c", "compression=zstd&foo=1&priority=7&want-mass-query=true&trusted=1"
                                         "&parallel-compression=true&compression-level=5")
    assert "unknown setting 'foo'" in caplog.text
    assert (st.priority, st.want_mass_query, st.trusted) == (7, True, True)
    assert (st.params.compression, st.params.compression_level, st.params.parallel_compression) == ("zstd", 5, True)
    for bad, rule in (("compression=rar", "bad-compression"), ("priority=x", "bad-parameter"),
                      ("write-nar-listing=maybe", "bad-parameter")):
        with pytest.raises(StoreError) as ei:
            cache_store(tmp_path / "c", bad)
        assert ei.value.rule == rule
    with pytest.raises(StoreError) as ei:
        cache_store(tmp_path / "c", f"secret-key={tmp_path / 'none'}")
    assert ei.value.rule == "bad-key"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n")
    st = cache_store(tmp_path / "p")
    assert (st.priority, st.want_mass_query) == (40, True)
    assert cache_store(tmp_path / "p", "priority=3").priority == 3


def test_parallel_zstd_reads_back(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    nartool_push(root, tmp_path / "c", "compression=zstd&parallel-compression=true&compression-level=19",
                 [paths["ia"]])
    with LocalStore(tmp_path / "d") as dst:
        ops.copy_paths(cache_store(tmp_path / "c"), dst, [paths["ia"]])
        assert dst.is_valid(paths["ia"])


def test_push_is_incremental_and_narinfo_last(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    c = nartool_push(root, tmp_path / "c", "compression=zstd", [paths["top"]])
    assert c.query_valid_paths(paths.values()) == {paths["top"], paths["mid"], paths["tree"]}
    with LocalStore(root) as src:
        r = ops.copy_paths(src, cache_store(tmp_path / "c"), [paths["ia"]])
    assert r.copied == [paths["ia"]]
    # a narinfo whose references are missing is never written
    with LocalStore(root) as src:
        info = src.path_info(paths["ia"])
        nar = b"".join(src.nar_chunks(paths["ia"]))
    empty = cache_store(tmp_path / "e")
    with pytest.raises(StoreError) as ei:
        empty.add_nar(info, nar)
    assert ei.value.rule == "invalid-reference" and not list((tmp_path / "e").glob("*.narinfo"))
    # no temporary files are left behind
    assert not [p for p in (tmp_path / "c").rglob(".*")]


def test_build_logs_and_hash_part_lookup(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    c = nartool_push(root, tmp_path / "c", "compression=none", [paths["top"]])
    drv = f"/nix/store/{'1' * 32}-ia.drv"
    assert c.get_build_log(drv) is None
    c.add_build_log(drv, b"built\n")
    assert c.get_build_log(drv) == b"built\n" and (tmp_path / "c" / "log" / f"{'1' * 32}-ia.drv").exists()
    assert c.query_path_from_hash_part(paths["top"][11:43]) == paths["top"]
    assert c.query_path_from_hash_part("0" * 32) is None


# -- the CLI ----------------------------------------------------------------------------------------


def test_cli_copy_to_and_from_a_file_cache(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    uri = f"file://{tmp_path / 'cache'}?compression=zstd&secret-key={KEY_SEC}"
    r = run_cli("--store", root, "copy", "--to", uri, paths["ia"], text=True)
    assert r.returncode == 0, r.stderr
    assert f"copying path '{paths['ia']}' to 'file://{tmp_path / 'cache'}'" in r.stderr
    conf = tmp_path / "nartool.conf"
    conf.write_text("require-sigs = true\n")
    r = run_cli("--store", tmp_path / "back", "copy", "--from", f"file://{tmp_path / 'cache'}", paths["ia"], text=True,
                env={"NARTOOL_CONFIG": str(conf)})
    assert r.returncode == 1 and "lacks a signature by a trusted key" in r.stderr and "Traceback" not in r.stderr
    conf.write_text(f"trusted-public-keys = {pub_key()}\n")
    r = run_cli("--store", tmp_path / "back", "copy", "--from", f"file://{tmp_path / 'cache'}", paths["ia"], text=True,
                env={"NARTOOL_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr
    # read-only store commands work on the cache
    cache = f"file://{tmp_path / 'cache'}"
    q = run_cli("--store", cache, "store", "query", "--requisites", paths["ia"], text=True)
    assert q.returncode == 0, q.stderr
    assert sorted(q.stdout.split()) == sorted(paths.values())
    a = run_cli("--store", cache, "store", "ls", "-R", paths["tree"], text=True)
    b = run_cli("--store", root, "store", "ls", "-R", paths["tree"], text=True)
    assert a.returncode == 0 and a.stdout == b.stdout
    a2 = run_cli("--store", cache, "store", "dump", paths["ia"])
    b2 = run_cli("--store", root, "store", "dump", paths["ia"])
    assert a2.returncode == 0 and a2.stdout == b2.stdout
    # a corrupt narinfo: one clear line, exit 1
    (tmp_path / "cache" / f"{paths['ia'][11:43]}.narinfo").write_bytes(b"garbage")
    r = run_cli("--store", tmp_path / "again", "copy", "--from", cache, paths["ia"], text=True,
                env={"NARTOOL_CONFIG": str(conf)})
    assert r.returncode == 1 and "is corrupt" in r.stderr and "Traceback" not in r.stderr


def test_cli_parameter_diagnostics(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    r = run_cli("--store", root, "copy", "--to", f"file://{tmp_path / 'c'}?compression=zstd&frobnicate=1",
                paths["top"], text=True)
    assert r.returncode == 0 and "warning: unknown setting 'frobnicate'" in r.stderr
    r = run_cli("--store", root, "copy", "--to", f"file://{tmp_path / 'c'}?compression=foo", paths["top"], text=True)
    assert r.returncode == 1 and "unknown compression method 'foo'" in r.stderr


def test_compressions_round_trip_in_process(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    for comp, opener in (("xz", lzma.decompress), ("bzip2", bz2.decompress), ("gzip", gzip.decompress),
                         ("zstd", lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b))):
        c = nartool_push(root, tmp_path / comp, f"compression={comp}", [paths["tree"]])
        ni = c.narinfo(paths["tree"])
        assert ni is not None and ni.compression == comp
        with LocalStore(root) as src:
            assert opener((tmp_path / comp / ni.url).read_bytes()) == b"".join(src.nar_chunks(paths["tree"]))


# -- current Nix, concurrency ---------------------------------------------------------------------------


def test_current_nix_both_ways(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Nix 2.26 (``NARTOOL_MODERN_NIX``) writes the same narinfos and NARs; each reads the other's cache."""
    import subprocess

    from .conftest import require
    from .helpers import nix_env

    modern = os.environ.get("NARTOOL_MODERN_NIX")
    require("MODERN_NIX", bool(modern), "NARTOOL_MODERN_NIX is not set (a command running current Nix)")
    assert modern is not None
    root, paths = closure

    def mnix(*args: str | os.PathLike[str]) -> None:
        r = subprocess.run([*modern.split(), *map(str, args)], capture_output=True, text=True, env=nix_env(),
                           timeout=300)
        assert r.returncode == 0, r.stderr

    params = "compression=zstd&secret-key={key}"
    key = tmp_path / "key.sec"  # current Nix runs in a chroot that shares only /tmp
    shutil.copy(KEY_SEC, key)
    for comp in ("zstd", "none"):
        mnix("nix", "--extra-experimental-features", "nix-command", "copy", "--store", root, "--to",
             f"file://{tmp_path / 'm'}-{comp}?compression={comp}&secret-key={key}", paths["ia"])
    # identical where the compressor's version does not matter (its libzstd is not Debian 12's)
    nartool_push(root, tmp_path / "n-none", "compression=none&secret-key={key}", [paths["ia"]])
    assert tree_files(tmp_path / "n-none") == tree_files(Path(f"{tmp_path / 'm'}-none"))
    nartool_push(root, tmp_path / "n", params, [paths["ia"]])
    with LocalStore(tmp_path / "r1") as dst:
        ops.copy_paths(cache_store(Path(f"{tmp_path / 'm'}-zstd")), dst, [paths["ia"]], check_sigs=True,
                       trusted_keys=keys())
        assert dst.is_valid(paths["ia"])
    mnix("nix-store", "--store", tmp_path / "r2", "-r", paths["ia"], "--option", "substituters",
         f"file://{tmp_path / 'n'}", "--option", "trusted-public-keys", pub_key())
    mnix("nix-store", "--store", tmp_path / "r2", "--verify", "--check-contents")


def test_concurrent_pushes_of_one_closure(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Four processes push the same closure to one cache at once: all succeed and the cache is whole."""
    import subprocess

    from .helpers import cli_argv, cli_env

    root, paths = closure
    uri = f"file://{tmp_path / 'c'}?compression=xz&secret-key={KEY_SEC}&write-nar-listing=1"
    procs = [subprocess.Popen(cli_argv("--store", root, "copy", "--to", uri, paths["ia"]), env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert not [p for p in (tmp_path / "c").rglob(".*")]  # no temporaries left
    nartool_push(root, tmp_path / "one", "compression=xz&secret-key={key}&write-nar-listing=1", [paths["ia"]])
    assert tree_files(tmp_path / "c") == tree_files(tmp_path / "one")


def test_batches_publish_at_the_end_with_narinfos_last(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Inside a batch nothing is visible until it ends (one sync for all files); an error drops
    the block's files unless keep_on_error; commit_pending publishes mid-block."""
    root, paths = closure
    order = [paths["tree"], paths["mid"], paths["top"]]
    with LocalStore(root) as src:
        items = [(src.path_info(p), b"".join(src.nar_chunks(p))) for p in order]
    c = cache_store(tmp_path / "c", "compression=zstd")

    def visible() -> set[str]:
        return {f.name for f in (tmp_path / "c").glob("*.narinfo")}

    with c.batch():
        for info, nar in items:
            c.add_nar(info, nar)
        assert visible() == set() and not list((tmp_path / "c" / "nar").glob("[!.]*"))  # only temporaries
        assert c.is_valid(paths["top"])  # the store itself knows (references of later paths)
    assert len(visible()) == 3 and not [p for p in (tmp_path / "c").rglob(".*")]
    d = cache_store(tmp_path / "d", "compression=zstd")
    with pytest.raises(RuntimeError), d.batch():
        d.add_nar(*items[0])
        raise RuntimeError("interrupted")
    assert not list((tmp_path / "d").glob("*.narinfo")) and not [p for p in (tmp_path / "d").rglob(".*")]
    assert not d.is_valid(paths["tree"])
    e = cache_store(tmp_path / "e", "compression=zstd")
    with pytest.raises(RuntimeError), e.batch(keep_on_error=True):
        e.add_nar(*items[0])
        assert e.commit_pending() == 1 and len(list((tmp_path / "e").glob("*.narinfo"))) == 1
        e.add_nar(*items[1])
        raise RuntimeError("interrupted")
    assert len(list((tmp_path / "e").glob("*.narinfo"))) == 2  # complete ones kept
    assert cache_store(tmp_path / "e").query_valid_paths(order) == set(order[:2])


def test_refused_nar_leaves_nothing(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    with LocalStore(root) as src:
        info = src.path_info(paths["tree"])
        nar = b"".join(src.nar_chunks(paths["tree"]))
    c = cache_store(tmp_path / "c", "compression=xz")
    for bad, rule in ((info.replace(nar_size=info.nar_size + 8), "size-mismatch"),
                      (info.replace(nar_hash=Hash("sha256", bytes(32)), ca=None), "hash-mismatch"),
                      (info.replace(nar_hash=Hash("sha256", bytes(32))), "ca-mismatch")):
        with pytest.raises(StoreError) as ei:
            c.add_nar(bad, nar)
        assert ei.value.rule == rule
    with pytest.raises(NarError):
        c.add_nar(info, nar[:-8])  # truncated
    assert not list((tmp_path / "c").rglob("*.narinfo")) and not [p for p in (tmp_path / "c").rglob(".*")]
    assert not list((tmp_path / "c" / "nar").iterdir())
    c.add_nar(info, nar)
    assert len(list((tmp_path / "c" / "nar").iterdir())) == 1
