"""The process that starts a builder, run as ``python -I -S -c LAUNCHER MODE`` (``LAUNCHER``,
:data:`nartool.build.zygote.LAUNCHER`, imports this file as a top-level module, so that its
compiled form is cached, and calls :func:`main`).

It is a freshly exec'd, single-threaded interpreter that imports only the standard library, so
creating namespaces and switching ids here is safe (nartool's own process has threads; forking
and calling ``unshare``/``setuid`` from it could hang in glibc's at-fork/setxid machinery).

Modes:

``sandbox``/``plain``
    stdin is the control pipe: the prepared plan (``nartool.build.sandbox``; 8-byte little-endian
    length, then a ``marshal`` blob: same interpreter, no imports needed to read it),
    then ``go`` lines; EOF on it kills the builder. stdout is the report pipe: lines
    ``helper <own pid>``, ``unshared <0|1>`` (sandbox: namespaces made; the parent writes the id maps and /etc/passwd,
    then sends ``go``), ``pid <host pid>``, and at the end ``status <wait status>``; or one
    ``unavailable <reason>`` / ``error <message>`` line. A setup failure of the builder child
    is written to the error pipe (close-on-exec, so the builder never sees it).

``kill-user UID``
    kill every process of UID (switches to it, ``kill(-1, SIGKILL)`` until none is left).

``zygote``
    a long-lived server on a socket (fd 0) that forks one child per build running the mode
    above, and kills build users' processes; see :func:`zygote`.

``probe``
    try to create the namespaces a sandbox needs in a child and print ``ok`` or the reason.
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import os
import resource
import select
import stat as statmod
import sys

# start-up time: ``typing`` and ``signal`` (which imports ``enum``) cost more than the rest
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
ADDR_NO_RANDOMIZE = 0x0040000
PER_LINUX32 = 0x0008
UNAME26 = 0x0020000

SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40

SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "i686": 217, "armv7l": 218, "riscv64": 41}

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def sys_error(what: str, e: int) -> SetupError:
    err = SetupError(f"{what}: {os.strerror(e)}")
    err.errno = e  # type: ignore[attr-defined]
    return err


def call(fn: Any, what: str, *args: Any) -> None:
    if fn(*args) == -1:
        raise sys_error(what, ctypes.get_errno())


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None, what: str) -> None:
    def b(x: str | None) -> bytes | None:
        return None if x is None else os.fsencode(x)
    if _libc.mount(b(src), b(target), b(fstype), ctypes.c_ulong(flags), b(data)) == -1:
        raise sys_error(what, ctypes.get_errno())


def unshare(flags: int) -> int:
    if _libc.unshare(ctypes.c_int(flags)) == -1:
        return ctypes.get_errno()
    return 0


def write_line(fd: int, line: str) -> None:
    data = (line + "\n").encode("utf-8", "surrogateescape")
    while data:
        n = os.write(fd, data)
        data = data[n:]


def userns_enabled() -> bool:
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def create_dirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def path_exists(path: str) -> bool:
    try:
        os.lstat(path)
        return True
    except OSError:
        return False


def do_bind(source: str, target: str, optional: bool = False) -> None:
    try:
        st = os.stat(source)
    except OSError as e:
        if optional and e.errno == errno.ENOENT:
            return
        raise sys_error(f"getting attributes of path '{source}'", e.errno or 0) from None
    if statmod.S_ISDIR(st.st_mode):
        create_dirs(target)
    else:
        create_dirs(os.path.dirname(target))
        write_file(target, b"")
    mount(source, target, "", MS_BIND | MS_REC, None, f"bind mount from '{source}' to '{target}' failed")


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_SECCOMP: dict = {}  # type: ignore[type-arg]  # program (hex) -> (buffer, SockFprog)


def prepare_seccomp(program_hex: str) -> tuple[Any, SockFprog]:
    """The kernel's view of a BPF program, made once per program: the zygote makes it before
    forking, so a builder only calls ``prctl``."""
    got = _SECCOMP.get(program_hex)
    if got is None:
        program = bytes.fromhex(program_hex)
        buf = ctypes.create_string_buffer(program, len(program))
        got = _SECCOMP[program_hex] = (buf, SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p)))
    return got


def install_seccomp(program_hex: str) -> None:
    call(_libc.prctl, "unable to set 'no new privileges'", PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1),
         ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    _, prog = prepare_seccomp(program_hex)
    call(_libc.prctl, "unable to load seccomp BPF program", PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
         ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0))


def loopback_up() -> None:
    fd = _libc.socket(2, 2, 0)   # AF_INET, SOCK_DGRAM
    if fd == -1:
        raise sys_error("cannot open IP socket", ctypes.get_errno())
    try:
        ifr = ctypes.create_string_buffer(40)                       # struct ifreq
        ifr.raw = b"lo".ljust(16, b"\0") + (IFF_UP | IFF_LOOPBACK | IFF_RUNNING).to_bytes(2, sys.byteorder) + bytes(22)
        if _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(SIOCSIFFLAGS), ifr) == -1:
            raise sys_error("cannot set loopback interface flags", ctypes.get_errno())
    finally:
        os.close(fd)


def close_most_fds(keep: set) -> None:  # type: ignore[type-arg]
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def reset_process() -> None:
    """The signal state Nix gives its builders (default dispositions, nothing blocked) and a
    session of its own."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        os.setsid()
    except OSError as e:
        raise sys_error("creating a new session", e.errno or 0) from None


def init_namespaces(private_network: bool) -> None:
    """A sandboxed builder's first steps in its namespaces, whatever the build: its own loopback
    (a private network), its host and domain names, and no mount event shared with the host."""
    if private_network:
        loopback_up()
    hn = b"localhost\0"
    call(_libc.sethostname, "cannot set host name", hn, ctypes.c_size_t(len(hn)))
    dn = b"(none)\0"
    call(_libc.setdomainname, "cannot set domain name", dn, ctypes.c_size_t(len(dn)))
    mount(None, "/", None, MS_PRIVATE | MS_REC, None, "unable to make '/' private")


def common_child_init(plan: dict, initialised: bool = False) -> None:  # type: ignore[type-arg]
    if not initialised:
        reset_process()
    os.dup2(plan["pty_fd"], 2)
    os.dup2(2, 1)
    nul = os.open("/dev/null", os.O_RDWR)
    if nul != 0:
        os.dup2(nul, 0)
        os.close(nul)


def finish_and_exec(plan: dict, err_fd: int, set_user: bool) -> None:  # type: ignore[type-arg]
    """The last steps before execve (Nix's order); returns only by raising SetupError."""
    try:
        os.chdir(plan["cwd"])
    except OSError as e:
        raise sys_error(f"changing into '{plan['build_dir']}'", e.errno or 0) from None
    close_most_fds({0, 1, 2, err_fd})
    for p in plan.get("personality", []):
        cur = _libc.personality(ctypes.c_ulong(0xFFFFFFFF))
        if p == "linux32":
            call(_libc.personality, "cannot set 32-bit personality", ctypes.c_ulong(PER_LINUX32))
        elif p == "uname26" and cur != -1:
            _libc.personality(ctypes.c_ulong(cur | UNAME26))
    cur = _libc.personality(ctypes.c_ulong(0xFFFFFFFF))
    if cur != -1:
        _libc.personality(ctypes.c_ulong(cur | ADDR_NO_RANDOMIZE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.RLIM_INFINITY))
    bu = plan.get("build_user")
    if set_user and bu:
        if bu["supplementary_gids"]:
            try:
                os.setgroups(bu["supplementary_gids"])
            except OSError as e:
                raise sys_error("cannot set supplementary groups of build user", e.errno or 0) from None
        try:
            os.setgid(bu["gid"])
        except OSError as e:
            raise sys_error("setgid failed", e.errno or 0) from None
        if os.getgid() != bu["gid"] or os.getegid() != bu["gid"]:
            raise sys_error("setgid failed", errno.EPERM)
        try:
            os.setuid(bu["uid"])
        except OSError as e:
            raise sys_error("setuid failed", e.errno or 0) from None
        if os.getuid() != bu["uid"] or os.geteuid() != bu["uid"]:
            raise sys_error("setuid failed", errno.EPERM)
    # a change of credentials clears the parent-death signal: arm it again for the builder
    _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                ctypes.c_ulong(0))
    builder = plan["builder"]
    args = [os.path.basename(builder), *plan["args"]]
    env = dict(plan["env"])
    try:
        os.execve(builder, args, env)
    except OSError as e:
        # as in Nix 2.8, past this point a failure is the builder's own: exit code 1, the reason
        # in the log (Nix writes it there as a binary error frame; this is the readable text)
        os.close(err_fd)
        msg = f"executing '{os.fsdecode(builder)}': {os.strerror(e.errno or 0)}\n"
        os.write(2, msg.encode("utf-8", "surrogateescape"))
        os._exit(1)


def run_child(plan: dict, err_fd: int, initialised: bool = False) -> None:  # type: ignore[type-arg]
    """The builder child (pid 1 of the new PID namespace in sandbox mode). ``initialised``: a
    spare's builder child, which made the steps of :func:`reset_process` and
    :func:`init_namespaces` before its plan came."""
    common_child_init(plan, initialised)
    if plan.get("seccomp"):
        try:
            install_seccomp(plan["seccomp"])
        except SetupError:
            if plan.get("build_user"):
                raise
    if plan["mode"] != "sandbox":
        finish_and_exec(plan, err_fd, True)
        return
    chroot = plan["chroot"]
    if not initialised:
        init_namespaces(plan["private_network"])
    mount(chroot, chroot, None, MS_BIND, None, f"unable to bind mount '{chroot}'")
    store = chroot + plan["store_dir"]
    mount(store, store, None, MS_BIND, None, "unable to bind mount the Nix store")
    mount(None, store, None, MS_SHARED, None, f"unable to make '{store}' shared")

    binds: dict = {t: (s, o) for t, s, o in plan["binds"]}  # type: ignore[type-arg]
    extra: list = []  # type: ignore[type-arg]
    if "/dev" not in binds:
        create_dirs(chroot + "/dev/shm")
        create_dirs(chroot + "/dev/pts")
        extra.append("/dev/full")
        if plan.get("kvm") and path_exists("/dev/kvm"):
            extra.append("/dev/kvm")
        extra += ["/dev/null", "/dev/random", "/dev/tty", "/dev/urandom", "/dev/zero"]
        os.symlink("/proc/self/fd", chroot + "/dev/fd")
        os.symlink("/proc/self/fd/0", chroot + "/dev/stdin")
        os.symlink("/proc/self/fd/1", chroot + "/dev/stdout")
        os.symlink("/proc/self/fd/2", chroot + "/dev/stderr")
    if not plan["private_network"]:
        write_file(chroot + "/etc/nsswitch.conf", b"hosts: files dns\nservices: files\n")
        for p in ("/etc/resolv.conf", "/etc/services", "/etc/hosts"):
            if path_exists(p):
                extra.append(p)
    for p in extra:
        binds.setdefault(p, (p, False))
    for target in sorted(binds, key=lambda t: os.fsencode(t)):
        source, optional = binds[target]
        if source == "/proc":
            continue
        do_bind(source, chroot + target, optional)

    create_dirs(chroot + "/proc")
    mount("none", chroot + "/proc", "proc", 0, None, "mounting /proc")
    if path_exists("/dev/shm"):
        mount("none", chroot + "/dev/shm", "tmpfs", 0, "size=" + plan["dev_shm_size"], "mounting /dev/shm")
    if path_exists("/dev/pts/ptmx") and not path_exists(chroot + "/dev/ptmx") and "/dev/pts" not in binds:
        try:
            mount("none", chroot + "/dev/pts", "devpts", 0, "newinstance,mode=0620", "mounting /dev/pts")
            os.symlink("/dev/pts/ptmx", chroot + "/dev/ptmx")
            os.chmod(chroot + "/dev/pts/ptmx", 0o666)
        except SetupError as e:
            if getattr(e, "errno", None) != errno.EINVAL:
                raise
            do_bind("/dev/pts", chroot + "/dev/pts")
            do_bind("/dev/ptmx", chroot + "/dev/ptmx")

    if unshare(CLONE_NEWNS):
        raise sys_error("unsharing mount namespace", ctypes.get_errno())
    try:
        os.chdir(chroot)
    except OSError as e:
        raise sys_error(f"cannot change directory to '{chroot}'", e.errno or 0) from None
    try:
        os.mkdir("real-root", 0)
    except OSError as e:
        raise sys_error("cannot create real-root directory", e.errno or 0) from None
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None or _libc.syscall(ctypes.c_long(nr), b".", b"real-root") == -1:
        raise sys_error(f"cannot pivot old root directory onto '{chroot}/real-root'",
                        ctypes.get_errno() if nr is not None else errno.ENOSYS)
    try:
        os.chroot(".")
    except OSError as e:
        raise sys_error(f"cannot change root directory to '{chroot}'", e.errno or 0) from None
    call(_libc.umount2, "cannot unmount real root filesystem", b"real-root", ctypes.c_int(MNT_DETACH))
    try:
        os.rmdir("real-root")
    except OSError as e:
        raise sys_error("cannot remove real-root directory", e.errno or 0) from None
    try:
        os.setgid(plan["sandbox_gid"])
    except OSError as e:
        raise sys_error("setgid failed", e.errno or 0) from None
    try:
        os.setuid(plan["sandbox_uid"])
    except OSError as e:
        raise sys_error("setuid failed", e.errno or 0) from None
    finish_and_exec(plan, err_fd, False)


def child_main(plan: dict, err_fd: int, initialised: bool = False,  # type: ignore[type-arg]
               failure: str | None = None) -> None:
    """Run the builder child; a setup failure (or ``failure``, one found before the plan came)
    is written to ``err_fd``."""
    try:
        os.set_inheritable(err_fd, False)  # closed by the builder's execve: it never sees it
        if failure is not None:
            raise SetupError(failure)
        run_child(plan, err_fd, initialised)
        msg = "exec returned"
    except SetupError as e:
        msg = str(e.args[0])
    except BaseException as e:  # noqa: BLE001 - everything becomes a setup error report
        msg = f"{type(e).__name__}: {e}"
    try:
        os.write(err_fd, msg.encode("utf-8", "surrogateescape"))
    finally:
        os._exit(1)


def monitor(child: int, report: int, group: bool, killer: Killer | None = None,
            pid_namespace: bool = False) -> None:
    """Wait for the builder; kill it when the control pipe closes or says ``kill``: pid 1 of the
    namespace (which takes the whole PID namespace along), or the builder's process group when
    unsandboxed. The builder is our unreaped child until then, so its pid (and process group)
    cannot have been reused by another process."""
    try:
        pidfd = os.pidfd_open(child)
    except (AttributeError, OSError):   # kernels before 5.3: poll instead
        pidfd = -1
    buf = b""
    control_open = True
    while True:
        fds = ([pidfd] if pidfd >= 0 else []) + ([0] if control_open else [])
        r, _, _ = select.select(fds, [], [], None if pidfd >= 0 else 0.05)
        if pidfd < 0:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                finish(report, status, killer, pid_namespace)
        if 0 in r:
            data = os.read(0, 4096)
            buf += data
            if not data or b"kill" in buf:
                control_open = bool(data)
                try:
                    if group:
                        os.killpg(child, signal.SIGKILL)
                    else:
                        os.kill(child, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                buf = b""
        if pidfd in r:
            _, status = os.waitpid(child, 0)
            finish(report, status, killer, pid_namespace)


def finish(report: int, status: int, killer: Killer | None, pid_namespace: bool = False) -> None:
    """Report the builder's wait status and exit, after killing the build user's processes
    again. In a PID namespace nothing of the build survives its pid 1 (the kernel kills and
    reaps the namespace's other processes before pid 1 can be waited for), so the status goes
    first there; otherwise a process that left the builder's group could still be writing, and
    the kill comes first."""
    if killer is not None and not pid_namespace:
        killer.finish()
    try:
        write_line(report, f"status {status}")
    except OSError:
        pass
    if killer is not None and pid_namespace:
        killer.finish()
    os._exit(0)


def spawn_killer(uid: int | None) -> tuple[int, int]:
    """Nix kills every process of the build user before and after a build. A child forked in the
    host's namespaces (never inside a sandbox's: ``kill(-1)`` there reaches no host process)
    switches to ``uid``, sends ``kill(-1, SIGKILL)`` and writes ``ok`` (or why not) on the ack
    pipe, then waits on the trigger pipe (a byte, or EOF when every holder of its write end is
    gone), kills again and exits, which closes the ack pipe. With ``uid`` None (a killer forked
    ahead for a spare) it first reads the uid from the trigger pipe, a decimal line, and exits at
    EOF before one comes. Returns ``(trigger write end, ack read end)``; the forking process does
    not wait for it (the zygote ignores SIGCHLD)."""
    trig_r, trig_w = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            close_most_fds({2, trig_r, ack_w})
            if uid is None:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = os.read(trig_r, 1)
                    if not chunk:
                        os._exit(0)
                    line += chunk
                uid = int(line)
            os.setuid(uid)
            kill_all()
            os.write(ack_w, b"ok")
            os.read(trig_r, 1)
            kill_all()
        except (OSError, ValueError) as e:
            try:
                os.write(ack_w, f"cannot kill processes for uid '{uid}': {getattr(e, 'strerror', e)}".encode())
            except OSError:
                pass
            code = 1
        finally:
            os._exit(code)
    os.close(trig_r)
    os.close(ack_w)
    return trig_w, ack_r


class Killer:
    """This helper's end of a :func:`spawn_killer` child."""

    def __init__(self, trig_w: int, ack_r: int, uid: int | None = None) -> None:
        """``uid``: for a killer forked ahead, the uid it is to kill now."""
        self.trig_w, self.ack_r = trig_w, ack_r
        if uid is not None:
            try:
                write_line(trig_w, str(uid))
            except OSError:
                pass  # it died: started() says so

    def started(self) -> str | None:
        """Wait until the first kill is done; None, or why it failed."""
        msg = b""
        while msg != b"ok":
            chunk = os.read(self.ack_r, 4096)
            if not chunk:
                break
            msg += chunk
        return None if msg == b"ok" else (msg.decode("utf-8", "replace") or "the kill helper died")

    def finish(self) -> None:
        """Kill again; return when the killer is gone."""
        if self.trig_w >= 0:
            try:
                os.write(self.trig_w, b"k")
            except OSError:
                pass
            os.close(self.trig_w)
            self.trig_w = -1
            while True:
                try:
                    if not os.read(self.ack_r, 4096):
                        break
                except OSError:
                    break
            os.close(self.ack_r)
            self.ack_r = -1


def read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            os._exit(2)
        data += chunk
    return data


def make_namespaces(private_network: bool, want_userns: bool) -> tuple[str, int, int, bool]:
    """Move this process into the namespaces of a sandbox (its children into a new PID
    namespace): ``(failed step or "", errno, flags, user namespace made)``."""
    if os.getuid() == 0:
        try:
            os.setgroups([])
        except OSError as e:
            return "setgroups", e.errno or errno.EPERM, 0, False
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    if private_network:
        flags |= CLONE_NEWNET
    userns = want_userns and userns_enabled()
    if userns:
        flags |= CLONE_NEWUSER
    err = unshare(flags)
    if err == errno.EINVAL:
        flags &= ~CLONE_NEWPID
        err = unshare(flags)
    if userns and err in (errno.EPERM, errno.EINVAL):
        userns = False
        flags &= ~CLONE_NEWUSER
        err = unshare(flags)
    return ("unshare" if err else ""), err, flags, userns


def start(mode: str, plan: dict | None = None,  # type: ignore[type-arg]
          made: tuple[str, int, int, bool] | None = None, ready: tuple[int, Any] | None = None) -> None:
    """Run one build's helper (the modes ``sandbox``/``plain`` above). ``made``: the result of
    :func:`make_namespaces`, when this process (a zygote's spare) made them before the plan came;
    ``ready``: then its builder child too, forked ahead (:func:`fork_ready_builder`)."""
    os.umask(0o022)
    if plan is None:
        plan = marshal.loads(read_exact(0, int.from_bytes(read_exact(0, 8), "little")))
    assert plan is not None
    report = 1
    err_fd = plan["err_fd"]
    write_line(report, f"helper {os.getpid()}")
    killer = None
    bu: dict = plan.get("build_user") or {}  # type: ignore[type-arg]
    kill = bool(bu and plan.get("kill_user"))
    if plan.get("spare_killer"):  # forked ahead, waiting for a uid (or EOF: nothing to do)
        if kill:
            trig_w, ack_r = plan["spare_killer"]
            killer = Killer(trig_w, ack_r, uid=bu["uid"])
        else:
            close_all(plan["spare_killer"])
    elif plan.get("killer_fds"):
        killer = Killer(*plan["killer_fds"])
    elif kill:
        killer = Killer(*spawn_killer(bu["uid"]))  # runs while the namespaces are made
    if mode == "sandbox":
        if made is None:
            made = make_namespaces(plan["private_network"], not plan.get("no_userns"))
        step, err, flags, userns = made
        if step == "setgroups":
            write_line(report, f"error setgroups failed: {os.strerror(err)}")
            os._exit(1)
        if err in (errno.EPERM, errno.EINVAL):
            write_line(report, f"unavailable unshare({namespace_names(flags)} namespaces): {os.strerror(err)}")
            os._exit(1)
        if err:
            write_line(report, f"error cloning builder process: {os.strerror(err)}")
            os._exit(1)
        write_line(report, f"unshared {int(userns)}")
        go = b""
        while not go.endswith(b"\n"):
            chunk = os.read(0, 1)
            if not chunk:
                os._exit(1)
            go += chunk
        if go != b"go\n":
            os._exit(1)
        if not userns and not plan.get("build_user"):
            write_line(report, "error cannot perform a sandboxed build because user namespaces are not enabled; "
                               "check /proc/sys/user/max_user_namespaces")
            os._exit(1)
        plan["sandbox_uid"] = 1000 if userns else plan["build_user"]["uid"]
        plan["sandbox_gid"] = 100 if userns else plan["build_user"]["gid"]
    if killer is not None:
        error = killer.started()
        if error is not None:
            write_line(report, f"error {error}")
            os._exit(1)
    if ready is not None and mode == "sandbox":
        pid, chan = ready
        send_request(chan, b"B", marshal.dumps(plan), [plan["pty_fd"], err_fd])
        chan.close()
    else:
        pid = os.fork()
        if pid == 0:
            os.close(report)
            # the helper is single-threaded: its death (e.g. SIGKILL) takes the builder with it
            _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                        ctypes.c_ulong(0))
            child_main(plan, err_fd)
    os.close(err_fd)
    os.close(plan["pty_fd"])
    write_line(report, f"pid {pid}")
    monitor(pid, report, group=mode != "sandbox", killer=killer,
            pid_namespace=bool(mode == "sandbox" and made is not None and made[2] & CLONE_NEWPID))


def kill_user(uid: int) -> None:
    os.setuid(uid)
    kill_all()


def kill_all() -> None:
    # as Nix does: one kill(-1) as the uid reaches every process of it (ESRCH/EPERM: none left)
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        except InterruptedError:
            continue
        break


def recv_exact(sock: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            os._exit(0)
        data += chunk
    return data


FD_SIZE = 4  # sizeof(int)


def recv_request(sock: Any) -> tuple[bytes, bytes, list[int]]:
    """One request: a 9-byte header (kind, 8-byte little-endian body length) carrying
    descriptors (SCM_RIGHTS), then the body. Exits at EOF."""
    import _socket

    try:
        head, anc, _, _ = sock.recvmsg(9, _socket.CMSG_SPACE(8 * FD_SIZE))
    except OSError:
        os._exit(0)
    if not head:
        os._exit(0)
    fds: list = []  # type: ignore[type-arg]
    for level, kind, data in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(data[i:i + FD_SIZE], sys.byteorder, signed=True)
                       for i in range(0, len(data) - FD_SIZE + 1, FD_SIZE))
    if len(head) < 9:
        head += recv_exact(sock, 9 - len(head))
    return head[:1], recv_exact(sock, int.from_bytes(head[1:9], "little")), fds


def send_request(sock: Any, kind: bytes, body: bytes, fds: list[int]) -> None:
    """The counterpart of :func:`recv_request`."""
    import _socket

    sock.sendmsg([kind + len(body).to_bytes(8, "little")],
                 [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                   b"".join(fd.to_bytes(FD_SIZE, sys.byteorder, signed=True) for fd in fds))] if fds else [])
    sock.sendall(body)


def fork_ready_builder(made: tuple[str, int, int, bool], keep: set) -> tuple[int, Any]:  # type: ignore[type-arg]
    """In a spare that made its namespaces: fork its builder child (pid 1 of the new PID
    namespace) now, which makes the steps of a builder that need no plan and then waits for its
    plan (a ``B`` request with the pty slave and the error pipe). ``keep``: the spare's
    descriptors the child closes. Returns (pid, the spare's end of the channel)."""
    import _socket

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        failure = None
        try:
            _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                        ctypes.c_ulong(0))
            ours.close()
            close_all([fd for fd in keep if fd > 2])
            try:
                reset_process()
                init_namespaces(bool(made[2] & CLONE_NEWNET))
            except SetupError as e:
                failure = str(e.args[0])
            kind, body, fds = recv_request(theirs)
            theirs.close()
            if kind != b"B" or len(fds) != 2:
                os._exit(4)
            plan = marshal.loads(body)
            plan["pty_fd"], plan["err_fd"] = fds
            child_main(plan, fds[1], initialised=True, failure=failure)
        finally:
            os._exit(3)
    theirs.close()
    return pid, ours


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


#: the sandbox a spare makes ahead: (private network, user namespace allowed), the usual case
#: (nartool.build.sandbox sends a build to a spare only when its plan wants these)
SPARE_KEY = (True, True)


def run_helper(fds: list[int], mode_plan: dict,  # type: ignore[type-arg]
               made: tuple[str, int, int, bool] | None = None, ready: tuple[int, Any] | None = None) -> None:
    """In a child of the zygote: take a build request's descriptors (control, report, stderr as
    0/1/2; the pty slave; the error pipe; the killer's two ends if any) and run its helper."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for i, fd in enumerate(fds[:3]):
            os.dup2(fd, i)
        for fd in fds[:3]:
            if fd > 2:
                os.close(fd)
        plan = mode_plan["plan"]
        plan["pty_fd"] = fds[3]
        plan["err_fd"] = fds[4]
        plan["killer_fds"] = fds[5:7] if len(fds) >= 7 else None
        start(mode_plan["mode"], plan, made, ready)
    except BaseException:  # noqa: BLE001 - the parent reads it from the stderr pipe
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(3)


def spare(sock: Any, killer: tuple[int, int]) -> None:
    """A zygote's spare helper: makes the usual sandbox's namespaces at once, then waits for the
    one build request its owner sends (the zygote's ``B`` format and descriptors) and runs it;
    exits at EOF (its owner is gone, or dropped it). ``killer``:
    the ends of a :func:`spawn_killer` child forked ahead in the host's namespaces."""
    made = make_namespaces(*SPARE_KEY)
    ready = None
    if not made[0]:
        try:
            ready = fork_ready_builder(made, {sock.fileno(), *killer})
        except OSError:
            pass  # the builder is forked when the plan comes
    # to the owner: "<pid> <1|0: a user namespace made; -1: the namespaces failed>", so that it
    # writes the id maps as soon as it sends a build, without waiting for the 'unshared' line
    try:
        sock.sendall(f"{os.getpid()} {-1 if made[0] else int(made[3])}\n".encode())
    except OSError:
        os._exit(0)
    kind, body, fds = recv_request(sock)
    sock.close()
    if kind != b"B" or len(fds) < 5:
        os._exit(4)
    mode_plan = marshal.loads(body)
    mode_plan["plan"]["spare_killer"] = killer
    run_helper(fds, mode_plan, made, ready)


def zygote() -> None:
    """Serve requests on the stream socket at fd 0 until EOF (its owner, a nartool process, is
    gone). Each request is a 9-byte header (kind, 8-byte little-endian length) carrying
    descriptors (SCM_RIGHTS), then the body.

    ``B`` (build): body = the marshalled plan; descriptors = control (read end), report (write
    end), the helper's stderr, the pty slave, the error pipe. A child is forked (the zygote is
    single-threaded, so this is safe) that runs the ``sandbox``/``plain`` mode above with the
    plan, taking control/report/stderr as fds 0/1/2; the zygote keeps no copy of any
    descriptor. No reply: the report pipe speaks for the helper (EOF at once when it could not
    start). When the build user's processes are to be killed, the zygote forks the killer first
    (:func:`spawn_killer`, in the host's namespaces) and hands its ends to the helper.

    ``S`` (spare): body = the hex of the BPF program builds install (prepared here once, so that
    every later fork inherits it), or empty. The zygote forks a :func:`spare` helper, already in
    the usual sandbox's namespaces with its builder child and its killer forked ahead, and
    replies one byte: ``S`` carrying (SCM_RIGHTS) the spare's socket, whose only other end the
    owner then holds and sends the build's ``B`` request to directly, or ``N`` (none could be
    forked). The spare writes one line on that socket once its namespaces are made (its pid, and
    whether it made a user namespace), so that its owner can write the id maps at once. The owner asks for one when the zygote starts and once each build runs, so that the
    forks use the time a builder runs rather than the next build's.

    ``K`` (kill user): body = the uid in decimal; a child switches to it and sends
    ``kill(-1, SIGKILL)``; the reply is one line, ``ok`` or ``error <reason>``."""
    import _socket  # not ``socket``: it imports enum, selectors & co., start-up time

    sock = _socket.socket(fileno=0)
    # nothing here makes reference cycles worth a collection; the forked children then touch
    # (copy) fewer pages
    import gc
    gc.disable()
    gc.freeze()
    # children are reaped by the kernel; each child sets SIGCHLD back to the default at once
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    os.umask(0o022)
    while True:
        kind, body, fds = recv_request(sock)
        if kind == b"B" and len(fds) == 5:
            mode_plan = marshal.loads(body)
            plan = mode_plan["plan"]
            try:
                if plan.get("seccomp"):
                    prepare_seccomp(plan["seccomp"])
                if plan.get("build_user") and plan.get("kill_user"):
                    fds += spawn_killer(plan["build_user"]["uid"])
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    os.setsid()
                    run_helper(fds, mode_plan)
            except OSError as e:
                try:
                    write_line(fds[1], f"error unable to start the build helper: {os.strerror(e.errno or 0)}")
                except OSError:
                    pass
            close_all(fds)
        elif kind == b"S":
            close_all(fds)
            if body:
                prepare_seccomp(body.decode())  # (inherited by the spare and its builder child)
            spare_sock = fork_spare(sock)
            if spare_sock is None:
                sock.sendall(b"N")
            else:
                sock.sendmsg([b"S"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                       spare_sock.fileno().to_bytes(FD_SIZE, sys.byteorder, signed=True))])
                spare_sock.close()
        elif kind == b"K":
            close_all(fds)
            sock.sendall((kill_user_forked(int(body)) + "\n").encode("utf-8", "replace"))
        else:
            close_all(fds)
            os._exit(4)


def fork_spare(zsock: Any) -> Any | None:
    """Fork a :func:`spare`; the zygote's end of its socket (None when the fork failed)."""
    import _socket

    try:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        killer = spawn_killer(None)
    except OSError:
        ours.close()
        theirs.close()
        return None
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        close_all(list(killer))
        return None
    if pid == 0:
        try:
            # the zygote's socket to nartool is fd 0: /dev/null in its place, so that no
            # descriptor the spare makes lands on a number its build's descriptors take
            nul = os.open("/dev/null", os.O_RDWR)
            os.dup2(nul, zsock.detach())
            os.close(nul)
            ours.close()
            os.setsid()
            spare(theirs, killer)
        finally:
            os._exit(3)
    theirs.close()
    close_all(list(killer))
    return ours


def kill_user_forked(uid: int) -> str:
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        os.close(r)
        os.close(w)
        return f"error fork: {os.strerror(e.errno or 0)}"
    if pid == 0:
        code = 0
        try:
            os.close(r)
            kill_user(uid)
        except OSError as e:
            os.write(w, f"error setting uid: {e.strerror}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(r)
    return msg.decode("utf-8", "replace") or "ok"


def namespace_names(flags: int) -> str:
    return ", ".join(n for n, f in (("user", CLONE_NEWUSER), ("mount", CLONE_NEWNS), ("PID", CLONE_NEWPID),
                                    ("IPC", CLONE_NEWIPC), ("UTS", CLONE_NEWUTS), ("network", CLONE_NEWNET))
                     if flags & f)


def probe() -> None:
    """Create every namespace a sandbox uses in a child; print ``ok`` or why it failed."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
    if os.getuid() != 0:
        if not userns_enabled():
            print("user namespaces are not enabled (/proc/sys/user/max_user_namespaces is 0 or missing)")
            return
        flags |= CLONE_NEWUSER
    elif userns_enabled():
        err = unshare(flags | CLONE_NEWUSER)
        if err == 0:
            print("ok")
            return
    err = unshare(flags)
    if err:
        print(f"unshare({namespace_names(flags)} namespaces) failed: {os.strerror(err)}")
        return
    print("ok")


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode in ("sandbox", "plain"):
        start(mode)
    elif mode == "kill-user":
        try:
            kill_user(int(sys.argv[2]))
        except OSError as e:
            sys.stderr.write(f"setting uid: {e.strerror}\n")
            sys.exit(1)
    elif mode == "zygote":
        zygote()
    elif mode == "probe":
        probe()
    else:
        sys.stderr.write("usage: _sandbox_helper.py sandbox|plain|kill-user UID|probe\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
