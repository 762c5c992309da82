"""Running a builder the way Nix 2.8 runs it on Linux: in a chroot of bind mounts with private
namespaces (``start_sandboxed``), or in the host file system (``start_unsandboxed``).

The goal (``nartool.build.goal``) prepares everything a :class:`SandboxSpec` holds — the ordered
environment, the build directory, the input closure, the parsed ``sandbox-paths`` — and this
module does the rest:

* in this process (which may have threads): the chroot skeleton (``<drv>.chroot`` in the real
  store directory: ``/tmp``, ``/etc/group``, ``/etc/hosts``, the sandbox store with hard links of
  non-directory inputs), the pre-build hook, the pseudo-terminal of the log, and, once the
  namespaces exist, the uid/gid maps and ``/etc/passwd``;
* in a freshly exec'd single-threaded helper (``_sandbox_helper.py``): ``unshare`` of the
  namespaces, the fork that makes the builder pid 1, and in the builder: mounts, ``pivot_root``,
  seccomp, ids, and ``execve``.

See docs/sandbox.md for the sequence step by step.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import marshal
import os
import select
import signal
import stat
import sys
import termios
from collections.abc import Callable

from .._log import get_logger
from .._record import Record
from ..errors import BuildError, SandboxUnavailable
from . import seccomp, zygote
from .users import BuildUser

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import IO

log = get_logger(__name__)

HOMELESS_SHELTER = "/homeless-shelter"
SETUP_CONTEXT = "while setting up the build environment"


class Bind(Record):
    """One ``sandbox-paths`` / pre-build-hook entry, already parsed."""

    __slots__ = ("target", "source", "optional")

    def __init__(self, target: str, source: str, optional: bool = False) -> None:
        self.target = target
        self.source = source
        self.optional = optional


class SandboxSpec(Record):
    """What a sandboxed build runs and with what. ``platform`` is the derivation's ``system``
    (an i686-linux build on x86_64, and armv6l/armv7l builds, get the 32-bit personality, as in
    Nix); ``impersonate_linux_26`` is Nix's setting (UNAME26 personality for i686/x86_64 builds);
    ``personality`` lists extra personality flags besides those derived from ``platform``
    ("linux32", "uname26"); ``no_user_namespace`` (for tests) does not try a user namespace (as
    when max_user_namespaces is 0); ``skeleton_made``: the chroot's skeleton was made ahead
    (:func:`make_skeleton`) expecting a user namespace (True) or not (False)."""

    __slots__ = ("builder", "args", "env", "store_dir", "real_store_dir", "chroot_dir", "build_dir", "inputs",
                 "binds", "outputs", "host_network", "build_user", "sandbox_build_dir", "kvm", "dev_shm_size",
                 "filter_syscalls", "pre_build_hook", "platform", "impersonate_linux_26", "personality",
                 "no_user_namespace", "skeleton_made")

    def __init__(self, builder: bytes, args: list[bytes], env: list[tuple[bytes, bytes]], store_dir: str,
                 real_store_dir: str, chroot_dir: str, build_dir: str, inputs: list[str], binds: list[Bind],
                 outputs: list[str], host_network: bool, build_user: BuildUser | None, sandbox_build_dir: str = "/build",
                 kvm: bool = False, dev_shm_size: str = "50%", filter_syscalls: bool = True,
                 pre_build_hook: Callable[[str], list[Bind]] | None = None, platform: str = "",
                 impersonate_linux_26: bool = False, personality: list[str] | None = None,
                 no_user_namespace: bool = False, skeleton_made: bool | None = None) -> None:
        self.builder = builder
        self.args = args
        self.env = env
        self.store_dir = store_dir
        self.real_store_dir = real_store_dir
        self.chroot_dir = chroot_dir
        self.build_dir = build_dir
        self.inputs = inputs
        self.binds = binds
        self.outputs = outputs
        self.host_network = host_network
        self.build_user = build_user
        self.sandbox_build_dir = sandbox_build_dir
        self.kvm = kvm
        self.dev_shm_size = dev_shm_size
        self.filter_syscalls = filter_syscalls
        self.pre_build_hook = pre_build_hook
        self.platform = platform
        self.impersonate_linux_26 = impersonate_linux_26
        self.personality: list[str] = [] if personality is None else personality
        self.no_user_namespace = no_user_namespace
        self.skeleton_made = skeleton_made


def _setup_error(msg: str) -> BuildError:
    """A failure of the builder child before execve: the message is Nix's own text (what Nix 2.8
    prints after ``error:``); ``trace`` holds the context Nix shows only with --show-trace."""
    e = BuildError(msg, rule="sandbox-setup")
    e.setup_message = msg  # type: ignore[attr-defined]
    e.trace = [SETUP_CONTEXT]  # type: ignore[attr-defined]
    return e


# ---------------------------------------------------------------------------------------------
# removal of a chroot without ever deleting through a mount


def _mount_points_under(root: str, mountinfo: str = "/proc/self/mountinfo", *, real: bool = False) -> list[str]:
    """The mount points in the table ``mountinfo`` at ``root`` or below it (``real``: ``root``
    is already a real path)."""
    root = root if real else os.path.realpath(root)
    try:
        with open(mountinfo, "rb") as f:
            data = f.read()
    except OSError:
        return []
    # the table escapes these bytes in octal: nothing below root when its escaped form is absent
    key = os.fsencode(root)
    for ch, esc in ((b"\\", b"\\134"), (b" ", b"\\040"), (b"\t", b"\\011"), (b"\n", b"\\012")):
        key = key.replace(ch, esc)
    if key not in data:
        return []
    pts: list[str] = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        mp = _unescape_mountinfo(fields[4])
        if mp == root or mp.startswith(root + "/"):
            pts.append(mp)
    return pts


def _unescape_mountinfo(b: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(b):
        if b[i] == 0x5C and i + 3 < len(b) + 0 and b[i + 1:i + 4].isdigit():
            out.append(int(b[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(b[i])
            i += 1
    return os.fsdecode(bytes(out))


def _umount_detach(path: str) -> bool:
    import ctypes  # (here: only a chroot with mounts left needs it; ctypes costs start-up time)

    return bool(ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(path), ctypes.c_int(2)) == 0)  # MNT_DETACH


def cleanup_chroot(path: str, mountinfo_files: tuple[str, ...] = ("/proc/self/mountinfo",)) -> list[str]:
    """Remove a (possibly stale) chroot directory. Mounts found under it (in the mount tables
    given) are unmounted first; whatever cannot be unmounted is left in place together with the
    directories above it, and the returned list names it. Removal never crosses a mount point:
    every directory is opened relative to its parent with O_NOFOLLOW and skipped when it is a
    mount point or lies on another device."""
    if not os.path.lexists(path):
        return []
    real = os.path.realpath(path)
    for mi in mountinfo_files:
        for mp in sorted(_mount_points_under(real, mi, real=True), key=len, reverse=True):
            _umount_detach(mp)
    left = set()
    for mi in mountinfo_files:
        left.update(_mount_points_under(real, mi, real=True))
    if real in left:
        log.warning("not removing %s: it is still a mount point", path)
        return sorted(left)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return []
    if _rmtree(real, st.st_dev, left):
        try:
            os.rmdir(real)
        except FileNotFoundError:
            pass
    if left:
        log.warning("left mount points under %s in place: %s", path, ", ".join(sorted(left)))
    return sorted(left)


def _rmtree(path: str, dev: int, skip: set[str]) -> bool:
    """Empty the directory ``path`` (not removing it); False if something had to stay. Every
    directory is opened relative to its parent's descriptor with O_NOFOLLOW, so a symlink
    planted by a builder is removed, never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    try:
        return _empty_dir(fd, path, dev, skip)
    finally:
        os.close(fd)


def _empty_dir(fd: int, path: str, dev: int, skip: set[str]) -> bool:
    st = os.fstat(fd)
    if st.st_dev != dev or path in skip:
        return False
    if st.st_mode & 0o700 != 0o700:
        try:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
        except OSError:
            pass
    complete = True
    with os.scandir(fd) as it:  # (the entries' types come with the names, no stat each)
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        child = path + "/" + name
        if child in skip:
            complete = False
            continue
        if not is_dir:
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            continue
        # (a directory on another device is left: the recursion below checks st_dev)
        try:
            cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            continue
        try:
            if not _empty_dir(cfd, child, dev, skip):
                complete = False
                continue
        finally:
            os.close(cfd)
        try:
            os.rmdir(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            complete = False
    return complete


def _remove_chroot(path: str, extra_mountinfo: tuple[str, ...] = ()) -> list[str]:
    return cleanup_chroot(path, ("/proc/self/mountinfo", *extra_mountinfo))


# ---------------------------------------------------------------------------------------------
# the chroot skeleton (parent side)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)   # a symlink input is linked as the symlink itself
    except OSError as e:
        if e.errno not in (errno.EMLINK, errno.EPERM, errno.EXDEV):
            raise
        import shutil
        shutil.copy2(src, dst, follow_symlinks=False)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


@functools.lru_cache(maxsize=1)
def _userns_enabled() -> bool:
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            return f.read().strip() != "0"
    except OSError:
        return False


def _check_target(target: str, what: str) -> str:
    """A path inside the sandbox must be absolute and stay inside it (no '..' component)."""
    if not target.startswith("/") or target == "/" or ".." in target.split("/") or "\0" in target:
        raise BuildError(f"{what} '{target}' is not an absolute path inside the sandbox", path=target,
                         rule="sandbox-path")
    return target


def _chroot_error(spec: SandboxSpec, e: OSError) -> BuildError:
    name = e.filename if isinstance(e.filename, str) else spec.chroot_dir
    return BuildError(f"setting up the chroot '{spec.chroot_dir}': {name}: {e.strerror}", path=name,
                      rule="chroot-setup")


def _chroot_binds(spec: SandboxSpec) -> tuple[dict[str, tuple[str, bool]], list[tuple[str, str]]]:
    """Check the spec's paths and put the bind list together (nothing is written yet): the
    ``sandbox-paths`` entries, the build directory, the input directories; and the input files to
    link into the chroot's store, as (source, target)."""
    _check_target(spec.sandbox_build_dir, "sandbox-build-dir")
    for b in spec.binds:
        _check_target(b.target, "sandbox path")
    for p in [*spec.inputs, *spec.outputs]:
        base = p[len(spec.store_dir) + 1:] if p.startswith(spec.store_dir + "/") else ""
        if not base or "/" in base or base in (".", ".."):
            raise BuildError(f"'{p}' is not a store path in '{spec.store_dir}'", path=p, rule="input-path")
    binds: dict[str, tuple[str, bool]] = {}
    links: list[tuple[str, str]] = []
    for b in spec.binds:
        binds[b.target] = (b.source, b.optional)
    binds[spec.sandbox_build_dir] = (spec.build_dir, False)
    try:
        for p in spec.inputs:
            real = spec.real_store_dir + p[len(spec.store_dir):]
            if stat.S_ISDIR(os.lstat(real).st_mode):
                binds[p] = (real, False)
            else:
                links.append((real, spec.chroot_dir + p))
    except OSError as e:
        raise _chroot_error(spec, e) from None
    for o in spec.outputs:
        binds.pop(o, None)
    return binds, links


def _make_chroot(spec: SandboxSpec, userns_expected: bool, links: list[tuple[str, str]]) -> None:
    """Create the chroot's skeleton (a stale chroot is removed first) and link the input files."""
    try:
        _make_chroot_inner(spec, userns_expected, links)
    except OSError as e:
        raise _chroot_error(spec, e) from None


def _make_chroot_inner(spec: SandboxSpec, userns_expected: bool, links: list[tuple[str, str]]) -> None:
    if spec.skeleton_made != userns_expected:  # (None: not made ahead)
        make_skeleton(spec.chroot_dir, spec.store_dir, spec.build_user, spec.host_network, userns_expected)
    for src, dst in links:
        _link_or_copy(src, dst)


def make_skeleton(chroot: str, store_dir: str, bu: BuildUser | None, host_network: bool,
                  userns_expected: bool) -> None:
    """The chroot's skeleton, without the input files (a stale chroot is removed first): the
    directory, ``/tmp``, ``/etc/group``, ``/etc/hosts`` (unless the build keeps the host's
    network) and the store directory. Called by :func:`start_sandboxed`, or ahead by the
    scheduler (``SandboxSpec.skeleton_made`` then says with which ``userns_expected``)."""
    if os.path.lexists(chroot):
        left = _remove_chroot(chroot)
        if left or os.path.lexists(chroot):
            raise BuildError(f"cannot remove stale chroot '{chroot}': still mounted: {', '.join(left)}",
                             path=chroot, rule="stale-chroot")
    os.mkdir(chroot, 0o750)
    os.chmod(chroot, 0o750)
    if bu is not None:
        os.chown(chroot, 0, bu.gid)
    os.mkdir(chroot + "/tmp")
    os.chmod(chroot + "/tmp", 0o1777)
    os.mkdir(chroot + "/etc")
    gid = 100 if userns_expected or bu is None else bu.gid
    _write_file(chroot + "/etc/group", f"root:x:0:\nnixbld:!:{gid}:\nnogroup:x:65534:\n".encode())
    if not host_network:
        _write_file(chroot + "/etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
    store = chroot + store_dir
    _mkdirs(store)
    os.chmod(store, 0o1775)
    if bu is not None:
        os.chown(store, 0, bu.gid)


def _open_pty(bu: BuildUser | None) -> tuple[int, int]:
    master, slave = os.openpty()
    if bu is not None:
        name = os.ttyname(slave)
        os.chmod(name, 0o600)
        os.chown(name, bu.uid, 0)
    a = termios.tcgetattr(slave)
    a[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
              | termios.IGNCR | termios.ICRNL | termios.IXON)
    a[1] &= ~termios.OPOST
    a[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    a[2] &= ~(termios.CSIZE | termios.PARENB)
    a[2] |= termios.CS8
    a[6][termios.VMIN] = 1
    a[6][termios.VTIME] = 0
    termios.tcsetattr(slave, termios.TCSANOW, a)
    fl = fcntl.fcntl(master, fcntl.F_GETFL)
    fcntl.fcntl(master, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    return master, slave


# ---------------------------------------------------------------------------------------------
# the running builder


class Builder:
    """A running builder. ``pid`` is its host pid (pid 1 of its PID namespace when sandboxed);
    ``log_fd`` the non-blocking master side of its pty (EIO or EOF once every writer is gone);
    ``helper_pid`` the pid of the helper process that is the builder's parent."""

    def __init__(self, spec: SandboxSpec, control: int, report: IO[bytes], helper_pid: int, pid: int,
                 log_fd: int, sandboxed: bool, user_namespace: bool) -> None:
        self.spec = spec
        self._control = control
        self._report = report
        self.helper_pid = helper_pid
        self.pid = pid
        self.log_fd = log_fd
        self.sandboxed = sandboxed
        self.user_namespace = user_namespace
        self._status: int | None = None
        self._cleaned = False
        #: the error pipe, when the start did not wait for the builder's execve
        self._err_fd = -1

    def setup_error(self) -> BuildError | None:
        """For a builder started with ``wait_exec=False``, once it has exited: why its set-up
        failed before ``execve``, or None (it ran). Reads the error pipe (at EOF by then)."""
        if self._err_fd < 0:
            return None
        try:
            msg = _read_all(self._err_fd)
        finally:
            os.close(self._err_fd)
            self._err_fd = -1
        return _setup_error(msg.decode("utf-8", "surrogateescape")) if msg else None

    def kill(self) -> None:
        """SIGKILL the whole build: the helper (the builder's parent, so the pid cannot have been
        reused) kills pid 1 of the namespace, whose death takes every process of the PID namespace
        along, or the process group when unsandboxed; then every process of the build user."""
        if self._status is not None:
            return
        if self._control >= 0:
            try:
                os.write(self._control, b"kill\n")
            except OSError:
                pass
        if self.spec.build_user is not None:
            self.spec.build_user.kill()

    @property
    def status_fd(self) -> int:
        """Becomes readable when the builder has exited (for select/poll loops; then wait())."""
        return self._report.fileno()

    def poll(self) -> int | None:
        """The wait status if the builder has exited, else None (never blocks)."""
        if self._status is not None:
            return self._status
        p = select.poll()
        p.register(self._report.fileno(), select.POLLIN)
        if not p.poll(0):
            return None
        return self.wait()

    def wait(self) -> int:
        """Wait for the builder; return its wait status. Drain ``log_fd`` first (or from another
        thread): a builder blocked on a full pty never exits."""
        if self._status is not None:
            return self._status
        status: int | None = None
        for line in self._report:
            if line.startswith(b"status "):
                status = int(line.split()[1])
                break  # (the helper's own exit is not waited for)
        if status is None:
            # the helper itself died (its builder has a parent-death signal and died with it)
            status = signal.SIGKILL
        self._status = status
        if self._control >= 0:
            os.close(self._control)
            self._control = -1
        # the build's processes are gone: in a PID namespace with its pid 1, else the helper
        # killed the build user's processes before reporting the status (and its killer child
        # does so too when the helper itself died). In a PID namespace the helper kills them
        # once more after the report: :meth:`close_report` waits for that.
        return status

    def close_report(self) -> None:
        """Wait until the helper is gone (its report pipe at EOF): its last kill of the build
        user's processes is done, so the user can be given to another build."""
        if not self._report.closed:
            try:
                self._report.read()
            finally:
                self._report.close()

    def output_location(self, path: str) -> str:
        """The host path where the builder left the logical store path ``path``."""
        if self.sandboxed:
            return self.spec.chroot_dir + path
        return self.spec.real_store_dir + path[len(self.spec.store_dir):]

    def cleanup(self) -> None:
        """After exit: unmount what is still mounted under the chroot and remove it (never
        through a mount). Idempotent. Closes ``log_fd``."""
        if self._status is None:
            self.kill()
            self.wait()
        self.close_report()
        if self._err_fd >= 0:
            os.close(self._err_fd)
            self._err_fd = -1
        if self.log_fd >= 0:
            try:
                os.close(self.log_fd)
            except OSError:
                pass
            self.log_fd = -1
        if self.sandboxed and not self._cleaned:
            _remove_chroot(self.spec.chroot_dir)
            self._cleaned = True


def _personality(spec: SandboxSpec) -> list[str]:
    flags = list(spec.personality)
    if ((spec.platform == "i686-linux" and os.uname().machine == "x86_64")
            or spec.platform in ("armv7l-linux", "armv6l-linux")) and "linux32" not in flags:
        flags.append("linux32")
    if spec.impersonate_linux_26 and spec.platform in ("i686-linux", "x86_64-linux") and "uname26" not in flags:
        flags.append("uname26")
    return flags


def _plan(spec: SandboxSpec, mode: str, binds: dict[str, tuple[str, bool]], slave: int, err_w: int) -> bytes:
    prog = None
    if spec.filter_syscalls:
        try:
            prog = seccomp.filter_program().hex()
        except ValueError:
            if spec.build_user is not None:
                raise BuildError("seccomp is not supported on this machine; set 'filter-syscalls' to false "
                                 "to build without it", rule="seccomp") from None
    bu = spec.build_user
    if bu is not None and bu.uid == 0:
        raise BuildError("refusing to kill all processes of uid 0", rule="kill-root")
    plan = {
        "mode": mode,
        "chroot": spec.chroot_dir,
        "store_dir": spec.store_dir,
        "build_dir": spec.build_dir,
        "cwd": spec.sandbox_build_dir if mode == "sandbox" else spec.build_dir,
        "binds": sorted((t, s, o) for t, (s, o) in binds.items()),
        "private_network": not spec.host_network,
        "kvm": spec.kvm,
        "dev_shm_size": spec.dev_shm_size,
        "seccomp": prog,
        "personality": _personality(spec),
        "build_user": None if bu is None else {"uid": bu.uid, "gid": bu.gid,
                                               "supplementary_gids": bu.supplementary_gids},
        "builder": bytes(spec.builder),
        "args": [bytes(a) for a in spec.args],
        "env": [(bytes(k), bytes(v)) for k, v in spec.env],
        "pty_fd": slave,
        "err_fd": err_w,
        "no_userns": spec.no_user_namespace,
        # kill every process of the build user before the build and after it (in the helper)
        "kill_user": bu is not None,
    }
    # marshal: the helper is the same interpreter, and unmarshalling needs no imports there
    return marshal.dumps({"mode": mode, "plan": plan})


def _read_line(f: IO[bytes]) -> str:
    return f.readline().decode("utf-8", "surrogateescape").rstrip("\n")


def _start(spec: SandboxSpec, mode: str, wait_exec: bool = True) -> Builder:
    if not spec.builder.startswith(b"/"):
        raise BuildError(f"builder '{os.fsdecode(spec.builder)}' is not an absolute path", rule="builder-path")
    for s in [spec.builder, *spec.args, *(k + b"=" + v for k, v in spec.env)]:
        if b"\0" in s:
            raise BuildError("a builder argument or environment variable contains a NUL byte", got=s,
                             rule="nul-byte")
    for k, _ in spec.env:
        if not k or b"=" in k:
            raise BuildError("invalid environment variable name", got=k, rule="env-name")
    sandboxed = mode == "sandbox"
    userns_expected = _userns_enabled() and not spec.no_user_namespace
    master = slave = err_r = err_w = -1
    ctl_r = ctl_w = rep_w = se_r = se_w = -1
    report: IO[bytes] | None = None
    ok = False
    try:
        binds: dict[str, tuple[str, bool]] = {}
        links: list[tuple[str, str]] = []
        # the chroot's skeleton is made while the helper starts, unless a pre-build hook (called
        # with the chroot) must see it first
        late = sandboxed and spec.pre_build_hook is None
        if sandboxed:
            binds, links = _chroot_binds(spec)
        if sandboxed and not late:
            _make_chroot(spec, userns_expected, links)
            assert spec.pre_build_hook is not None
            try:
                for b in spec.pre_build_hook(spec.chroot_dir):
                    binds[_check_target(b.target, "pre-build hook path")] = (b.source, b.optional)
            except OSError as e:
                raise _chroot_error(spec, e) from None
        master, slave = _open_pty(spec.build_user)
        err_r, err_w = os.pipe()
        plan = _plan(spec, mode, binds, slave, err_w)
        ctl_r, ctl_w = os.pipe()
        rep_r, rep_w = os.pipe()
        report = open(rep_r, "rb")  # noqa: SIM115 - closed by Builder.wait or below
        se_r, se_w = os.pipe()
        # the helper's own stderr (only a crash of the helper itself writes there) is kept
        # for the error message; its builder child replaces fd 2 with the pty at once
        spare_pid = zygote.start_build(plan, [ctl_r, rep_w, se_w, slave, err_w],
                                       spare_ok=sandboxed and not spec.host_network and not spec.no_user_namespace)
        for fd in (ctl_r, rep_w, se_w, slave, err_w):
            os.close(fd)
        ctl_r = rep_w = se_w = slave = err_w = -1
        if late:
            _make_chroot(spec, userns_expected, links)
        went = False
        if sandboxed and spare_pid is not None:
            # a spare made its user namespace before the request: its id maps (and /etc/passwd)
            # now, and 'go' ahead of its 'unshared' line (should it have died meanwhile, its
            # report says so below)
            try:
                _after_unshare(spec, spare_pid, True)
                os.write(ctl_w, b"go\n")
                went = True
            except OSError:
                pass
        userns = False
        helper_pid = -1
        line = _read_line(report)
        if line.startswith("helper "):
            helper_pid = int(line.split()[1])
            line = _read_line(report)
        if sandboxed and line.startswith("unshared "):
            userns = line.split()[1] == "1"
            if not went:
                _after_unshare(spec, helper_pid, userns)
                os.write(ctl_w, b"go\n")
            line = _read_line(report)
        if line.startswith("unavailable "):
            raise SandboxUnavailable(f"cannot create the build sandbox: {line[len('unavailable '):]}",
                                     rule="sandbox-unavailable")
        if line.startswith("error "):
            raise BuildError(line[len("error "):], rule="sandbox-start")
        if not line.startswith("pid "):
            report.read()
            detail = _read_all(se_r).decode("utf-8", "replace").strip().splitlines()
            raise BuildError(f"the sandbox helper failed: {detail[-1] if detail else repr(line)}",
                             rule="sandbox-start")
        os.close(se_r)
        se_r = -1
        pid = int(line.split()[1])
        if not wait_exec:
            builder = Builder(spec, ctl_w, report, helper_pid, pid, master, sandboxed, userns)
            builder._err_fd, err_r, ctl_w = err_r, -1, -1
        else:
            msg = _read_all(err_r)
            os.close(err_r)
            err_r = -1
            builder = Builder(spec, ctl_w, report, helper_pid, pid, master, sandboxed, userns)
            ctl_w = -1
            if msg:
                builder.wait()
                builder.close_report()
                raise _setup_error(msg.decode("utf-8", "surrogateescape"))
        ok = True
        zygote.prepare_spare(zygote.seccomp_program())  # (forked while this build runs)
        return builder
    finally:
        if not ok:
            for fd in (slave, err_r, err_w, master, ctl_r, ctl_w, rep_w, se_r, se_w):
                if fd >= 0:
                    os.close(fd)
            if report is not None and not report.closed:
                # EOF on the control pipe (closed above) makes the helper kill its builder; its
                # report pipe reaches EOF when it is gone
                report.read()
                report.close()
            if sandboxed and os.path.lexists(spec.chroot_dir):
                _remove_chroot(spec.chroot_dir)


def _read_all(fd: int) -> bytes:
    msg = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return msg
        msg += chunk


def _after_unshare(spec: SandboxSpec, pid: int, userns: bool) -> None:
    """Parent's part once the helper made the namespaces: id maps, then /etc/passwd."""
    bu = spec.build_user
    if userns:
        host_uid = bu.uid if bu is not None else os.getuid()
        host_gid = bu.gid if bu is not None else os.getgid()
        _write_file(f"/proc/{pid}/uid_map", f"1000 {host_uid} 1".encode())
        _write_file(f"/proc/{pid}/setgroups", b"deny")
        _write_file(f"/proc/{pid}/gid_map", f"100 {host_gid} 1".encode())
        uid, gid = 1000, 100
    elif bu is None:
        raise BuildError("cannot perform a sandboxed build because user namespaces are not enabled; "
                         "check /proc/sys/user/max_user_namespaces", rule="no-user-namespaces")
    else:
        uid, gid = bu.uid, bu.gid
    _write_file(spec.chroot_dir + "/etc/passwd",
                f"root:x:0:0:Nix build user:{spec.sandbox_build_dir}:/noshell\n"
                f"nixbld:x:{uid}:{gid}:Nix build user:{spec.sandbox_build_dir}:/noshell\n"
                "nobody:x:65534:65534:Nobody:/:/noshell\n".encode())


def start_sandboxed(spec: SandboxSpec, *, wait_exec: bool = True) -> Builder:
    """Start the builder in a fresh sandbox (see the module docs). Raises BuildError for setup
    failures and SandboxUnavailable when the kernel refuses the namespaces. With ``wait_exec``
    False it returns before the builder's ``execve``; a set-up failure there then shows as the
    builder's exit, and :meth:`Builder.setup_error` says why."""
    return _start(spec, "sandbox", wait_exec)


def start_unsandboxed(spec: SandboxSpec, *, wait_exec: bool = True) -> Builder:
    """Start the builder in the host file system (cwd = the build dir), as the build user if
    any. Refuses when /homeless-shelter exists, as Nix does. ``wait_exec``: as for
    :func:`start_sandboxed`."""
    if os.path.lexists(HOMELESS_SHELTER):
        raise BuildError(f"home directory '{HOMELESS_SHELTER}' exists; please remove it to assure purity of "
                         "builds without sandboxing", path=HOMELESS_SHELTER, rule="homeless-shelter")
    return _start(spec, "plain", wait_exec)


def sandbox_unavailable_reason() -> str | None:
    """None when this machine can create the namespaces a sandboxed build needs, else why not
    (tried for real in a throw-away helper process)."""
    if sys.platform != "linux":
        return f"build sandboxing needs Linux namespaces (this is {sys.platform})"
    if os.getuid() != 0 and not _userns_enabled():
        return ("user namespaces are not enabled (/proc/sys/user/max_user_namespaces is 0 or missing); "
                "a sandboxed build as a non-root user needs them")
    import subprocess  # (here: a build's start-up does without it)

    r = subprocess.run(zygote.helper_argv("probe"), capture_output=True,
                       stdin=subprocess.DEVNULL, check=False)
    out = r.stdout.decode(errors="replace").strip()
    if r.returncode == 0 and out == "ok":
        return None
    return out or f"the sandbox probe failed: {r.stderr.decode(errors='replace').strip()}"
