"""The case hack on a real case-insensitive mount (FUSE)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from nartool.nar import nar_bytes

from .fusefs import ci_mount, hfs_mount  # noqa: F401  (fixtures)
from .helpers import UNSET, run_cli
from .test_nar_property import events_of

TREE = {b"Makefile": b"1", b"makefile": b"2", b"README": b"r", b"src": {b"A.c": b"a", b"a.c": b"b"},
        b"a~nix~case~hack~1": b"literal"}


def _cli(*args: str, input: bytes | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*args, input=input, env=env, unset=(*UNSET, "NARTOOL_CASE_HACK"))


def test_mount_is_case_insensitive(ci_mount: Path) -> None:  # noqa: F811
    (ci_mount / "Foo").write_text("x")
    assert (ci_mount / "FOO").read_text() == "x"
    assert os.listdir(ci_mount) == ["Foo"]
    from nartool.fs.detect import is_case_insensitive

    assert is_case_insensitive(ci_mount)


def test_restore_without_case_hack_fails_cleanly(ci_mount: Path) -> None:  # noqa: F811
    nar = nar_bytes(events_of(TREE))
    r = _cli("nar", "restore", "--no-case-hack", str(ci_mount / "out"), input=nar)
    assert r.returncode == 1
    assert b"makefile" in r.stderr and b"collision" in r.stderr, r.stderr
    assert os.listdir(ci_mount) == []


def test_restore_with_case_hack_round_trips(ci_mount: Path) -> None:  # noqa: F811
    nar = nar_bytes(events_of(TREE))
    r = _cli("nar", "restore", str(ci_mount / "out"), input=nar)  # auto-detected
    assert r.returncode == 0, r.stderr
    assert b"case hack" in r.stderr
    assert "makefile~nix~case~hack~1" in os.listdir(ci_mount / "out")
    r = _cli("nar", "dump", str(ci_mount / "out"))
    assert r.returncode == 0 and r.stdout == nar


def test_normalisation_variants_on_hfs_like_mount(hfs_mount: Path) -> None:  # noqa: F811
    tree = {"été".encode(): b"nfc", "e\u0301te\u0301".encode(): b"nfd", "É".encode(): b"E"}
    nar = nar_bytes(events_of(tree))
    r = _cli("nar", "restore", "--no-case-hack", str(hfs_mount / "plain"), input=nar)
    assert r.returncode == 1 and os.listdir(hfs_mount) == []
    r = _cli("nar", "restore", "--case-hack", str(hfs_mount / "out"), input=nar)
    assert r.returncode == 0, r.stderr
    assert _cli("nar", "dump", "--case-hack", str(hfs_mount / "out")).stdout == nar


def test_store_on_case_insensitive_mount(ci_mount: Path, tmp_path: Path) -> None:  # noqa: F811
    """A store created on a case-insensitive filesystem takes the case hack (probed once, then
    remembered) and holds Linux closures losslessly: import then export gives the same bytes."""
    from nartool.nar.hashing import hash_events
    from nartool.store import LocalStore, PathInfo
    from nartool.store.paths import make_fixed_output_path

    nar = nar_bytes(events_of(TREE))
    h, size = hash_events(events_of(TREE))
    path = make_fixed_output_path("tree", h, recursive=True)
    env_before = os.environ.pop("NARTOOL_CASE_HACK", None)
    try:
        s = LocalStore(ci_mount / "store")
        assert s.case_hack
        s.add_nar(PathInfo(path, h, size), nar)
        assert b"".join(bytes(c) for c in s.nar_chunks(path)) == nar
        assert s.verify(check_contents=True) == []
        s.close()
        s = LocalStore(ci_mount / "store")  # remembered, not re-probed
        assert s.case_hack
        s.close()
    finally:
        if env_before is not None:
            os.environ["NARTOOL_CASE_HACK"] = env_before
    r = _cli("--store", str(ci_mount / "store"), "store", "export", path)
    assert r.returncode == 0, r.stderr
    r2 = _cli("--store", str(tmp_path / "plain"), "store", "import", input=r.stdout)
    assert r2.returncode == 0, r2.stderr
    r3 = _cli("--store", str(tmp_path / "plain"), "store", "dump", path)
    assert r3.stdout == nar
