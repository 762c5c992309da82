"""Test helpers for builds (shared by the build and sandbox tests): a store holding Debian's
static busybox as the only builder, and derivations made either by real Nix
(``nix-instantiate``) or by nartool's own derivation code.

The busybox tree is ``busybox/bin/busybox`` plus ``busybox/bin/sh -> busybox``; added to any
store with the default store dir it is :data:`BB` (the same path in every store, Nix's or
nartool's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from nartool.store.derivation import Derivation, DerivationOutput, compute_outputs, store_resolver
from nartool.store.local import LocalStore

from .helpers import nix_env

BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)
#: the store path of the busybox tree (Debian 12's busybox-static 1.35)
BB = "/nix/store/ap5lw0pk87zllpr8psdiqgxx50yqpp1h-busybox"
SYSTEM = "x86_64-linux"


def busybox_tree(tmp: Path) -> Path:
    """``tmp/busybox`` with ``bin/busybox`` (a copy of the static binary) and ``bin/sh``."""
    assert BUSYBOX is not None
    d = tmp / "busybox"
    if not d.exists():
        (d / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, d / "bin" / "busybox")
        os.chmod(d / "bin" / "busybox", 0o755)
        (d / "bin" / "sh").symlink_to("busybox")
    return d


def static_busybox() -> bool:
    """Whether the machine's busybox is static (a dynamic one cannot run in the sandbox): an ELF
    file without a program interpreter (its path sits near the start of a dynamic binary)."""
    if BUSYBOX is None:
        return False
    with open(BUSYBOX, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x7fELF") and b"/ld-linux" not in head and b"/ld-musl" not in head


def nartool_store(root: Path, tmp: Path) -> tuple[LocalStore, str]:
    """A nartool store at ``root`` holding the busybox tree; returns it and the busybox path."""
    st = LocalStore(root)
    info = st.add_path(busybox_tree(tmp))
    return st, info.path


def nix_store_with_busybox(root: Path, tmp: Path) -> str:
    """A real Nix chroot store at ``root`` holding the busybox tree; returns the busybox path."""
    r = subprocess.run(["nix-store", "--store", str(root), "--add", str(busybox_tree(tmp))], capture_output=True,
                       check=True, env=nix_env())
    return r.stdout.decode().strip()


def instantiate(root: Path, expr: str, *, tmp: Path | None = None) -> str:
    """``nix-instantiate --store ROOT --expr EXPR`` (``bb`` is bound to the busybox store path)."""
    full = f"let bb = builtins.storePath {BB}; in {expr}"
    r = subprocess.run(["nix-instantiate", "--store", str(root), "--expr", full], capture_output=True,
                       check=False, env=nix_env())
    if r.returncode != 0:
        raise AssertionError(r.stderr.decode())
    return r.stdout.decode().strip().splitlines()[-1]


def write_drv(store: LocalStore, name: str, script: str, *, inputs: list[str] | None = None,
              input_drvs: dict[str, list[str]] | None = None, env: dict[str, str] | None = None,
              outputs: tuple[str, ...] = ("out",), fixed: tuple[str, str] | None = None,
              builder: str | None = None, args: list[str] | None = None) -> str:
    """A derivation written by nartool's derivation code: ``builder`` (default busybox ``sh``)
    with ``args`` (default ``-c SCRIPT``); ``fixed`` = (``[r:]algo``, hex hash) makes a
    fixed-output derivation. Returns the ``.drv`` path (added to ``store``)."""
    e: dict[str, Any] = {"name": name, "system": SYSTEM, "builder": builder or f"{BB}/bin/sh"}
    outs = {o: DerivationOutput() for o in outputs}
    if fixed is not None:
        outs = {"out": DerivationOutput("", fixed[0], fixed[1])}
        e["outputHashAlgo"] = fixed[0].removeprefix("r:")
        e["outputHash"] = fixed[1]
        e["outputHashMode"] = "recursive" if fixed[0].startswith("r:") else "flat"
    if len(outputs) > 1 or outputs != ("out",):
        e["outputs"] = " ".join(outputs)
    for o in outs:
        e[o] = ""
    e.update(env or {})
    drv = Derivation(outputs=outs, input_drvs=dict(input_drvs or {}), input_srcs=sorted(set(inputs or [BB])),
                     platform=SYSTEM, builder=e["builder"], args=args if args is not None else ["-c", script],
                     env=e, name=name)
    full = compute_outputs(drv, store_resolver(store), store.store_dir)
    info = store.add_text(name + ".drv", full.unparse(), full.references())
    return info.path


def nix_build(root: Path, drv: str, *options: str, check: bool = False) -> subprocess.CompletedProcess[bytes]:
    """``nix-store --store ROOT --realise DRV`` with no substituters."""
    return subprocess.run(["nix-store", "--store", str(root), "--option", "substituters", "", *options,
                           "--realise", drv], capture_output=True, check=check, env=nix_env())


def copy_drv_closure(src_root: Path, dst: LocalStore, drv: str) -> None:
    """Copy a ``.drv`` and everything it refers to from a Nix chroot store into ``dst``."""
    r = subprocess.run(["nix-store", "--store", str(src_root), "--export",
                        *subprocess.run(["nix-store", "--store", str(src_root), "-qR", drv], capture_output=True,
                                        check=True, env=nix_env()).stdout.decode().split()],
                       capture_output=True, check=True, env=nix_env())
    dst.import_paths(r.stdout)


def nar_hash(root: Path, path: str) -> str:
    r = subprocess.run(["nix-store", "--store", str(root), "-q", "--hash", path], capture_output=True, check=True,
                       env=nix_env())
    return r.stdout.decode().strip()
