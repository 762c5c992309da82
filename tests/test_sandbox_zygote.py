"""The sandbox zygote (nartool/build/zygote.py): one exec'd single-threaded helper per nartool
process that forks a build helper per build. These tests check what it must guarantee: it holds
no descriptor of any build, it dies with its owner, a dead zygote is replaced, and each build
runs in a fresh child of it."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nartool.build import zygote
from nartool.build.sandbox import start_sandboxed

from .helpers import REPO, cli_env
from .test_sandbox import Env, env, need_sandbox, run  # noqa: F401 - env is a fixture

__all__ = ["env"]


def _fds(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd"))


def _not_sockets(pid: int, fds: list[str] | None = None) -> list[str]:
    return [f for f in (_fds(pid) if fds is None else fds) if not f.startswith("socket:")]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_builds_are_forked_by_one_zygote_that_keeps_no_build_descriptor(env: Env) -> None:
    need_sandbox()
    z = zygote.get()
    _spares(z.pid)  # (its first spare exists: the zygote is past its own start-up, whose imports open files)
    before = _fds(z.pid)
    b = start_sandboxed(env.spec("sleep 1"))
    try:
        assert zygote.get() is z
        # the build helper (the builder's parent) is a child of the zygote, not of nartool
        assert _ppid(b.helper_pid) == z.pid
        assert _ppid(b.pid) == b.helper_pid
        # while the build runs, the zygote holds nothing of it: no pty, no pipe of the build
        # (its sockets: the one to nartool, and the one to its spare helper, replaced meanwhile;
        # it holds the pipes of the next spare's killer for a moment while it forks them)
        spares = _spares(z.pid, exclude=b.helper_pid)
        deadline = time.monotonic() + 10
        while _not_sockets(z.pid) != _not_sockets(z.pid, before) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert spares and _not_sockets(z.pid) == _not_sockets(z.pid, before)
        assert not [f for f in _fds(z.pid) if f.startswith(("/dev/pts/", "pipe:"))]
        assert len([f for f in _fds(z.pid) if f.startswith("socket:")]) <= 2
    finally:
        b.kill()
        b.wait()
        b.cleanup()
    status, log, b2 = run(env.spec("echo again"))
    assert status == 0 and log.strip() == "again", log
    assert b2.helper_pid != b.helper_pid and zygote.get() is z


def test_a_dead_zygote_is_replaced(env: Env) -> None:
    need_sandbox()
    z = zygote.get()
    os.kill(z.pid, signal.SIGKILL)
    z.proc.wait()
    status, log, _ = run(env.spec("echo ok"))
    assert status == 0, log
    assert zygote.get() is not z and _alive(zygote.get().pid)


def test_the_zygote_dies_with_its_owner(tmp_path: Path) -> None:
    need_sandbox()
    code = ("import sys, time\n"
            "from nartool.build import zygote\n"
            "print(zygote.get().pid, flush=True)\n"
            "time.sleep(1000)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout is not None
    zpid = int(p.stdout.readline())
    assert _alive(zpid)
    p.kill()
    p.wait()
    deadline = time.time() + 10
    while _alive(zpid) and time.time() < deadline:
        time.sleep(0.02)
    assert not _alive(zpid)


def test_kill_user_request_reports_failure() -> None:
    """A kill request for a uid the zygote cannot switch to (not root) fails with the reason;
    as root, a uid without processes is killed without error."""
    need_sandbox()
    res = zygote.kill_user(65534)
    if os.getuid() == 0:
        assert res == "ok"
    else:
        assert res.startswith("error setting uid: ")


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if _ppid(int(name)) == pid and _alive(int(name)):
                    out.append(int(name))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _spares(z: int, timeout: float = 10, exclude: int = -1) -> list[int]:
    """The zygote's children that sit in namespaces of their own (its spare helpers, and helpers
    running a build), but ``exclude``."""
    deadline = time.monotonic() + timeout
    while True:
        got = []
        for c in _children(z):
            if c == exclude:
                continue
            try:
                if _ns(c, "mnt") != _ns(z, "mnt") and _ns(c, "net") != _ns(z, "net"):
                    got.append(c)
            except FileNotFoundError:
                pass
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_a_spare_helper_waits_in_fresh_namespaces(env: Env) -> None:
    """The zygote keeps one helper forked ahead, already in a sandbox's namespaces; a build of
    that kind of sandbox runs in it, and the next spare is forked while that build runs. A build
    of another kind (here: the host's network, as a fixed-output derivation has) gets a fresh
    helper and leaves the spare waiting."""
    need_sandbox()
    z = zygote.get()
    spares = _spares(z.pid)
    assert len(spares) == 1, spares
    first = spares[0]
    # its own namespaces, made before any build asked for them (its PID namespace, its
    # children's, is made with its first child: /proc shows none before)
    assert _ns(first, "uts") != _ns(z.pid, "uts") and _ns(first, "ipc") != _ns(z.pid, "ipc")
    # and its builder child, forked ahead too: pid 1 of the new PID namespace, waiting for a plan
    deadline = time.monotonic() + 10
    while not _children(first) and time.monotonic() < deadline:
        time.sleep(0.02)
    ready = _children(first)
    assert len(ready) == 1
    with open(f"/proc/{ready[0]}/status") as f:
        assert [ln.split()[1:] for ln in f if ln.startswith("NSpid:")] == [[str(ready[0]), "1"]]
    status, log, b = run(env.spec("echo hi; echo $$"))
    assert status == 0 and log.split() == ["hi", "1"], log
    assert b.helper_pid == first and b.pid == ready[0]
    deadline = time.monotonic() + 10
    while _alive(first) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(first)
    spares = _spares(z.pid)
    assert len(spares) == 1 and spares[0] != first
    second = spares[0]
    status, log, b = run(env.spec("echo host", host_network=True))
    assert status == 0, log
    assert b.helper_pid != second and _alive(second)
    status, log, b = run(env.spec("echo again"))
    assert status == 0 and b.helper_pid == second
    # nothing piles up: the spare and its killer (forked ahead in the host's namespaces) wait
    deadline = time.monotonic() + 10
    while len(_children(z.pid)) > 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_children(z.pid)) == 2, _children(z.pid)


def test_zygote_starts_clean() -> None:
    """The zygote runs in ``/``, in a session of its own, with stdout and stderr on /dev/null and
    none of the inheritable descriptors its owner got from whoever started it."""
    code = ("import os, sys, time\n"
            "r, w = os.pipe(); os.set_inheritable(r, True); os.set_inheritable(w, True)\n"
            "os.chdir('/tmp')\n"
            "from nartool.build import zygote\n"
            "z = zygote.get()\n"
            "def fds():\n"
            "    out = {}\n"
            "    for n in os.listdir(f'/proc/{z.pid}/fd'):\n"
            "        try: out[int(n)] = os.readlink(f'/proc/{z.pid}/fd/{n}')\n"
            "        except FileNotFoundError: pass  # (one it just closed)\n"
            "    return out\n"
            "deadline = time.monotonic() + 10\n"
            "while time.monotonic() < deadline:\n"
            "    # past its start-up (its first spare is forked) and not forking one (whose pipes it\n"
            "    # holds meanwhile): only sockets besides 0-2, unless it kept an inherited one\n"
            "    with open(f'/proc/{z.pid}/task/{z.pid}/children') as f:\n"
            "        spare = bool(f.read().split())\n"
            "    got = fds()\n"
            "    if spare and all(t.startswith('socket:') for n, t in got.items() if n > 2): break\n"
            "    time.sleep(0.005)\n"
            "fds = got\n"
            "with open(f'/proc/{z.pid}/stat') as f: sid = int(f.read().rsplit(')', 1)[1].split()[3])\n"
            "print(sorted(fds.items()), os.readlink(f'/proc/{z.pid}/cwd'), sid == z.pid, flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env())
    assert r.returncode == 0, r.stderr
    fds, cwd, leader = r.stdout.rsplit(" ", 2)
    got = dict(ast.literal_eval(fds))
    assert got[0].startswith("socket:") and got[1] == got[2] == "/dev/null"
    assert all(t.startswith("socket:") for n, t in got.items() if n > 2)
    assert cwd == "/" and leader.strip() == "True"


def test_the_zygote_is_started_as_popen_would_start_it() -> None:
    """A command's zygote is started with fork and exec (zygote._fork_exec: no subprocess to
    import); the program then finds what ``Popen(stdin=SOCKET, stdout=DEVNULL,
    stderr=DEVNULL, close_fds=True, cwd="/", start_new_session=True)`` gives it: the same
    signal dispositions and mask (an ignored signal stays ignored, those Python ignores are
    restored), descriptors, session, directory and environment; a failed exec is the same
    error."""
    probe = ("import os\n"
             "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
             "def link(n):\n"
             "    try: return os.readlink('/proc/self/fd/' + n).split('[')[0]\n"
             "    except FileNotFoundError: return None  # (listdir's own, closed by now)\n"
             "fds = sorted((int(n), link(n)) for n in os.listdir('/proc/self/fd') if link(n))\n"
             "state = [status['SigIgn'], status['SigBlk'], status['SigCgt'], fds, os.getsid(0) == os.getpid(),\n"
             "         os.getcwd(), sorted(os.environ.items())]\n"
             "os.write(0, repr(state).encode())\n")
    code = ("import _socket, os, signal, subprocess, sys\n"
            "from nartool.build import zygote\n"
            "r, w = os.pipe(); os.set_inheritable(r, True)  # (neither child may keep it)\n"
            "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
            "os.environ['ZYGOTE_TEST_VARIABLE'] = 'x'\n"
            "os.chdir('/tmp')\n"
            "def run(start):\n"
            "    a, b = _socket.socketpair()\n"
            "    child = start([sys.executable, '-I', '-S', '-c', PROBE], b.fileno())\n"
            "    b.close()\n"
            "    out = b''\n"
            "    while chunk := a.recv(65536):\n"
            "        out += chunk\n"
            "    assert child.wait() == 0\n"
            "    return out.decode()\n"
            "def popen(argv, fd):\n"
            "    return subprocess.Popen(argv, stdin=fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,\n"
            "                            close_fds=True, cwd='/', start_new_session=True)\n"
            "forked = run(zygote._fork_exec)\n"
            "print(forked == run(popen), forked)\n"
            "CAT = ['/bin/sh', '-c', 'exec cat /proc/self/status >&0']  # (a program that keeps the state it got)\n"
            "def cat(start):\n"
            "    a, b = _socket.socketpair()\n"
            "    child = start(CAT, b.fileno())\n"
            "    b.close()\n"
            "    out = b''\n"
            "    while chunk := a.recv(65536):\n"
            "        out += chunk\n"
            "    assert child.wait() == 0\n"
            "    return [l for l in out.decode().splitlines() if l.startswith(('SigIgn', 'SigBlk'))]\n"
            "print(cat(zygote._fork_exec), cat(popen))\n"
            "errors = []\n"
            "for start in (zygote._fork_exec, popen):\n"
            "    try:\n"
            "        start(['/nonexistent/python'], 0)\n"
            "    except OSError as e:\n"
            "        errors.append((type(e).__name__, str(e)))\n"
            "print(errors)\n").replace("PROBE", repr(probe))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env(),
                       cwd="/")
    assert r.returncode == 0, r.stderr
    same, _, rest = r.stdout.partition(" ")
    state_text, signals_text, errors_text = rest.rsplit("\n", 3)[:3]
    state = ast.literal_eval(state_text)
    assert same == "True", r.stdout
    # (the dispositions a program keeps: ignored SIGUSR1, not SIGPIPE or SIGXFSZ; nothing blocked)
    forked_sigs, popen_sigs = signals_text.split("] [")
    assert forked_sigs + "]" == "[" + popen_sigs
    sigs = dict(x.split(":\t") for x in ast.literal_eval(forked_sigs + "]"))
    ign = int(sigs["SigIgn"], 16)
    assert ign & (1 << (signal.SIGUSR1 - 1)) and not ign & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    assert int(sigs["SigBlk"], 16) == 0
    assert state[3][:3] == [(0, "socket:"), (1, "/dev/null"), (2, "/dev/null")] and state[4] is True and state[5] == "/"
    assert ("ZYGOTE_TEST_VARIABLE", "x") in state[6]
    errors = ast.literal_eval(errors_text)
    assert errors[0] == errors[1] == ("FileNotFoundError", "[Errno 2] No such file or directory: '/nonexistent/python'")
