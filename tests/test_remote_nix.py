"""Serve protocol against real Nix 2.8, both ways: real Nix clients (``nix-copy-closure``,
``nix copy``) against ``nartool serve``, and ``nartool copy-closure`` against a real
``nix-store --serve``; locally (``localhost?remote-program=…``, no ssh, as Nix does it) and over
a real sshd. Afterwards ``nix-store --verify --check-contents`` must pass and every path's
metadata (hash, size, references, deriver, ca, signatures) must equal the source's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nartool.remote.client import RemoteError, ServeClient
from nartool.remote.copy import copy_closure
from nartool.remote.testing import add_path, chain, dir_nar, file_nar, make_info
from nartool.remote.transport import SshTransport, serve_command_line
from nartool.store.local import LocalStore
from nartool.store.signing import SecretKey, sign_path_info

from .helpers import cli_argv, nix_env
from .sshd import Sshd, make_sshd, sshd  # noqa: F401

pytestmark = pytest.mark.nix

REPO = Path(__file__).resolve().parents[1]
Nix = Callable[..., "subprocess.CompletedProcess[bytes]"]


# -- set-up -----------------------------------------------------------------------------------


class Env:
    """A scratch area: wrapper scripts for `nartool serve`, a config, and helpers."""

    def __init__(self, tmp: Path, nix: Nix) -> None:
        self.tmp = tmp
        self.nix = nix
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.config = tmp / "nartool.conf"
        self.config.write_text("trusted-users = root\n")
        self.serve = self._wrapper("nartool-serve", "serve")
        # the whole CLI under the name `nartool` (a remote program taking `serve --write …`)
        self.cli = self._wrapper("nartool", "")
        # a server that drops --write, as an authorized_keys forced command might
        self.serve_ro = self._wrapper("nartool-serve-ro", "serve", drop_write=True)
        self.env = nix_env(dict(os.environ, NARTOOL_CONFIG=str(self.config), PYTHONPATH=str(REPO)))

    def _wrapper(self, name: str, sub: str, drop_write: bool = False) -> Path:
        p = self.bin / name
        args = '"$@"'
        if drop_write:
            args = '$(for a in "$@"; do [ "$a" = --write ] || printf "%s " "$a"; done)'
        p.write_text("#!/bin/sh\n"
                     f"export PYTHONPATH={REPO} NARTOOL_CONFIG={self.config}\n"
                     f"exec {sys.executable} -m nartool {sub}{' ' if sub else ''}{args}\n")
        p.chmod(0o755)
        return p

    def run(self, *argv: str | os.PathLike[str], env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        e = dict(self.env)
        if env:
            e.update(env)
        r = subprocess.run([os.fspath(a) for a in argv], env=e, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} exited {r.returncode}:\n{r.stderr}")
        return r

    def nartool(self, *argv: str | os.PathLike[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(*cli_argv(*argv), check=check, **kw)

    def url(self, store: Path, program: Path | str | None = None, host: str = "localhost") -> str:
        return f"{host}?remote-program={program or self.serve}&remote-store={store}"


@pytest.fixture
def env(tmp_path: Path, nix: Nix) -> Env:
    return Env(tmp_path, nix)


def make_source(env: Env, name: str = "src", n: int = 6, size: int = 2000) -> tuple[Path, list[str]]:
    """A store made by nartool (a chain with references and derivers, a signed path) plus a
    tree with a symlink and an executable added by `nix-store --add`; returns its roots."""
    root = env.tmp / name
    st = LocalStore(root)
    infos = chain(st, n, prefix=name, size=size)
    key = SecretKey.generate("src-key-1")
    nar = dir_nar([("bin", b"#!/bin/sh\n" + infos[-1].path.encode()), ("lib", b"\0" * 5000)])
    top = make_info(f"{name}-top", nar, [infos[-1].path, infos[0].path],
                    deriver=f"/nix/store/{'1' * 32}-{name}-top.drv")
    top.sigs = frozenset({sign_path_info(top, key)})
    add_path(st, top, nar)
    st.close()
    tree = env.tmp / f"{name}-tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "run").write_text("#!/bin/sh\necho hi\n")
    (tree / "sub" / "run").chmod(0o755)
    (tree / "link").symlink_to("sub/run")
    (tree / "empty").write_bytes(b"")
    added = env.run("nix-store", "--store", root, "--add", tree).stdout.strip()
    return root, [top.path, added]


def infos_json(env: Env, store: Path, paths: list[str]) -> dict[str, dict[str, Any]]:
    out = env.run("nix", "--store", store, "path-info", "--json", "--recursive", *paths).stdout
    res: dict[str, dict[str, Any]] = {}
    for d in json.loads(out):
        d.pop("registrationTime", None)
        d.pop("ultimate", None)
        d["signatures"] = sorted(d.get("signatures", []))
        res[d["path"]] = d
    return res


def check_same(env: Env, src: Path, dst: Path, paths: list[str], *, sigs: bool = True) -> None:
    r = env.run("nix-store", "--store", dst, "--verify", "--check-contents")
    assert "error" not in r.stderr.lower(), r.stderr
    a, b = infos_json(env, src, paths), infos_json(env, dst, paths)
    if not sigs:
        for d in (*a.values(), *b.values()):
            d.pop("signatures", None)
    assert a == b


# -- localhost?remote-program=… ---------------------------------------------------------------


def test_nix_copy_closure_to_nartool_serve(env: Env) -> None:
    src, roots = make_source(env)
    dst = env.tmp / "dst"
    env.run("nix-copy-closure", "--to", env.url(dst), *roots, env={"NIX_REMOTE": str(src)})
    check_same(env, src, dst, roots)
    # a second run finds everything valid
    env.run("nix-copy-closure", "--to", env.url(dst), *roots, env={"NIX_REMOTE": str(src)})


def test_nix_copy_to_ssh_store_nartool_serve(env: Env) -> None:
    src, roots = make_source(env)
    dst = env.tmp / "dst"
    env.run("nix", "copy", "--to", f"ssh://{env.url(dst)}", *roots, env={"NIX_REMOTE": str(src)})
    check_same(env, src, dst, roots)


def test_nix_copy_closure_from_nartool_serve(env: Env) -> None:
    src, roots = make_source(env)
    dst = env.tmp / "dst"
    env.run("nix-copy-closure", "--from", env.url(src), *roots, env={"NIX_REMOTE": str(dst)})
    check_same(env, src, dst, roots)
    dst2 = env.tmp / "dst2"
    env.run("nix", "copy", "--no-check-sigs", "--from", f"ssh://{env.url(src, env.serve_ro)}", *roots,
            env={"NIX_REMOTE": str(dst2)})
    check_same(env, src, dst2, roots)


def test_nartool_copy_closure_to_nix_store_serve(env: Env) -> None:
    src, roots = make_source(env)
    dst = env.tmp / "dst"
    r = env.nartool("--store", src, "copy-closure", "--json", "--to", env.url(dst, "nix-store"), *roots)
    res = json.loads(r.stdout)
    assert res["remoteCommand"] == serve_command_line("nix-store", str(dst))
    assert len(res["copied"]) == res["closureSize"] == 8
    check_same(env, src, dst, roots)
    again = json.loads(env.nartool("--store", src, "copy-closure", "--json", "--to", env.url(dst, "nix-store"),
                                   *roots).stdout)
    assert again["copied"] == []


def test_nartool_copy_closure_from_nix_store_serve(env: Env) -> None:
    src, roots = make_source(env)
    dst = env.tmp / "dst"
    r = env.nartool("--store", dst, "copy-closure", "--json", "--from", env.url(src, "nix-store"), *roots)
    assert len(json.loads(r.stdout)["copied"]) == 8
    check_same(env, src, dst, roots)


def test_nartool_to_nartool_with_zstd(env: Env) -> None:
    src, roots = make_source(env)
    dst = env.tmp / "dst"
    r = env.nartool("--store", src, "copy-closure", "--json", "--compress", "zstd", "--remote-program",
                    str(env.cli), "--to", f"localhost?remote-store={dst}", *roots)
    assert "--compress zstd" in json.loads(r.stdout)["remoteCommand"]
    check_same(env, src, dst, roots)
    # towards Nix the option is dropped with a warning
    r = env.nartool("--store", src, "copy-closure", "--compress", "zstd", "--to",
                    env.url(env.tmp / "n", "nix-store"), *roots)
    assert "needs a nartool remote" in r.stderr


def test_nix_client_against_read_only_and_untrusted_nartool(env: Env) -> None:
    src, roots = make_source(env)
    dst = env.tmp / "dst"
    r = env.run("nix-copy-closure", "--to", env.url(dst, env.serve_ro), *roots, env={"NIX_REMOTE": str(src)},
                check=False)
    assert r.returncode != 0
    assert "error: importing paths is not allowed" in r.stderr
    # root is not trusted here: unsigned paths are refused, with Nix's message
    env.config.write_text("trusted-users = nobody\n")
    r = env.run("nix-copy-closure", "--to", env.url(dst), *roots, env={"NIX_REMOTE": str(src)}, check=False)
    assert r.returncode != 0 and "because it lacks a valid signature" in r.stderr
    # our client learns it before sending anything
    r = env.nartool("--store", src, "copy-closure", "--to", env.url(dst, env.cli), *roots, check=False)
    assert r.returncode == 1 and "nothing was sent" in r.stderr
    assert env.run("nix-store", "--store", dst, "-q", "--references", roots[0], check=False).returncode != 0


# -- over a real sshd -------------------------------------------------------------------------


@pytest.mark.ssh
def test_all_directions_over_sshd(env: Env, sshd: Sshd) -> None:  # noqa: F811
    key = sshd.add_key(None)
    sshopts = {"NIX_SSHOPTS": sshd.nix_sshopts(key)}
    src, roots = make_source(env)

    # real Nix clients into and out of `nartool serve`
    a = env.tmp / "a"
    env.run("nix-copy-closure", "--to", env.url(a, host=sshd.host), *roots, env={"NIX_REMOTE": str(src), **sshopts})
    check_same(env, src, a, roots)
    b = env.tmp / "b"
    env.run("nix", "copy", "--to", f"ssh://{env.url(b, host=sshd.host)}", *roots,
            env={"NIX_REMOTE": str(src), **sshopts})
    check_same(env, src, b, roots)
    c = env.tmp / "c"
    env.run("nix-copy-closure", "--from", env.url(a, host=sshd.host), *roots, env={"NIX_REMOTE": str(c), **sshopts})
    check_same(env, src, c, roots)

    # nartool's client into and out of real `nix-store --serve`
    d = env.tmp / "d"
    env.nartool("--store", src, "copy-closure", "--to", f"{sshd.host}?remote-program=nix-store&remote-store={d}",
                *roots, env=sshopts)
    check_same(env, src, d, roots)
    e = env.tmp / "e"
    env.nartool("--store", e, "copy-closure", "--from", f"{sshd.host}?remote-program=nix-store&remote-store={d}",
                *roots, env=sshopts)
    check_same(env, src, e, roots)
    # and nartool to nartool over ssh, compressed, with --ssh-opt instead of NIX_SSHOPTS
    f = env.tmp / "f"
    opts = [x for a in sshd.ssh_args(key) for x in ("--ssh-opt", a)]
    env.nartool("--store", src, "copy-closure", *opts, "--compress", "zstd", "--remote-program", str(env.cli),
                "--to", f"{sshd.host}?remote-store={f}", *roots)
    check_same(env, src, f, roots)


def _big_source(env: Env) -> tuple[Path, str, list[str]]:
    root = env.tmp / "big"
    st = LocalStore(root)
    infos = chain(st, 24, prefix="big", size=600_000)
    st.close()
    return root, infos[-1].path, [i.path for i in infos]


class KillAt(LocalStore):
    """A store that kills the ssh transport when the ``at``-th NAR is read (upload) or
    written (download)."""

    def __init__(self, root: Any, at: int) -> None:
        super().__init__(root)
        self.store = self
        self.at = at
        self.n = 0
        self.transport: SshTransport | None = None

    def _tick(self) -> None:
        self.n += 1
        if self.n == self.at and self.transport is not None:
            self.transport.proc.kill()

    def nar_chunks(self, path: str, *, check: bool = True) -> Any:
        self._tick()
        return super().nar_chunks(path, check=check)

    def add_nar(self, info: Any, nar: Any) -> Any:
        self._tick()
        return super().add_nar(info, nar)


@pytest.mark.ssh
@pytest.mark.slow
def test_cut_connection_then_rerun(env: Env, sshd: Sshd) -> None:  # noqa: F811
    key = sshd.add_key(None)
    src_root, top, all_paths = _big_source(env)
    for receiver, program in (("nartool", str(env.serve)), ("nix", "nix-store")):
        dst = env.tmp / f"cut-{receiver}"
        cmd = serve_command_line(program, str(dst))
        src = KillAt(src_root, at=12)
        t = SshTransport(sshd.host, sshd.ssh_args(key), cmd, passthrough=False)
        src.transport = t
        with pytest.raises(RemoteError):
            copy_closure(src, ServeClient(t), [top], "to")
        t.close()
        env.run("nix-store", "--store", dst, "--verify", "--check-contents")
        valid_before = {p for p in all_paths
                        if env.run("nix-store", "--store", dst, "-q", "--hash", p, check=False).returncode == 0}
        assert len(valid_before) < 12, receiver
        with SshTransport(sshd.host, sshd.ssh_args(key), cmd, passthrough=False) as t2:
            r = copy_closure(src.store, ServeClient(t2), [top], "to")
        assert sorted(r.copied) == sorted(set(all_paths) - valid_before)
        src.store.close()
        check_same(env, src_root, dst, [top])

    # the other direction: a cut download into a nartool store keeps what fully arrived
    dst_root = env.tmp / "cut-from"
    recv = KillAt(dst_root, at=12)
    remote = serve_command_line("nix-store", str(src_root))
    t = SshTransport(sshd.host, sshd.ssh_args(key), remote, passthrough=False)
    recv.transport = t
    with pytest.raises(RemoteError):
        copy_closure(recv, ServeClient(t), [top], "from")
    t.close()
    kept = recv.store.query_valid_paths(all_paths)
    assert 0 < len(kept) < 12
    assert recv.store.verify(check_contents=True) == []
    with SshTransport(sshd.host, sshd.ssh_args(key), remote, passthrough=False) as t2:
        r = copy_closure(recv.store, ServeClient(t2), [top], "from")
    assert sorted(r.copied) == sorted(set(all_paths) - kept)
    recv.store.close()
    check_same(env, src_root, dst_root, [top])


@pytest.mark.slow
def test_concurrent_overlapping_copies(env: Env) -> None:
    """Two copies sharing most of their closures, at the same time, into one nartool server store."""
    src_root = env.tmp / "conc"
    st = LocalStore(src_root)
    shared = chain(st, 12, prefix="shared", size=200_000)
    tops = []
    for k in ("x", "y"):
        nar = file_nar(f"top {k} ".encode() + shared[-1].path.encode())
        tops.append(add_path(st, make_info(f"top-{k}", nar, [shared[-1].path]), nar).path)
    st.close()
    dst = env.tmp / "conc-dst"
    results: list[subprocess.CompletedProcess[str]] = []

    def one(top: str) -> None:
        results.append(env.nartool("--store", src_root, "copy-closure", "--json", "--to", env.url(dst), top,
                                   check=False))

    threads = [threading.Thread(target=one, args=(t,)) for t in tops]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    copied = [set(json.loads(r.stdout)["copied"]) for r in results]
    assert copied[0] | copied[1] >= {s.path for s in shared}
    check_same(env, src_root, dst, tops)
