"""``nartool serve --write`` as a build machine, replaying recorded sessions of a real Nix 2.8
remote-build client (``tests/fixtures/remote-build``, recorded against ``nix-store --serve
--write`` by its ``record.py``): the server's replies must be byte-identical, timestamps
(``startTime``/``stopTime``) aside, and its stderr — the build log — the same."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nartool.config import Config, UserIdentity
from nartool.remote.serve import serve_command
from nartool.store.local import LocalStore

from .conftest import require
from .helpers import cli_argv, cli_env
from .remote_build_util import BUSYBOX, busybox_tree, require_busybox

FIX = Path(__file__).parent / "fixtures" / "remote-build"
MANIFEST: dict[str, Any] = json.loads((FIX / "manifest.json").read_text())
#: a u64 word that differs may be a timestamp when both values lie in this range
TIME_RANGE = range(1_500_000_000, 2_500_000_000)


def busybox_nar(tmp: Path) -> bytes:
    require_busybox()
    nar = subprocess.run(cli_argv("nar", "dump", busybox_tree(tmp)), env=cli_env(), capture_output=True,
                         check=True).stdout
    if hashlib.sha256(nar).hexdigest() != MANIFEST["busybox_nar_sha256"]:
        pytest.skip("this machine's /bin/busybox is not the one the sessions were recorded with")
    return nar


def session_bytes(session: dict[str, Any], nar: bytes) -> bytes:
    data = (FIX / f"{session['name']}.c2s").read_bytes()
    at = session["busybox_nar_at"]
    return data if at is None else data[:at] + nar + data[at:]


def same_but_timestamps(got: bytes, want: bytes) -> list[int]:
    """Offsets of the 8-byte words that differ other than as two timestamps."""
    if len(got) != len(want):
        return [-1]
    bad = []
    for i in range(0, len(want), 8):
        a, b = got[i:i + 8], want[i:i + 8]
        if a != b:
            x, y = int.from_bytes(a, "little"), int.from_bytes(b, "little")
            if not (x in TIME_RANGE and y in TIME_RANGE):
                bad.append(i)
    return bad


class _Log(io.StringIO):
    pass


@pytest.mark.parametrize("scenario", [s["scenario"] for s in MANIFEST["scenarios"]])
def test_replay_against_nartool_serve(tmp_path: Path, scenario: str) -> None:
    """Each scenario's sessions in order, against one fresh nartool store (after the sessions of
    the scenario whose machine it continues)."""
    nar = busybox_nar(tmp_path)
    by_name = {s["scenario"]: s for s in MANIFEST["scenarios"]}
    sc = by_name[scenario]
    sessions = ([] if sc["machine"] == scenario else by_name[sc["machine"]]["sessions"]) + sc["sessions"]
    user = UserIdentity.current()
    config = Config.from_text(f"trusted-users = {user.name}\n")
    st = LocalStore(tmp_path / "machine")
    try:
        for session in sessions:
            out, err = io.BytesIO(), _Log()
            code = serve_command(st, io.BytesIO(session_bytes(session, nar)), out, write=True, config=config,
                                 user=user, log=err)
            want = (FIX / f"{session['name']}.s2c").read_bytes()
            assert code == 0, err.getvalue()
            bad = same_but_timestamps(out.getvalue(), want)
            assert not bad, (session["name"], bad, out.getvalue(), want)
            assert err.getvalue() == session["stderr"]
        assert st.is_valid(BUSYBOX)
    finally:
        st.close()


def test_replay_through_the_cli_keeps_stdin_open(tmp_path: Path) -> None:
    """The same first session through ``nartool serve --write`` as a process: the log on its
    stderr, the replies on its stdout. The client keeps its end open until the reply is in
    (as real clients do: a closed input would mean a hang-up, which kills the build)."""
    require("ROOT", os.geteuid() == 0, "serve reads trusted-users from the caller's own file only as root")
    nar = busybox_nar(tmp_path)
    session = MANIFEST["scenarios"][0]["sessions"][0]
    conf = tmp_path / "nartool.conf"
    conf.write_text(f"trusted-users = {UserIdentity.current().name}\n")
    os.chmod(conf, 0o600)
    want = (FIX / f"{session['name']}.s2c").read_bytes()
    p = subprocess.Popen(cli_argv("serve", "--write", "--store", tmp_path / "machine"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env({"NARTOOL_CONFIG": str(conf)}))
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    p.stdin.write(session_bytes(session, nar))
    p.stdin.flush()
    got = b""
    while len(got) < len(want):
        chunk = os.read(p.stdout.fileno(), 1 << 16)
        if not chunk:
            break
        got += chunk
    p.stdin.close()
    assert p.wait(30) == 0
    err = p.stderr.read().decode()
    assert not same_but_timestamps(got, want), (got, want, err)
    assert err.endswith(session["stderr"]), err
