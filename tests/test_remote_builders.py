"""Remote builds, client side: Nix's machines file, machine selection, and
``try_remote_build`` against a real ``nix-store --serve --write`` (Nix 2.8) as the build
machine (locally through ``localhost``, as Nix runs it, and through a real sshd)."""

from __future__ import annotations

import base64
import os
import subprocess
import types
from pathlib import Path

import pytest

from nartool.errors import BuildError
from nartool.remote import wire as W
from nartool.remote.builders import (
    Machine,
    parse_machines,
    select_machine,
    try_remote_build,
)
from nartool.remote.messages import BuildStatus
from nartool.store.derivation import read_derivation
from nartool.store.local import LocalStore

from .helpers import nix_env
from .remote_build_util import BUSYBOX, instantiate, make_store, parse_c2s, recorder, require_busybox
from .sshd import Sshd, make_sshd, sshd  # noqa: F401

# -- the machines file ------------------------------------------------------------------------


def test_machine_line_columns_and_defaults() -> None:
    key = base64.b64encode(b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE host").decode()
    ms = parse_machines(f"ssh://a x86_64-linux,i686-linux /k 4 2 kvm,big big {key}\n"
                        "b - - - - - - -\n"
                        "c", "aarch64-linux")
    assert ms[0] == Machine("ssh://a", ("x86_64-linux", "i686-linux"), "/k", 4, 2, frozenset({"kvm", "big"}),
                            frozenset({"big"}), key)
    assert ms[1] == Machine("ssh://b", ("aarch64-linux",))
    assert ms[2] == Machine("ssh://c", ("aarch64-linux",))


def test_separators_comments_files_and_uris(tmp_path: Path) -> None:
    f = tmp_path / "machines"
    f.write_text("# a comment line\nfile1 x86_64-linux  # trailing comment\n\n@" + str(tmp_path / "absent") + "\n")
    ms = parse_machines(f"root@h1 x86_64-linux; @{f} ;ssh://h2?remote-store=/s x86_64-linux;local;/some/dir",
                        "x86_64-linux")
    assert [m.uri for m in ms] == ["ssh://root@h1", "ssh://file1", "ssh://h2?remote-store=/s", "local", "/some/dir"]


@pytest.mark.parametrize("line, what", [
    ("h x86_64-linux - x", "column #3"),
    ("h x86_64-linux - 1 -2", "column #4"),
    ("h x86_64-linux - 1 1 - - not*base64", "column #7"),
])
def test_bad_machine_lines(line: str, what: str) -> None:
    with pytest.raises(BuildError) as ei:
        parse_machines(line)
    assert what in str(ei.value) and line in str(ei.value) and ei.value.rule == "bad-machine"


def test_speed_factor_at_least_one_and_self_including_file(tmp_path: Path) -> None:
    assert parse_machines("h x86_64-linux - 1 0")[0].speed_factor == 1
    f = tmp_path / "loop"
    f.write_text(f"@{f}\n")
    with pytest.raises(BuildError, match="nest"):
        parse_machines(f"@{f}")


def test_selection_by_system_features_slots_and_speed(tmp_path: Path) -> None:
    d = str(tmp_path / "load")
    ms = parse_machines("ssh://slow x86_64-linux - 2 1\n"
                        "ssh://fast x86_64-linux - 1 4\n"
                        "ssh://arm aarch64-linux - 8 9\n"
                        "ssh://kvm x86_64-linux - 1 1 kvm kvm")
    m, slot, right = select_machine(ms, "x86_64-linux", [], d)
    assert right and m is not None and m.uri == "ssh://fast" and slot is not None
    # fast's only slot is held: slow (load 0) is next; a second slot of slow after that
    m2, slot2, _ = select_machine(ms, "x86_64-linux", [], d)
    assert m2 is not None and m2.uri == "ssh://slow" and slot2 is not None
    m3, slot3, _ = select_machine(ms, "x86_64-linux", [], d)
    assert m3 is not None and m3.uri == "ssh://slow" and slot3 is not None and slot3.path != slot2.path
    # everything that fits is busy: nothing, but the right type exists
    assert select_machine(ms, "x86_64-linux", [], d)[::2] == (None, True)
    # mandatory features: only a derivation requiring kvm may use (and gets) the kvm machine
    m4, slot4, _ = select_machine(ms, "x86_64-linux", ["kvm"], d)
    assert m4 is not None and m4.uri == "ssh://kvm"
    assert select_machine(ms, "riscv64-linux", [], d)[::2] == (None, False)
    for s in (slot, slot2, slot3, slot4):
        assert s is not None
        s.release()
    # the slots are lock files other processes see: a child holding fast's slot makes us pick slow
    lock = os.path.join(d, "ssh:__fast-0")
    holder = subprocess.Popen(["flock", lock, "sleep", "30"])
    try:
        for _ in range(100):
            m5, slot5, _ = select_machine(ms, "x86_64-linux", [], d)
            assert slot5 is not None
            slot5.release()
            if m5 is not None and m5.uri == "ssh://slow":
                break
            import time

            time.sleep(0.05)
        else:
            raise AssertionError("a slot held by another process was not seen")
    finally:
        holder.kill()
        holder.wait()


# -- building on a real nix-store --serve --write ---------------------------------------------


def _opts(builders: str, **kw: object) -> types.SimpleNamespace:
    base: dict[str, object] = {"builders": builders, "max_jobs": 0, "max_silent_time": 0, "timeout": 0,
                               "max_build_log_size": 0, "system": "x86_64-linux", "system_features": ()}
    base.update(kw)
    return types.SimpleNamespace(**base)


def _nix_builds(tmp: Path, what: str) -> dict[str, str]:
    """Local Nix 2.8 builds of ``what``: output path → NAR hash (the reference)."""
    ref = make_store(tmp / "ref", tmp)
    drv = instantiate(ref, tmp, what)
    subprocess.run(["nix-store", "--store", str(ref), "--option", "substituters", "", "-r", drv],
                   env=nix_env(), check=True, capture_output=True)
    st = LocalStore(ref)
    try:
        outs = st.closure(read_derivation(st, drv).output_paths().values())
        return {p: st.path_info(p).nar_hash.base16 for p in outs if p != BUSYBOX}
    finally:
        st.close()


def _build_all(st: LocalStore, top: str, opts: object, log: list[bytes]) -> list[object]:
    """Build ``top`` and its input derivations, inputs first, each through try_remote_build."""
    order: list[str] = []

    def visit(p: str) -> None:
        for q in read_derivation(st, p).input_drvs:
            visit(q)
        if p not in order:
            order.append(p)

    visit(top)
    return [try_remote_build(st, p, read_derivation(st, p), opts, log=log.append) for p in order]


@pytest.fixture
def busybox_ok(nix: object) -> None:
    require_busybox()


def test_chain_on_nix_store_serve(tmp_path: Path, busybox_ok: None) -> None:
    """Two derivations built by a real nix-store --serve --write: outputs identical to local Nix
    builds, valid in both stores, log lines streamed, and per build exactly one validity query
    before the uploads (references first), BuildDerivation without the .drv."""
    client, remote = make_store(tmp_path / "client", tmp_path), tmp_path / "remote"
    top = instantiate(client, tmp_path, "chain")
    prog, sessions = recorder(tmp_path, "nix-store")
    opts = _opts(f"ssh://localhost?remote-program={prog}&remote-store={remote} x86_64-linux - 1 1")
    st = LocalStore(client)
    log: list[bytes] = []
    try:
        results = _build_all(st, top, opts, log)
        assert [r.status for r in results] == [BuildStatus.BUILT, BuildStatus.BUILT]  # type: ignore[attr-defined]
        want = _nix_builds(tmp_path, "chain")
        got = {p: st.path_info(p).nar_hash.base16 for p in want}
        assert got == want
        drv_top = read_derivation(st, top)
        out = drv_top.output_paths()["out"]
        assert st.path_info(out).deriver == top
    finally:
        st.close()
    assert log == [b"building base\n", b"building top\n"]
    r = subprocess.run(["nix-store", "--store", str(remote), "--verify-path", out, BUSYBOX], env=nix_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # what went over the wire
    s1 = parse_c2s((sessions / "session-1.c2s").read_bytes())
    s2 = parse_c2s((sessions / "session-2.c2s").read_bytes())
    # session 1: the validity query, busybox uploaded, the build; the .drv never travels
    assert [c.number for c in s1][:3] == [W.CMD_QUERY_VALID_PATHS, W.CMD_ADD_TO_STORE_NAR, W.CMD_BUILD_DERIVATION]
    assert s1[1].detail == BUSYBOX
    # session 2: one validity query for the input closure (busybox, base's output) — both valid
    assert s2[0].number == W.CMD_QUERY_VALID_PATHS and BUSYBOX in s2[0].detail  # type: ignore[operator]
    assert W.CMD_ADD_TO_STORE_NAR not in [c.number for c in s2]
    for s in (s1, s2):
        assert [c.number for c in s].count(W.CMD_QUERY_VALID_PATHS) == 1 or s[0].detail == []
        assert not any(c.number == W.CMD_ADD_TO_STORE_NAR and str(c.detail).endswith(".drv") for c in s)
    req = next(c.detail for c in s2 if c.number == W.CMD_BUILD_DERIVATION)
    assert req.drv_path == top and set(req.drv.input_srcs) >= {BUSYBOX}  # type: ignore[attr-defined]


def test_failing_builder_and_timeout_on_nix_store_serve(tmp_path: Path, busybox_ok: None) -> None:
    client, remote = make_store(tmp_path / "client", tmp_path), tmp_path / "remote"
    fail = instantiate(client, tmp_path, "fail")
    silent = instantiate(client, tmp_path, "silent")
    uri = f"ssh://localhost?remote-program=nix-store&remote-store={remote}"
    st = LocalStore(client)
    try:
        log: list[bytes] = []
        r = try_remote_build(st, fail, read_derivation(st, fail), _opts(f"{uri} x86_64-linux"), log=log.append)
        assert r is not None and r.status == BuildStatus.PERMANENT_FAILURE
        assert r.error_msg == (f"build of '{fail}' on '{uri}' failed: builder for '{fail}' failed with exit code 3")
        assert log == [b"about to fail\n", b"second line\n"]
        log.clear()
        r = try_remote_build(st, silent, read_derivation(st, silent),
                             _opts(f"{uri} x86_64-linux", max_silent_time=1), log=log.append)
        assert r is not None and r.status == BuildStatus.TIMED_OUT
        assert r.error_msg.endswith(f"failed: building of '{silent}!out' from in-memory derivation timed out "
                                    "after 1 seconds of silence")
        assert log == [b"going quiet\n"]
    finally:
        st.close()


def test_no_fitting_machine_and_dead_machine(tmp_path: Path, busybox_ok: None) -> None:
    client = make_store(tmp_path / "client", tmp_path)
    drv = instantiate(client, tmp_path, "fail")
    st = LocalStore(client)
    try:
        d = read_derivation(st, drv)
        # wrong system: no machine fits -> None (the scheduler builds locally or fails)
        assert try_remote_build(st, drv, d, _opts("ssh://localhost aarch64-linux")) is None
        # a machine whose remote program does not exist is skipped (None: nothing else fits)
        assert try_remote_build(st, drv, d, _opts(
            f"ssh://localhost?remote-program={tmp_path}/absent x86_64-linux"), log=lambda _b: None) is None
    finally:
        st.close()


def test_over_sshd_with_key_column(tmp_path: Path, busybox_ok: None, sshd: Sshd) -> None:  # noqa: F811
    """The machines file's ssh key column and a real sshd (NIX_SSHOPTS carries the port)."""
    client, remote = make_store(tmp_path / "client", tmp_path), tmp_path / "remote"
    key = sshd.add_key(f"nix-store --serve --write --store {remote}",
                       environment={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **{
                           k: v for k, v in nix_env().items() if k.startswith(("NIX_", "XDG_"))}})
    drv = instantiate(client, tmp_path, "chain")
    sshopts = " ".join(a for a in sshd.ssh_args(key) if a not in ("-i", str(key)))
    os.environ["NIX_SSHOPTS"] = sshopts
    st = LocalStore(client)
    try:
        opts = _opts(f"ssh://{sshd.host} x86_64-linux {key} 1 1")
        results = _build_all(st, drv, opts, [])
        assert [r.status for r in results] == [BuildStatus.BUILT] * 2  # type: ignore[attr-defined]
        assert st.is_valid(read_derivation(st, drv).output_paths()["out"])
    finally:
        del os.environ["NIX_SSHOPTS"]
        st.close()


# -- nartool build (the CLI) ------------------------------------------------------------------


def _cli_build(client: Path, builders: str, drv: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    from .helpers import cli_argv, cli_env

    return subprocess.run(cli_argv("--store", client, "build", "--option", "builders", builders, "--max-jobs", "0",
                                   *extra, drv), env=cli_env(env), capture_output=True, text=True, timeout=300)


def _forced_env() -> dict[str, str]:
    from .helpers import REPO

    e = {k: v for k, v in nix_env().items() if k.startswith(("NIX_", "XDG_"))}
    e["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return e


@pytest.mark.parametrize("machine_kind", ["nix-store", "nartool"])
def test_cli_build_over_sshd(tmp_path: Path, busybox_ok: None, sshd: Sshd, machine_kind: str) -> None:  # noqa: F811
    """``nartool build --option builders 'ssh://… SYSTEM KEY 1 1' --max-jobs 0`` on a machine behind a
    real sshd whose forced command is Nix 2.8's ``nix-store --serve --write --store …`` or
    ``nartool serve --write --store …``: the chain's outputs equal local Nix builds, the remote log
    reaches stderr, a failing builder gives Nix's exit status and message, a silent one times out
    with the client's max-silent-time."""
    import sys

    client, remote = make_store(tmp_path / "client", tmp_path), tmp_path / "remote"
    if machine_kind == "nix-store":
        cmd = f"nix-store --serve --write --store {remote}"
    else:
        if os.geteuid() != 0:
            pytest.skip("the nartool machine reads trusted-users from its own file only as root")
        conf = tmp_path / "machine.conf"
        conf.write_text("trusted-users = root\n")
        conf.chmod(0o600)
        cmd = f"NARTOOL_CONFIG={conf} {sys.executable} -m nartool serve --write --store {remote}"
    key = sshd.add_key(cmd, environment=_forced_env())
    machines = tmp_path / "machines"
    machines.write_text(f"# the build machine\nssh://{sshd.host} x86_64-linux {key} 1 1\n")
    env = {"NIX_SSHOPTS": " ".join(a for a in sshd.ssh_args(key) if a not in ("-i", str(key)))}
    # the machines list literally (towards Nix) or from a file (towards nartool)
    spec = machines.read_text().splitlines()[1] if machine_kind == "nix-store" else f"@{machines}"
    top = instantiate(client, tmp_path, "chain")
    r = _cli_build(client, spec, top, env)
    assert r.returncode == 0, r.stderr
    want = _nix_builds(tmp_path, "chain")
    out = r.stdout.strip()
    assert out in want
    st = LocalStore(client)
    try:
        assert {p: st.path_info(p).nar_hash.base16 for p in want} == want
    finally:
        st.close()
    assert "building base\n" in r.stderr and "building top\n" in r.stderr
    assert f"building '{top}' on 'ssh://{sshd.host}'..." in r.stderr
    v = subprocess.run(["nix-store", "--store", str(remote), "--verify-path", *want], env=nix_env(),
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr
    fail = instantiate(client, tmp_path, "fail")
    r = _cli_build(client, spec, fail, env)
    assert r.returncode == 100, r.stderr
    assert "about to fail\nsecond line\n" in r.stderr
    assert f"build of '{fail}' on 'ssh://{sshd.host}' failed: builder for '{fail}' failed with exit code 3" in r.stderr
    # the client's max-silent-time travels in the build settings; the machine enforces it
    silent = instantiate(client, tmp_path, "silent")
    r = _cli_build(client, spec, silent, env, "--max-silent-time", "1")
    assert r.returncode == 101, r.stderr
    assert "going quiet\n" in r.stderr
    assert (f"failed: building of '{silent}!out' from in-memory derivation timed out after 1 seconds of silence"
            in r.stderr), r.stderr


def test_machine_dying_mid_build_is_a_failed_build(tmp_path: Path, busybox_ok: None) -> None:
    """The machine's process is killed while it builds: a failed result naming the machine (the
    scheduler goes on), not an exception."""
    client, remote = make_store(tmp_path / "client", tmp_path), tmp_path / "remote"
    prog = tmp_path / "dies"
    prog.write_text('#!/bin/sh\nexec timeout -s KILL 1 nix-store "$@"\n')
    prog.chmod(0o755)
    drv = instantiate(client, tmp_path, "silent")
    st = LocalStore(client)
    try:
        uri = f"ssh://localhost?remote-program={prog}&remote-store={remote}"
        r = try_remote_build(st, drv, read_derivation(st, drv), _opts(f"{uri} x86_64-linux"), log=lambda _b: None)
        assert r is not None and r.status == BuildStatus.MISC_FAILURE
        assert r.error_msg.startswith(f"build of '{drv}' on '{uri}' failed: ") and "closed the connection" in r.error_msg
    finally:
        st.close()


def test_builders_use_substitutes(tmp_path: Path, busybox_ok: None) -> None:
    """With builders-use-substitutes the validity query asks the machine (a real nix-store
    --serve --write whose substituter is a file:// binary cache holding busybox) to substitute:
    busybox is not uploaded, the machine fetches it itself."""
    client, remote, cache = make_store(tmp_path / "client", tmp_path), tmp_path / "remote", tmp_path / "cache"
    subprocess.run(["nix", "copy", "--store", str(client), "--to", f"file://{cache}", BUSYBOX], env=nix_env(),
                   check=True, capture_output=True)
    machine = tmp_path / "nix-store-with-cache"
    machine.write_text("#!/bin/sh\n"
                       f"export NIX_CONFIG='substituters = file://{cache}\nrequire-sigs = false'\n"
                       'exec nix-store "$@"\n')
    machine.chmod(0o755)
    prog, sessions = recorder(tmp_path, str(machine))
    drv = instantiate(client, tmp_path, "chainN", n=1)
    st = LocalStore(client)
    try:
        uri = f"ssh://localhost?remote-program={prog}&remote-store={remote}"
        r = try_remote_build(st, drv, read_derivation(st, drv), _opts(f"{uri} x86_64-linux",
                                                                       builders_use_substitutes=True))
        assert r is not None and r.status == BuildStatus.BUILT, r
    finally:
        st.close()
    cmds = parse_c2s((sessions / "session-1.c2s").read_bytes())
    assert cmds[0].number == W.CMD_QUERY_VALID_PATHS and cmds[0].flag == 1
    assert W.CMD_ADD_TO_STORE_NAR not in [c.number for c in cmds]
    v = subprocess.run(["nix-store", "--store", str(remote), "--verify-path", BUSYBOX], env=nix_env(),
                       capture_output=True, text=True)
    assert v.returncode == 0, v.stderr


@pytest.mark.parametrize("what", ["esc", "fod"])
def test_same_as_nix_store_serve(tmp_path: Path, busybox_ok: None, what: str) -> None:
    """The same derivation built by nix-store --serve and by nartool serve: the log lines the client
    receives are identical (``esc``: colours, an OSC title, tabs, a carriage return, unknown
    escapes, a last line without newline) and so are the realisations in the result (``fod``: a
    fixed-output derivation, whose id hashes ``fixed:out:…``)."""
    import sys

    from .helpers import REPO

    if os.geteuid() != 0:
        pytest.skip("the nartool machine reads trusted-users from its own file only as root")
    client = make_store(tmp_path / "client", tmp_path)
    drv = instantiate(client, tmp_path, what)
    conf = tmp_path / "machine.conf"
    conf.write_text("trusted-users = root\n")
    conf.chmod(0o600)
    serve = tmp_path / "nartool-serve"
    serve.write_text(f"#!/bin/sh\nexport PYTHONPATH={REPO} NARTOOL_CONFIG={conf}\n"
                     f'exec {sys.executable} -m nartool serve "$@"\n')
    serve.chmod(0o755)
    logs: dict[str, list[bytes]] = {}
    outputs: dict[str, object] = {}
    for prog in ("nix-store", str(serve)):
        st = LocalStore(client)
        try:
            uri = f"ssh://localhost?remote-program={prog}&remote-store={tmp_path / ('m-' + os.path.basename(prog))}"
            log: list[bytes] = []
            r = try_remote_build(st, drv, read_derivation(st, drv), _opts(f"{uri} x86_64-linux"), log=log.append)
            assert r is not None and r.status in (BuildStatus.BUILT, BuildStatus.ALREADY_VALID), r
            logs[prog] = log
            outputs[prog] = r.built_outputs
        finally:
            st.close()
    assert logs["nix-store"] == logs[str(serve)]
    assert outputs["nix-store"] == outputs[str(serve)] and outputs["nix-store"]
    if what == "esc":
        assert logs["nix-store"][0] == b"plain\n" and logs["nix-store"][-1] == b"last without newline\n"
