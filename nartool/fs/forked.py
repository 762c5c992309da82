"""What the forked helper processes of a restore and of a hash share (docs/speed.md).

A helper is a ``fork`` of the calling process that does part of the work (making files, or
walking the tree) while the caller does the rest; it reports an error to the caller on a pipe,
with the error's fields, and leaves with ``os._exit``. Helpers are only forked where that is
safe and may pay: on Linux, from a process with no other thread (forking a threaded process can
deadlock the child), and within :func:`helper_processes`.
"""

from __future__ import annotations

import os

from ..errors import FsError, NartoolError
from .osutil import LINUX

#: at most this many processes for one restore (the caller included)
MAX_PROCESSES = 4


def helper_processes() -> int:
    """How many processes one operation may use, the caller included: ``NARTOOL_PROCESSES``
    when set (``1``: no helper process, ever), else the CPUs this process may run on, at most
    :data:`MAX_PROCESSES`."""
    env = os.environ.get("NARTOOL_PROCESSES", "")
    if env:
        try:
            return max(1, min(int(env), 16))
        except ValueError:
            return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_PROCESSES)


def can_fork() -> bool:
    """Whether this process may fork a helper: Linux, and no other thread."""
    if not LINUX:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def report(e: BaseException) -> bytes:
    """``e`` as a helper sends it to its parent (see :func:`reported`)."""
    import pickle

    def plain(v: object) -> object:
        if v is None or isinstance(v, (int, str)):
            return v
        if isinstance(v, (bytes, bytearray, memoryview)):
            return bytes(v[:4096])
        return str(v)

    if isinstance(e, NartoolError):
        fields = {k: plain(getattr(e, k)) for k in ("offset", "expected", "got", "path", "rule")}
        return pickle.dumps((type(e).__name__, e.message, fields))
    return pickle.dumps(("FsError", f"a helper process failed: {type(e).__name__}: {e}", {"rule": "io"}))


def reported(data: bytes, status: int) -> BaseException:
    """The error a helper reported (``data`` from :func:`report`), or the way it ended
    (``status`` from ``waitpid``) when it reported nothing readable."""
    from .. import errors

    if data:
        import pickle

        try:
            name, message, fields = pickle.loads(data)
            cls = getattr(errors, name, None)
            if not (isinstance(cls, type) and issubclass(cls, NartoolError)):
                cls = FsError
            return cls(message, **fields)
        except Exception:  # noqa: BLE001 - a garbled report is still a failure
            pass
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"status {os.waitstatus_to_exitcode(status)}"
    return FsError(f"a helper process ended with {how}", rule="io")


def read_to_end(fd: int) -> bytes:
    """Everything left to read from ``fd`` (a pipe), until its writers are gone."""
    parts: list[bytes] = []
    while True:
        part = os.read(fd, 1 << 16)
        if not part:
            return b"".join(parts)
        parts.append(part)
