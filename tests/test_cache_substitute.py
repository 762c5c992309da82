"""Substituters (nartool.cache.substitute): priority order, signature policy per substituter,
dead substituters skipped once, and the commands that use them (`copy -s`, `copy-closure -s`)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from nartool.cache.store import BinaryCacheStore
from nartool.cache.substitute import Substituters, forget_dead_substituters, substitute_paths
from nartool.config import Config
from nartool.store import ops
from nartool.store.local import LocalStore
from nartool.store.uri import open_store

from .cachekit import KEY_SEC, make_closure, pub_key
from .helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("closure")
    return d / "store", make_closure(d / "store", d)


def push(root: Path, dest: Path, params: str, paths: list[str]) -> str:
    """Push the closures of ``paths`` to a file:// cache; its URI (with ``params``)."""
    uri = f"file://{dest}?{params.format(key=KEY_SEC)}" if params else f"file://{dest}"
    st = open_store(uri)
    with LocalStore(root) as src:
        ops.copy_paths(src, st, paths)
    st.close()
    return f"file://{dest}"


def config(subs: list[str], *, keys: bool = True, require_sigs: bool = True) -> Config:
    text = f"substituters = {' '.join(subs)}\nrequire-sigs = {'true' if require_sigs else 'false'}\n"
    if keys:
        text += f"trusted-public-keys = {pub_key()}\n"
    return Config.from_text(text)


def test_substitutes_a_closure_with_signatures_checked(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    c = push(root, tmp_path / "c", "compression=zstd&secret-key={key}", [paths["ia"]])
    with LocalStore(tmp_path / "dst") as dst, LocalStore(root) as src:
        got = substitute_paths(dst, [paths["ia"]], config([c]))
        assert got == set(paths.values())
        for p in paths.values():
            assert b"".join(dst.nar_chunks(p)) == b"".join(src.nar_chunks(p))
        assert dst.path_info(paths["ia"]).sigs  # the cache's signature came along
        assert substitute_paths(dst, [paths["ia"]], config([c])) == set()  # nothing left to do


def test_unsigned_needs_trust(closure: tuple[Path, dict[str, str]], tmp_path: Path,
                              caplog: pytest.LogCaptureFixture) -> None:
    root, paths = closure
    c = push(root, tmp_path / "c", "compression=zstd", [paths["ia"]])
    with LocalStore(tmp_path / "d1") as dst, caplog.at_level(logging.WARNING, logger="nartool.cache"):
        got = substitute_paths(dst, [paths["ia"], paths["top"]], config([c]))
        # the content-addressed paths need no signature; the input-addressed one is refused
        assert got == {paths["top"], paths["mid"], paths["tree"]} and not dst.is_valid(paths["ia"])
    assert f"the substitute for '{paths['ia']}' from '{c}' is not signed by any of the keys" in caplog.text
    with LocalStore(tmp_path / "d2") as dst:
        assert paths["ia"] in substitute_paths(dst, [paths["ia"]], config([c + "?trusted=1"]))
    with LocalStore(tmp_path / "d3") as dst:
        assert paths["ia"] in substitute_paths(dst, [paths["ia"]], config([c], require_sigs=False))
    with LocalStore(tmp_path / "d4") as dst:  # substitute = false: nothing happens
        cfg = Config.from_text(f"substituters = {c}?trusted=1\nsubstitute = false\n")
        assert substitute_paths(dst, [paths["ia"]], cfg) == set()


def test_priority_order(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    a = push(root, tmp_path / "a", "compression=xz&secret-key={key}", [paths["ia"]])
    b = push(root, tmp_path / "b", "compression=zstd&secret-key={key}", [paths["ia"]])
    (tmp_path / "b" / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 10\n")
    (tmp_path / "a" / "nix-cache-info").write_text("StoreDir: /nix/store\nPriority: 30\n")
    subs = Substituters.open([a, b, f"{a}?priority=5"], store_dir="/nix/store")
    try:
        assert [(s.uri, s.priority) for s in subs.stores if isinstance(s, BinaryCacheStore)] == \
            [(a, 5), (b, 10), (a, 30)]
    finally:
        subs.close()
    # the better one supplies the path: b (zstd); a's NARs are gone, so using a would fail
    for f in (tmp_path / "a" / "nar").iterdir():
        f.unlink()
    with LocalStore(tmp_path / "dst") as dst:
        assert paths["ia"] in substitute_paths(dst, [paths["ia"]], config([a, b]))
    # with a first by ?priority=, its missing NARs make it fail and b is used next
    with LocalStore(tmp_path / "dst2") as dst:
        assert paths["ia"] in substitute_paths(dst, [paths["ia"]], config([f"{a}?priority=1", b]))


def test_partial_caches_combine(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A path one cache lacks comes from the next; a cache whose closure is incomplete is passed over."""
    root, paths = closure
    a = push(root, tmp_path / "a", "compression=zstd&secret-key={key}", [paths["top"]])
    b = push(root, tmp_path / "b", "compression=zstd&secret-key={key}", [paths["ia"]])
    with LocalStore(tmp_path / "dst") as dst:
        got = substitute_paths(dst, [paths["top"], paths["ia"]], config([a, b]))
        assert got == set(paths.values())


def test_dead_substituter_costs_once(closure: tuple[Path, dict[str, str]], tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """An ssh substituter whose server never answers (``/bin/false``) is skipped after its first
    failure; the live cache after it supplies everything."""
    root, paths = closure
    good = push(root, tmp_path / "c", "compression=zstd&secret-key={key}", [paths["ia"]])
    dead = "ssh://localhost?remote-program=/bin/false"
    forget_dead_substituters()
    subs = Substituters.open([dead, good], store_dir="/nix/store")
    try:
        t0 = time.monotonic()
        with LocalStore(tmp_path / "dst") as dst, caplog.at_level(logging.WARNING, logger="nartool.cache"):
            got = set()
            for p in paths.values():  # one call per path, as a build would: the dead one is asked once
                got |= substitute_paths(dst, [p], config([]), substituters=subs)
        assert got == set(paths.values())
        assert caplog.text.count("is unreachable, skipping it") == 1, caplog.text
        assert time.monotonic() - t0 < 30
    finally:
        subs.close()


def test_cli_copy_substitute_on_destination(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    c = push(root, tmp_path / "c", "compression=zstd&secret-key={key}", [paths["ia"]])
    conf = tmp_path / "nartool.conf"
    conf.write_text(f"substituters = {c}\ntrusted-public-keys = {pub_key()}\n")
    r = run_cli("copy", "--from", root, "--to", tmp_path / "dst", "-s", paths["ia"], text=True,
                env={"NARTOOL_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr
    assert "copying path" not in r.stderr  # nothing was left to copy from the source
    with LocalStore(tmp_path / "dst") as dst:
        assert dst.path_info(paths["ia"]).sigs  # it came from the signed cache, not from the unsigned source


def test_cli_copy_closure_from_uses_substitutes(closure: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, paths = closure
    c = push(root, tmp_path / "c", "compression=zstd&secret-key={key}", [paths["mid"]])
    conf = tmp_path / "nartool.conf"
    conf.write_text(f"substituters = {c}\ntrusted-public-keys = {pub_key()}\ntrusted-users = root\n")
    serve = tmp_path / "nartool-serve"
    serve.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO} NARTOOL_CONFIG={conf}\n"
                     f'exec {sys.executable} -m nartool serve "$@"\n')
    serve.chmod(0o755)
    host = f"localhost?remote-program={serve}&remote-store={root}"
    r = run_cli("--store", tmp_path / "dst", "copy-closure", "-s", "--from", host, paths["ia"], text=True,
                env={"NARTOOL_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr
    with LocalStore(tmp_path / "dst") as dst:
        assert dst.query_valid_paths(paths.values()) == set(paths.values())
        assert dst.path_info(paths["mid"]).sigs and dst.path_info(paths["tree"]).sigs  # from the cache
        assert not dst.path_info(paths["ia"]).sigs  # over the connection


def test_dead_http_substituter_costs_its_timeout_once(closure: tuple[Path, dict[str, str]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A web cache on a port nobody listens on, listed first: the first lookup pays for it (its
    connection attempts), every later one — even from a new substitute_paths call — skips it at once."""
    import socket

    forget_dead_substituters()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root, paths = closure
    good = push(root, tmp_path / "c", "compression=zstd&secret-key={key}", [paths["ia"]])
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = Config.from_text(f"substituters = http://127.0.0.1:{port} {good}\ntrusted-public-keys = {pub_key()}\n"
                           "connect-timeout = 2\ndownload-attempts = 2\n")
    with LocalStore(tmp_path / "dst") as dst:
        t0 = time.monotonic()
        assert paths["tree"] in substitute_paths(dst, [paths["tree"]], cfg)
        first = time.monotonic() - t0
        later = []
        for p in (paths["mid"], paths["top"], paths["ia"]):
            t0 = time.monotonic()
            assert p in substitute_paths(dst, [p], cfg)
            later.append(time.monotonic() - t0)
    assert first < 20, first  # the HTTP backend's attempts with back-off (download-attempts)
    assert max(later) < 1.5, (first, later)
    forget_dead_substituters()


def test_cli_copy_closure_to_asks_the_remote_to_substitute(closure: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    """``copy-closure -s --to``: the validity query carries the substitute flag and a nartool
    server with substituters in its configuration fetches what it can from them first."""
    root, paths = closure
    c = push(root, tmp_path / "c", "compression=zstd&secret-key={key}", [paths["mid"]])
    conf = tmp_path / "serve.conf"
    conf.write_text(f"substituters = {c}\ntrusted-public-keys = {pub_key()}\ntrusted-users = root\n")
    conf.chmod(0o644)
    serve = tmp_path / "nartool-serve"
    serve.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO} NARTOOL_CONFIG={conf}\n"
                     f'exec {sys.executable} -m nartool serve "$@"\n')
    serve.chmod(0o755)
    remote = tmp_path / "remote"
    host = f"localhost?remote-program={serve}&remote-store={remote}"
    r = run_cli("--store", root, "copy-closure", "-s", "--to", host, paths["ia"], text=True)
    assert r.returncode == 0, r.stderr
    with LocalStore(remote) as dst:
        assert dst.query_valid_paths(paths.values()) == set(paths.values())
        assert dst.path_info(paths["mid"]).sigs and dst.path_info(paths["tree"]).sigs  # from the cache
        assert not dst.path_info(paths["ia"]).sigs  # over the connection
    # without -s everything comes over the connection
    host2 = f"localhost?remote-program={serve}&remote-store={tmp_path / 'remote2'}"
    r = run_cli("--store", root, "copy-closure", "--to", host2, paths["ia"], text=True)
    assert r.returncode == 0, r.stderr
    with LocalStore(tmp_path / "remote2") as dst:
        assert not dst.path_info(paths["mid"]).sigs
