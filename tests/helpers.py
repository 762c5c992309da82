"""Helpers shared by the test modules: running the ``nartool`` CLI as a subprocess, and the
environment for real Nix commands (isolated from the host's Nix configuration)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, overload

REPO = Path(__file__).resolve().parent.parent

#: Variables of the caller's environment a CLI run does not inherit unless ``env`` sets them
#: (a developer's default store must not leak into the tests).
UNSET = ("NARTOOL_STORE",)

Arg = str | os.PathLike[str]


_REPO_FOR: dict[str, Path] = {}


def repo_for(user: str) -> Path:
    """A checkout ``user`` can read, for tests that run code as another user (``runuser``):
    this one when ``user`` can reach its package and tests, else (a clone under a private home
    directory, say) a world-readable copy of ``nartool/`` and ``tests/``, made once per run."""
    if user in _REPO_FOR:
        return _REPO_FOR[user]
    probe = ["runuser", "-u", user, "--", "test", "-r", str(REPO / "nartool" / "__init__.py"), "-a",
             "-r", str(REPO / "tests" / "helpers.py")]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        _REPO_FOR[user] = REPO
        return REPO
    top = Path(tempfile.mkdtemp(prefix="nartool-checkout-"))
    atexit.register(shutil.rmtree, top, True)
    skip = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc")
    for part in ("nartool", "tests"):
        shutil.copytree(REPO / part, top / part, ignore=skip, symlinks=True)
    for d, _, files in os.walk(top):
        os.chmod(d, 0o755)
        for f in files:
            if not os.path.islink(os.path.join(d, f)):
                os.chmod(os.path.join(d, f), 0o644 | (os.stat(os.path.join(d, f)).st_mode & 0o111))
    _REPO_FOR[user] = top
    return top


def cli_argv(*args: Arg) -> list[str]:
    """The command line running ``nartool *args`` with this interpreter (for ``Popen``)."""
    return [sys.executable, "-m", "nartool", *map(os.fspath, args)]


def cli_env(env: dict[str, str] | None = None, unset: Iterable[str] = UNSET) -> dict[str, str]:
    """The environment for a CLI run: ours, minus ``unset``, with the working tree's package
    first on ``PYTHONPATH``, plus ``env``."""
    e = dict(os.environ)
    for name in unset:
        e.pop(name, None)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (os.fspath(REPO), e.get("PYTHONPATH")) if p)
    e.update(env or {})
    return e


@overload
def run_cli(*args: Arg, input: bytes | None = None, env: dict[str, str] | None = None, check: bool = False,
            cwd: Arg | None = None, timeout: float | None = None, unset: Iterable[str] = UNSET,
            text: Literal[False] = False) -> subprocess.CompletedProcess[bytes]: ...


@overload
def run_cli(*args: Arg, input: str | None = None, env: dict[str, str] | None = None, check: bool = False,
            cwd: Arg | None = None, timeout: float | None = None, unset: Iterable[str] = UNSET,
            text: Literal[True]) -> subprocess.CompletedProcess[str]: ...


def run_cli(*args: Arg, input: bytes | str | None = None, env: dict[str, str] | None = None, check: bool = False,
            cwd: Arg | None = None, timeout: float | None = None, unset: Iterable[str] = UNSET,
            text: bool = False) -> subprocess.CompletedProcess[bytes] | subprocess.CompletedProcess[str]:
    """Run ``nartool *args`` (see :func:`cli_env` for its environment), capturing its output.
    ``check=True`` raises :class:`subprocess.CalledProcessError` on a non-zero exit."""
    return subprocess.run(cli_argv(*args), input=input, capture_output=True, check=check, env=cli_env(env, unset),
                          cwd=cwd, timeout=timeout, text=text)


#: The only configuration real Nix reads in the tests (``$NIX_CONF_DIR/nix.conf``).
NIX_CONF = """\
# written by tests/helpers.py: the host's /etc/nix/nix.conf and ~/.config/nix are not read
sandbox = false
substituters =
experimental-features = nix-command
"""

_nix_dirs: Path | None = None


def _nix_conf_dirs() -> Path:
    global _nix_dirs
    if _nix_dirs is None:
        d = Path(tempfile.mkdtemp(prefix="nartool-tests-nix-"))
        atexit.register(shutil.rmtree, d, True)
        (d / "etc").mkdir()
        (d / "etc" / "nix.conf").write_text(NIX_CONF)
        (d / "config").mkdir()
        _nix_dirs = d
    return _nix_dirs


def nix_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: our environment) with real Nix confined to :data:`NIX_CONF`: its
    ``NIX_CONF_DIR`` is a private directory, no user configuration files are read
    (``NIX_USER_CONF_FILES`` empty, ``XDG_CONFIG_HOME``/``XDG_CONFIG_DIRS`` private) and
    ``NIX_CONFIG`` is ours. Every test running ``nix-store``, ``nix``, ``nix-instantiate`` or
    ``nix-copy-closure`` passes this (or uses the ``nix`` fixture, which does)."""
    d = _nix_conf_dirs()
    e = dict(os.environ if base is None else base)
    e.update(NIX_CONF_DIR=os.fspath(d / "etc"), NIX_USER_CONF_FILES="", XDG_CONFIG_HOME=os.fspath(d / "config"),
             XDG_CONFIG_DIRS=os.fspath(d / "config"), NIX_CONFIG="experimental-features = nix-command")
    return e
