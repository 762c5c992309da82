"""``nartool build`` against real Nix 2.8 on the same derivations (made by ``nix-instantiate`` in a
Nix chroot store, copied into a nartool store): the same output paths and NAR hashes, the same
error lines and exit statuses, the same stored logs; plus interruption, kill -9 and concurrency.
Debian's static busybox is the only builder (tests/buildkit.py)."""

from __future__ import annotations

import http.server
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nartool.build import read_log
from nartool.store.local import LocalStore

from .buildkit import (
    BB,
    copy_drv_closure,
    instantiate,
    nar_hash,
    nartool_store,
    nix_build,
    nix_store_with_busybox,
    static_busybox,
)
from .conftest import NIX_STORE, require
from .helpers import REPO, cli_argv, cli_env, nix_env, repo_for, run_cli


def _sandbox_reason() -> str | None:
    from nartool.build.sandbox import sandbox_unavailable_reason

    return sandbox_unavailable_reason()


@pytest.fixture(scope="module")
def nixroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("NIX", NIX_STORE is not None, "nix-store not found: install Debian's nix-bin for differential tests")
    require("SANDBOX", static_busybox(), "no static busybox (install busybox-static)")
    reason = _sandbox_reason()
    require("SANDBOX", reason is None, f"the build sandbox cannot run here: {reason}")
    tmp = tmp_path_factory.mktemp("nixbuild")
    root = tmp / "nix"
    assert nix_store_with_busybox(root, tmp) == BB
    return root


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[LocalStore]:
    st, bb = nartool_store(tmp_path / "store", tmp_path)
    assert bb == BB
    yield st
    st.close()


def _both(nixroot: Path, st: LocalStore, expr: str) -> str:
    drv = instantiate(nixroot, expr)
    copy_drv_closure(nixroot, st, drv)
    return drv


def _nartool_build(st: LocalStore, *args: str, env: dict[str, str] | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return run_cli("--store", st.root, "build", *args, env=env, timeout=timeout)


def _errors(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode(errors="replace").splitlines() if line.startswith("error:")]


def _outputs(st: LocalStore, drv: str) -> dict[str, str]:
    with LocalStore(st.root) as s:
        return s.query_derivation_outputs(drv)


def _our_hash(st: LocalStore, path: str) -> str:
    with LocalStore(st.root) as s:
        info = s.query_path_info(path)
        assert info is not None, path
        return info.nar_hash.prefixed("base16")


DET = """derivation { name = "det"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
  args = [ "-c" ''
    set -e
    B=${bb}/bin/busybox
    $B mkdir -p $out/bin $out/share
    echo hello > $out/share/greeting
    printf '#!${bb}/bin/sh\\necho hi from det\\n' > $out/bin/hi
    $B chmod +x $out/bin/hi
    $B ln -s share/greeting $out/link
    $B seq 1 10000 | $B sha256sum > $out/share/seq
    echo built det
  '' ]; }"""


def test_deterministic_same_path_and_hash(nixroot: Path, ours: LocalStore) -> None:
    drv = _both(nixroot, ours, DET)
    r = nix_build(nixroot, drv)
    assert r.returncode == 0, r.stderr
    nix_out = r.stdout.decode().split()[-1]
    mine = _nartool_build(ours, drv)
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout.decode().split() == [nix_out]
    assert _our_hash(ours, nix_out) == "sha256:" + _b16(nar_hash(nixroot, nix_out))
    with LocalStore(ours.root) as s:
        info = s.query_path_info(nix_out)
        assert info is not None and info.deriver == drv and info.ultimate and info.references == {BB}
        assert s.query_derivation_outputs(drv) == {"out": nix_out}
    assert b"built det" in mine.stderr
    # the stored log: where and as nix-store -l reads it
    r = subprocess.run(["nix-store", "--store", ours.root, "-l", drv], capture_output=True, env=nix_env(), check=False)
    assert r.returncode == 0 and r.stdout == b"built det\n"
    assert run_cli("--store", ours.root, "store", "log", nix_out).stdout == b"built det\n"
    # nothing left behind: no chroot, no build dir of ours
    assert not [n for n in os.listdir(ours.real_store_dir) if n.endswith(".chroot")]
    # a second build does nothing and prints the same path
    again = _nartool_build(ours, drv)
    assert again.returncode == 0 and again.stdout == mine.stdout and b"built det" not in again.stderr


def _b16(h: str) -> str:
    from nartool.hashes import Hash

    return Hash.parse(h).base16


CHAIN = """let
  a = derivation { name = "step-a"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
        args = [ "-c" "${bb}/bin/busybox mkdir $out; echo one > $out/a; echo built a" ]; };
  b = derivation { name = "step-b"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
        args = [ "-c" "${bb}/bin/busybox cat ${a}/a > $out; echo two >> $out; echo ${a} >> $out" ]; };
in b"""


def test_two_step_chain(nixroot: Path, ours: LocalStore) -> None:
    drv = _both(nixroot, ours, CHAIN)
    r = nix_build(nixroot, drv)
    assert r.returncode == 0, r.stderr
    nix_out = r.stdout.decode().split()[-1]
    mine = _nartool_build(ours, "--max-jobs", "2", drv)
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout.decode().split() == [nix_out]
    assert _our_hash(ours, nix_out) == "sha256:" + _b16(nar_hash(nixroot, nix_out))
    with LocalStore(ours.root) as s:
        (dep,) = [p for p in s.query_references(nix_out)]
        assert dep.endswith("-step-a") and s.is_valid(dep)
    err = mine.stderr.decode()
    assert err.index("step-a.drv'...") < err.index("step-b.drv'...")


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b"fixed output payload\n" * 100

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_fixed_output_fetch_from_loopback(nixroot: Path, ours: LocalStore, http_server: int) -> None:
    import hashlib

    h = hashlib.sha256(_Handler.payload).hexdigest()
    expr = f"""derivation {{ name = "fetched-{http_server}"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      outputHashAlgo = "sha256"; outputHashMode = "flat"; outputHash = "{h}";
      args = [ "-c" "${{bb}}/bin/busybox wget -q -O $out http://127.0.0.1:{http_server}/file" ]; }}"""
    drv = _both(nixroot, ours, expr)
    r = nix_build(nixroot, drv)
    assert r.returncode == 0, r.stderr
    nix_out = r.stdout.decode().split()[-1]
    mine = _nartool_build(ours, drv)
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout.decode().split() == [nix_out]
    with LocalStore(ours.root) as s:
        info = s.query_path_info(nix_out)
        assert info is not None and info.ca == f"fixed:sha256:{_nix32(h)}"
    # an ordinary derivation cannot reach the host's loopback
    expr2 = f"""derivation {{ name = "nofetch-{http_server}"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      args = [ "-c" "${{bb}}/bin/busybox wget -q -O $out http://127.0.0.1:{http_server}/file" ]; }}"""
    drv2 = _both(nixroot, ours, expr2)
    n2 = nix_build(nixroot, drv2)
    m2 = _nartool_build(ours, drv2)
    assert n2.returncode == m2.returncode == 100
    assert _errors(m2.stderr) == _errors(n2.stderr)


def _nix32(hexdigest: str) -> str:
    from nartool.hashes import nix32_encode

    return nix32_encode(bytes.fromhex(hexdigest))


def test_fixed_output_hash_mismatch(nixroot: Path, ours: LocalStore) -> None:
    expr = """derivation { name = "wrong-hash"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      outputHashAlgo = "sha256"; outputHashMode = "recursive";
      outputHash = "0000000000000000000000000000000000000000000000000000";
      args = [ "-c" "echo x > $out" ]; }"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 102, (n.stderr, m.stderr)
    nix_err = n.stderr.decode()
    my_err = m.stderr.decode()
    assert nix_err[nix_err.index("error: hash mismatch"):] == my_err[my_err.index("error: hash mismatch"):]
    # unlike Nix, nothing of the rejected output is in the store
    assert not [x for x in os.listdir(ours.real_store_dir) if "wrong-hash" in x and not x.endswith(".drv")]


def test_failing_builder_and_exit_status(nixroot: Path, ours: LocalStore) -> None:
    expr = """derivation { name = "fails"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      args = [ "-c" "echo about to fail; exit 3" ]; }"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 100
    assert _errors(m.stderr) == _errors(n.stderr) == [f"error: builder for '{drv}' failed with exit code 3"]
    assert b"about to fail" in m.stderr and m.stdout == b""
    # its log is kept, as Nix keeps it
    assert read_log(ours.state_dir, drv) == b"about to fail\n"
    assert not _outputs(ours, drv) or not any(os.path.exists(ours.physical(p)) for p in _outputs(ours, drv).values())


def test_dependency_failure(nixroot: Path, ours: LocalStore) -> None:
    expr = """let a = derivation { name = "dep-fails"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
                args = [ "-c" "exit 1" ]; };
      in derivation { name = "top"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
           args = [ "-c" "echo ${a} > $out" ]; }"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 100
    assert _errors(m.stderr) == _errors(n.stderr)


def test_max_silent_time_and_timeout(nixroot: Path, ours: LocalStore) -> None:
    expr = """derivation { name = "silent"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      args = [ "-c" "echo started; ${bb}/bin/busybox sleep 30" ]; }"""
    drv = _both(nixroot, ours, expr)
    for opt in (("--option", "max-silent-time", "1"), ("--option", "timeout", "1")):
        t = time.monotonic()
        n = nix_build(nixroot, drv, *opt)
        m = _nartool_build(ours, *opt, drv)
        assert time.monotonic() - t < 15
        assert n.returncode == m.returncode == 101, (n.stderr, m.stderr)
        assert _errors(m.stderr) == _errors(n.stderr)
    assert not [x for x in os.listdir(ours.real_store_dir) if x.endswith(".chroot")]


def test_max_build_log_size(nixroot: Path, ours: LocalStore) -> None:
    expr = """derivation { name = "chatty"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      args = [ "-c" "${bb}/bin/busybox seq 1 100000; echo x > $out" ]; }"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv, "--option", "max-build-log-size", "1000")
    m = _nartool_build(ours, "--option", "max-build-log-size", "1000", drv)
    assert n.returncode == m.returncode == 1
    assert _errors(m.stderr) == _errors(n.stderr)


ESCAPES = r"""derivation { name = "escapes"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
  args = [ "-c" ''
    printf 'L1 \033[3pnest-open\033[q end\n'
    printf 'L2 \033[1;31mred\033[0m plain\n'
    printf 'L3 \033[2Kerase \033[5Acursor \033]0;title\007osc\n'
    printf 'L4 tab\there\n'
    printf 'L5 abcdef\rXY\n'
    printf 'L6 bell\007 \033(B charset \033M rev \033[a\033[b\033[s\n'
    printf 'L7 no newline at the end'
    echo > $out
  '' ]; }"""


def test_log_escapes(nixroot: Path, ours: LocalStore) -> None:
    drv = _both(nixroot, ours, ESCAPES)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 0
    nix_raw = subprocess.run(["nix-store", "--store", str(nixroot), "-l", drv], capture_output=True, env=nix_env(),
                             check=True).stdout
    assert read_log(ours.state_dir, drv) == nix_raw
    assert b"\033[3p" in nix_raw and b"\r" in nix_raw

    def lines(err: bytes) -> list[bytes]:
        return [x for x in err.split(b"\n") if x.startswith((b"L", b"XY"))]

    assert lines(m.stderr) == lines(n.stderr)
    assert len(lines(m.stderr)) == 7 and b"XY abcdef" in lines(m.stderr)


REFS = """let
  det = derivation { name = "ref-det"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
          args = [ "-c" "${bb}/bin/busybox mkdir -p $out/bin; echo ${bb} > $out/bin/hi" ]; };
  probe = n: attrs: derivation ({ name = "ref-" + n; system = builtins.currentSystem; builder = "${bb}/bin/sh";
          args = [ "-c" "echo ${det} > $out" ]; } // attrs);
in probe "NAME" ATTRS"""


@pytest.mark.parametrize(("name", "attrs", "ok"), [
    ("dreq", "{ disallowedRequisites = [ bb ]; }", False),
    ("dref", "{ disallowedReferences = [ bb ]; }", True),
    ("aref", "{ allowedReferences = []; }", False),
    ("areq", "{ allowedRequisites = [ det ]; }", False),
    ("self", '{ disallowedRequisites = [ "out" ]; }', True),
    ("bad", '{ allowedReferences = [ "dep" ]; }', False),
    ("sa", '{ __structuredAttrs = true; outputChecks.out.allowedRequisites = [ "out" ]; }', False),
    ("size", "{ __structuredAttrs = true; outputChecks.out.maxSize = 10; }", False),
    ("csize", "{ __structuredAttrs = true; outputChecks.out.maxClosureSize = 1000; }", False),
    ("csize-ok", "{ __structuredAttrs = true; outputChecks.out.maxClosureSize = 100000000; }", True),
    ("sa-dref", '{ __structuredAttrs = true; outputChecks.out.disallowedReferences = [ det ]; }', False),
])
def test_reference_checks(nixroot: Path, ours: LocalStore, name: str, attrs: str, ok: bool) -> None:
    expr = REFS.replace("NAME", name).replace("ATTRS", attrs).replace("det = derivation", "det = derivation")
    expr = expr.replace('args = [ "-c" "echo ${det} > $out" ]', 'args = [ "-c" "echo ${det} > $out" ]' if "__structured"
                        not in attrs else 'args = [ "-c" "echo ${det} > ${placeholder "out"}" ]')
    drv = _both(nixroot, ours, expr)
    copy_drv_closure(nixroot, ours, drv)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert (n.returncode == 0) == ok, n.stderr
    assert m.returncode == n.returncode, (m.stderr, n.stderr)
    nix_err = n.stderr.decode()
    my_err = m.stderr.decode()
    if not ok:
        i, j = nix_err.index("error:"), my_err.index("error:")
        assert my_err[j:] == nix_err[i:]
        # the rejected output is not in our store (Nix leaves it there, unregistered)
        out = f"-ref-{name}"
        assert not [x for x in os.listdir(ours.real_store_dir) if x.endswith(out)]


NOCHROOT = """derivation { name = "nochroot-MODE"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
  __noChroot = true; args = [ "-c" "echo ok > $out" ]; }"""


def test_no_chroot(nixroot: Path, ours: LocalStore) -> None:
    drv = _both(nixroot, ours, NOCHROOT.replace("MODE", "true"))
    n = nix_build(nixroot, drv, "--option", "sandbox", "true")
    m = _nartool_build(ours, "--option", "sandbox", "true", drv)
    assert n.returncode == m.returncode == 1
    assert _errors(m.stderr) == _errors(n.stderr) == [
        f"error: derivation '{drv}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"]
    # relaxed, on a diverted store: sandboxed anyway, as Nix
    drv = _both(nixroot, ours, NOCHROOT.replace("MODE", "relaxed").replace("echo ok", "${bb}/bin/busybox pwd"))
    n = nix_build(nixroot, drv, "--option", "sandbox", "relaxed")
    m = _nartool_build(ours, "--option", "sandbox", "relaxed", drv)
    assert n.returncode == m.returncode == 0
    out = m.stdout.decode().split()[-1]
    assert Path(ours.physical(out)).read_text() == "/build\n"
    assert _our_hash(ours, out) == "sha256:" + _b16(nar_hash(nixroot, out))


def test_pre_build_hook(nixroot: Path, ours: LocalStore, tmp_path: Path) -> None:
    shown = tmp_path / "shown"
    shown.mkdir()
    (shown / "file").write_text("from the hook\n")
    record = tmp_path / "args"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$#\" > {record}\necho extra-sandbox-paths\necho /hooked={shown}\necho\n")
    hook.chmod(0o755)
    expr = """derivation { name = "hooked"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      args = [ "-c" "${bb}/bin/busybox cat /hooked/file > $out" ]; }"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv, "--option", "pre-build-hook", str(hook))
    assert n.returncode == 0, n.stderr
    assert record.read_text() == "2\n"
    record.unlink()
    m = _nartool_build(ours, "--option", "pre-build-hook", str(hook), drv)
    assert m.returncode == 0, m.stderr
    assert record.read_text() == "2\n"
    out = m.stdout.decode().split()[-1]
    assert Path(ours.physical(out)).read_text() == "from the hook\n"
    # a hook speaking another language
    hook.write_text("#!/bin/sh\necho hello\n")
    drv2 = _both(nixroot, ours, expr.replace('"hooked"', '"hooked2"'))
    n = nix_build(nixroot, drv2, "--option", "pre-build-hook", str(hook))
    m = _nartool_build(ours, "--option", "pre-build-hook", str(hook), drv2)
    assert n.returncode != 0 and m.returncode != 0
    assert "unknown pre-build hook command 'hello'" in n.stderr.decode()
    assert _errors(m.stderr) == _errors(n.stderr)
    # a failing hook
    hook.write_text("#!/bin/sh\nexit 4\n")
    drv3 = _both(nixroot, ours, expr.replace('"hooked"', '"hooked3"'))
    n = nix_build(nixroot, drv3, "--option", "pre-build-hook", str(hook))
    m = _nartool_build(ours, "--option", "pre-build-hook", str(hook), drv3)
    assert n.returncode == m.returncode == 1
    assert _errors(m.stderr) == _errors(n.stderr)
    assert not [x for x in os.listdir(ours.real_store_dir) if x.endswith(".chroot")]


def test_sandbox_paths_closure(nixroot: Path, ours: LocalStore) -> None:
    """A store path in sandbox-paths brings its closure (here DET and busybox); on a chroot
    store nartool takes them from that store (Nix 2.8 looks for them in the host's /nix/store)."""
    det_drv = _both(nixroot, ours, DET)
    m = _nartool_build(ours, det_drv)
    assert m.returncode == 0, m.stderr
    det = m.stdout.decode().split()[-1]
    expr = """derivation { name = "sp-probe"; system = builtins.currentSystem; builder = "/bin/sh";
      args = [ "-c" "echo $(/opt/hi) > $out; ls /nix/store >> $out" ]; }"""
    drv = _both(nixroot, ours, expr)
    m = _nartool_build(ours, "--option", "sandbox-paths", f"/bin/sh={BB}/bin/sh /opt/hi={det}/bin/hi", drv)
    assert m.returncode == 0, m.stderr
    out = m.stdout.decode().split()[-1]
    lines = Path(ours.physical(out)).read_text().splitlines()
    assert lines[0] == "hi from det"
    assert sorted(lines[1:]) == sorted([BB.rsplit("/", 1)[1], det.rsplit("/", 1)[1], out.rsplit("/", 1)[1]])


SLEEPER = """derivation { name = "sleeper-TAG"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
  args = [ "-c" "echo sleeping; ${bb}/bin/busybox sleep SECS; echo done > $out" ]; }"""


def _wait_for(p: subprocess.Popen[bytes], marker: bytes, timeout: float = 20) -> bytes:
    assert p.stderr is not None
    buf = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(p.stderr.fileno(), False)
    while marker not in buf:
        assert time.monotonic() < deadline, buf
        chunk = p.stderr.read()
        if chunk:
            buf += chunk
        else:
            time.sleep(0.05)
    return buf


def _no_leftovers(st: LocalStore, drv: str) -> None:
    names = os.listdir(st.real_store_dir)
    assert not [n for n in names if n.endswith(".chroot")], names
    with LocalStore(st.root) as s:
        outs = s.query_derivation_outputs(drv)
        for p in outs.values():
            assert not s.is_valid(p)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_kills_and_cleans(nixroot: Path, ours: LocalStore, sig: int) -> None:
    drv = _both(nixroot, ours, SLEEPER.replace("TAG", f"int{sig}").replace("SECS", "60"))
    p = subprocess.Popen(cli_argv("--store", ours.root, "build", drv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=cli_env())
    _wait_for(p, b"sleeping")
    p.send_signal(sig)
    assert p.wait(timeout=20) == 130
    _no_leftovers(ours, drv)
    out = _outputs(ours, drv)["out"]
    assert not os.path.lexists(ours.physical(out))
    # no process of the build is left (the sleeper was pid 1 of its namespace)
    r = subprocess.run(["pgrep", "-f", "busybox sleep 60"], capture_output=True, check=False)
    assert r.stdout.strip() == b"", r.stdout


def test_kill_9_leaves_nothing_after_gc(nixroot: Path, ours: LocalStore) -> None:
    drv = _both(nixroot, ours, SLEEPER.replace("TAG", "k9").replace("SECS", "3"))
    p = subprocess.Popen(cli_argv("--store", ours.root, "build", drv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=cli_env())
    _wait_for(p, b"sleeping")
    p.kill()
    p.wait()
    time.sleep(4)  # the builder's own end
    out = _outputs(ours, drv)["out"]
    with LocalStore(ours.root) as s:
        assert not s.is_valid(out)
    ours.close()  # (its temporary roots would keep the derivation, and so its chroot, alive)
    r = run_cli("--store", ours.root, "store", "gc")
    assert r.returncode == 0, r.stderr
    names = os.listdir(ours.real_store_dir)
    assert not [n for n in names if n.endswith(".chroot") or n.endswith("-sleeper-k9")], names


def test_concurrent_builds_build_once(nixroot: Path, ours: LocalStore) -> None:
    drv = _both(nixroot, ours, SLEEPER.replace("TAG", "conc").replace("SECS", "3"))
    ps = [subprocess.Popen(cli_argv("--store", ours.root, "build", drv), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=cli_env()) for _ in range(2)]
    res = [p.communicate(timeout=60) for p in ps]
    assert [p.returncode for p in ps] == [0, 0], res
    assert res[0][0] == res[1][0] != b""
    assert sum(b"sleeping" in err for _, err in res) == 1, res
    (waiter,) = [err for _, err in res if b"sleeping" not in err]
    out = res[0][0].decode().strip()
    assert f"waiting for lock on '{ours.physical(out)}'".encode() in waiter, waiter


def test_unprivileged_user_same_output(nixroot: Path, http_server: int) -> None:
    """nartool run as the unprivileged user ``nartuser`` (sandbox through a user namespace)
    builds the deterministic derivation, the two-step chain and a fixed-output fetch from the
    host's loopback to the paths and NAR hashes Nix (as root, with build users) gives them."""
    import hashlib
    import json
    import tempfile

    try:
        pwd.getpwnam("nartuser")
    except KeyError:
        require("ROOT", False, "user 'nartuser' needed for the unprivileged build")
    require("ROOT", os.geteuid() == 0, "needs root to run as nartuser")
    py = next((x for x in ("/usr/bin/python3", sys.executable) if subprocess.run(
        ["runuser", "-u", "nartuser", "--", x, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"],
        capture_output=True, check=False).returncode == 0), None)
    require("ROOT", py is not None, "no Python >= 3.10 runnable by nartuser")
    h = hashlib.sha256(_Handler.payload).hexdigest()
    fod = f"""derivation {{ name = "fetched-u{http_server}"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      outputHashAlgo = "sha256"; outputHashMode = "flat"; outputHash = "{h}";
      args = [ "-c" "${{bb}}/bin/busybox wget -q -O $out http://127.0.0.1:{http_server}/file" ]; }}"""
    drvs = [instantiate(nixroot, e) for e in (DET, CHAIN.replace("step-", "ustep-"), fod)]
    want = {}
    for drv in drvs:
        n = nix_build(nixroot, drv)
        assert n.returncode == 0, n.stderr
        out = n.stdout.decode().split()[-1]
        want[drv] = {"out": out, "hash": "sha256:" + _b16(nar_hash(nixroot, out)), "status": 0, "error": ""}
    tmp_path = Path(tempfile.mkdtemp(prefix="nartool-unpriv-"))  # (pytest's own tmp dirs are root's only)
    try:
        work = tmp_path / "u"
        work.mkdir()
        st, _ = nartool_store(work / "store", work)
        for drv in drvs:
            copy_drv_closure(nixroot, st, drv)
        st.close()
        shutil.chown(tmp_path, "nartuser")
        subprocess.run(["chown", "-R", "nartuser:", str(work)], check=True)
        script = ("import json, sys\nfrom nartool.build import BuildOptions, build_paths\n"
                  "from nartool.store.local import LocalStore\n"
                  f"st = LocalStore({str(work / 'store')!r})\n"
                  f"drvs = {drvs!r}\n"
                  "rs = build_paths(st, drvs, BuildOptions(), log=sys.stderr.buffer.write)\n"
                  "res = {}\n"
                  "for d, r in zip(drvs, rs):\n"
                  "    out = st.query_derivation_outputs(d)['out']\n"
                  "    info = st.query_path_info(out)\n"
                  "    res[d] = {'status': int(r.status), 'error': r.error_msg, 'out': out,\n"
                  "              'hash': info.nar_hash.prefixed('base16') if info else None}\n"
                  "print(json.dumps(res))\n")
        r = subprocess.run(["runuser", "-u", "nartuser", "--", py or "", "-c", script], capture_output=True,
                           cwd="/tmp", env={**os.environ, "PYTHONPATH": str(repo_for("nartuser")), "TMPDIR": str(tmp_path)},
                           timeout=180, check=False)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        assert json.loads(r.stdout) == want
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=False)
        shutil.rmtree(tmp_path, ignore_errors=True)


ENVPROBE = r"""let dep = derivation { name = "env-dep"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
                 args = [ "-c" "echo ${bb} > $out" ]; };
in derivation { name = "envprobe"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
  big = "passed as a file to ${placeholder "out"}"; passAsFile = [ "big" ]; PATH = "/overridden";
  NIX_BUILD_TOP = "/not-this"; ph = "${placeholder "out"}/bin"; ${placeholder "out"} = "a key";
  exportReferencesGraph = [ "graph" dep ];
  args = [ "-c" ''
    B=${bb}/bin/busybox
    $B mkdir $out
    $B env | $B sort > $out/env
    $B cat $bigPath > $out/big
    $B cat graph > $out/graph
    $B ls -a /build | $B sort > $out/build-dir
  '' "${placeholder "out"}" ]; }"""

STRUCTURED = r"""let dep = derivation { name = "sa-dep"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
                 args = [ "-c" "echo ${bb} > $out" ]; };
in derivation { name = "structured"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
  __structuredAttrs = true; str = "it's"; num = 42; flt = 1.5; yes = true; no = false; nul = null;
  list = [ 1 "two" true ]; obj = { a = 1; b = "x"; }; nested = { a = [ 1 ]; }; "not-a-name" = 1;
  exportReferencesGraph.graph = [ dep ];
  args = [ "-c" ''
    B=${bb}/bin/busybox
    out=$($B sed -n "s/^declare -A outputs=(\['out'\]='\([^']*\)' )$/\1/p" /build/.attrs.sh)
    $B mkdir $out
    $B env | $B sort > $out/env
    $B cat /build/.attrs.sh > $out/attrs.sh
    $B cat /build/.attrs.json > $out/attrs.json
  '' ]; }"""


@pytest.mark.parametrize("expr", [ENVPROBE, STRUCTURED], ids=["passAsFile-exportReferencesGraph", "structured"])
def test_environment_and_build_files(nixroot: Path, ours: LocalStore, expr: str) -> None:
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    assert n.returncode == 0, n.stderr
    out = n.stdout.decode().split()[-1]
    m = _nartool_build(ours, drv)
    assert m.returncode == 0, m.stderr
    for f in sorted(os.listdir(f"{nixroot}{out}")):
        assert Path(ours.physical(out), f).read_bytes() == Path(f"{nixroot}{out}", f).read_bytes(), f
    assert _our_hash(ours, out) == "sha256:" + _b16(nar_hash(nixroot, out))


def test_fixed_output_impure_env_vars(nixroot: Path, ours: LocalStore) -> None:
    import hashlib

    value = "proxy.example:3128"
    h = hashlib.sha256((value + "\n").encode()).hexdigest()
    expr = f"""derivation {{ name = "impure-env"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      outputHashAlgo = "sha256"; outputHashMode = "flat"; outputHash = "{h}"; impureEnvVars = [ "MY_PROXY" ];
      args = [ "-c" "echo $MY_PROXY > $out; echo NIX_OUTPUT_CHECKED=$NIX_OUTPUT_CHECKED" ]; }}"""
    drv = _both(nixroot, ours, expr)
    n = subprocess.run(["nix-store", "--store", str(nixroot), "--option", "substituters", "", "-r", drv],
                       capture_output=True, env={**nix_env(), "MY_PROXY": value}, check=False)
    assert n.returncode == 0, n.stderr
    m = _nartool_build(ours, drv, env={"MY_PROXY": value})
    assert m.returncode == 0, m.stderr
    assert m.stdout == n.stdout
    assert b"NIX_OUTPUT_CHECKED=1" in m.stderr and b"NIX_OUTPUT_CHECKED=1" in n.stderr


def _with_pty_stderr(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run ``argv`` with stderr a terminal; returns (status, stdout, what the terminal got)."""
    import pty
    import select as sel

    master, slave = pty.openpty()
    import termios
    import tty

    tty.setraw(slave)  # no \n -> \r\n translation: the bytes as written
    attrs = termios.tcgetattr(slave)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    got = b""
    while True:
        r, _, _ = sel.select([master], [], [], 60)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    out = p.stdout.read() if p.stdout else b""
    os.close(master)
    return p.wait(), out, got


def test_log_escapes_on_a_terminal(nixroot: Path, ours: LocalStore) -> None:
    drv = _both(nixroot, ours, ESCAPES.replace('"escapes"', '"escapes-tty"'))
    ns, _, nerr = _with_pty_stderr(["nix-store", "--store", str(nixroot), "--option", "substituters", "",
                                    "--realise", drv], nix_env())
    ms, _, merr = _with_pty_stderr(cli_argv("--store", ours.root, "build", drv), cli_env())
    assert ns == ms == 0

    def lines(err: bytes) -> list[bytes]:
        return [x.rstrip(b"\r") for x in err.split(b"\n") if x.startswith((b"L", b"XY"))]

    assert lines(merr) == lines(nerr)
    assert b"L2 \x1b[1;31mred\x1b[0m plain" in lines(merr)


@pytest.mark.parametrize("attrs", ['system = "aarch64-linux";',
                                   'system = builtins.currentSystem; requiredSystemFeatures = [ "kvm" "gpu" ];'])
def test_platform_check(nixroot: Path, ours: LocalStore, attrs: str) -> None:
    expr = f"""derivation {{ name = "elsewhere"; {attrs} builder = "${{bb}}/bin/sh"; args = [ "-c" "echo > $out" ]; }}"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 1
    assert _errors(m.stderr) == _errors(n.stderr)
    assert "is required to build" in _errors(m.stderr)[0]


def test_json_and_output_selection(nixroot: Path, ours: LocalStore) -> None:
    import json

    expr = """derivation { name = "multi"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      outputs = [ "out" "dev" ]; args = [ "-c" "echo lib > $out; echo $out > $dev" ]; }"""
    drv = _both(nixroot, ours, expr)
    m = _nartool_build(ours, "--json", drv + "!dev")
    assert m.returncode == 0, m.stderr
    res = json.loads(m.stdout)
    outs = _outputs(ours, drv)
    assert res == [{"drvPath": drv, "outputs": {"dev": outs["dev"]}, "status": "BUILT"}]
    with LocalStore(ours.root) as s:  # both outputs built and registered
        assert s.query_references(outs["dev"]) == {outs["out"]} and s.query_references(outs["out"]) == set()
    n = nix_build(nixroot, drv)
    assert n.returncode == 0
    for o in outs.values():
        assert _our_hash(ours, o) == "sha256:" + _b16(nar_hash(nixroot, o))


def test_output_cycle(nixroot: Path, ours: LocalStore) -> None:
    expr = """derivation { name = "cyclic"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      outputs = [ "out" "dev" ]; args = [ "-c" "echo $dev > $out; echo $out > $dev" ]; }"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 1
    assert _errors(m.stderr) == _errors(n.stderr)
    assert "cycle detected" in _errors(m.stderr)[0]
    assert not [x for x in os.listdir(ours.real_store_dir) if x.endswith(("-cyclic", "-cyclic-dev"))]


@pytest.mark.parametrize("opts", [("--option", "build-users-group", "no-such-group"), ("--max-jobs", "0")],
                         ids=["no-such-group", "max-jobs-0"])
def test_setting_errors_as_nix(nixroot: Path, ours: LocalStore, opts: tuple[str, ...]) -> None:
    require("ROOT", os.geteuid() == 0 or opts[0] == "--max-jobs", "build users are used only as root")
    expr = f"""derivation {{ name = "opt-{opts[-1]}"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      args = [ "-c" "echo > $out" ]; }}"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv, *opts)
    m = _nartool_build(ours, *opts, drv)
    assert n.returncode == m.returncode == 1, (n.stderr, m.stderr)
    assert _errors(m.stderr) == _errors(n.stderr)


def test_log_settings(nixroot: Path, ours: LocalStore) -> None:
    expr = """derivation { name = "logset-NAME"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      args = [ "-c" "echo line; echo > $out" ]; }"""
    plain = _both(nixroot, ours, expr.replace("NAME", "plain"))
    m = _nartool_build(ours, "--option", "compress-build-log", "false", plain)
    assert m.returncode == 0, m.stderr
    base = plain.rsplit("/", 1)[1]
    assert Path(ours.root, "nix/var/log/nix/drvs", base[:2], base[2:]).read_bytes() == b"line\n"
    r = subprocess.run(["nix-store", "--store", ours.root, "-l", plain], capture_output=True, env=nix_env(), check=False)
    assert r.stdout == b"line\n"
    none = _both(nixroot, ours, expr.replace("NAME", "none"))
    m = _nartool_build(ours, "--option", "keep-build-log", "false", none)
    assert m.returncode == 0 and b"line" in m.stderr
    r2 = run_cli("--store", ours.root, "store", "log", none)
    assert r2.returncode == 1 and b"is not available" in r2.stderr


def test_keep_going_several_failures(nixroot: Path, ours: LocalStore) -> None:
    mk = """derivation {{ name = "kg-{0}"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      args = [ "-c" "{1}" ]; }}"""
    bad1 = _both(nixroot, ours, mk.format("bad1", "exit 2"))
    bad2 = _both(nixroot, ours, mk.format("bad2", "exit 3"))
    good = _both(nixroot, ours, mk.format("good", "echo > $out"))
    n = subprocess.run(
        ["nix-store", "--store", str(nixroot), "--option", "substituters", "", "--keep-going", "--realise",
         bad1, good, bad2], capture_output=True, env=nix_env(), check=False)
    m = _nartool_build(ours, "--keep-going", bad1, good, bad2)
    assert n.returncode == m.returncode == 100
    assert n.stdout == m.stdout == b""
    assert _errors(m.stderr) == _errors(n.stderr)
    with LocalStore(ours.root) as s:
        assert s.is_valid(s.query_derivation_outputs(good)["out"])


def test_first_failure_stops_the_rest(nixroot: Path, ours: LocalStore) -> None:
    mk = """derivation {{ name = "stop-{0}"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      args = [ "-c" "{1}" ]; }}"""
    bad = _both(nixroot, ours, mk.format("bad", "exit 2"))
    later = _both(nixroot, ours, mk.format("later", "echo > $out"))
    n = subprocess.run(["nix-store", "--store", str(nixroot), "--option", "substituters", "", "--realise",
                        bad, later], capture_output=True, env=nix_env(), check=False)
    m = _nartool_build(ours, bad, later)
    assert n.returncode == m.returncode == 100
    assert _errors(m.stderr) == _errors(n.stderr)
    with LocalStore(ours.root) as s:  # never started, as in Nix
        assert not s.is_valid(s.query_derivation_outputs(later)["out"])


UNSANDBOXED_SCRIPT = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.buildkit import BB, nartool_store, write_drv
from nartool.build import BuildOptions, build_paths
work = Path(sys.argv[2])
st, _ = nartool_store(Path("/"), work)
assert st.real_store_dir == "/nix/store"
probe = ('B=' + BB + '/bin/busybox; $B mkdir $out; echo "$TMPDIR" > $out/tmpdir; $B id -u > $out/uid; '
         'echo "$HOME $NIX_BUILD_TOP" > $out/env; $B ls /nix/store | $B wc -l > $out/store-entries')
res = {}
for mode in ("false", "relaxed-nochroot"):
    env = {"__noChroot": "1"} if mode == "relaxed-nochroot" else {}
    drv = write_drv(st, "unsb-" + mode, probe, env=env)
    opts = BuildOptions(sandbox="relaxed" if mode.startswith("relaxed") else mode)
    r = build_paths(st, [drv], opts, log=sys.stderr.buffer.write)[0]
    out = st.query_derivation_outputs(drv)["out"]
    files = {p.name: p.read_text() for p in Path(out).iterdir()} if st.is_valid(out) else None
    res[mode] = {"status": int(r.status), "error": r.error_msg, "files": files,
                 "owner": os.stat(out).st_uid if files else None}
print(json.dumps(res))
"""


def test_unsandboxed_builds_in_a_private_mount_namespace(tmp_path: Path) -> None:
    """``sandbox = false`` and ``relaxed`` + ``__noChroot`` need a store whose real directory is
    /nix/store: the test gets one by mounting a temporary directory on /nix in a mount namespace of
    its own."""
    require("ROOT", os.geteuid() == 0, "needs root (a private mount namespace with /nix replaced)")
    require("SANDBOX", static_busybox(), "no static busybox (install busybox-static)")
    if shutil.which("unshare") is None:
        require("SANDBOX", False, "unshare(1) not found")
    nixdir = tmp_path / "nix"
    nixdir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(UNSANDBOXED_SCRIPT)
    # the build users' lock files stay the host's (a Nix or nartool outside must never share a uid
    # with this build): /nix/var/nix/userpool is carried over into the replaced /nix
    os.makedirs("/nix/var/nix/userpool", exist_ok=True)
    pool = tmp_path / "pool"
    pool.mkdir()
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount --bind /nix/var/nix/userpool {pool} && mount --bind {nixdir} /nix && "
                        f"mkdir -p /nix/var/nix/userpool && mount --bind {pool} /nix/var/nix/userpool && "
                        f"exec {sys.executable} {script} {REPO} {work}"],
                       capture_output=True, timeout=120, env={**cli_env(), "NIX_STATE_DIR": "/nix/var/nix"},
                       check=False)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    import json

    res = json.loads(r.stdout)
    for mode in ("false", "relaxed-nochroot"):
        got = res[mode]
        assert got["status"] == 0, got
        f = got["files"]
        assert f["tmpdir"].startswith(f"/tmp/nix-build-unsb-{mode}.drv-"), f
        assert f["env"] == f"/homeless-shelter {f['tmpdir'].strip()}\n"
        assert f["uid"].strip() != "0" and f["uid"].strip() != "1000"  # a build user, not root, no namespace
        assert int(f["store-entries"]) >= 3  # the whole store is visible
        assert got["owner"] == 0  # canonicalised to the store's owner


def test_structured_log_lines(nixroot: Path, ours: LocalStore) -> None:
    expr = r"""derivation { name = "atnix"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      args = [ "-c" ''
        echo 'before'
        echo '@nix {"action":"msg","level":0,"msg":"shown from json"}'
        echo '@nix {"action":"msg","level":5,"msg":"too verbose"}'
        echo '@nix {"action":"start","id":7,"level":3,"type":0,"text":"an activity"}'
        echo '@nix {"action":"stop","id":7}'
        echo 'after'
        echo > $out
      '' ]; }"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 0

    def body(err: bytes) -> list[bytes]:
        lines = err.split(b"\n")
        i = lines.index(b"before")
        return lines[i:lines.index(b"after") + 1]

    assert body(m.stderr) == body(n.stderr)
    assert read_log(ours.state_dir, drv) == subprocess.run(
        ["nix-store", "--store", str(nixroot), "-l", drv], capture_output=True, env=nix_env(), check=True).stdout


def test_gc_during_a_build(nixroot: Path, ours: LocalStore) -> None:
    """A collection while a build runs deletes nothing the build uses (its inputs, its chroot, its
    outputs-to-be are temporary roots of the building process)."""
    drv = _both(nixroot, ours, SLEEPER.replace("TAG", "gc").replace("SECS", "2"))
    ours.close()  # (only the building process keeps anything alive)
    p = subprocess.Popen(cli_argv("--store", ours.root, "build", drv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=cli_env())
    _wait_for(p, b"sleeping")
    g = run_cli("--store", ours.root, "store", "gc")
    assert g.returncode == 0, g.stderr
    assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else b""
    with LocalStore(ours.root) as s:
        out = s.query_derivation_outputs(drv)["out"]
        assert s.is_valid(out) and s.is_valid(BB) and s.is_valid(drv)
        assert Path(s.physical(out)).read_text() == "done\n"


def test_max_jobs_runs_builds_in_parallel(nixroot: Path, ours: LocalStore) -> None:
    mk = """derivation {{ name = "par-{0}"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      args = [ "-c" "B=${{bb}}/bin/busybox; $B date +%s > $out; $B sleep 2.5; $B date +%s >> $out" ]; }}"""
    drvs = [_both(nixroot, ours, mk.format(x)) for x in ("one", "two")]
    m = _nartool_build(ours, "-j", "2", *drvs)
    assert m.returncode == 0, m.stderr
    spans = [[float(x) for x in Path(ours.physical(p)).read_text().split()] for p in m.stdout.decode().split()]
    assert len(spans) == 2
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 - 1 and b0 < a1 - 1, spans  # the two builds overlapped (whole seconds: by more than 1 s)


def test_fixed_output_flat_must_not_be_executable(nixroot: Path, ours: LocalStore) -> None:
    import hashlib

    h = hashlib.sha256(b"x\n").hexdigest()
    expr = f"""derivation {{ name = "flat-exec"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      outputHashAlgo = "sha256"; outputHashMode = "flat"; outputHash = "{h}";
      args = [ "-c" "echo x > $out; ${{bb}}/bin/busybox chmod +x $out" ]; }}"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 1
    nix_err = _errors(n.stderr)
    assert len(nix_err) == 1 and "should be a non-executable regular file" in nix_err[0]
    # the same text, the chroot's path being that of each store
    assert _errors(m.stderr) == [nix_err[0].replace(str(nixroot), ours.root)]


def test_impure_host_deps(nixroot: Path, ours: LocalStore, tmp_path: Path) -> None:
    host = tmp_path / "impure"
    host.mkdir()
    (host / "f").write_text("impure\n")
    expr = f"""derivation {{ name = "impure-deps"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      __impureHostDeps = [ "{host}" "{tmp_path}/missing" ];
      args = [ "-c" "${{bb}}/bin/busybox cat {host}/f > $out" ]; }}"""
    drv = _both(nixroot, ours, expr)
    n = nix_build(nixroot, drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 1
    assert _errors(m.stderr) == _errors(n.stderr)
    opt = ("--option", "allowed-impure-host-deps", str(tmp_path))
    n = nix_build(nixroot, drv, *opt)
    m = _nartool_build(ours, *opt, drv)
    assert n.returncode == m.returncode == 0, (n.stderr, m.stderr)
    assert m.stdout == n.stdout
    assert Path(ours.physical(m.stdout.decode().split()[-1])).read_text() == "impure\n"


def test_fixed_output_with_references_is_refused(nixroot: Path, ours: LocalStore) -> None:
    import hashlib

    body = (BB + "\n").encode()
    h = hashlib.sha256(body).hexdigest()
    expr = f"""derivation {{ name = "fod-refs"; system = builtins.currentSystem; builder = "${{bb}}/bin/sh";
      outputHashAlgo = "sha256"; outputHashMode = "flat"; outputHash = "{h}";
      args = [ "-c" "echo ${{bb}} > $out" ]; }}"""
    drv = _both(nixroot, ours, expr)
    m = _nartool_build(ours, drv)
    assert m.returncode == 1
    assert _errors(m.stderr) == [f"error: the output '{_outputs(ours, drv)['out']}' of fixed-output derivation "
                                 f"'{drv}' refers to store paths, which a fixed output cannot: {BB}"]
    assert not [x for x in os.listdir(ours.real_store_dir) if x.endswith("-fod-refs")]


def test_missing_derivation(nixroot: Path, ours: LocalStore) -> None:
    drv = instantiate(nixroot, DET.replace('"det"', '"never-copied"'))
    n = nix_build(nixroot.parent / "empty-nix", drv)
    m = _nartool_build(ours, drv)
    assert n.returncode == m.returncode == 1
    assert m.stderr.decode().splitlines() == n.stderr.decode().splitlines()


def test_sandbox_setup_failure(nixroot: Path, ours: LocalStore, tmp_path: Path) -> None:
    """A required sandbox path that does not exist: the set-up fails before the builder runs
    (nartool learns it after the builder's start, from the error pipe), with Nix's message and
    status, and nothing registered."""
    expr = """derivation { name = "setup-fails"; system = builtins.currentSystem; builder = "${bb}/bin/sh";
      args = [ "-c" "echo never > $out" ]; }"""
    drv = _both(nixroot, ours, expr)
    missing = str(tmp_path / "no-such-path")
    n = nix_build(nixroot, drv, "--option", "sandbox-paths", missing)
    m = _nartool_build(ours, "--option", "sandbox-paths", missing, drv)
    assert m.returncode == n.returncode != 0, (n.stderr, m.stderr)
    want = f"error: getting attributes of path '{missing}': No such file or directory"
    assert want in _errors(n.stderr), n.stderr
    assert want in _errors(m.stderr), m.stderr
    assert not any(ours.is_valid(p) or os.path.lexists(ours.physical(p)) for p in _outputs(ours, drv).values())
    # the next build runs as usual
    ok = _nartool_build(ours, drv)
    assert ok.returncode == 0, ok.stderr
