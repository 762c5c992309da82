"""Shared parts of the remote-build tests: stores holding busybox as the builder, derivation
chains instantiated by real Nix, a recording wrapper for the remote program, and a parser of
the client-to-server bytes it captures (to check which commands a client sent)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nartool.nar.source import ByteSource
from nartool.remote import messages as M
from nartool.remote import wire as W
from nartool.store.local import LocalStore

from .buildkit import BB as BUSYBOX
from .buildkit import BUSYBOX as BUSYBOX_BIN
from .buildkit import busybox_tree, static_busybox
from .conftest import require
from .helpers import nix_env

SYSTEM = "x86_64-linux"
__all__ = ["BUSYBOX", "BUSYBOX_BIN", "busybox_tree"]

#: derivations for the tests; ``what`` picks one; ``n`` is the length of ``chainN``
EXPR = """{ busybox, what, n ? 2, tag ? "" }:
let
  bb = builtins.storePath busybox;
  sh = "${bb}/bin/sh";
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = sh;
                                  args = [ "-c" script ]; };
  base = mk "rb-base" "echo building base; echo base > $out";
  top = mk "rb-top" "echo building top; cat ${base} > $out; echo top >> $out";
  step = i: prev: mk "rb-step-${toString i}${tag}"
    (if prev == null then "echo step 0; echo 0 > $out" else "echo step ${toString i}; cat ${prev} > $out; echo ${toString i} >> $out");
  go = i: if i == 0 then step 0 null else step i (go (i - 1));
  fail = mk "rb-fail" "echo about to fail; echo second line; exit 3";
  silent = mk "rb-silent" "echo going quiet; sleep 5; echo never > $out";
  fod = derivation { name = "rb-fod"; system = builtins.currentSystem; builder = sh; args = [ "-c" "echo hi > $out" ];
                     outputHashMode = "flat"; outputHashAlgo = "sha256";
                     outputHash = "98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4"; };
  esc = mk "rb-esc" "printf 'plain\\\\n\\\\033[31mred\\\\033[0m text\\\\n\\\\033]0;title\\\\007after osc\\\\ntab\\\\there\\\\ncarriage\\\\rreturn\\\\n\\\\033[3pq\\\\033[s\\\\033[q\\\\nlast without newline'; echo x > $out";
  nonl = mk "rb-nonl" "echo first line; printf 'no newline at the end'; echo x > $out";
  hang = mk "rb-hang${tag}" "echo started; sleep 37; echo done > $out";
  refs = mk "rb-refs" "mkdir $out; echo ${base} > $out/ref; ln -s ${bb}/bin/sh $out/sh; printf 'no newline at the end'";
in { chain = top; inherit fail silent refs hang nonl fod esc; chainN = go (n - 1); }.${what}
"""


def require_busybox() -> None:
    require("NIX", BUSYBOX_BIN is not None and static_busybox() and shutil.which("nix-instantiate") is not None,
            "a static busybox (busybox-static) and nix-instantiate are needed for the remote-build tests")


def make_store(root: Path, tmp: Path, with_busybox: bool = True) -> Path:
    """A store at ``root`` (made by nartool) holding busybox (``tests/buildkit.py``'s tree)."""
    st = LocalStore(root)
    try:
        if with_busybox:
            p = st.add_path(busybox_tree(tmp)).path
            if p != BUSYBOX:
                require("NIX", False, f"{BUSYBOX_BIN} is not the busybox these tests expect (it added as {p})")
    finally:
        st.close()
    return root


def instantiate(store: Path, tmp: Path, what: str, **args: str | int) -> str:
    """``nix-instantiate`` the derivation ``what`` of :data:`EXPR` into ``store``; its .drv path."""
    expr = tmp / "rb.nix"
    expr.write_text(EXPR)
    argv = ["nix-instantiate", "--store", os.fspath(store), "--arg", "busybox", f'"{BUSYBOX}"', "--argstr", "what", what]
    for k, v in args.items():
        argv += ["--arg", k, str(v)] if isinstance(v, int) else ["--argstr", k, v]
    r = subprocess.run([*argv, os.fspath(expr)], env=nix_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"nix-instantiate failed: {r.stderr}")
    return r.stdout.strip().splitlines()[-1].split("!")[0]


RECORDER = """#!/bin/sh
# records what the client sends to the remote program and passes everything through
n=$(cat "{dir}/counter" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "{dir}/counter"
exec 3>"{dir}/session-$n.c2s"
tee /dev/fd/3 | {program} "$@"
"""


def recorder(tmp: Path, program: str, name: str = "recorder") -> tuple[Path, Path]:
    """A remote program that records each session's client bytes to ``DIR/session-N.c2s`` and
    runs ``program "$@"``; returns (the program, DIR)."""
    d = tmp / f"{name}-sessions"
    d.mkdir(parents=True, exist_ok=True)
    p = tmp / name
    p.write_text(RECORDER.format(dir=d, program=program))
    p.chmod(0o755)
    return p, d


@dataclass
class Command:
    number: int
    detail: object = None
    flag: int = 0  # QueryValidPaths: the substitute flag


def parse_c2s(data: bytes, store_dir: str = "/nix/store") -> list[Command]:
    """The commands a client sent in one session (after the handshake)."""
    chunks = [data]

    def read(n: int) -> bytes:
        if not chunks:
            return b""
        out, chunks[0] = chunks[0][:n], chunks[0][n:]
        if not chunks[0]:
            chunks.clear()
        return out

    src = ByteSource(read, "c2s")
    W.read_u64(src, "magic")
    minor = W.version_minor(W.read_u64(src, "version"))
    out: list[Command] = []
    while not src.at_eof():
        cmd = W.read_u32(src, "command")
        if cmd == W.CMD_QUERY_VALID_PATHS:
            W.read_u64(src, "lock")
            substitute = W.read_u64(src, "substitute")
            out.append(Command(cmd, W.read_path_set(src, store_dir, "paths"), substitute))
        elif cmd == W.CMD_ADD_TO_STORE_NAR:
            h = M.AddToStoreNarHeader.read(src, store_dir)
            src.skip(h.nar_size)
            out.append(Command(cmd, h.path))
        elif cmd == W.CMD_BUILD_DERIVATION:
            out.append(Command(cmd, M.BuildDerivationRequest.read(src, store_dir, minor)))
        elif cmd == W.CMD_QUERY_PATH_INFOS:
            out.append(Command(cmd, W.read_path_set(src, store_dir, "paths")))
        elif cmd == W.CMD_DUMP_STORE_PATH:
            out.append(Command(cmd, W.read_str(src, "path")))
        elif cmd == W.CMD_QUERY_CLOSURE:
            W.read_u64(src, "includeOutputs")
            out.append(Command(cmd, W.read_path_set(src, store_dir, "paths")))
        else:
            raise AssertionError(f"unexpected command {cmd} in a remote-build session")
    return out
