"""Shared fixtures. Tests needing real Nix, FUSE or sshd skip with a stated reason when the
tool is absent — unless NARTOOL_REQUIRE_<NIX|FUSE|SSH>=1 (set by .ci/run), which turns that
skip into a failure so CI cannot pass without running them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def require(kind: str, available: bool, reason: str) -> None:
    if available:
        return
    if os.environ.get(f"NARTOOL_REQUIRE_{kind}") == "1":
        pytest.fail(f"{reason} (NARTOOL_REQUIRE_{kind}=1: this test must run)")
    pytest.skip(reason)


NIX_STORE = shutil.which("nix-store")


@pytest.fixture
def nix() -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """Run a real Nix command: ``nix("nix-store", "--dump", path)`` → CompletedProcess."""
    require("NIX", NIX_STORE is not None, "nix-store not found: install Debian's nix-bin for differential tests")

    def run(*args: str | os.PathLike[str], input: bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        e = dict(os.environ)
        e.setdefault("NIX_CONFIG", "experimental-features = nix-command")
        if env:
            e.update(env)
        argv = [os.fspath(a) for a in args]
        if argv[0] == "nix":
            argv[1:1] = ["--extra-experimental-features", "nix-command"]
        return subprocess.run(argv, input=input, capture_output=True, check=check, env=e)

    return run
