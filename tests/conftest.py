"""Shared fixtures. Tests needing real Nix, FUSE, sshd or root skip with a stated reason when
the capability is missing (e.g. as a normal user: /dev/fuse not accessible, serve's trust only
for root) — unless NARTOOL_REQUIRE_<NIX|FUSE|SSH|ROOT|S3|SANDBOX>=1 (.ci/run sets them), which turns that
skip into a failure so CI cannot pass without running them.

As a normal user the suite also: raises the soft limit on open files to the hard limit (the
deep-tree tests hold a descriptor per level; the default soft limit of 1024 is too low for
them), and gives real Nix a private store (``NIX_REMOTE=local?root=…``) for commands without
``--store``, since a normal user cannot reach the system's Nix daemon socket.

Real Nix never reads the host's configuration (/etc/nix/nix.conf, ~/.config/nix, NIX_CONFIG):
the ``nix`` fixture, and every other Nix call, runs with :func:`tests.helpers.nix_env`."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .helpers import nix_env

FIXTURES = Path(__file__).parent / "fixtures"


def require(kind: str, available: bool, reason: str) -> None:
    if available:
        return
    if os.environ.get(f"NARTOOL_REQUIRE_{kind}") == "1":
        pytest.fail(f"{reason} (NARTOOL_REQUIRE_{kind}=1: this test must run)")
    pytest.skip(reason)


NIX_STORE = shutil.which("nix-store")
IS_ROOT = os.geteuid() == 0


def _raise_open_files_limit() -> None:
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


_raise_open_files_limit()

#: Tests that run ``nartool serve`` (or copy into it) as a subprocess and need it to trust the
#: user running them through that user's own configuration file (``NARTOOL_CONFIG``). serve
#: reads trust settings only from /etc/nartool/nartool.conf — and from root's own files when it
#: runs as root — so as a normal user these can only be skipped. By file and test name.
NEEDS_ROOT_FOR_SERVE_TRUST = {
    "test_remote_protocol.py": {"test_serve_cli_session_and_errors", "test_serve_cli_allowed_users",
                                "test_concurrent_group_commits_in_opposite_orders"},
    "test_remote_nix.py": {"test_nix_copy_closure_to_nartool_serve", "test_nix_copy_to_ssh_store_nartool_serve",
                           "test_nartool_to_nartool_with_zstd", "test_all_directions_over_sshd",
                           "test_cut_connection_then_rerun", "test_concurrent_overlapping_copies"},
    "test_hardening_serve.py": {"test_stalled_client_does_not_hold_a_path_lock",
                                "test_stalled_import_paths_does_not_hold_a_path_lock"},
}


_SERVE_TRUST_REASON = ("runs `nartool serve` as this user and trusts it through the user's own "
                       "configuration file, which serve honours only for root (trust comes from "
                       "/etc/nartool/nartool.conf): run the tests as root")


def _untrusted_mark() -> str:
    """What serve's refusal says when the user running the tests is not trusted."""
    import getpass

    user = getpass.getuser()
    return f"(user '{user}' is not trusted: add 'trusted-users = {user}'"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """As a normal user outside CI, a test that failed only because a `nartool serve` it started
    (locally or over ssh) refused this user as untrusted — the refusal names the user — is
    reported as a skip for the missing capability (tests added without being listed in
    NEEDS_ROOT_FOR_SERVE_TRUST). As root, or with NARTOOL_REQUIRE_ROOT=1, it stays a failure."""
    outcome = yield
    rep = outcome.get_result()
    if IS_ROOT or os.environ.get("NARTOOL_REQUIRE_ROOT") == "1" or rep.when != "call" or not rep.failed:
        return
    if _untrusted_mark() in str(rep.longrepr):
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {_SERVE_TRUST_REASON}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    names = NEEDS_ROOT_FOR_SERVE_TRUST.get(item.path.name, set())
    if getattr(item, "originalname", item.name) in names:
        require("ROOT", IS_ROOT, _SERVE_TRUST_REASON)


@pytest.fixture(scope="session")
def _private_nix_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.fspath(tmp_path_factory.mktemp("nix-default-store"))


@pytest.fixture
def nix(_private_nix_root: str) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """Run a real Nix command: ``nix("nix-store", "--dump", path)`` → CompletedProcess."""
    require("NIX", NIX_STORE is not None, "nix-store not found: install Debian's nix-bin for differential tests")

    def run(*args: str | os.PathLike[str], input: bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        e = nix_env()  # not the host's nix.conf
        if not IS_ROOT:  # the daemon socket is root's: a store of our own (``--store`` overrides it)
            e.setdefault("NIX_REMOTE", f"local?root={_private_nix_root}")
        if env:
            e.update(env)
        argv = [os.fspath(a) for a in args]
        if argv[0] == "nix":
            argv[1:1] = ["--extra-experimental-features", "nix-command"]
        return subprocess.run(argv, input=input, capture_output=True, check=check, env=e)

    return run
