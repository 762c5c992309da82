"""End-to-end smoke test of the CLI on a small tree, against real Nix."""

from __future__ import annotations

import os
from pathlib import Path

from .helpers import run_cli


def test_dump_matches_nix(tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    t = tmp_path / "t"
    (t / "sub").mkdir(parents=True)
    (t / "a").write_bytes(b"hello\n")
    os.symlink("a", t / "link")
    (t / "sub" / "run").write_bytes(b"#!/bin/sh\n")
    os.chmod(t / "sub" / "run", 0o755)
    ours = run_cli("nar", "dump", str(t))
    assert ours.returncode == 0, ours.stderr
    theirs = nix("nix-store", "--dump", t).stdout
    assert ours.stdout == theirs


def test_bad_input_one_line_error(tmp_path: Path) -> None:
    r = run_cli("nar", "restore", str(tmp_path / "out"), input=b"not a nar at all, clearly")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.startswith("error: not a NAR") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []
