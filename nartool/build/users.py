"""Build users: the members of ``build-users-group``, handed out one per build through the same
lock files real Nix uses (``<nix state dir>/userpool/<uid>``, an exclusive ``flock`` held for the
whole build), so that nartool and a Nix on the same machine never run two builds as one uid.

Nix 2.8 takes the state directory from its global setting (``NIX_STATE_DIR``, default
``/nix/var/nix``), not from the store being built into: a chroot store (``--store DIR``) still
locks ``/nix/var/nix/userpool``. :func:`nix_state_dir` gives that directory; callers pass it to
:func:`acquire_build_user`.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd

from .._record import Record
from ..errors import BuildError


def nix_state_dir() -> str:
    """The state directory whose ``userpool`` Nix 2.8 locks (``NIX_STATE_DIR`` or /nix/var/nix)."""
    return os.environ.get("NIX_STATE_DIR") or "/nix/var/nix"


class BuildUser(Record):
    """A locked build user. ``gid`` is the build group's gid (what the build runs with), not
    the user's primary group; ``supplementary_gids`` come from ``getgrouplist`` (kept only in
    builds without a user namespace, as Nix does)."""

    __slots__ = ("name", "uid", "gid", "supplementary_gids", "group", "lock_path", "_fd")

    def __init__(self, name: str, uid: int, gid: int, supplementary_gids: list[int] | None = None, group: str = "",
                 lock_path: str = "", _fd: int | None = None) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.supplementary_gids: list[int] = [] if supplementary_gids is None else supplementary_gids
        self.group = group
        self.lock_path = lock_path
        #: the lock file (open while the user is held; not compared, shown or copied)
        self._fd = _fd

    def kill(self) -> None:
        """Kill every process running as this uid (a child forked by the sandbox zygote switches
        to the uid and sends ``kill(-1, SIGKILL)``)."""
        kill_user(self.uid)

    def release(self) -> None:
        """Give the uid back (closes the lock file; idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def locked(self) -> bool:
        return self._fd is not None


def kill_user(uid: int) -> None:
    if uid == 0:
        raise BuildError("refusing to kill all processes of uid 0", rule="kill-root")
    from . import zygote
    res = zygote.kill_user(uid)
    if res != "ok":
        msg = res[len("error "):] if res.startswith("error ") else res
        raise BuildError(f"cannot kill processes for uid '{uid}': {msg}", rule="kill-user")


def acquire_build_user(group_name: str, state_dir: str | None = None) -> BuildUser | None:
    """Lock a free member of ``group_name``; ``None`` when all are busy (the caller waits and
    polls, printing Nix's ``waiting for UID to build '…'``). Errors use Nix's messages."""
    state_dir = state_dir or nix_state_dir()
    try:
        gr = grp.getgrnam(group_name)
    except KeyError:
        raise BuildError(f"the group '{group_name}' specified in 'build-users-group' does not exist",
                         rule="build-users-group") from None
    if not gr.gr_mem:
        raise BuildError(f"the build users group '{group_name}' has no members", rule="build-users-group")
    pool = os.path.join(state_dir, "userpool")
    os.makedirs(pool, exist_ok=True)
    for name in gr.gr_mem:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise BuildError(f"the user '{name}' in the group '{group_name}' does not exist",
                             rule="build-users-group") from None
        path = os.path.join(pool, str(pw.pw_uid))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise BuildError(f"opening user lock '{path}': {e.strerror}", path=path, rule="userpool") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except OSError:
            os.close(fd)
            raise
        if pw.pw_uid in (os.getuid(), os.geteuid()):
            os.close(fd)
            raise BuildError(f"the Nix user should not be a member of '{group_name}'", rule="build-users-group")
        try:
            supp = os.getgrouplist(pw.pw_name, pw.pw_gid)
        except OSError:
            os.close(fd)
            raise BuildError(f"failed to get list of supplementary groups for '{pw.pw_name}'",
                             rule="build-users-group") from None
        return BuildUser(name=name, uid=pw.pw_uid, gid=gr.gr_gid, supplementary_gids=list(supp),
                         group=group_name, lock_path=path, _fd=fd)
    return None
