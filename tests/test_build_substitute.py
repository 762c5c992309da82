"""``nartool build`` substitutes before it builds (as Nix does with ``substituters``): outputs a
binary cache holds are fetched (signatures checked), top-down, so the inputs of a fetched output
are neither fetched nor built; what no cache holds, or what fails the signature policy, is built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nartool.build import BuildOptions, build_paths
from nartool.config import Config
from nartool.store import ops
from nartool.store.derivation import read_derivation
from nartool.store.local import LocalStore
from nartool.store.uri import open_store

from .buildkit import BB, nartool_store, static_busybox, write_drv
from .cachekit import KEY_SEC, pub_key
from .conftest import require
from .helpers import run_cli


@pytest.fixture(autouse=True)
def _need_sandbox() -> None:
    from nartool.build.sandbox import sandbox_unavailable_reason

    require("SANDBOX", static_busybox(), "no static busybox (install busybox-static)")
    reason = sandbox_unavailable_reason()
    require("SANDBOX", reason is None, f"the build sandbox cannot run here: {reason}")


def _chain(st: LocalStore, tag: str) -> tuple[str, str]:
    """step1 writes a file; step2 reads it (no reference to step1's output kept)."""
    d1 = write_drv(st, f"sub-step1-{tag}", f"echo one-{tag} > $out")
    o1 = read_derivation(st, d1).outputs["out"].path
    d2 = write_drv(st, f"sub-step2-{tag}", f"{BB}/bin/cat {o1} > $out; echo two >> $out",
                   inputs=[BB], input_drvs={d1: ["out"]})
    return d1, d2


def _setup(tmp_path: Path, tag: str, params: str = "secret-key={key}") -> tuple[Path, str, str, str]:
    """A builder store A that built the chain and pushed step2's output to a file:// cache; a
    fresh store B holding only the derivations. Returns (B's root, cache URI, d1, d2)."""
    a, _ = nartool_store(tmp_path / "a", tmp_path)
    d1, d2 = _chain(a, tag)
    [res] = build_paths(a, [d2], BuildOptions())
    assert res.status.name in ("BUILT", "ALREADY_VALID"), res.error_msg
    out2 = read_derivation(a, d2).outputs["out"].path
    cache = tmp_path / "cache"
    uri = f"file://{cache}?{params.format(key=KEY_SEC)}" if params else f"file://{cache}"
    c = open_store(uri)
    ops.copy_paths(a, c, [out2])
    c.close()
    b, _ = nartool_store(tmp_path / "b", tmp_path)
    ops.copy_paths(a, b, [d2])  # the derivations (and busybox), not the outputs
    assert not b.is_valid(out2)
    b.close()
    a.close()
    return tmp_path / "b", f"file://{cache}", d1, d2


def test_build_fetches_from_a_cache_instead_of_building(tmp_path: Path) -> None:
    root, cache, d1, d2 = _setup(tmp_path, "fetch")
    r = run_cli("--store", str(root), "build", "--option", "substituters", cache,
                "--option", "trusted-public-keys", pub_key(), d2, text=True)
    assert r.returncode == 0, r.stderr
    with LocalStore(root) as b:
        out2 = read_derivation(b, d2).outputs["out"].path
        out1 = read_derivation(b, d1).outputs["out"].path
        assert r.stdout.split() == [out2]
        assert b.is_valid(out2) and b.path_info(out2).sigs  # fetched, signature kept
        assert not b.is_valid(out1)  # top-down: step1 neither fetched nor built
    assert "building '" not in r.stderr
    assert f"this path was fetched:\n  {out2}" in r.stderr


def test_unsigned_cache_is_not_trusted_so_the_chain_is_built(tmp_path: Path) -> None:
    root, cache, d1, d2 = _setup(tmp_path, "unsigned", params="")
    cfg = Config.from_text(f"substituters = {cache}\nrequire-sigs = true\ntrusted-public-keys = {pub_key()}\n")
    with LocalStore(root) as b:
        [res] = build_paths(b, [d2], BuildOptions.from_config(cfg))
        assert res.status.name == "BUILT", res.error_msg
        assert b.is_valid(read_derivation(b, d1).outputs["out"].path)  # built, so its input was built too
        assert not b.path_info(read_derivation(b, d2).outputs["out"].path).sigs


def test_no_substituters_means_build(tmp_path: Path) -> None:
    """``substitute = false`` turns substitution off even with substituters configured."""
    root, cache, d1, d2 = _setup(tmp_path, "off")
    cfg = Config.from_text(f"substituters = {cache}\nsubstitute = false\ntrusted-public-keys = {pub_key()}\n")
    with LocalStore(root) as b:
        [res] = build_paths(b, [d2], BuildOptions.from_config(cfg))
        assert res.status.name == "BUILT", res.error_msg
        assert b.is_valid(read_derivation(b, d1).outputs["out"].path)


def test_dead_substituter_then_build(tmp_path: Path) -> None:
    """A substituter nobody answers costs one attempt, then the chain is built."""
    root, _cache, d1, d2 = _setup(tmp_path, "dead")
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = run_cli("--store", str(root), "build", "--option", "substituters", f"http://127.0.0.1:{port}",
                "--option", "trusted-public-keys", pub_key(), d2, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")}, text=True)
    assert r.returncode == 0, r.stderr
    assert "building '" in r.stderr
    with LocalStore(root) as b:
        assert b.is_valid(read_derivation(b, d2).outputs["out"].path)
    assert os.path.isdir(tmp_path / "b")
