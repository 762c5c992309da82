"""``nartool serve --write`` as a build machine, driven with hand-made sessions (the client's
bytes built with nartool's own message classes): access rules, refused requests, the reply
layout per client minor, the log on stderr, BuildPaths, and a client hanging up mid-build."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest

from nartool.config import Config, UserIdentity
from nartool.nar.source import ByteSource
from nartool.remote import messages as M
from nartool.remote import wire as W
from nartool.remote.builders import _input_paths
from nartool.remote.serve import serve_command
from nartool.remote.serve_build import REPEAT_REFUSED
from nartool.store.derivation import BasicDerivation, read_derivation
from nartool.store.local import LocalStore

from .helpers import cli_argv, cli_env
from .remote_build_util import BUSYBOX, instantiate, make_store, require_busybox
from .sshd import Sshd, make_sshd, sshd  # noqa: F401


@pytest.fixture
def client(tmp_path: Path, nix: object) -> Path:
    require_busybox()
    return make_store(tmp_path / "client", tmp_path)


def session(client: Path, drv_path: str, *, minor: int = 7, settings: M.BuildSettings | None = None,
            upload: list[str] | None = None, build_paths: list[str] | None = None) -> tuple[bytes, int]:
    """Client bytes: handshake, AddToStoreNar of ``upload`` (default: the input closure), then
    BuildDerivation of ``drv_path`` (or BuildPaths of ``build_paths``); and the upload count."""
    st = LocalStore(client)
    try:
        drv = read_derivation(st, drv_path)
        inputs = _input_paths(st, drv)
        basic = BasicDerivation.from_derivation(drv, inputs)
        buf = io.BytesIO()
        w = W.Writer(buf)
        w.u64(W.SERVE_MAGIC_1).u64(0x200 | minor)
        paths = inputs if upload is None else upload
        for p in paths:
            w.u64(W.CMD_ADD_TO_STORE_NAR)
            M.AddToStoreNarHeader.from_info(st.path_info(p), ultimate=False).write(w)
            for c in st.nar_chunks(p):
                w.raw(c)
        if build_paths is not None:
            w.u64(W.CMD_BUILD_PATHS).strs(build_paths)
            (settings or M.BuildSettings()).write(w, minor)
        else:
            w.u64(W.CMD_BUILD_DERIVATION)
            M.BuildDerivationRequest(drv_path, basic, settings or M.BuildSettings()).write(w, minor)
        w.flush()
        return buf.getvalue(), len(paths)
    finally:
        st.close()


def reply(data: bytes, uploads: int, minor: int = 7) -> M.BuildResult:
    src = ByteSource(io.BytesIO(data).read, "reply")
    assert W.read_u64(src, "magic") == W.SERVE_MAGIC_2
    W.read_u64(src, "version")
    for _ in range(uploads):
        assert W.read_u64(src, "ack") == 1
    r = M.read_build_result(src, minor)
    assert src.at_eof()
    return r


def serve(machine: Path, data: bytes, *, write: bool = True, trusted: bool = True) -> tuple[int, bytes, str]:
    user = UserIdentity.current()
    config = Config.from_text(f"trusted-users = {user.name if trusted else 'nobody-at-all'}\nrequire-sigs = false\n")
    out, err = io.BytesIO(), io.StringIO()
    st = LocalStore(machine)
    try:
        code = serve_command(st, io.BytesIO(data), out, write=write, config=config, user=user, log=err)
    finally:
        st.close()
    return code, out.getvalue(), err.getvalue()


# -- refusals (nothing is built) --------------------------------------------------------------


def test_refusals(tmp_path: Path, client: Path) -> None:
    drv = instantiate(client, tmp_path, "chainN", n=1)
    data, _ = session(client, drv)
    code, _out, err = serve(tmp_path / "m1", data, write=False)
    assert code == 1 and "error: importing paths is not allowed" in err
    data0, _ = session(client, drv, upload=[])
    code, _out, err = serve(tmp_path / "m1", data0, write=False)
    assert (code, err) == (1, "error: building paths is not allowed\n")
    # an untrusted user may upload (require-sigs = false here) but not build input-addressed
    code, _out, err = serve(tmp_path / "m2", data, trusted=False)
    assert code == 1 and "error: you are not privileged to build input-addressed derivations" in err
    data_r, _ = session(client, drv, settings=M.BuildSettings(build_repeat=1))
    code, _out, err = serve(tmp_path / "m3", data_r)
    assert (code, err) == (1, f"error: {REPEAT_REFUSED}\n")
    assert not LocalStore(tmp_path / "m3").is_valid(read_derivation(LocalStore(client), drv).outputs["out"].path)


def test_missing_input_is_misc_failure(tmp_path: Path, client: Path) -> None:
    drv = instantiate(client, tmp_path, "chainN", n=1)
    data, n = session(client, drv, upload=[])
    code, out, err = serve(tmp_path / "m", data)
    assert code == 0, err
    r = reply(out, n)
    assert r.status == M.BuildStatus.MISC_FAILURE and r.error_msg == f"path '{BUSYBOX}' is not valid"


# -- builds -----------------------------------------------------------------------------------


def test_reply_per_minor_and_log_newline(tmp_path: Path, client: Path) -> None:
    drv = instantiate(client, tmp_path, "nonl")
    out_path = read_derivation(LocalStore(client), drv).outputs["out"].path
    for minor in (7, 5, 2):
        data, n = session(client, drv, minor=minor)
        code, out, err = serve(tmp_path / f"m{minor}", data)
        assert code == 0, err
        r = reply(out, n, minor)
        assert r.status == M.BuildStatus.BUILT
        # the log: whole lines, the last one given its newline
        assert err == "first line\nno newline at the end\n"
        if minor >= 6:
            assert len(r.built_outputs) == 1 and r.built_outputs[0][0].endswith("!out")
            assert out_path.rsplit("/", 1)[1] in r.built_outputs[0][1]
        else:
            assert r.built_outputs == ()
        if minor >= 3:
            assert r.times_built == 1 and 0 < r.start_time <= r.stop_time
        assert LocalStore(tmp_path / f"m{minor}").is_valid(out_path)


def test_build_paths(tmp_path: Path, client: Path) -> None:
    ok = instantiate(client, tmp_path, "chainN", n=1)
    bad = instantiate(client, tmp_path, "fail")
    for drv, want in ((ok, 0), (bad, 100)):
        data, n = session(client, drv, upload=[BUSYBOX, drv], build_paths=[f"{drv}!out"])
        code, out, err = serve(tmp_path / "m", data)
        assert code == 0, err
        src = ByteSource(io.BytesIO(out).read, "reply")
        src.skip(16 + 8 * n)
        status = W.read_u64(src, "status")
        assert status == want
        if want:
            msg = W.read_str(src, "message")
            assert msg == (f"\x1b[31;1merror:\x1b[0m builder for '\x1b[35;1m{drv}\x1b[0m' failed with exit code 3")
            assert "about to fail\nsecond line\n" in err


def _builders() -> list[int]:
    """Pids of running 'hang' builders (the sandboxed builder is visible from the host)."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and b"echo started; sleep 37" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("command", ["BuildDerivation", "BuildPaths"])
def test_hangup_kills_the_build(tmp_path: Path, client: Path, command: str) -> None:
    """A client that goes away mid-build: the builder is killed and the session ends."""
    tag = f"-{os.getpid()}-{time.monotonic_ns()}"
    drv = instantiate(client, tmp_path, "hang", tag=tag)
    if command == "BuildPaths":
        data, _n = session(client, drv, upload=[BUSYBOX, drv], build_paths=[drv])
    else:
        data, _n = session(client, drv)
    conf = tmp_path / "nartool.conf"
    conf.write_text(f"trusted-users = {UserIdentity.current().name}\n")
    os.chmod(conf, 0o600)
    p = subprocess.Popen(cli_argv("serve", "--write", "--store", tmp_path / "m"), stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env({"NARTOOL_CONFIG": str(conf)}))
    assert p.stdin is not None and p.stderr is not None
    p.stdin.write(data)
    p.stdin.flush()
    assert p.stderr.readline() == b"started\n"  # the builder runs

    assert _builders()
    p.stdin.close()  # hang up
    assert p.wait(20) == 1
    rest = p.stderr.read().decode()
    assert "the client closed the connection during the build" in rest
    deadline = time.monotonic() + 10
    while _builders() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _builders(), "the builder outlived its session"


def test_ssh_client_killed_mid_build(tmp_path: Path, client: Path, sshd: Sshd) -> None:  # noqa: F811
    """As Nix's client ends a session — SIGKILL to its ssh — while the machine builds, through a
    real sshd: the forced-command server notices the hang-up and the builder is killed."""
    import sys

    from .helpers import REPO

    tag = f"-ssh-{os.getpid()}-{time.monotonic_ns()}"
    drv = instantiate(client, tmp_path, "hang", tag=tag)
    data, _n = session(client, drv)
    conf = tmp_path / "nartool.conf"
    conf.write_text(f"trusted-users = {UserIdentity.current().name}\n")
    os.chmod(conf, 0o600)
    key = sshd.add_key(f"{sys.executable} -m nartool serve --write --store {tmp_path / 'm'}",
                       environment={"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                                                  if p),
                                    "NARTOOL_CONFIG": str(conf)})
    p = subprocess.Popen(sshd.ssh_command(key), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stderr is not None
    p.stdin.write(data)
    p.stdin.flush()
    assert p.stderr.readline() == b"started\n"
    assert _builders()
    p.kill()
    p.wait()
    deadline = time.monotonic() + 15
    while _builders() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _builders(), "the builder outlived its ssh session"


def test_untrusted_user_builds_fixed_output_only_at_its_path(tmp_path: Path, client: Path) -> None:
    """An untrusted user (uploads: content-addressed busybox passes the import rules) may build a
    fixed-output derivation — but only with the output path its hash and name give."""
    drv = instantiate(client, tmp_path, "fod")
    data, n = session(client, drv)
    code, out, err = serve(tmp_path / "m1", data, trusted=False)
    assert code == 0, err
    r = reply(out, n)
    assert r.status == M.BuildStatus.BUILT, r.error_msg
    # the same request with another output path
    st = LocalStore(client)
    try:
        d = read_derivation(st, drv)
        basic = BasicDerivation.from_derivation(d, _input_paths(st, d))
    finally:
        st.close()
    evil = f"/nix/store/{'a' * 32}-glibc"
    basic = basic.replace(outputs=[(n_, evil, a, h) for n_, _p, a, h in basic.outputs],
                          env=[(k, evil if k == "out" else v) for k, v in basic.env])
    buf = io.BytesIO()
    w = W.Writer(buf)
    w.u64(W.SERVE_MAGIC_1).u64(0x207).u64(W.CMD_BUILD_DERIVATION)
    M.BuildDerivationRequest(drv, basic).write(w, 7)
    w.flush()
    code, _out, err = serve(tmp_path / "m1", buf.getvalue(), trusted=False)
    assert code == 1 and f"has output 'out' at '{evil}', but its hash and name give" in err
    assert not LocalStore(tmp_path / "m1").is_valid(evil)
    # a trusted user is not checked (as with Nix's server)
    code, out, err = serve(tmp_path / "m1", buf.getvalue())
    assert code == 0, err


def _evil_drv(store_root: Path) -> tuple[str, str]:
    """Plant a ``.drv`` whose output is not what its contents give (a 'glibc' path with content
    of the uploader's choice) in the store at ``store_root``, bypassing the registration check
    an import makes (as a store written by an older tool could hold one); (drv, output)."""
    from unittest import mock

    from nartool.store.derivation import Derivation, DerivationOutput

    evil = f"/nix/store/{'a' * 32}-glibc"
    sh = f"{BUSYBOX}/bin/sh"
    d = Derivation(outputs={"out": DerivationOutput(evil)}, input_srcs=[BUSYBOX], platform="x86_64-linux",
                   builder=sh, args=["-c", "echo pwned > $out"],
                   env={"out": evil, "name": "glibc", "system": "x86_64-linux", "builder": sh}, name="glibc")
    st = LocalStore(store_root)
    try:
        with mock.patch.object(LocalStore, "_drv_outputs", lambda self, tmp, path: {}):
            drv = st.add_text("glibc.drv", d.unparse(), d.references()).path
    finally:
        st.close()
    return drv, evil


def test_upload_of_a_derivation_with_wrong_outputs_is_refused(tmp_path: Path, client: Path) -> None:
    """A ``.drv`` is a content-addressed text path, so an untrusted user may upload one; one whose
    output path is not what its contents give is refused at the upload (as Nix refuses it when
    registering), and nothing is built."""
    drv, evil = _evil_drv(client)
    data, n = session(client, drv, upload=[BUSYBOX, drv], build_paths=[f"{drv}!out"])
    code, out, err = serve(tmp_path / "m", data, trusted=False)
    assert code != 0 and "incorrect output" in err, err
    m = LocalStore(tmp_path / "m")
    assert not m.is_valid(evil) and not m.is_valid(drv) and m.is_valid(BUSYBOX)


def test_build_paths_refuses_a_derivation_with_wrong_outputs(tmp_path: Path, client: Path) -> None:
    """Defence in depth: such a ``.drv`` already in the machine's store (planted past the
    import check) is refused by BuildPaths, and nothing is built."""
    drv, evil = _evil_drv(client)
    make_store(tmp_path / "m", tmp_path)
    assert _evil_drv(tmp_path / "m") == (drv, evil)
    data, n = session(client, drv, upload=[], build_paths=[f"{drv}!out"])
    code, out, err = serve(tmp_path / "m", data, trusted=False)
    assert code == 0, err
    src = ByteSource(io.BytesIO(out).read, "reply")
    src.skip(16 + 8 * n)
    assert W.read_u64(src, "status") == 1
    msg = W.read_str(src, "message")
    assert msg.startswith(f"\x1b[31;1merror:\x1b[0m derivation '{drv}' cannot be built here: ") and "incorrect output" in msg
    assert not LocalStore(tmp_path / "m").is_valid(evil)


def test_inputs_and_outputs_are_temp_roots_of_the_session(tmp_path: Path, client: Path) -> None:
    """While the session's process lives, the uploaded inputs and the built outputs are in its
    temporary-roots file (``<state>/temproots/<pid>``, which a garbage collector honours)."""
    drv = instantiate(client, tmp_path, "nonl")
    out_path = read_derivation(LocalStore(client), drv).outputs["out"].path
    data, n = session(client, drv)
    user = UserIdentity.current()
    st = LocalStore(tmp_path / "m")
    try:
        out, err = io.BytesIO(), io.StringIO()
        code = serve_command(st, io.BytesIO(data), out, write=True, user=user,
                             config=Config.from_text(f"trusted-users = {user.name}\n"), log=err)
        assert code == 0, err.getvalue()
        assert reply(out.getvalue(), n).status == M.BuildStatus.BUILT
        roots = (tmp_path / "m" / "nix" / "var" / "nix" / "temproots" / str(os.getpid())).read_bytes().split(b"\0")
        assert out_path.encode() in roots and BUSYBOX.encode() in roots
    finally:
        st.close()
