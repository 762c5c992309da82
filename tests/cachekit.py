"""Shared helpers of the binary cache tests: a deterministic closure, the test key, Nix runners."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from nartool.remote.testing import add_path, dir_nar, make_info
from nartool.store.local import LocalStore

from .conftest import NIX_STORE, require
from .helpers import nix_env

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cache"
KEY_SEC = FIXTURES / "test-key.sec"
KEY_PUB = FIXTURES / "test-key.pub"
NIX = shutil.which("nix")


def pub_key() -> str:
    return KEY_PUB.read_text().strip()


def make_tree(d: Path) -> Path:
    """A tree with a compressible file big enough for several zstd blocks, an executable, a
    symlink, an empty file and a subdirectory; the same bytes on every run."""
    t = d / "tree"
    (t / "sub").mkdir(parents=True)
    lines = [f"line {i} {hashlib.sha256(str(i % 97).encode()).hexdigest()}\n" for i in range(4000)]
    (t / "big").write_text("".join(lines))
    (t / "hello").write_text("hello\n")
    (t / "empty").write_bytes(b"")
    (t / "sub" / "run").write_text("#!/bin/sh\necho run\n")
    (t / "sub" / "run").chmod(0o755)
    (t / "link").symlink_to("sub/run")
    return t


def make_closure(root: Path, work: Path) -> dict[str, str]:
    """A local store at ``root`` holding: ``tree`` (content-addressed), ``mid`` and ``top``
    (text objects referring to it), and ``ia`` — input-addressed, with a deriver, referring to
    ``top`` and ``tree``, so it needs a signature. Returns name → path."""
    with LocalStore(root) as st:
        tree = st.add_path(make_tree(work))
        mid = st.add_text("mid", "uses " + tree.path, [tree.path])
        top = st.add_text("top", "uses " + mid.path + " and " + tree.path, [mid.path, tree.path])
        nar = dir_nar([("bin", b"#!/bin/sh\n" + top.path.encode()), ("data", b"\x00" * 5000 + tree.path.encode())])
        info = make_info("ia", nar, [top.path, tree.path], deriver=f"/nix/store/{'1' * 32}-ia.drv")
        ia = add_path(st, info, nar)
        return {"tree": tree.path, "mid": mid.path, "top": top.path, "ia": ia.path}


def run_nix(*args: str | os.PathLike[str], check: bool = True, extra_conf: str = "") -> subprocess.CompletedProcess[str]:
    """A real Nix 2.8 command, isolated from the host's configuration (no substituters)."""
    require("NIX", NIX_STORE is not None and NIX is not None, "Nix not installed: install Debian's nix-bin")
    env = nix_env()
    if extra_conf:
        env["NIX_CONFIG"] = env["NIX_CONFIG"] + "\n" + extra_conf
    argv = [os.fspath(a) for a in args]
    if argv[0] == "nix":
        argv[1:1] = ["--extra-experimental-features", "nix-command"]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r


def tree_files(d: Path) -> dict[str, bytes]:
    """Every regular file under ``d`` by relative path (empty directories do not count)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(d))] = p.read_bytes()
    return out
