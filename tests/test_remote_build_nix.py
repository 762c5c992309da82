"""Real Nix clients use ``nartool serve --write`` as their remote build machine, reached
through a real sshd with a forced command (``command="<python> -m nartool serve --write
--store MACHINE"``): Nix 2.8's ``nix-build --max-jobs 0 --builders 'ssh://…'`` and, when
``NARTOOL_MODERN_NIX`` is set, current Nix's. Outputs must equal local Nix builds and be valid
in both stores; a failing builder's error and log and a max-silent-time timeout must reach
the client as Nix reports them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nartool.store.derivation import read_derivation
from nartool.store.local import LocalStore

from .conftest import require
from .helpers import REPO, nix_env
from .remote_build_util import BUSYBOX, EXPR, busybox_tree, instantiate, make_store, require_busybox
from .sshd import Sshd, make_sshd, sshd  # noqa: F401

pytestmark = pytest.mark.nix
MODERN_NIX = os.environ.get("NARTOOL_MODERN_NIX")


class Machine:
    """A nartool build machine behind sshd: its store and the client key whose forced command
    serves it."""

    def __init__(self, tmp: Path, server: Sshd) -> None:
        self.tmp = tmp
        self.store = tmp / "machine"
        self.conf = tmp / "machine.conf"
        self.conf.write_text("trusted-users = root\n")
        os.chmod(self.conf, 0o600)
        self.sshd = server
        self.key = server.add_key(f"{sys.executable} -m nartool serve --write --store {self.store}",
                                  environment={"PYTHONPATH": os.pathsep.join(
                                      p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                                      "NARTOOL_CONFIG": str(self.conf),
                                               "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self.key.chmod(0o600)

    def sshopts(self) -> str:
        return self.sshd.nix_sshopts(self.key)

    def builders(self) -> str:
        return f"ssh://{self.sshd.host} x86_64-linux {self.key} 1 1"


@pytest.fixture
def machine(tmp_path: Path, nix: object, sshd: Sshd) -> Machine:  # noqa: F811
    require_busybox()
    require("ROOT", os.geteuid() == 0, "the machine's serve reads trusted-users from its own file only as root")
    return Machine(tmp_path, sshd)


def nix_build(argv0: list[str], client: Path, m: Machine, tmp: Path, what: str, *extra: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    expr = tmp / "rb.nix"
    expr.write_text(EXPR)
    e = nix_env()
    e.update(NIX_SSHOPTS=m.sshopts(), **(env or {}))
    return subprocess.run([*argv0, "nix-build", "--store", str(client), "--option", "substituters", "",
                           "--max-jobs", "0", "--builders", m.builders(), "--no-out-link",
                           "--arg", "busybox", f'"{BUSYBOX}"', "--argstr", "what", what, *extra, str(expr)],
                          env=e, capture_output=True, text=True, timeout=300)


def reference(tmp: Path, what: str) -> dict[str, str]:
    """Local Nix 2.8 build of ``what``: {output path: NAR hash} of the chain's outputs."""
    ref = make_store(tmp / f"ref-{what}", tmp)
    drv = instantiate(ref, tmp, what)
    subprocess.run(["nix-store", "--store", str(ref), "--option", "substituters", "", "-r", drv], env=nix_env(),
                   check=True, capture_output=True)
    st = LocalStore(ref)
    try:
        outs = [p for p in st.closure(read_derivation(st, drv).output_paths().values()) if p != BUSYBOX]
        return {p: st.path_info(p).nar_hash.base16 for p in outs}
    finally:
        st.close()


def hashes(store: Path, paths: list[str]) -> dict[str, str]:
    st = LocalStore(store)
    try:
        return {p: st.path_info(p).nar_hash.base16 for p in paths}
    finally:
        st.close()


def check_chain(client: Path, m: Machine, tmp: Path, r: subprocess.CompletedProcess[str],
                check_client: Callable[[list[str]], None]) -> None:
    assert r.returncode == 0, r.stderr
    want = reference(tmp, "chain")
    out = r.stdout.strip()
    assert out in want
    # identical outputs, valid on the machine (its own check) and in the client store
    assert hashes(m.store, list(want)) == want
    v = subprocess.run([sys.executable, "-m", "nartool", "--store", str(m.store), "store", "verify",
                        "--check-contents"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert v.returncode == 0, v.stdout + v.stderr
    v = subprocess.run(["nix-store", "--store", str(m.store), "--verify-path", *want], env=nix_env(),
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    check_client(list(want))
    assert "building base" in r.stderr and "building top" in r.stderr


def test_nix28_builds_chain_on_nartool(tmp_path: Path, machine: Machine) -> None:
    client = make_store(tmp_path / "client", tmp_path)
    r = nix_build([], client, machine, tmp_path, "chain")

    def check_client(paths: list[str]) -> None:
        assert hashes(client, paths) == reference(tmp_path, "chain")
        v = subprocess.run(["nix-store", "--store", str(client), "--verify-path", *paths], env=nix_env(),
                           capture_output=True, text=True)
        assert v.returncode == 0, v.stderr

    check_chain(client, machine, tmp_path, r, check_client)


def test_nix28_sees_failure_and_log(tmp_path: Path, machine: Machine) -> None:
    client = make_store(tmp_path / "client", tmp_path)
    drv = instantiate(client, tmp_path, "fail")
    r = nix_build([], client, machine, tmp_path, "fail")
    assert r.returncode != 0
    assert "about to fail\nsecond line\n" in r.stderr
    assert f"failed: builder for '{drv}' failed with exit code 3" in r.stderr, r.stderr


def test_nix28_sees_silence_timeout(tmp_path: Path, machine: Machine) -> None:
    client = make_store(tmp_path / "client", tmp_path)
    drv = instantiate(client, tmp_path, "silent")
    r = nix_build([], client, machine, tmp_path, "silent", "--max-silent-time", "1")
    assert r.returncode != 0
    assert "going quiet" in r.stderr
    assert (f"failed: building of '{drv}!out' from in-memory derivation timed out after 1 seconds of silence"
            in r.stderr), r.stderr


def modern(tmp: Path) -> list[str]:
    require("MODERN_NIX", bool(MODERN_NIX), "NARTOOL_MODERN_NIX is not set (a command running current Nix)")
    assert MODERN_NIX is not None
    return MODERN_NIX.split()


def test_modern_nix_builds_chain_on_nartool(tmp_path: Path, machine: Machine) -> None:
    argv0 = modern(tmp_path)
    client = tmp_path / "client-modern"
    e = nix_env()
    add = subprocess.run([*argv0, "nix-store", "--store", str(client), "--add", str(busybox_tree(tmp_path))],
                         env=e, capture_output=True, text=True)
    assert add.stdout.strip() == BUSYBOX, add.stderr
    r = nix_build(argv0, client, machine, tmp_path, "chain")

    def check_client(paths: list[str]) -> None:
        q = subprocess.run([*argv0, "nix-store", "--store", str(client), "--verify-path", *paths], env=e,
                           capture_output=True, text=True)
        assert q.returncode == 0, q.stderr
        info = subprocess.run([*argv0, "nix-store", "--store", str(client), "--query", "--hash", *paths], env=e,
                              capture_output=True, text=True, check=True).stdout.split()
        want = reference(tmp_path, "chain")
        from nartool.hashes import Hash

        assert [Hash.parse(h).base16 for h in info] == [want[p] for p in paths]

    check_chain(client, machine, tmp_path, r, check_client)


def test_modern_nix_sees_failure_and_timeout(tmp_path: Path, machine: Machine) -> None:
    argv0 = modern(tmp_path)
    client = tmp_path / "client-modern"
    subprocess.run([*argv0, "nix-store", "--store", str(client), "--add", str(busybox_tree(tmp_path))],
                   env=nix_env(), capture_output=True, check=True)
    r = nix_build(argv0, client, machine, tmp_path, "fail")
    assert r.returncode != 0
    assert "about to fail" in r.stderr and "second line" in r.stderr
    assert "failed with exit code 3" in r.stderr, r.stderr
    r = nix_build(argv0, client, machine, tmp_path, "silent", "--max-silent-time", "1")
    assert r.returncode != 0
    assert "timed out after 1 seconds of silence" in r.stderr, r.stderr


def test_nix28_output_with_references(tmp_path: Path, machine: Machine) -> None:
    """An output referring to an input and to busybox (a file naming one, a symlink into the
    other): built on the nartool machine, its metadata in the client store — NAR hash and size,
    references, deriver — equals a local Nix 2.8 build's."""
    import json

    client = make_store(tmp_path / "client", tmp_path)
    r = nix_build([], client, machine, tmp_path, "refs")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    ref = make_store(tmp_path / "ref-refs", tmp_path)
    drv = instantiate(ref, tmp_path, "refs")
    subprocess.run(["nix-store", "--store", str(ref), "--option", "substituters", "", "-r", drv], env=nix_env(),
                   check=True, capture_output=True)

    def info(store: Path) -> dict[str, object]:
        j = json.loads(subprocess.run(["nix", "--store", str(store), "path-info", "--json", out], env=nix_env(),
                                      check=True, capture_output=True, text=True).stdout)[0]
        return {k: j.get(k) for k in ("path", "narHash", "narSize", "references", "deriver")}

    got, want = info(client), info(ref)
    assert got == want
    assert BUSYBOX in got["references"]  # type: ignore[operator]
