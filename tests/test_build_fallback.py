"""Where the kernel refuses namespaces (a container that forbids ``unshare``), a build of the real
``/nix/store`` falls back to an unsandboxed build when ``sandbox-fallback`` allows it, as Nix
does, and fails naming the cause when it does not.

Real parts: the test runs a Python process in a mount namespace of its own with a tmpfs on
``/nix`` (so the store is ``/nix/store`` itself, not a diverted one, without touching the host's),
and that process refuses itself ``unshare(2)`` with a seccomp filter (EPERM, as such containers
do) before it builds with busybox as the builder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .buildkit import static_busybox
from .conftest import require
from .helpers import REPO

SCRIPT = r'''
import ctypes, json, os, platform, struct, sys
from pathlib import Path

# refuse unshare(2) with EPERM in this process and everything it starts (classic BPF)
ARCH = {"x86_64": (0xC000003E, 272), "aarch64": (0xC00000B7, 97)}[platform.machine()]
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    ins(0x20, 0, 0, 4),                      # A = arch
    ins(0x15, 0, 3, ARCH[0]),                # another arch: allow
    ins(0x20, 0, 0, 0),                      # A = syscall number
    ins(0x15, 0, 1, ARCH[1]),                # unshare: EPERM
    ins(0x06, 0, 0, 0x00050000 | 1),
    ins(0x06, 0, 0, 0x7FFF0000),             # the rest: allowed
])
libc = ctypes.CDLL(None, use_errno=True)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
buf = ctypes.create_string_buffer(prog, len(prog))
fp = Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
assert libc.prctl(38, 1, 0, 0, 0) == 0                                   # no new privileges
assert libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0, ctypes.get_errno()  # seccomp filter

from nartool.build import BuildOptions, BuildStatus, build_paths
from nartool.build.sandbox import sandbox_unavailable_reason
from tests.buildkit import nartool_store, write_drv

tmp = Path(sys.argv[1])
st, bb = nartool_store(Path("/"), tmp)   # /nix/store itself (a tmpfs here)
assert st.real_store_dir == st.store_dir == "/nix/store"
out = {"reason": sandbox_unavailable_reason()}
for fallback in (False, True):
    drv = write_drv(st, f"fallback-{int(fallback)}", "echo built > $out; pwd >> $out")
    res = build_paths(st, [drv], BuildOptions(sandbox_fallback=fallback, build_users_group=""))[0]
    path = st.query_derivation_outputs(drv).get("out") or ""
    out[str(fallback)] = {"status": int(res.status), "error": res.error_msg, "valid": bool(path) and st.is_valid(path),
                          "contents": open(path).read() if path and os.path.exists(path) else None}
print(json.dumps(out))
'''


def test_unsandboxed_fallback_where_namespaces_are_refused(tmp_path: Path) -> None:
    require("SANDBOX", static_busybox(), "no static busybox (install busybox-static)")
    require("ROOT", os.geteuid() == 0, "needs root (a tmpfs on /nix in a mount namespace of its own)")
    require("ROOT", os.path.isdir("/nix") and shutil.which("unshare") is not None,
            "needs a /nix directory to mount over and unshare(1)")
    script = tmp_path / "fallback.py"
    script.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs tmpfs /nix && exec "$0" "$@"', sys.executable, str(script), str(work)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["reason"] and "Operation not permitted" in res["reason"], res
    # sandbox-fallback = false: the build fails, naming the cause; nothing registered
    no = res["False"]
    assert no["status"] != 0 and not no["valid"] and no["contents"] is None, no
    assert "unable to start build process" in no["error"] and "Operation not permitted" in no["error"], no
    # sandbox-fallback = true (Nix's default): built without the sandbox, in the host's file system
    # (its build directory is the host's, not the sandbox's /build)
    yes = res["True"]
    assert yes["status"] == 0 and yes["valid"], yes
    built, cwd = yes["contents"].splitlines()
    assert built == "built" and cwd != "/build" and "/nix-build-fallback-1.drv-" in cwd, yes
    # the host's /nix was never touched
    assert not any(n.endswith(("-fallback-0.drv", "-fallback-1.drv")) for n in os.listdir("/nix/store"))
