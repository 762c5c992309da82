"""``nartool copy-closure`` / ``nartool copy`` as drop-ins: Nix's options and log lines, JSON keys.

The remote is ``localhost?remote-program=…`` (run locally without ssh, as Nix does); stderr
is a pipe here, so the commands write Nix 2.8's log lines (checked against real Nix's
output: ``copying 8 paths...`` / ``copying path '/nix/store/…' to 'ssh://localhost'...``).
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nartool.remote.testing import chain
from nartool.store.local import LocalStore

from .helpers import cli_argv

REPO = Path(__file__).resolve().parent.parent


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "nartool.conf"
        self.config.write_text(f"trusted-users = {getpass.getuser()}\n")
        self.serve = tmp / "nartool-serve"
        self.serve.write_text("#!/bin/sh\n"
                              f"export PYTHONPATH={REPO} NARTOOL_CONFIG={self.config}\n"
                              f'exec {sys.executable} -m nartool serve "$@"\n')
        self.serve.chmod(0o755)
        self.env = dict(os.environ, NARTOOL_CONFIG=str(self.config), PYTHONPATH=str(REPO))
        self.env.pop("NARTOOL_VERBOSE", None)

    def nartool(self, *argv: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(cli_argv(*argv), env=self.env,
                           capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} exited {r.returncode}:\n{r.stderr}")
        return r

    def url(self, store: Path) -> str:
        return f"localhost?remote-program={self.serve}&remote-store={store}"

    def source(self, name: str = "src", n: int = 4) -> tuple[Path, list[str]]:
        root = self.tmp / name
        st = LocalStore(root)
        infos = chain(st, n, prefix=name)
        st.close()
        return root, [i.path for i in infos]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def copy_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("copying ")]


def test_copy_closure_to_logs_like_nix(env: Env) -> None:
    src, paths = env.source()
    dst = env.tmp / "dst"
    r = env.nartool("--store", src, "copy-closure", "--to", env.url(dst), paths[-1])
    assert r.stdout == ""
    assert copy_lines(r.stderr) == ["copying 4 paths...",
                                    *(f"copying path '{p}' to 'ssh://localhost'..." for p in paths)]
    # nothing missing: silent, as Nix
    r = env.nartool("--store", src, "copy-closure", "--to", env.url(dst), paths[-1])
    assert copy_lines(r.stderr) == [] and r.stdout == ""


def test_copy_closure_from_logs_like_nix(env: Env) -> None:
    src, paths = env.source()
    dst = env.tmp / "dst"
    r = env.nartool("--store", dst, "copy-closure", "--from", env.url(src), paths[1])
    assert copy_lines(r.stderr) == ["copying 2 paths...",
                                    *(f"copying path '{p}' from 'ssh://localhost'..." for p in paths[:2])]


def test_nix_options_accepted(env: Env) -> None:
    src, paths = env.source()
    dst = env.tmp / "dst"
    r = env.nartool("--store", src, "copy-closure", "-s", "--gzip", "-v", "-v", "--to", env.url(dst), paths[-1])
    assert len(copy_lines(r.stderr)) == 5
    assert "copied 4 of 4 paths" in r.stderr  # -v: the summary line too
    r = env.nartool("--store", src, "copy-closure", "--use-substitutes", "--verbose", "--to", env.url(dst),
                    paths[-1])
    assert "copied 0 of 4 paths" in r.stderr
    r = env.nartool("--store", src, "copy-closure", "-vv", "--xz", "--to", env.url(env.tmp / "d2"), paths[0])
    assert "warning: '--xz' is not implemented, falling back to gzip" in r.stderr
    assert "copied 1 of 1 paths" in r.stderr
    help_text = env.nartool("copy-closure", "--help").stdout
    assert "--use-substitutes" in help_text and "substituters" in help_text
    assert "ssh -C" in help_text


def test_copy_closure_json_camel_case(env: Env) -> None:
    src, paths = env.source()
    dst = env.tmp / "dst"
    r = env.nartool("--store", src, "copy-closure", "--json", "--dry-run", "--to", env.url(dst), paths[-1])
    d = json.loads(r.stdout)
    assert {"closureSize", "bytesTotal", "bytesCopied", "dryRun", "remoteCommand"} <= d.keys()
    assert not any("_" in k for k in d)
    assert d["dryRun"] is True and d["closureSize"] == 4 and d["bytesCopied"] == 0
    assert copy_lines(r.stderr) == []  # --json: the result is on stdout, no log lines
    d = json.loads(env.nartool("--store", src, "copy-closure", "--json", "--to", env.url(dst), paths[-1]).stdout)
    assert d["dryRun"] is False and len(d["copied"]) == 4 and d["bytesCopied"] == d["bytesTotal"] > 0


def test_copy_logs_and_json(env: Env) -> None:
    src, paths = env.source()
    dst = env.tmp / "dst"
    dst_uri = LocalStore(dst).uri
    r = env.nartool("copy", "--no-check-sigs", "--from", src, "--to", dst, paths[-1])
    assert copy_lines(r.stderr) == ["copying 4 paths...",
                                    *(f"copying path '{p}' to '{dst_uri}'..." for p in paths)]
    # from an ssh store into a local one: "from"; the ssh store is named by its host only
    dst2 = env.tmp / "dst2"
    r = env.nartool("copy", "--no-check-sigs", "--from", f"ssh://{env.url(src)}", "--to", dst2, paths[0])
    assert copy_lines(r.stderr) == ["copying 1 paths...", f"copying path '{paths[0]}' from 'ssh://localhost'..."]
    # local to ssh: "to"
    r = env.nartool("copy", "--from", src, "--to", f"ssh://{env.url(env.tmp / 'dst3')}", paths[0])
    assert copy_lines(r.stderr)[1:] == [f"copying path '{paths[0]}' to 'ssh://localhost'..."]
    r = env.nartool("copy", "-v", "--json", "--no-check-sigs", "--from", src, "--to", env.tmp / "dst4", paths[-1])
    d = json.loads(r.stdout)
    assert d["closureSize"] == 4 and d["bytesCopied"] == d["bytesTotal"] and d["dryRun"] is False
    assert not any("_" in k for k in d)


# -- cryptography is only needed for signing ---------------------------------------------------


def test_without_cryptography(env: Env) -> None:
    """With ``cryptography`` unimportable, unsigned work runs (and never imports it); signing
    fails with a clear message naming the fix and exit status 1."""
    shim = env.tmp / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.modules['cryptography'] = None  # import cryptography -> ImportError\n"
        "import atexit\n"
        "atexit.register(lambda: sys.stderr.write(\n"
        "    'IMPORTED-CRYPTOGRAPHY\\n' if any(m.startswith('cryptography.') for m in sys.modules) else ''))\n")
    env.env["PYTHONPATH"] = f"{shim}{os.pathsep}{REPO}"
    # the serve wrapper sets its own PYTHONPATH: give it the shim too
    env.serve.write_text(env.serve.read_text().replace(f"PYTHONPATH={REPO}", f"PYTHONPATH={shim}:{REPO}"))
    tree = env.tmp / "tree"
    tree.mkdir()
    (tree / "f").write_text("hello\n")
    src = env.tmp / "src"
    added = env.nartool("--store", src, "store", "add", tree).stdout.strip()
    exported = env.tmp / "x.export"
    with exported.open("wb") as f:
        subprocess.run(cli_argv("--store", src, "store", "export", added),
                       env=env.env, stdout=f, check=True, timeout=60)
    outs = [
        env.nartool("--store", env.tmp / "imp", "store", "import", exported),
        env.nartool("copy", "--no-check-sigs", "--from", src, "--to", env.tmp / "c", added),
        env.nartool("--store", src, "copy-closure", "--to", env.url(env.tmp / "cc"), added),
        env.nartool("--store", src, "store", "verify", "--check-contents"),
    ]
    for r in outs:
        assert "IMPORTED-CRYPTOGRAPHY" not in r.stderr, r.args
        assert "'cryptography'" not in r.stderr and "error" not in r.stderr, r.stderr
    assert copy_lines(outs[2].stderr)[-1] == f"copying path '{added}' to 'ssh://localhost'..."
    r = env.nartool("key", "generate", "k-1", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert "'cryptography'" in r.stderr and "pip install 'nartool[signing]'" in r.stderr
    assert "Traceback" not in r.stderr


# -- the same lines as real Nix ----------------------------------------------------------------


@pytest.mark.nix
@pytest.mark.parametrize("direction", ["to", "from"])
def test_log_lines_match_nix_copy_closure(env: Env, nix: Any, direction: str) -> None:
    """nix-copy-closure 2.8 and nartool copy-closure write the same stderr lines for the same copy."""
    src, paths = env.source(n=3)
    lines = {}
    for tool in ("nix", "nartool"):
        if direction == "to":
            local, remote = src, env.tmp / f"{tool}-dst"
        else:
            local, remote = env.tmp / f"{tool}-dst", src
        if tool == "nix":
            r = nix("nix-copy-closure", f"--{direction}", env.url(remote), paths[-1],
                    env={"NIX_REMOTE": str(local), "NARTOOL_CONFIG": str(env.config), "PYTHONPATH": str(REPO)})
            err = r.stderr.decode()
        else:
            err = env.nartool("--store", local, "copy-closure", f"--{direction}", env.url(remote), paths[-1]).stderr
        lines[tool] = copy_lines(err)
    assert lines["nartool"] == lines["nix"]
    assert len(lines["nix"]) == 4 and lines["nix"][0] == "copying 3 paths..."
