"""Build the fingerprint derivation (fingerprint.sh) with real Nix 2.8 and with nartool's sandbox,
and compare the two outputs file by file.

Used in-process by tests/test_sandbox.py (as root, with build users) and run as a script as an
unprivileged user (``python fingerprint_compare.py``: prints a JSON report on stdout), where Nix
builds into a chroot store owned by that user and nartool's sandbox goes through a user namespace.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nartool.build.sandbox import Bind, SandboxSpec, start_sandboxed  # noqa: E402
from nartool.build.users import acquire_build_user  # noqa: E402
from nartool.store.derivation import parse_derivation  # noqa: E402
from tests.helpers import nix_env  # noqa: E402

BUSYBOX_BASE = "ap5lw0pk87zllpr8psdiqgxx50yqpp1h-busybox"
BUSYBOX = "/nix/store/" + BUSYBOX_BASE


def busybox_tree(dest: str | os.PathLike[str], read_only: bool = True) -> None:
    """``dest/bin/{busybox,sh->busybox}`` from the host's static busybox, with the store's
    permissions (read-only) when ``read_only``."""
    b = Path(dest) / "bin"
    b.mkdir(parents=True)
    shutil.copy("/bin/busybox", b / "busybox")
    os.symlink("busybox", b / "sh")
    if read_only:
        for p in (b / "busybox", b, Path(dest)):
            os.chmod(p, 0o555)


#: a syntactically valid sha256 that no fingerprint output has
DUMMY_HASH = "0" * 52


def nix_expr(script: str, name: str = "fp", fixed_output: bool = False) -> str:
    quoted = json.dumps(script).replace("${", "\\${")
    fod = (f'outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "{DUMMY_HASH}"; '
           if fixed_output else "")
    return (f'derivation {{ name = "{name}"; system = builtins.currentSystem; {fod}'
            f'builder = "${{builtins.storePath {BUSYBOX}}}/bin/sh"; args = [ "-c" {quoted} ]; }}')


def nix_env_order(drv_env: dict[str, str], cores: int, fixed_output: bool = False) -> list[tuple[bytes, bytes]]:
    """The builder environment of Nix 2.8: its variables live in a std::map, so execve gets them
    sorted by name (the fingerprint's environ-order file checks this)."""
    env = {"PATH": "/path-not-set", "HOME": "/homeless-shelter", "NIX_STORE": "/nix/store",
           "NIX_BUILD_CORES": str(cores)}
    env.update(drv_env)
    for k in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[k] = "/build"
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    if fixed_output:
        env["NIX_OUTPUT_CHECKED"] = "1"
    return sorted((k.encode(), v.encode()) for k, v in env.items())


def drain(log_fd: int) -> bytes:
    out = b""
    while True:
        select.select([log_fd], [], [])
        try:
            chunk = os.read(log_fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _normalise(name: str, data: bytes, rewrites: dict[bytes, bytes]) -> bytes:
    for old, new in rewrites.items():
        data = data.replace(old, new)
    if name == "id-maps":
        # the host side of the uid map names whichever build user was free: not part of the view
        lines = data.split(b"\n")
        f = lines[0].split()
        if len(f) == 3:
            lines[0] = b" ".join([f[0], b"HOST-UID", f[2]])
        data = b"\n".join(lines)
    return data


def compare_dirs(a: Path, b: Path, rewrites: dict[bytes, bytes] | None = None) -> dict[str, object]:
    """File-by-file comparison of Nix's fingerprint ``a`` with ours ``b``; ``rewrites`` are applied
    to Nix's side (a fixed-output result that Nix moved to the path of its actual hash)."""
    fa = sorted(p.name for p in a.iterdir())
    fb = sorted(p.name for p in b.iterdir())
    diffs: dict[str, object] = {}
    for name in sorted(set(fa) | set(fb)):
        if name not in fa or name not in fb:
            diffs[name] = "only in " + ("ours" if name not in fa else "nix")
            continue
        ta = _normalise(name, (a / name).read_bytes(), rewrites or {})
        tb = _normalise(name, (b / name).read_bytes(), {})
        if ta != tb:
            diffs[name] = {"nix": ta.decode(errors="replace"), "ours": tb.decode(errors="replace")}
    return {"files": fa, "diffs": diffs}


def host_binds(work: str) -> tuple[str, list[Bind]]:
    """Host paths for ``sandbox-paths``: a directory, a file, a symlink to the directory (followed),
    a missing optional entry. Returns Nix's option value and the same entries parsed."""
    h = Path(work) / "host"
    (h / "dir").mkdir(parents=True)
    (h / "dir" / "f").write_text("in a bound directory\n")
    (h / "file").write_text("a bound file\n")
    os.symlink("dir", h / "link")
    for p in (work, h, h / "dir"):
        os.chmod(p, 0o755)
    entries = [("/opt/dir", f"{h}/dir", False), ("/opt/file", f"{h}/file", False), ("/opt/link", f"{h}/link", False),
               ("/opt/missing", f"{h}/nope", True), ("/srv/x/y", f"{h}/dir", False)]
    option = " ".join(f"{t}={s}" + ("?" if o else "") for t, s, o in entries)
    return option, [Bind(t, s, o) for t, s, o in entries]


def run(work: str, fixed_output: bool = False, build_users: bool = True, sandbox_paths: bool = False) -> dict[str, object]:
    """Both builds under ``work``; returns {"files": [...], "diffs": {...}, "nix_out": ..., ...}.
    ``build_users``: as root, with ``build-users-group = nixbld`` (else empty: root maps to 1000);
    ``sandbox_paths``: host paths bound in (see :func:`host_binds`)."""
    script = (HERE / "fingerprint.sh").read_text()
    src = Path(work) / "src" / "busybox"
    busybox_tree(src, read_only=False)
    env = nix_env()
    nstore = f"{work}/nix"
    subprocess.run(["nix-store", "--store", nstore, "--add", str(src)], env=env, check=True, capture_output=True)
    drv_path = subprocess.run(["nix-instantiate", "--store", nstore, "--expr", nix_expr(script, fixed_output=fixed_output)],
                              env=env, check=True, capture_output=True, text=True).stdout.strip()
    before = set(os.listdir(nstore + "/nix/store"))
    rewrites: dict[bytes, bytes] = {}
    opts = ["--option", "substituters", ""]
    if not build_users:
        opts += ["--option", "build-users-group", ""]
    binds: list[Bind] = []
    if sandbox_paths:
        value, binds = host_binds(work)
        opts += ["--option", "sandbox-paths", value]
    r = subprocess.run(["nix-store", "--store", nstore, *opts, "-r", drv_path], env=env, capture_output=True, text=True)
    drv = parse_derivation(Path(nstore + drv_path).read_bytes())
    out_path = drv.outputs["out"].path
    if fixed_output:
        # the dummy hash fails; Nix 2.8 registers the output under the path of its actual hash
        if "hash mismatch in fixed-output derivation" not in r.stderr:
            raise RuntimeError(f"nix-store -r: expected a hash mismatch: {r.stderr}")
        new = [n for n in set(os.listdir(nstore + "/nix/store")) - before
               if n.endswith("-fp") and os.path.isdir(f"{nstore}/nix/store/{n}")]
        if len(new) != 1:
            raise RuntimeError(f"cannot find Nix's fixed-output result among {new}")
        nix_out = f"{nstore}/nix/store/{new[0]}"
        rewrites = {new[0].encode(): out_path.rsplit("/", 1)[1].encode()}
    else:
        if r.returncode != 0:
            raise RuntimeError(f"nix-store -r failed: {r.stderr}")
        nix_out = nstore + r.stdout.strip()

    ours = f"{work}/ours"
    busybox_tree(f"{ours}/nix/store/{BUSYBOX_BASE}")
    bu = acquire_build_user("nixbld") if os.getuid() == 0 and build_users else None
    build_dir = tempfile.mkdtemp(prefix="nix-build-fp.drv-", dir=work)
    if bu is not None:
        os.chown(build_dir, bu.uid, bu.gid)
    spec = SandboxSpec(
        builder=drv.builder.encode(), args=[a.encode() for a in drv.args],
        env=nix_env_order(drv.env, os.cpu_count() or 1, fixed_output), store_dir="/nix/store",
        real_store_dir=f"{ours}/nix/store", chroot_dir=f"{ours}/nix/store/{Path(drv_path).name}.chroot",
        build_dir=build_dir, inputs=[BUSYBOX], binds=binds, outputs=[out_path], host_network=fixed_output,
        build_user=bu, kvm=os.access("/dev/kvm", os.R_OK | os.W_OK))
    try:
        b = start_sandboxed(spec)
        log = drain(b.log_fd)
        status = b.wait()
        mine = Path(work) / "ours-out"
        if os.path.lexists(b.output_location(out_path)):
            os.rename(b.output_location(out_path), mine)
        b.cleanup()
    finally:
        if bu is not None:
            bu.release()
    res = {"status": status, "log": log.decode(errors="replace"), "nix_out": nix_out,
           "chroot_left": os.path.lexists(spec.chroot_dir)}
    if mine.is_dir():
        res.update(compare_dirs(Path(nix_out), mine, rewrites))
    else:
        res["diffs"] = {"*": "no output from nartool's sandbox"}
    return res


if __name__ == "__main__":
    work = tempfile.mkdtemp(prefix="nartool-fp-")
    try:
        print(json.dumps(run(work, fixed_output="--fixed-output" in sys.argv[1:],
                             sandbox_paths="--sandbox-paths" in sys.argv[1:])))
    finally:
        subprocess.run(["chmod", "-R", "u+w", work], check=False)
        shutil.rmtree(work, ignore_errors=True)
