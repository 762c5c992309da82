"""``nartool cache serve``: HTTP semantics, uploads and their checks, concurrency, shutdown,
and real Nix 2.8 (and current Nix when installed) substituting from it and copying to it."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nartool.cache.narinfo import NarInfo
from nartool.cache.server import CacheServer, ServeOptions
from nartool.hashes import Hash
from nartool.remote.testing import dir_nar, make_info
from nartool.store.local import LocalStore
from nartool.store.signing import SecretKey

from .conftest import NIX_STORE, require
from .helpers import cli_argv, cli_env, nix_env
from .test_cache_http import Closure, make_conf, make_key, start_serve, valid_paths

NIX = shutil.which("nix")


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    return make_key(tmp_path)


@pytest.fixture
def conf(tmp_path: Path, key: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return make_conf(tmp_path, key, monkeypatch)


@pytest.fixture
def closure(tmp_path: Path) -> Closure:
    return Closure(tmp_path / "src", tmp_path / "work")


def req(url: str, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


@pytest.fixture
def served(tmp_path: Path, closure: Closure, key: tuple[Path, str]) -> Iterator[CacheServer]:
    """An in-process server (faster than a subprocess, same code), signing with the test key."""
    from nartool.store.signing import load_secret_key

    store = LocalStore(closure.root)
    srv = CacheServer(store, ("127.0.0.1", 0), ServeOptions(sign_keys=[load_secret_key(key[0])]))
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(10)
    store.close()


def test_routes_etag_cache_control(served: CacheServer, closure: Closure, key: tuple[Path, str]) -> None:
    st, h, body = req(served.url, "GET", "/nix-cache-info")
    assert st == 200 and body == b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
    hp = closure.hash_part(closure.top)
    st, h, body = req(served.url, "GET", f"/{hp}.narinfo")
    assert st == 200 and h["content-type"] == "text/x-nix-narinfo" and "max-age" in h["cache-control"]
    ni = NarInfo.parse(body)
    assert ni.store_path == closure.top and ni.sigs and ni.sigs[0].startswith("test-http-1:")
    from nartool.store.signing import PublicKey

    assert PublicKey.parse(key[1]).verify(ni.fingerprint(), ni.sigs[0])
    st2, h2, _ = req(served.url, "GET", f"/{hp}.narinfo", {"If-None-Match": h["etag"]})
    assert st2 == 304 and h2["etag"] == h["etag"]
    st3, h3, body3 = req(served.url, "HEAD", f"/{hp}.narinfo")
    assert st3 == 200 and body3 == b"" and h3["content-length"] == str(len(body))
    # the NAR: streamed from the store, its hash matches
    st, h, nar = req(served.url, "GET", "/" + ni.url)
    assert st == 200 and "immutable" in h["cache-control"] and int(h["content-length"]) == ni.nar_size
    assert Hash("sha256", hashlib.sha256(nar).digest()) == Hash.parse(ni.nar_hash)
    st, _, _ = req(served.url, "GET", "/" + ni.url, {"If-None-Match": h["etag"]})
    assert st == 304
    # 404s are not to be cached
    st, h, _ = req(served.url, "GET", "/" + "0" * 32 + ".narinfo")
    assert st == 404 and h["cache-control"] == "no-store"
    st, h, _ = req(served.url, "GET", "/nar/" + hp + "-" + "0" * 52 + ".nar")
    assert st == 404
    st, _, _ = req(served.url, "GET", "/../etc/passwd")
    assert st == 404
    # the listing
    st, h, ls = req(served.url, "GET", f"/{closure.hash_part(closure.tree)}.ls")
    assert st == 200 and ls.startswith(b'{"version":1,"root":{"type":"directory"') and b"narOffset" in ls
    # read-only: PUT is 501, as a static server answers
    st, _, _ = req(served.url, "PUT", "/nix-cache-info", body=b"StoreDir: /nix/store\n")
    assert st == 501


def test_zstd_nar_on_the_fly(tmp_path: Path, closure: Closure) -> None:
    import zstandard

    with LocalStore(closure.root) as store:
        srv = CacheServer(store, ("127.0.0.1", 0), ServeOptions(compression="zstd"))
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            hp = closure.hash_part(closure.tree)
            _, _, body = req(srv.url, "GET", f"/{hp}.narinfo")
            ni = NarInfo.parse(body)
            assert ni.compression == "zstd" and ni.file_hash is None and ni.file_size is None
            st, h, data = req(srv.url, "GET", "/" + ni.url)
            assert st == 200 and h.get("transfer-encoding") == "chunked"
            nar = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            assert len(nar) == ni.nar_size and data[:4] == b"\x28\xb5\x2f\xfd"
            assert Hash("sha256", hashlib.sha256(nar).digest()) == Hash.parse(ni.nar_hash)
        finally:
            srv.shutdown()
            srv.server_close()


def test_concurrent_clients(served: CacheServer, closure: Closure) -> None:
    errors: list[str] = []
    hps = [closure.hash_part(p) for p in closure.paths]

    def client(n: int) -> None:
        host, port = served.url.removeprefix("http://").rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            for i in range(10):
                hp = hps[(n + i) % len(hps)]
                c.request("GET", f"/{hp}.narinfo")
                r = c.getresponse()
                body = r.read()
                if r.status != 200:
                    errors.append(f"{hp}: {r.status}")
                    continue
                ni = NarInfo.parse(body)
                c.request("GET", "/" + ni.url)
                r = c.getresponse()
                nar = r.read()
                if Hash("sha256", hashlib.sha256(nar).digest()) != Hash.parse(ni.nar_hash):
                    errors.append(f"{hp}: bad NAR")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


# -- uploads ----------------------------------------------------------------------------------


def _writable(tmp_path: Path, **kw: object) -> tuple[CacheServer, LocalStore, threading.Thread]:
    store = LocalStore(tmp_path / "dst")
    srv = CacheServer(store, ("127.0.0.1", 0), ServeOptions(writable=True, **kw))  # type: ignore[arg-type]
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return srv, store, t


def _upload_one(url: str, name: str, *, signer: SecretKey | None = None, tamper: str = "",
                headers: dict[str, str] | None = None) -> tuple[int, int, bytes, str]:
    """Upload an input-addressed path (NAR then narinfo); returns the statuses, the narinfo
    response body and the path."""
    nar = dir_nar([("f", name.encode() * 100)])
    info = make_info(name, nar, [])
    h = Hash("sha256", hashlib.sha256(nar).digest())
    ni = NarInfo.from_path_info(info, url=f"nar/{h.nix32}.nar", compression="none", file_hash=h.prefixed("nix32"),
                                file_size=len(nar))
    if tamper == "nar":  # only the NAR hash can tell
        ni.file_hash, ni.file_size = None, None
    if signer is not None:
        ni.sign(signer)
    if tamper in ("nar", "nar-filehash"):
        nar = nar.replace(name.encode(), name.upper().encode(), 1)
    st1, _, _ = req(url, "PUT", "/" + ni.url, {"Content-Type": "application/x-nix-nar", **(headers or {})}, nar)
    text = ni.render()
    if tamper == "narinfo":
        text = text.replace(b"NarSize: ", b"NarSize: 1")
    hp = info.path.split("/")[-1][:32]
    st2, _, body = req(url, "PUT", f"/{hp}.narinfo", {"Content-Type": "text/x-nix-narinfo", **(headers or {})}, text)
    return st1, st2, body, info.path


def test_upload_signed_registered_unsigned_refused(tmp_path: Path) -> None:
    sk = SecretKey.generate("uploader-1")
    srv, store, t = _writable(tmp_path, trusted_keys={"uploader-1": sk.public_key()})
    try:
        st1, st2, body, path = _upload_one(srv.url, "signed", signer=sk)
        assert (st1, st2) == (204, 204), body
        assert store.is_valid(path)
        st, _, got = req(srv.url, "GET", f"/{path.split('/')[-1][:32]}.narinfo")
        assert st == 200 and NarInfo.parse(got).store_path == path
        st1, st2, body, path = _upload_one(srv.url, "unsigned")
        assert st2 == 403 and b"lacks a signature" in body
        assert not store.is_valid(path)
        st1, st2, body, path = _upload_one(srv.url, "tampered", signer=sk, tamper="nar")
        assert st2 == 400 and b"cannot add" in body and b"hash" in body
        assert not store.is_valid(path)
        st1, st2, body, path = _upload_one(srv.url, "tampered2", signer=sk, tamper="nar-filehash")
        assert st2 == 400 and b"FileHash" in body
        assert not store.is_valid(path)
        st1, st2, body, path = _upload_one(srv.url, "badinfo", signer=sk, tamper="narinfo")
        assert st2 in (400, 403)
        assert not store.is_valid(path)
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


def test_upload_only_from_trusted_clients(tmp_path: Path) -> None:
    srv, store, t = _writable(tmp_path, upload_from=("10.0.0.0/8",), require_sigs=False)
    try:
        st1, st2, body, path = _upload_one(srv.url, "remote")
        assert st1 == 403 and st2 == 403 and b"not allowed" in body
        assert not store.is_valid(path)
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


def test_upload_password(tmp_path: Path) -> None:
    srv, store, t = _writable(tmp_path, upload_password="s3cret", require_sigs=False)
    try:
        st1, st2, body, path = _upload_one(srv.url, "nopass")
        assert st1 == 401 and st2 == 401
        bad = {"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()}
        assert _upload_one(srv.url, "wrongpass", headers=bad)[1] == 401
        good = {"Authorization": "Basic " + base64.b64encode(b"u:s3cret").decode()}
        st1, st2, body, path = _upload_one(srv.url, "withpass", headers=good)
        assert (st1, st2) == (204, 204), body
        assert store.is_valid(path)
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


def test_narinfo_without_nar_refused(tmp_path: Path) -> None:
    srv, store, t = _writable(tmp_path, require_sigs=False)
    try:
        nar = dir_nar([("f", b"x")])
        info = make_info("orphan", nar, [])
        ni = NarInfo.from_path_info(info, url="nar/" + "1" * 52 + ".nar", compression="none", file_hash=None,
                                    file_size=None)
        st, _, body = req(srv.url, "PUT", f"/{info.path.split('/')[-1][:32]}.narinfo", body=ni.render())
        assert st == 400 and b"was not uploaded" in body
        st, _, body = req(srv.url, "PUT", f"/{'2' * 32}.narinfo", body=ni.render())
        assert st == 400 and b"another path" in body
        assert store.all_paths() == []
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


# -- shutdown -------------------------------------------------------------------------------


def test_sigterm_finishes_running_download(tmp_path: Path, conf: dict[str, str]) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "data").write_bytes(os.urandom(24 << 20))
    with LocalStore(tmp_path / "s") as st:
        p = st.add_path(big)
    s = start_serve(tmp_path, tmp_path / "s", conf)
    hp = p.path.split("/")[-1][:32]
    _, _, body = req(s.url, "GET", f"/{hp}.narinfo")
    ni = NarInfo.parse(body)
    host, port = s.url.removeprefix("http://").rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    idle = http.client.HTTPConnection(host, int(port), timeout=30)
    idle.request("GET", "/nix-cache-info")
    idle.getresponse().read()  # a kept-alive idle connection must not hold the shutdown up
    c.request("GET", "/" + ni.url)
    r = c.getresponse()
    first = r.read(1 << 20)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    rest = r.read()
    assert len(first) + len(rest) == ni.nar_size
    assert s.proc.wait(10) == 0  # one SIGTERM: a clean exit once the download is done
    c.close()
    idle.close()


# -- real Nix -------------------------------------------------------------------------------


def _nix_env(tmp_path: Path) -> dict[str, str]:
    env = nix_env()
    env["XDG_CACHE_HOME"] = str(tmp_path / "nix-cache")  # Nix's own narinfo cache, per test
    return env


def _nix(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    require("NIX", NIX_STORE is not None and NIX is not None, "Nix not installed: install Debian's nix-bin")
    argv = list(args)
    if argv[0] == "nix":
        argv[1:1] = ["--extra-experimental-features", "nix-command"]
    return subprocess.run(argv, capture_output=True, text=True, env=_nix_env(tmp_path), timeout=300)


@pytest.mark.nix
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_nix_substitutes_from_cache_serve(tmp_path: Path, closure: Closure, key: tuple[Path, str],
                                          conf: dict[str, str], compression: str) -> None:
    require("NIX", NIX_STORE is not None, "Nix not installed: install Debian's nix-bin")
    s = start_serve(tmp_path, closure.root, conf, "--sign-key", str(key[0]), "--compression", compression)
    try:
        root = tmp_path / "nixroot"
        r = _nix(tmp_path, "nix-store", "--store", str(root), "-r", closure.top, "--option", "substituters", s.url,
                 "--option", "trusted-public-keys", key[1])
        assert r.returncode == 0, r.stderr
        assert f"copying path '{closure.tree}' from '{s.url}'" in r.stderr
        r = _nix(tmp_path, "nix-store", "--store", str(root), "--verify-path", closure.top)
        assert r.returncode == 0, r.stderr
        root2 = tmp_path / "nixroot2"
        r = _nix(tmp_path, "nix", "copy", "--store", str(root2), "--from", s.url, closure.top,
                 "--option", "trusted-public-keys", key[1])
        assert r.returncode == 0, r.stderr
        assert (root2 / closure.tree.lstrip("/") / "hello").read_text() == "hello\n"
    finally:
        assert s.stop() == 0


@pytest.mark.nix
def test_nix_copy_to_writable_cache_serve(tmp_path: Path, closure: Closure, key: tuple[Path, str],
                                          conf: dict[str, str]) -> None:
    require("NIX", NIX_STORE is not None and NIX is not None, "Nix not installed: install Debian's nix-bin")
    # a Nix store holding the closure, signed by the test key (which the server trusts)
    from nartool.store.ops import copy_paths
    from nartool.store.uri import open_store

    nixsrc = tmp_path / "nixsrc"
    with LocalStore(closure.root) as src, open_store(f"file://{tmp_path}/fc?secret-key={key[0]}") as fc:
        copy_paths(src, fc, [closure.top])
    r = _nix(tmp_path, "nix", "copy", "--store", str(nixsrc), "--from", f"file://{tmp_path}/fc", closure.top,
             "--option", "trusted-public-keys", key[1])
    assert r.returncode == 0, r.stderr
    empty = tmp_path / "served"
    LocalStore(empty).close()
    s = start_serve(tmp_path, empty, conf, "--writable")
    try:
        r2 = _nix(tmp_path, "nix", "copy", "--store", str(nixsrc), "--to", s.url, closure.top)
        assert r2.returncode == 0, r2.stderr
        assert valid_paths(empty) == set(closure.paths)
        # the same user's Nix substitutes right after (from the narinfos it remembers uploading)
        root = tmp_path / "nixroot"
        r2 = _nix(tmp_path, "nix-store", "--store", str(root), "-r", closure.top, "--option", "substituters", s.url,
                  "--option", "require-sigs", "false")
        assert r2.returncode == 0, r2.stderr
        # and an unsigned input-addressed path is refused (require-sigs on the server)
        nar = dir_nar([("f", b"unsigned")])
        info = make_info("unsigned-ia", nar, [])
        with LocalStore(tmp_path / "ia") as st:
            from nartool.remote.testing import add_path

            add_path(st, info, nar)
        exp = subprocess.run(cli_argv(
            "--store", tmp_path / "ia", "store", "export", info.path), capture_output=True,
            env=cli_env(conf), check=True).stdout
        ri = subprocess.run(["nix-store", "--store", str(nixsrc), "--import"], input=exp, capture_output=True,
                            env=_nix_env(tmp_path), timeout=120)
        assert ri.returncode == 0, ri.stderr
        r2 = _nix(tmp_path, "nix", "copy", "--store", str(nixsrc), "--to", s.url, info.path)
        assert r2.returncode != 0 and "403" in r2.stderr
        assert info.path not in valid_paths(empty)
    finally:
        assert s.stop() == 0


def _modern() -> str | None:
    tool = Path(__file__).resolve().parent.parent / ".ci" / "modern-nix"
    if os.environ.get("NARTOOL_MODERN_NIX"):
        return os.environ["NARTOOL_MODERN_NIX"]
    if tool.exists() and Path("/var/cache/nartool-modern-nix").exists():
        return str(tool)
    return None


@pytest.mark.nix
def test_modern_nix_substitutes_from_cache_serve(tmp_path: Path, closure: Closure, key: tuple[Path, str],
                                                 conf: dict[str, str]) -> None:
    modern = _modern()
    if modern is None:
        pytest.skip("current Nix not installed (bash .ci/modern-nix install)")
    s = start_serve(tmp_path, closure.root, conf, "--sign-key", str(key[0]), "--compression", "zstd")
    try:
        root = tmp_path / "modern-root"
        r = subprocess.run([modern, "nix", "--extra-experimental-features", "nix-command", "copy", "--store",
                            f"local?root={root}", "--from", s.url, closure.top, "--option", "trusted-public-keys",
                            key[1]], capture_output=True, text=True, env=_nix_env(tmp_path), timeout=300)
        assert r.returncode == 0, r.stderr
        assert (root / closure.tree.lstrip("/") / "hello").read_text() == "hello\n"
    finally:
        assert s.stop() == 0


@pytest.mark.nix
def test_modern_nix_copies_to_writable_cache_serve(tmp_path: Path, conf: dict[str, str]) -> None:
    """Current Nix uploads with nix copy --to, then substitutes from the narinfo it remembers
    uploading (it insists on the compression that narinfo names: the kept upload is served)."""
    modern = _modern()
    if modern is None:
        pytest.skip("current Nix not installed (bash .ci/modern-nix install)")
    env = _nix_env(tmp_path)
    t = tmp_path / "t"
    t.mkdir()
    (t / "f").write_text("modern upload\n")
    src = f"local?root={tmp_path / 'msrc'}"
    r = subprocess.run([modern, "nix-store", "--store", src, "--add", str(t)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    served = tmp_path / "served"
    LocalStore(served).close()
    s = start_serve(tmp_path, served, conf, "--writable")
    try:
        nix = [modern, "nix", "--extra-experimental-features", "nix-command"]
        r = subprocess.run([*nix, "copy", "--store", src, "--to", s.url, path], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert path in valid_paths(served)
        r = subprocess.run([*nix, "copy", "--store", f"local?root={tmp_path / 'mdst'}", "--from", s.url, path],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "mdst" / path.lstrip("/") / "f").read_text() == "modern upload\n"
    finally:
        assert s.stop() == 0


def test_alias_of_valid_path_served_in_its_compression(tmp_path: Path) -> None:
    """A narinfo uploaded for a path the store has already (no NAR sent) makes its NAR name
    answer too, compressed as that narinfo says (current Nix insists on it)."""
    import lzma

    srv, store, t = _writable(tmp_path, require_sigs=False)
    try:
        st1, st2, body, path = _upload_one(srv.url, "first")
        assert (st1, st2) == (204, 204), body
        info = store.path_info(path)
        ni = NarInfo.from_path_info(info, url="nar/" + "3" * 52 + ".nar.xz", compression="xz", file_hash=None,
                                    file_size=None)
        st, _, body = req(srv.url, "PUT", f"/{path.split('/')[-1][:32]}.narinfo", body=ni.render())
        assert st == 204, body
        st, h, data = req(srv.url, "GET", "/" + ni.url)
        assert st == 200 and h["transfer-encoding"] == "chunked"
        nar = lzma.decompress(data)
        assert Hash("sha256", hashlib.sha256(nar).digest()) == info.nar_hash
        # the kept upload is served byte for byte under its own name
        nar0 = dir_nar([("f", b"first" * 100)])
        h0 = Hash("sha256", hashlib.sha256(nar0).digest())
        st, h, data = req(srv.url, "GET", f"/nar/{h0.nix32}.nar")
        assert st == 200 and data == nar0 and h["content-length"] == str(len(nar0))
        st, _, _ = req(srv.url, "GET", "/nar/" + "4" * 52 + ".nar.xz")
        assert st == 404
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


def test_build_logs(served: CacheServer, closure: Closure) -> None:
    import bz2

    drvs = Path(closure.root) / "nix" / "var" / "log" / "nix" / "drvs"
    plain = "a" * 32 + "-plain.drv"
    packed = "b" * 32 + "-packed.drv"
    (drvs / plain[:2]).mkdir(parents=True)
    (drvs / plain[:2] / plain[2:]).write_text("plain log\n")
    (drvs / packed[:2]).mkdir(parents=True)
    (drvs / packed[:2] / (packed[2:] + ".bz2")).write_bytes(bz2.compress(b"packed log\n"))
    st, h, body = req(served.url, "GET", f"/log/{plain}")
    assert st == 200 and body == b"plain log\n" and h["content-type"].startswith("text/plain")
    st2, _, _ = req(served.url, "GET", f"/log/{plain}", {"If-None-Match": h["etag"]})
    assert st2 == 304
    st, _, body = req(served.url, "GET", f"/log/{packed}")
    assert st == 200 and body == b"packed log\n"
    st, _, _ = req(served.url, "GET", "/log/" + "c" * 32 + "-none.drv")
    assert st == 404


def test_client_revalidates_against_cache_serve(served: CacheServer, closure: Closure, tmp_path: Path) -> None:
    """nartool's lookup cache and cache serve's ETags together: a stale narinfo costs a 304."""
    from nartool.cache.http import HttpBackend
    from nartool.cache.lookup import Answer, Entry, LookupCache

    now = [0.0]
    b = HttpBackend(served.url, lookups=LookupCache(str(tmp_path / "lc.sqlite"), positive_ttl=10,
                                                     clock=lambda: now[0]), tries=1)
    seen: list[str] = []
    fetch = b._fetch_lookup

    def spy(key: str, prev: Entry | None) -> Answer:
        a = fetch(key, prev)
        seen.append(a.status)
        return a

    b._fetch_lookup = spy  # type: ignore[method-assign]
    key = closure.hash_part(closure.top) + ".narinfo"
    first = b.get_bytes(key)
    now[0] = 11
    assert b.get_bytes(key) == first
    assert seen == ["ok", "not-modified"]
    b.close()


def test_serves_any_store_a_file_cache(tmp_path: Path, closure: Closure, conf: dict[str, str]) -> None:
    """cache serve in front of another kind of store (a file:// binary cache): narinfos and
    NARs come through it (one request at a time for stores not shared between threads)."""
    from nartool.store.ops import copy_paths
    from nartool.store.uri import open_store

    with LocalStore(closure.root) as src, open_store(f"file://{tmp_path}/fc?compression=xz") as fc:
        copy_paths(src, fc, [closure.top])
    store = open_store(f"file://{tmp_path}/fc")
    srv = CacheServer(store, ("127.0.0.1", 0), ServeOptions())
    assert srv.store_lock is not None
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        dst = tmp_path / "dst"
        with LocalStore(dst) as d, open_store(srv.url) as remote:
            copy_paths(remote, d, [closure.top])
        assert valid_paths(dst) == set(closure.paths)
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()
