"""The Linux build sandbox (nartool.build.sandbox), driven directly through its API with a static
busybox as the builder, and compared with real Nix 2.8 (the fingerprint derivation).

Every test that needs namespaces skips, with the reason, where the machine forbids them (fails
under NARTOOL_REQUIRE_SANDBOX=1)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nartool.build import sandbox as sb
from nartool.build import seccomp
from nartool.build.sandbox import (
    Bind,
    SandboxSpec,
    sandbox_unavailable_reason,
    start_sandboxed,
    start_unsandboxed,
)
from nartool.build.users import BuildUser, acquire_build_user
from nartool.errors import BuildError, SandboxUnavailable

from .conftest import IS_ROOT, NIX_STORE, require
from .helpers import REPO, repo_for
from .probes.fingerprint_compare import BUSYBOX, BUSYBOX_BASE, busybox_tree, drain

PROBES = Path(__file__).parent / "probes"
PROBE_BASE = "0c7kc2q7dvl6k5x0b6s3zbbzf0f1m7dn-probes"
PROBE_PATH = "/nix/store/" + PROBE_BASE
OUT = "/nix/store/1mdf1wqvk3x1dcsm9wmiz9kbqg4i5xv2-out"

_REASON = sandbox_unavailable_reason() if sys.platform == "linux" else "not Linux"


def need_sandbox() -> None:
    require("SANDBOX", _REASON is None, f"build sandbox unavailable here: {_REASON}")


def need_root() -> None:
    require("ROOT", IS_ROOT, "needs root (build users, mounts in the host namespace)")


@dataclass
class Env:
    root: Path               # the store root: root/nix/store holds the paths
    store: Path              # real store dir
    build_dir: Path

    def spec(self, script: str, **kw: object) -> SandboxSpec:
        base = SandboxSpec(
            builder=(BUSYBOX + "/bin/sh").encode(), args=[b"-c", script.encode()],
            env=[(b"PATH", f"{BUSYBOX}/bin".encode()), (b"HOME", b"/homeless-shelter"), (b"out", OUT.encode())],
            store_dir="/nix/store", real_store_dir=str(self.store), chroot_dir=str(self.store / "t.drv.chroot"),
            build_dir=str(self.build_dir), inputs=[BUSYBOX], binds=[], outputs=[OUT], host_network=False,
            build_user=None)
        return base.replace(**kw)


@pytest.fixture
def env() -> Iterator[Env]:
    # under /tmp, searchable by everybody: unsandboxed builds as a build user run in it
    tmp_path = Path(tempfile.mkdtemp(prefix="nartool-sandbox-test-"))
    os.chmod(tmp_path, 0o755)
    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    busybox_tree(store / BUSYBOX_BASE)
    bd = tmp_path / "build"
    bd.mkdir(mode=0o700)
    yield Env(tmp_path, store, bd)
    sb.cleanup_chroot(str(store / "t.drv.chroot"))
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=False)
    shutil.rmtree(tmp_path, ignore_errors=True)


def run(spec: SandboxSpec, sandboxed: bool = True, timeout: float = 30) -> tuple[int, str, sb.Builder]:
    b = start_sandboxed(spec) if sandboxed else start_unsandboxed(spec)
    try:
        log = drain(b.log_fd)
        status = b.wait()
    finally:
        b.cleanup()
    return status, log.decode(errors="replace"), b


def probes_input(env: Env) -> str:
    """Compile the static C probes into a store path of the test store."""
    gcc = shutil.which("gcc")
    require("SANDBOX", gcc is not None, "gcc is needed to compile the probes")
    d = env.store / PROBE_BASE / "bin"
    d.mkdir(parents=True)
    for name in ("escape", "xattr"):
        r = subprocess.run([gcc or "gcc", "-static", "-O2", "-o", str(d / name), str(PROBES / f"{name}.c")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            require("SANDBOX", False, f"gcc -static failed (libc6-dev missing?): {r.stderr[-300:]}")
    return PROBE_PATH


# ---------------------------------------------------------------------------------------------
# what the builder sees


def test_builder_view(env: Env) -> None:
    need_sandbox()
    (env.root / "host-only").write_text("x")
    script = r"""
echo "pid=$$ ppid=$PPID"
id
hostname; cat /proc/sys/kernel/domainname
pwd
ls -1 /nix/store
ls -1 /
ls -1 /dev
for f in /etc/*; do echo "== $f"; cat $f; done
grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status
cat /proc/self/personality
ulimit -c
ls -1 /proc/self/fd
echo /proc/[0-9]*
awk '{print $5}' /proc/self/mountinfo
ip -o link | awk '{print $2}'
[ -t 1 ] && echo stdout-tty
readlink /proc/self/fd/0
echo "args: $0"
"""
    status, log, _ = run(env.spec(script, args=[b"-c", script.encode(), b"first-arg"]))
    assert status == 0, log
    lines = log.splitlines()
    assert "pid=1 ppid=0" in lines
    assert lines[1].startswith("uid=1000(nixbld) gid=100(nixbld)")
    assert lines[lines.index("pid=1 ppid=0") + 2:lines.index("pid=1 ppid=0") + 5] == ["localhost", "(none)", "/build"]
    assert f"{BUSYBOX_BASE}" in lines and "t.drv.chroot" not in log   # closure only
    assert lines[lines.index(BUSYBOX_BASE) + 1:][:6] == ["build", "dev", "etc", "nix", "proc", "tmp"]
    assert [x for x in lines if x in {"fd", "full", "kvm", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                                   "stdout", "tty", "urandom", "zero"}] == \
        ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]
    i = lines.index("== /etc/group")
    assert lines[i:i + 12] == [
        "== /etc/group", "root:x:0:", "nixbld:!:100:", "nogroup:x:65534:",
        "== /etc/hosts", "127.0.0.1 localhost", "::1 localhost",
        "== /etc/passwd", "root:x:0:0:Nix build user:/build:/noshell",
        "nixbld:x:1000:100:Nix build user:/build:/noshell", "nobody:x:65534:65534:Nobody:/:/noshell", "CapEff:\t0000000000000000"]
    assert "NoNewPrivs:\t1" in lines and "Seccomp:\t2" in lines
    assert "00040000" in lines          # ADDR_NO_RANDOMIZE
    assert lines[lines.index("00040000") + 1] == "0"   # core dumps off
    assert lines[lines.index("00040000") + 2:lines.index("00040000") + 6] == ["0", "1", "2", "3"]  # 3 = ls's dir
    assert "/proc/1" in lines
    mounts = lines[lines.index("/proc/1") + 1:lines.index("lo:")]
    assert mounts == ["/", "/nix/store", BUSYBOX, "/build", "/dev/full", "/dev/null", "/dev/random", "/dev/tty",
                      "/dev/urandom", "/dev/zero", "/proc", "/dev/shm", "/dev/pts"]
    assert lines[lines.index("lo:") + 1] == "stdout-tty"   # only lo
    assert lines[lines.index("stdout-tty") + 1] == "/dev/null"
    assert "args: first-arg" in lines


def test_environment_passed_exactly(env: Env) -> None:
    need_sandbox()
    e = [(b"Z", b"1"), (b"A", b"\xff\xfe bytes"), (b"M", b"")]
    b = start_sandboxed(env.spec(f"{BUSYBOX}/bin/busybox cat /proc/1/environ; true", env=e))
    raw = drain(b.log_fd)
    b.wait()
    b.cleanup()
    assert raw == b"Z=1\0A=\xff\xfe bytes\0M=\0"


# ---------------------------------------------------------------------------------------------
# probes of build-testing.md §3


def test_escape_probe(env: Env) -> None:
    need_sandbox()
    probe = probes_input(env)
    host_only = env.root / "host-only-canary"
    host_only.write_text("outside")
    script = f"{probe}/bin/escape {host_only}; unshare -r {probe}/bin/escape {host_only}"
    status, log, _ = run(env.spec(script, inputs=[BUSYBOX, probe]))
    assert status == 0, log
    assert log.splitlines() == ["chroot(esc): Operation not permitted", "contained"]


def test_escape_probe_can_fail(tmp_path: Path, env: Env) -> None:
    """Control: the same probe, as root in a bare chroot (no pivot_root), does escape."""
    need_root()
    probe = probes_input(env)
    jail = tmp_path / "jail"
    (jail / "bin").mkdir(parents=True)
    shutil.copy(env.store / PROBE_BASE / "bin" / "escape", jail / "bin" / "escape")
    canary = tmp_path / "host-only-canary"
    canary.write_text("outside")
    r = subprocess.run(["chroot", str(jail), "/bin/escape", str(canary)], capture_output=True, text=True)
    assert r.stdout.startswith("ESCAPED"), (r.stdout, r.stderr, probe)


def test_seccomp_chmod_and_xattr(env: Env) -> None:
    need_sandbox()
    probe = probes_input(env)
    status, log, _ = run(env.spec(f"touch f && {probe}/bin/xattr f", inputs=[BUSYBOX, probe]))
    assert status == 0, log
    lines = log.splitlines()
    assert lines[:9] == [
        "setxattr: Operation not supported", "lsetxattr: Operation not supported", "fsetxattr: Operation not supported",
        "chmod 4755: Operation not permitted", "fchmod 2755: Operation not permitted",
        "fchmodat 6755: Operation not permitted", "fchmodat2 4755: Operation not permitted",
        "chmod 0755: ok", "fchmodat 0700: ok"]
    if os.uname().machine == "x86_64":
        # the i386 (int 0x80) and x32 ABIs are filtered too; without the filter these calls work
        # (i386) or do not exist in this kernel (x32: ENOSYS)
        assert lines[9:11] == ["i386 chmod 4755: Operation not permitted", "x32 chmod 4755: Operation not permitted"]
        assert lines[11] in ("i386 chmod 0755: ok", "i386 chmod 0755: Function not implemented")
        assert lines[12] in ("x32 chmod 0755: ok", "x32 chmod 0755: Function not implemented")


def test_seccomp_off(env: Env) -> None:
    need_sandbox()
    status, log, _ = run(env.spec("grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; touch f; chmod 4755 f && echo ok",
                                  filter_syscalls=False))
    assert log.splitlines() == ["NoNewPrivs:\t0", "Seccomp:\t0", "ok"]


def test_seccomp_program_is_valid_bpf() -> None:
    for machine in ("x86_64", "aarch64"):
        p = seccomp.filter_program(machine)
        assert len(p) % 8 == 0 and 0 < len(p) // 8 < 100
    with pytest.raises(ValueError):
        seccomp.filter_program("mips")


class _Http:
    def __init__(self, root: Path) -> None:
        (root / "file").write_text("served from the host\n")
        code = ("import http.server, functools, sys\n"
                "h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n"
                "s = http.server.HTTPServer(('127.0.0.1', 0), h)\n"
                "print(s.server_address[1], flush=True)\n"
                "s.serve_forever()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_network_fod_vs_ordinary(env: Env, tmp_path: Path) -> None:
    need_sandbox()
    www = tmp_path / "www"
    www.mkdir()
    srv = _Http(www)
    try:
        script = f"wget -q -O - http://127.0.0.1:{srv.port}/file 2>&1; pwd; ls -1 /nix/store; ls -1 /etc"
        _, log, _ = run(env.spec(script, host_network=True))
        lines = log.splitlines()
        assert lines[0] == "served from the host", log
        assert lines[1:3] == ["/build", BUSYBOX_BASE]       # still chrooted
        etc = lines[3:]
        assert "nsswitch.conf" in etc and "passwd" in etc and "group" in etc
        for f in ("resolv.conf", "services", "hosts"):
            assert (f in etc) == os.path.exists("/etc/" + f)
        _, log, _ = run(env.spec(script, host_network=False))
        assert "Connection refused" in log.splitlines()[0], log
        assert "nsswitch.conf" not in log and "resolv.conf" not in log
    finally:
        srv.close()


def test_binds_optional_missing_and_symlink(env: Env, tmp_path: Path) -> None:
    need_sandbox()
    d = tmp_path / "hostdir"
    d.mkdir()
    (d / "f").write_text("hello\n")
    os.symlink(d, tmp_path / "link")
    binds = [Bind("/opt/x", str(tmp_path / "link")), Bind("/opt/file", str(d / "f")),
             Bind("/opt/missing", str(tmp_path / "nope"), optional=True), Bind("/proc", "/proc")]
    status, log, _ = run(env.spec("cat /opt/x/f /opt/file; ls -1 /opt; [ -L /opt/x ] || echo dir", binds=binds))
    assert status == 0, log
    assert log.splitlines() == ["hello", "hello", "file", "x", "dir"]
    with pytest.raises(BuildError) as ei:
        run(env.spec("true", binds=[Bind("/opt/missing", str(tmp_path / "nope"))]))
    msg = f"getting attributes of path '{tmp_path / 'nope'}': No such file or directory"
    # Nix 2.8's words: "error: <msg>", the context only with --show-trace
    assert ei.value.message == ei.value.setup_message == msg  # type: ignore[attr-defined]
    assert ei.value.trace == ["while setting up the build environment"]  # type: ignore[attr-defined]
    assert ei.value.rule == "sandbox-setup"
    assert not os.path.lexists(env.store / "t.drv.chroot")


def test_input_files_hard_linked_and_outputs_not_bound(env: Env) -> None:
    need_sandbox()
    f = env.store / "0000000000000000000000000000000a-file"
    f.write_text("a file input\n")
    os.symlink("0000000000000000000000000000000a-file", env.store / "0000000000000000000000000000000b-link")
    out_base = OUT.rsplit("/", 1)[1]
    (env.store / out_base).mkdir()    # an output already present in the store is not shown
    spec = env.spec("cat /nix/store/*-file; ls -1 /nix/store; readlink /nix/store/*-link; mkdir $out; echo built > $out/x",
                    inputs=[BUSYBOX, "/nix/store/0000000000000000000000000000000a-file",
                            "/nix/store/0000000000000000000000000000000b-link", OUT])
    b = start_sandboxed(spec)
    log = drain(b.log_fd).decode()
    assert b.wait() == 0, log
    assert log.splitlines() == ["a file input", "0000000000000000000000000000000a-file",
                                "0000000000000000000000000000000b-link", BUSYBOX_BASE,
                                "0000000000000000000000000000000a-file"]
    assert Path(b.output_location(OUT), "x").read_text() == "built\n"
    assert b.output_location(OUT) == f"{env.store}/t.drv.chroot{OUT}"
    b.cleanup()
    b.cleanup()   # idempotent
    assert not os.path.lexists(spec.chroot_dir)
    assert f.read_text() == "a file input\n"


def test_pre_build_hook(env: Env, tmp_path: Path) -> None:
    need_sandbox()
    d = tmp_path / "hooked"
    d.mkdir()
    (d / "msg").write_text("from the hook\n")
    seen: list[list[str]] = []

    def hook(chroot: str) -> list[Bind]:
        seen.append(sorted(os.listdir(chroot)))
        return [Bind("/hook", str(d))]
    status, log, _ = run(env.spec("cat /hook/msg", pre_build_hook=hook))
    assert status == 0 and log == "from the hook\n"
    assert seen == [["etc", "nix", "tmp"]]


def test_kvm_flag(env: Env) -> None:
    need_sandbox()
    _, log, _ = run(env.spec("ls -1 /dev", kvm=True))
    assert ("kvm" in log.split()) == os.path.exists("/dev/kvm")


# ---------------------------------------------------------------------------------------------
# lifetime: kill, wait, cleanup, errors


def test_kill_kills_the_whole_sandbox(env: Env) -> None:
    need_sandbox()
    b = start_sandboxed(env.spec("sleep 1000 & sleep 1000 & echo started; wait"))
    deadline = time.time() + 10
    buf = b""
    while b"started" not in buf and time.time() < deadline:
        try:
            buf += os.read(b.log_fd, 100)
        except BlockingIOError:
            time.sleep(0.01)
    children = _descendants(b.pid)
    assert len(children) >= 2
    # '/' was made private first: none of the sandbox's mounts shows in the host's namespace
    assert sb._mount_points_under(spec_chroot := b.spec.chroot_dir) == [], spec_chroot
    t = time.time()
    b.kill()
    status = b.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert time.time() - t < 5
    time.sleep(0.1)
    assert [p for p in children if Path(f"/proc/{p}").exists() and _state(p) != "Z"] == []
    b.cleanup()
    assert not os.path.lexists(env.store / "t.drv.chroot")


def _descendants(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            if ppid == pid:
                out.append(int(p))
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_exit_status_and_log_eof(env: Env) -> None:
    need_sandbox()
    status, log, _ = run(env.spec("printf 'a\\nb'; exit 3"))
    assert os.waitstatus_to_exitcode(status) == 3
    assert log == "a\nb"   # raw pty: no \r\n translation


def test_builder_missing_fails_like_nix(env: Env) -> None:
    """A builder that cannot be executed fails as in Nix 2.8: exit code 1 (not a setup error),
    the reason in the log."""
    need_sandbox()
    status, log, _ = run(env.spec("", builder=b"/nix/store/nonexistent/bin/sh"))
    assert os.waitstatus_to_exitcode(status) == 1
    assert log == "executing '/nix/store/nonexistent/bin/sh': No such file or directory\n"
    with pytest.raises(BuildError, match="not an absolute path"):
        start_sandboxed(env.spec("", builder=b"sh"))


def test_stale_chroot_is_replaced(env: Env) -> None:
    need_sandbox()
    stale = env.store / "t.drv.chroot"
    (stale / "nix" / "store" / "junk").mkdir(parents=True)
    (stale / "nix" / "store" / "junk" / "f").write_text("x")
    os.chmod(stale / "nix" / "store" / "junk", 0o555)
    status, log, _ = run(env.spec("ls /nix/store"))
    assert log.split() == [BUSYBOX_BASE]


def test_cleanup_never_deletes_through_a_bind_mount(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bind mount left under the chroot in the host's namespace (on purpose): cleanup unmounts
    it, or, when that fails, leaves it in place -- the canary in the bound host dir survives."""
    need_sandbox()
    need_root()
    host = tmp_path / "precious"
    host.mkdir()
    (host / "canary").write_text("alive")
    for unmount_works in (True, False):
        b = start_sandboxed(env.spec("true"))
        drain(b.log_fd)
        assert b.wait() == 0
        target = Path(b.spec.chroot_dir) / "build-leftover"
        target.mkdir()
        subprocess.run(["mount", "--bind", str(host), str(target)], check=True)
        try:
            if not unmount_works:
                monkeypatch.setattr(sb, "_umount_detach", lambda path: False)
            b.cleanup()
            assert (host / "canary").read_text() == "alive"
            if unmount_works:
                assert not os.path.lexists(b.spec.chroot_dir)
            else:
                assert (target / "canary").exists()        # left, still mounted
                assert os.listdir(b.spec.chroot_dir) == ["build-leftover"]
        finally:
            monkeypatch.undo()
            subprocess.run(["umount", str(target)], check=False, capture_output=True)
        sb.cleanup_chroot(b.spec.chroot_dir)
        if os.path.isdir(b.spec.chroot_dir):
            os.rmdir(b.spec.chroot_dir)
        assert (host / "canary").read_text() == "alive"


# ---------------------------------------------------------------------------------------------
# build users


def _free_user(group: str = "nixbld") -> BuildUser:
    bu = acquire_build_user(group)
    assert bu is not None
    return bu


def test_build_users_locks(tmp_path: Path) -> None:
    need_root()
    require("ROOT", _has_group("nixbld"), "group nixbld needed")
    state = str(tmp_path / "state")
    a = acquire_build_user("nixbld", state)
    b = acquire_build_user("nixbld", state)
    assert a is not None and b is not None and a.uid != b.uid
    assert a.gid == b.gid == grp.getgrnam("nixbld").gr_gid
    assert a.lock_path == f"{state}/userpool/{a.uid}" and os.stat(a.lock_path).st_mode & 0o777 == 0o600
    # another process (as Nix would) holds the lock of the next member: it is skipped
    members = grp.getgrnam("nixbld").gr_mem
    uids = [pwd.getpwnam(m).pw_uid for m in members]
    nxt = next(u for u in uids if u not in (a.uid, b.uid))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | "
                               "os.O_CREAT, 0o600); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                               "sys.stdin.read()", f"{state}/userpool/{nxt}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        c = acquire_build_user("nixbld", state)
        assert c is not None and c.uid not in (a.uid, b.uid, nxt)
        c.release()
    finally:
        holder.communicate("")
    a.release()
    d = acquire_build_user("nixbld", state)
    assert d is not None and d.uid == a.uid
    for u in (b, d):
        u.release()


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_build_users_errors(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="^the group 'no-such-group-x' specified in 'build-users-group' does not exist$"):
        acquire_build_user("no-such-group-x", str(tmp_path))
    empty = next((g.gr_name for g in grp.getgrall() if not g.gr_mem), None)
    assert empty is not None
    with pytest.raises(BuildError, match=f"^the build users group '{empty}' has no members$"):
        acquire_build_user(empty, str(tmp_path))


def test_build_user_sandbox_and_kill(env: Env) -> None:
    need_sandbox()
    need_root()
    bu = _free_user()
    try:
        os.chown(env.build_dir, bu.uid, bu.gid)
        status, log, _ = run(env.spec("id; cat /proc/self/uid_map /proc/self/gid_map; stat -c '%U %G' /nix/store /",
                                      build_user=bu))
        assert status == 0, log
        # as Nix 2.8 run as root here: root drops its groups before the user namespace exists
        assert log.split("\n")[0] == "uid=1000(nixbld) gid=100(nixbld)"
        assert log.split()[2:8] == ["1000", str(bu.uid), "1", "100", str(bu.gid), "1"]
        assert log.split("\n")[3:5] == ["nobody nixbld", "nobody nixbld"]
        # a process of the build user outside the sandbox's process tree is killed when the next
        # build starts, when a build ends (before its clean-up returns, which gives the user
        # back), and by kill()
        for action in ("start", "end", "kill"):
            b = start_sandboxed(env.spec("sleep 1", build_user=bu)) if action == "end" else None
            stray = subprocess.Popen(["setpriv", f"--reuid={bu.uid}", f"--regid={bu.gid}", "--clear-groups",
                                      "sleep", "100"])
            time.sleep(0.2)
            assert stray.poll() is None
            if action == "start":
                run(env.spec("true", build_user=bu))
            elif b is not None:
                drain(b.log_fd)
                assert b.wait() == 0
                b.cleanup()
            else:
                bu.kill()
            assert stray.wait(timeout=10) == -signal.SIGKILL
    finally:
        bu.release()


def test_unsandboxed(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    need_root()
    bu = _free_user()
    try:
        os.chown(env.build_dir, bu.uid, bu.gid)
        spec = env.spec("id -u; id -G; pwd; echo $$; ls -1 /proc/self/fd; [ -d /nix/store ] && echo host-fs",
                        build_user=bu, builder=f"{env.store}/{BUSYBOX_BASE}/bin/sh".encode())
        monkeypatch.setattr(sb, "HOMELESS_SHELTER", str(tmp_path / "no-such-dir"))
        status, log, b = run(spec, sandboxed=False)
        assert status == 0, log
        lines = log.splitlines()
        assert lines[0] == str(bu.uid)
        assert sorted(lines[1].split()) == sorted({str(bu.gid), *map(str, bu.supplementary_gids)})
        assert lines[2] == str(env.build_dir)
        assert lines[3] == str(b.pid) and lines[4:] == ["0", "1", "2", "3", "host-fs"] or lines[4:8] == ["0", "1", "2", "3"]
        assert b.output_location(OUT) == f"{env.store}{OUT[len('/nix/store'):]}"
        monkeypatch.setattr(sb, "HOMELESS_SHELTER", str(tmp_path))
        with pytest.raises(BuildError, match=f"^home directory '{tmp_path}' exists; please remove it to assure "
                                             "purity of builds without sandboxing"):
            start_unsandboxed(spec)
    finally:
        bu.release()


# ---------------------------------------------------------------------------------------------
# where namespaces are refused


_DENY_UNSHARE = r"""
import ctypes, errno, os, struct, sys
# as container runtimes' default profiles do: unshare refused, clone refused when it asks for a
# namespace (a plain fork is allowed), clone3 not available (glibc falls back to clone)
unshare, clone, clone3 = {"x86_64": (272, 56, 435), "aarch64": (97, 220, 435)}[os.uname().machine]
NS = 0x7E020000                                                                   # CLONE_NEW* flags
ret = lambda e: struct.pack("=HBBI", 0x06, 0, 0, 0x00050000 | e)                  # ret errno
ins = [struct.pack("=HBBI", 0x20, 0, 0, 0),                                       # ld nr
       struct.pack("=HBBI", 0x15, 0, 1, unshare), ret(errno.EPERM),               # jeq unshare
       struct.pack("=HBBI", 0x15, 0, 1, clone3), ret(errno.ENOSYS),               # jeq clone3
       struct.pack("=HBBI", 0x15, 0, 3, clone),                                   # jeq clone
       struct.pack("=HBBI", 0x20, 0, 0, 16),                                      # ld args[0] (low half)
       struct.pack("=HBBI", 0x45, 0, 1, NS), ret(errno.EPERM),                    # jset NS
       struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)]                              # ret allow
prog = b"".join(ins)
buf = ctypes.create_string_buffer(prog, len(prog))
class F(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
f = F(len(ins), ctypes.cast(buf, ctypes.c_void_p))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.byref(f), 0, 0) == 0, ctypes.get_errno()
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def test_unavailable_when_unshare_is_refused(env: Env) -> None:
    """Under a seccomp filter refusing unshare/clone (as some container runtimes do), the reason
    names the failing call, and start_sandboxed raises SandboxUnavailable."""
    need_sandbox()
    code = ("import json, sys\n"
            "from nartool.build.sandbox import sandbox_unavailable_reason, start_sandboxed, SandboxSpec\n"
            "from nartool.errors import SandboxUnavailable\n"
            "r = sandbox_unavailable_reason()\n"
            "spec = SandboxSpec(**json.loads(sys.argv[1]))\n"
            "try:\n"
            "    start_sandboxed(spec); e = None\n"
            "except SandboxUnavailable as x:\n"
            "    e = str(x)\n"
            "print(json.dumps([r, e]))\n")
    spec = env.spec("true")
    d = {k: getattr(spec, k) for k in ("store_dir", "real_store_dir", "chroot_dir", "build_dir", "inputs",
                                       "outputs", "host_network")}
    d.update(builder=spec.builder.decode(), args=[], env=[], binds=[], build_user=None)
    wrapper = (f"import json; d = json.loads({json.dumps(json.dumps(d))}); "
               "d['builder'] = d['builder'].encode()\n")
    r = subprocess.run([sys.executable, "-c", _DENY_UNSHARE, "-c", wrapper + code.replace(
        "SandboxSpec(**json.loads(sys.argv[1]))", "SandboxSpec(**d)")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    reason, err = json.loads(r.stdout)
    assert reason is not None and "Operation not permitted" in reason and "mount, PID, IPC, UTS, network namespaces" in reason
    assert err is not None and "Operation not permitted" in err and "mount, PID, IPC, UTS, network namespaces" in err
    assert not os.path.lexists(spec.chroot_dir)


def test_no_user_namespace_without_build_user(env: Env) -> None:
    """With user namespaces unavailable and no build user: Nix's error."""
    need_sandbox()
    if IS_ROOT:
        with pytest.raises(BuildError, match="^cannot perform a sandboxed build because user namespaces are not "
                                             r"enabled; check /proc/sys/user/max_user_namespaces$"):
            start_sandboxed(env.spec("true", no_user_namespace=True))
        assert not os.path.lexists(env.store / "t.drv.chroot")
    else:
        with pytest.raises(SandboxUnavailable):
            start_sandboxed(env.spec("true", no_user_namespace=True))


def test_probe_reason_is_none_here() -> None:
    need_sandbox()
    assert sandbox_unavailable_reason() is None


# ---------------------------------------------------------------------------------------------
# fingerprint equality with Nix 2.8


def _need_nix() -> None:
    require("NIX", NIX_STORE is not None, "real Nix (nix-store) is not installed")


_ROOT_CASES = {
    "build-users": {},
    "build-users-fixed-output": {"fixed_output": True},
    "build-users-sandbox-paths": {"sandbox_paths": True},
    "no-build-users": {"build_users": False},
    "no-build-users-fixed-output": {"build_users": False, "fixed_output": True},
}


@pytest.mark.parametrize("case", list(_ROOT_CASES))
def test_fingerprint_equals_nix_as_root(tmp_path: Path, case: str) -> None:
    """Everything the fingerprint builder observes is identical under Nix 2.8 and nartool: with
    build users and without (root mapped to 1000), for a fixed-output derivation (host network and
    DNS files, still chrooted) and with host paths from sandbox-paths."""
    need_sandbox()
    need_root()
    _need_nix()
    from .probes.fingerprint_compare import run as fp_run
    os.chmod(tmp_path, 0o755)
    res = fp_run(str(tmp_path), **_ROOT_CASES[case])
    assert res["status"] == 0, res["log"]
    assert res["diffs"] == {}, json.dumps(res["diffs"], indent=1)
    assert len(res["files"]) >= 28 and "complete" in res["files"]   # type: ignore[operator]
    assert not res["chroot_left"]
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=False)


def _unprivileged_python(user: str) -> str | None:
    for py in (sys.executable, "/usr/bin/python3"):
        r = subprocess.run(["runuser", "-u", user, "--", py, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"],
                           capture_output=True)
        if r.returncode == 0:
            return py
    return None


@pytest.mark.parametrize("flags", [[], ["--fixed-output"], ["--sandbox-paths"]],
                         ids=["ordinary", "fixed-output", "sandbox-paths"])
def test_fingerprint_equals_nix_unprivileged(flags: list[str]) -> None:
    need_sandbox()
    need_root()
    _need_nix()
    try:
        pwd.getpwnam("nartuser")
    except KeyError:
        require("ROOT", False, "user 'nartuser' needed for the unprivileged fingerprint")
    py = _unprivileged_python("nartuser")
    require("ROOT", py is not None, "no Python >= 3.10 runnable by nartuser")
    r = subprocess.run(["runuser", "-u", "nartuser", "--", py or "", str(repo_for("nartuser") / "tests" / "probes" / "fingerprint_compare.py"), *flags],
                       capture_output=True, text=True, cwd="/tmp", timeout=300,
                       env={**os.environ, "PYTHONPATH": str(repo_for("nartuser"))})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["status"] == 0, res["log"]
    assert res["diffs"] == {}, json.dumps(res["diffs"], indent=1)
    assert len(res["files"]) >= 28 and "complete" in res["files"]


def test_cleanup_does_not_follow_planted_symlinks(env: Env, tmp_path: Path) -> None:
    need_sandbox()
    host = tmp_path / "precious"
    host.mkdir()
    (host / "canary").write_text("alive")
    script = (f"ln -s {host} /nix/store/evil; ln -s {host} /tmp/evil; mkdir -p /tmp/d/e; ln -s {host}/canary /tmp/d/c; "
              f"ln -s {host} /build/evil; chmod 0500 /tmp/d")
    status, log, b = run(env.spec(script))
    assert status == 0, log
    assert not os.path.lexists(b.spec.chroot_dir)
    assert (host / "canary").read_text() == "alive"


def test_killing_the_caller_kills_the_build(env: Env) -> None:
    """nartool killed with SIGKILL mid-build: the helper sees its control pipe close and kills
    the builder (pid 1 of the namespace, hence everything in it)."""
    need_sandbox()
    spec = env.spec("sleep 1000 & sleep 1000")
    d = {k: getattr(spec, k) for k in ("store_dir", "real_store_dir", "chroot_dir", "build_dir", "inputs",
                                       "outputs", "host_network")}
    code = ("import json, sys, time\n"
            "from nartool.build.sandbox import SandboxSpec, start_sandboxed\n"
            "d = json.loads(sys.argv[1])\n"
            f"b = start_sandboxed(SandboxSpec(builder={spec.builder!r}, args={spec.args!r}, env=[], binds=[], "
            "build_user=None, **d))\n"
            "print(b.pid, flush=True)\n"
            "time.sleep(1000)\n")
    p = subprocess.Popen([sys.executable, "-c", code, json.dumps(d)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout is not None
    pid = int(p.stdout.readline())
    time.sleep(0.3)
    assert _state(pid) not in ("gone", "Z")
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while _state(pid) not in ("gone", "Z") and time.time() < deadline:
        time.sleep(0.05)
    assert _state(pid) in ("gone", "Z")
    # the stale chroot is what the next build (or cleanup_chroot) removes
    sb.cleanup_chroot(spec.chroot_dir)
    assert not os.path.lexists(spec.chroot_dir)


def test_concurrent_sandboxes_from_threads(env: Env) -> None:
    """Builders started from several threads of one process at once (nartool's scheduler does)."""
    need_sandbox()
    import concurrent.futures

    def one(i: int) -> tuple[int, str]:
        bd = env.root / f"build{i}"
        bd.mkdir(mode=0o700)
        spec = env.spec(f"echo {i} $$; ls -1 /nix/store", chroot_dir=str(env.store / f"t{i}.drv.chroot"),
                        build_dir=str(bd))
        status, log, _ = run(spec)
        return status, log
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(one, range(8)))
    assert results == [(0, f"{i} 1\n{BUSYBOX_BASE}\n") for i in range(8)]
    assert sorted(os.listdir(env.store)) == [BUSYBOX_BASE]


def test_personality_from_platform(env: Env) -> None:
    need_sandbox()
    if os.uname().machine == "x86_64":
        _, log, _ = run(env.spec("cat /proc/self/personality; uname -m", platform="i686-linux"))
        assert log.split() == ["00040008", "i686"]
        _, log, _ = run(env.spec("cat /proc/self/personality; uname -r", platform="i686-linux",
                                 impersonate_linux_26=True))
        assert log.split()[0] == "00060008" and log.split()[1].startswith("2.6.")
    _, log, _ = run(env.spec("cat /proc/self/personality", platform="x86_64-linux"))
    assert log.split() == ["00040000"]
    _, log, _ = run(env.spec("cat /proc/self/personality", personality=["linux32"]))
    assert log.split() == ["00040008"]


def test_nul_bytes_refused(env: Env) -> None:
    with pytest.raises(BuildError, match="NUL byte"):
        start_sandboxed(env.spec("true", env=[(b"A", b"x\0y")]))
    assert not os.path.lexists(env.store / "t.drv.chroot")


_NO_USERNS = r"""
import ctypes, os, sys
py, code = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:         # CLONE_NEWUSER
        os._exit(3)
    os.write(w2, b"x"); os.read(r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:   # for this namespace and below
        f.write("0")
    os.setgroups([]); os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[3]))
    os.execv(py, [py, "-c", code])
os.read(r2, 1)
for m in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{m}", "w") as f:
        f.write("0 0 65536")
os.write(w, b"x")
_, st = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(st))
"""


def test_unavailable_when_user_namespaces_are_disabled(env: Env) -> None:
    """A non-root user where max_user_namespaces is 0 (set for real, in a user namespace whose
    limit applies to everything below it): the reason says so, and start_sandboxed raises
    SandboxUnavailable (the kernel refuses the other namespaces without one)."""
    need_sandbox()
    need_root()
    try:
        user = pwd.getpwnam("nartuser")
    except KeyError:
        require("ROOT", False, "user 'nartuser' needed")
        return
    py = _unprivileged_python("nartuser")
    require("ROOT", py is not None, "no Python >= 3.10 runnable by nartuser")
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(env.root)], check=True)
    spec = env.spec("true")
    d = {k: getattr(spec, k) for k in ("store_dir", "real_store_dir", "chroot_dir", "build_dir", "inputs",
                                       "outputs", "host_network")}
    code = ("import json, os, sys\n"
            "from nartool.build.sandbox import SandboxSpec, sandbox_unavailable_reason, start_sandboxed\n"
            "from nartool.errors import SandboxUnavailable\n"
            f"d = json.loads({json.dumps(json.dumps(d))})\n"
            "r = sandbox_unavailable_reason()\n"
            "try:\n"
            f"    start_sandboxed(SandboxSpec(builder={spec.builder!r}, args=[], env=[], binds=[], build_user=None, **d))\n"
            "    e = None\n"
            "except SandboxUnavailable as x:\n"
            "    e = str(x)\n"
            "print(json.dumps([open('/proc/sys/user/max_user_namespaces').read().strip(), os.getuid(), r, e]))\n")
    r = subprocess.run([sys.executable, "-c", _NO_USERNS, py or "", code, str(user.pw_uid)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(repo_for(user.pw_name))}, cwd="/")
    assert r.returncode == 0, r.stderr
    limit, uid, reason, err = json.loads(r.stdout)
    assert (limit, uid) == ("0", user.pw_uid)
    assert reason is not None and "max_user_namespaces" in reason
    assert err is not None and "Operation not permitted" in err
    assert not os.path.lexists(spec.chroot_dir)


def test_build_user_without_user_namespace(env: Env) -> None:
    """Root with a build user where user namespaces are not used: the builder runs as the build
    user's real ids (also in /etc/passwd and /etc/group), as Nix does."""
    need_sandbox()
    need_root()
    bu = _free_user()
    try:
        os.chown(env.build_dir, bu.uid, bu.gid)
        status, log, _ = run(env.spec("id -u; id -g; id -G; grep nixbld /etc/passwd /etc/group; "
                                      "echo $$; touch /nix/store/x && echo store-writable",
                                      build_user=bu, no_user_namespace=True))
        assert status == 0, log
        assert log.splitlines() == [str(bu.uid), str(bu.gid), str(bu.gid),
                                    f"/etc/passwd:nixbld:x:{bu.uid}:{bu.gid}:Nix build user:/build:/noshell",
                                    f"/etc/group:nixbld:!:{bu.gid}:", "1", "store-writable"]
    finally:
        bu.release()


def test_kill_unsandboxed_kills_the_process_group(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sb, "HOMELESS_SHELTER", str(tmp_path / "no-such-dir"))
    spec = env.spec("sleep 1000 & sleep 1000 & echo started; wait",
                    builder=f"{env.store}/{BUSYBOX_BASE}/bin/sh".encode())
    b = start_unsandboxed(spec)
    deadline = time.time() + 10
    buf = b""
    while b"started" not in buf and time.time() < deadline:
        try:
            buf += os.read(b.log_fd, 100)
        except BlockingIOError:
            time.sleep(0.01)
    children = _descendants(b.pid)
    assert len(children) >= 2
    b.kill()
    status = b.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    deadline = time.time() + 5
    while [p for p in children if _state(p) not in ("gone", "Z")] and time.time() < deadline:
        time.sleep(0.05)
    assert [p for p in children if _state(p) not in ("gone", "Z")] == []
    b.cleanup()


def test_helper_killed_takes_the_builder_along(env: Env) -> None:
    """Even the helper itself dying (SIGKILL) ends the build: the builder has a parent-death
    signal, re-armed after its uid change."""
    need_sandbox()
    bu = _free_user() if IS_ROOT else None     # a real uid change (root's 1000 would still be root outside)
    if bu is not None:
        os.chown(env.build_dir, bu.uid, bu.gid)
    b = start_sandboxed(env.spec("sleep 1000", build_user=bu))
    time.sleep(0.3)
    assert _state(b.pid) not in ("gone", "Z")
    os.kill(b.helper_pid, signal.SIGKILL)
    deadline = time.time() + 5
    while _state(b.pid) not in ("gone", "Z") and time.time() < deadline:
        time.sleep(0.05)
    assert _state(b.pid) in ("gone", "Z")
    assert b.wait() == signal.SIGKILL     # the helper's own end is reported
    b.cleanup()
    if bu is not None:
        bu.release()


def test_mounts_do_not_propagate_from_a_shared_host_mount(env: Env) -> None:
    """The store sits on a shared mount (as under systemd) and no user namespace cuts
    propagation: making '/' private inside the sandbox is what keeps its mounts out of the host."""
    need_sandbox()
    need_root()
    root = str(env.root)
    subprocess.run(["mount", "--bind", root, root], check=True)
    try:
        subprocess.run(["mount", "--make-shared", root], check=True)
        bu = _free_user()
        try:
            os.chown(env.build_dir, bu.uid, bu.gid)
            b = start_sandboxed(env.spec("echo started; sleep 1000", build_user=bu, no_user_namespace=True))
            buf = b""
            deadline = time.time() + 10
            while b"started" not in buf and time.time() < deadline:
                try:
                    buf += os.read(b.log_fd, 100)
                except BlockingIOError:
                    time.sleep(0.01)
            leaked = sb._mount_points_under(b.spec.chroot_dir)
            b.kill()
            b.wait()
            b.cleanup()
            assert leaked == []
        finally:
            bu.release()
    finally:
        subprocess.run(["umount", "-l", root], check=False)


def test_paths_that_would_leave_the_sandbox_are_refused(env: Env, tmp_path: Path) -> None:
    need_sandbox()
    for kw in ({"binds": [Bind("/../../../escaped", str(tmp_path))]}, {"binds": [Bind("relative", str(tmp_path))]},
               {"sandbox_build_dir": "/build/../.."}, {"inputs": [BUSYBOX, "/nix/store/../../etc"]},
               {"inputs": [BUSYBOX, "/nix/store/x/y"]}, {"pre_build_hook": lambda c: [Bind("/a/../../..", "/")]}):
        with pytest.raises(BuildError) as ei:
            start_sandboxed(env.spec("true", **kw))
        assert ei.value.rule in ("sandbox-path", "input-path")
        assert not os.path.lexists(env.store / "t.drv.chroot")
    assert sorted(os.listdir(env.store)) == [BUSYBOX_BASE]
    with pytest.raises(BuildError, match="No such file or directory") as ei:
        start_sandboxed(env.spec("true", inputs=[BUSYBOX, "/nix/store/00000000000000000000000000000000-gone"]))
    assert ei.value.rule == "chroot-setup"


def test_userpool_shared_with_real_nix(tmp_path: Path) -> None:
    """With every build user but one locked by nartool, real Nix 2.8 (as root, chroot store)
    builds as another: both use the same <state>/userpool locks (Nix 2.8 takes them from its
    global state dir, /nix/var/nix, even for a chroot store)."""
    need_sandbox()
    need_root()
    _need_nix()
    from .helpers import nix_env
    from .probes.fingerprint_compare import nix_expr

    held: list[BuildUser] = []
    try:
        while True:
            u = acquire_build_user("nixbld")
            if u is None:
                break
            held.append(u)
        require("ROOT", len(held) >= 2, "needs at least two free build users")
        free = held.pop()
        free.release()
        os.chmod(tmp_path, 0o755)
        src = tmp_path / "src" / "busybox"
        busybox_tree(src, read_only=False)
        st = str(tmp_path / "nix")
        env = nix_env()
        subprocess.run(["nix-store", "--store", st, "--add", str(src)], env=env, check=True, capture_output=True)
        drv = subprocess.run(["nix-instantiate", "--store", st, "--expr",
                              nix_expr("read a b c < /proc/self/uid_map; echo $b > $out", name="who")],
                             env=env, check=True, capture_output=True, text=True).stdout.strip()
        r = subprocess.run(["nix-store", "--store", st, "--option", "substituters", "", "-r", drv], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        # (other processes on the machine may take and release build users meanwhile: the property
        # is that Nix never builds as a uid nartool holds)
        nix_uid = int(Path(st + r.stdout.strip()).read_text())
        assert nix_uid not in {u.uid for u in held}, (nix_uid, [u.uid for u in held])
    finally:
        for u in held:
            u.release()
        subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=False)


def test_host_dev_bound_whole(env: Env) -> None:
    """`/dev` in sandbox-paths: the host's /dev is bound instead of the minimal one (no nodes or
    symlinks are created, devpts is not mounted), and nothing changes on the host's /dev."""
    need_sandbox()
    before = sorted(os.listdir("/dev"))
    status, log, _ = run(env.spec("ls -1 /dev | wc -l; [ -e /dev/null ] && echo null; touch /dev/shm/x && echo shm-ok",
                                  binds=[Bind("/dev", "/dev")]))
    assert status == 0, log
    lines = log.splitlines()
    assert int(lines[0]) >= len(before) - 5 and lines[1:] == ["null", "shm-ok"]
    assert not os.path.exists("/dev/shm/x")    # a private tmpfs over the bound /dev/shm
    assert set(before) <= set(os.listdir("/dev"))


def test_a_chroot_that_cannot_be_made_stops_the_started_helper(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chroot's skeleton is made while the helper starts; when that fails, the start fails
    with the reason, the helper and its builder child are gone, nothing is left of the chroot,
    and the next build runs."""
    need_sandbox()
    from nartool.build import zygote

    made: list[str] = []

    def fail(spec: SandboxSpec, userns_expected: bool, links: list[tuple[str, str]]) -> None:
        made.append(spec.chroot_dir)
        os.mkdir(spec.chroot_dir)  # (partly made)
        raise PermissionError(13, "Permission denied", spec.chroot_dir + "/tmp")

    monkeypatch.setattr(sb, "_make_chroot_inner", fail)
    spec = env.spec("echo ok")
    with pytest.raises(BuildError) as ei:
        start_sandboxed(spec)
    assert ei.value.rule == "chroot-setup" and "Permission denied" in ei.value.message
    assert made == [spec.chroot_dir] and not os.path.lexists(spec.chroot_dir)
    monkeypatch.undo()
    deadline = time.time() + 10
    helpers: list[str] = []
    while time.time() < deadline:
        # the zygote's children: the next spare and its killer, nothing of the failed start
        helpers = [p for p in os.listdir("/proc") if p.isdigit() and _ppid_of(int(p)) == zygote.get().pid]
        if len(helpers) <= 2:
            break
        time.sleep(0.05)
    assert len(helpers) <= 2, helpers
    status, log, _ = run(env.spec("echo ok"))
    assert status == 0 and log.strip() == "ok", log


def _ppid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return -1 if fields[0] == "Z" else int(fields[1])
    except (FileNotFoundError, ProcessLookupError):
        return -1
