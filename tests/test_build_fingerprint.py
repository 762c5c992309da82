"""The whole-sandbox fingerprint (tests/probes/fingerprint.sh: everything a builder can observe)
built by ``nartool build`` equals Nix 2.8's build of the same derivation, file by file — as root
(build users) and, through the library, as the unprivileged user ``nartuser`` (user namespace)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from nartool.store.local import LocalStore

from .buildkit import BB, copy_drv_closure, nartool_store, nix_build, nix_store_with_busybox, static_busybox
from .conftest import NIX_STORE, require
from .helpers import REPO, nix_env, repo_for, run_cli
from .probes.fingerprint_compare import compare_dirs, nix_expr

SCRIPT = (Path(__file__).parent / "probes" / "fingerprint.sh").read_text()


def _need() -> None:
    require("NIX", NIX_STORE is not None, "nix-store not found: install Debian's nix-bin for differential tests")
    require("SANDBOX", static_busybox(), "no static busybox (install busybox-static)")
    from nartool.build.sandbox import sandbox_unavailable_reason

    reason = sandbox_unavailable_reason()
    require("SANDBOX", reason is None, f"the build sandbox cannot run here: {reason}")


def _instantiate(root: Path, expr: str, env: dict[str, str] | None = None, user: list[str] | None = None) -> str:
    r = subprocess.run([*(user or []), "nix-instantiate", "--store", str(root), "--expr", expr], capture_output=True,
                       check=True, env=env or nix_env())
    return r.stdout.decode().strip()


def test_fingerprint_as_root(tmp_path: Path) -> None:
    _need()
    require("ROOT", os.geteuid() == 0, "the root fingerprint needs root (build users)")
    nixroot = tmp_path / "nix"
    assert nix_store_with_busybox(nixroot, tmp_path) == BB
    drv = _instantiate(nixroot, nix_expr(SCRIPT))
    n = nix_build(nixroot, drv)
    assert n.returncode == 0, n.stderr
    out = n.stdout.decode().split()[-1]
    st, _ = nartool_store(tmp_path / "ours", tmp_path)
    copy_drv_closure(nixroot, st, drv)
    st.close()
    m = run_cli("--store", tmp_path / "ours", "build", drv, timeout=120)
    assert m.returncode == 0, m.stderr
    assert m.stdout.decode().split() == [out]
    res = compare_dirs(Path(f"{nixroot}{out}"), Path(f"{tmp_path}/ours{out}"))
    assert res["diffs"] == {}, json.dumps(res["diffs"], indent=1)
    assert len(res["files"]) >= 25  # type: ignore[arg-type]
    # (NAR hashes may differ only through id-maps: the host uid of whichever build user was free)
    with LocalStore(tmp_path / "ours") as s:
        assert s.query_path_info(out) is not None


def test_fingerprint_unprivileged() -> None:
    _need()
    require("ROOT", os.geteuid() == 0, "needs root to run as nartuser")
    try:
        pwd.getpwnam("nartuser")
    except KeyError:
        require("ROOT", False, "user 'nartuser' needed for the unprivileged fingerprint")
    py = next((x for x in ("/usr/bin/python3", sys.executable) if subprocess.run(
        ["runuser", "-u", "nartuser", "--", x, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"],
        capture_output=True, check=False).returncode == 0), None)
    require("ROOT", py is not None, "no Python >= 3.10 runnable by nartuser")
    work = Path(tempfile.mkdtemp(prefix="nartool-fp-"))
    try:
        shutil.chown(work, "nartuser")
        script = f"""
import json, subprocess, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from tests.buildkit import nartool_store, nix_store_with_busybox, copy_drv_closure
from tests.helpers import nix_env
from tests.probes.fingerprint_compare import compare_dirs, nix_expr
from nartool.build import BuildOptions, build_paths
work = Path({str(work)!r})
nixroot = work / "nix"
nix_store_with_busybox(nixroot, work)
drv = subprocess.run(["nix-instantiate", "--store", str(nixroot), "--expr", nix_expr(Path({str(REPO)!r} + "/tests/probes/fingerprint.sh").read_text())],
                     capture_output=True, check=True, env=nix_env()).stdout.decode().strip()
n = subprocess.run(["nix-store", "--store", str(nixroot), "--option", "substituters", "", "-r", drv],
                   capture_output=True, env=nix_env())
if n.returncode:
    print(json.dumps({{"error": "nix: " + n.stderr.decode()}})); sys.exit(0)
out = n.stdout.decode().split()[-1]
st, _ = nartool_store(work / "ours", work)
copy_drv_closure(nixroot, st, drv)
r = build_paths(st, [drv], BuildOptions(), log=sys.stderr.buffer.write)[0]
if r.status != 0:
    print(json.dumps({{"error": "nartool: " + r.error_msg}})); sys.exit(0)
res = compare_dirs(Path(str(nixroot) + out), Path(str(work / "ours") + out))
res["ours"] = st.query_path_info(out).nar_hash.prefixed("nix32")
res["nix"] = subprocess.run(["nix-store", "--store", str(nixroot), "-q", "--hash", out], capture_output=True,
                            env=nix_env()).stdout.decode().strip()
print(json.dumps(res))
"""
        r = subprocess.run(["runuser", "-u", "nartuser", "--", py or "", "-c", script], capture_output=True,
                           cwd="/tmp", env={**os.environ, "PYTHONPATH": str(repo_for("nartuser")), "TMPDIR": str(work),
                                            "HOME": str(work)}, timeout=300, check=False)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        res = json.loads(r.stdout)
        assert "error" not in res, res
        assert res["diffs"] == {}, json.dumps(res["diffs"], indent=1)
        assert res["ours"] == res["nix"]
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
