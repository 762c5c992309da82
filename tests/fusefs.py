"""A case-insensitive, case-preserving FUSE passthrough (optionally normalisation-insensitive,
to play HFS+/APFS), and a pytest fixture that mounts and unmounts it.

Run as ``python3 -m tests.fusefs BACKING MOUNTPOINT [--fold-unicode]``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _key(name: str, unicode_fold: bool) -> str:
    if unicode_fold:
        return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())
    return name.lower()


def make_ops(backing: str, unicode_fold: bool) -> Any:
    from mfusepy import FuseOSError, Operations

    class FoldFS(Operations):  # type: ignore[misc]
        def _find(self, dirpath: str, name: str) -> str | None:
            try:
                names = os.listdir(dirpath)
            except OSError:
                return None
            if name in names:
                return name
            k = _key(name, unicode_fold)
            for n in names:
                if _key(n, unicode_fold) == k:
                    return n
            return None

        def _real(self, path: str, *, create: bool = False) -> str:
            cur = backing
            parts = [p for p in path.split("/") if p]
            for i, p in enumerate(parts):
                found = self._find(cur, p)
                if found is None:
                    if create and i == len(parts) - 1:
                        return os.path.join(cur, p)
                    raise FuseOSError(errno.ENOENT)
                if create and i == len(parts) - 1:
                    raise FuseOSError(errno.EEXIST)
                cur = os.path.join(cur, found)
            return cur

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            st = os.lstat(self._real(path))
            return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid",
                                                  "st_atime", "st_mtime", "st_ctime")}

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", *os.listdir(self._real(path))]

        def readlink(self, path: str) -> str:
            return os.readlink(self._real(path))

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._real(path, create=True), mode)

        def symlink(self, target: str, source: str) -> None:
            os.symlink(source, self._real(target, create=True))

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._real(path, create=True), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

        def open(self, path: str, flags: int) -> int:
            return os.open(self._real(path), flags & ~(os.O_CREAT | os.O_EXCL))

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: Any = None) -> None:
            os.truncate(self._real(path), length)

        def flush(self, path: str, fh: int) -> None:
            return None

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            os.fsync(fh)

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._real(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.lchown(self._real(path), uid, gid)

        def utimens(self, path: str, times: Any = None) -> None:
            os.utime(self._real(path), times, follow_symlinks=False)

        def unlink(self, path: str) -> None:
            os.unlink(self._real(path))

        def rmdir(self, path: str) -> None:
            os.rmdir(self._real(path))

        def rename(self, old: str, new: str) -> None:
            src = self._real(old)
            parent, name = os.path.split(new)
            existing = self._find(self._real(parent), name)
            dst = os.path.join(self._real(parent), existing if existing is not None else name)
            os.rename(src, dst)

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(backing)
            return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                  "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

        def listxattr(self, path: str) -> list[str]:
            return []

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            raise FuseOSError(errno.ENODATA)

    return FoldFS()


def main() -> None:
    from mfusepy import FUSE

    backing, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(make_ops(backing, "--fold-unicode" in sys.argv), mountpoint, foreground=True, nothreads=True,
         entry_timeout=0, negative_timeout=0, attr_timeout=0)


def fuse_available() -> tuple[bool, str]:
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing (no FUSE kernel support here)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return False, ("/dev/fuse is not readable and writable by this user (FUSE mounts need it: run as root, "
                       "or give the user access, e.g. the group that owns /dev/fuse)")
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return False, "fusermount not found: install Debian's fuse3"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return False, f"mfusepy unusable ({e}): pip install mfusepy, apt-get install fuse3"
    return True, ""


def mount(tmp: Path, unicode_fold: bool) -> Iterator[Path]:
    from .conftest import require

    ok, why = fuse_available()
    require("FUSE", ok, why)
    backing, mnt = tmp / "backing", tmp / "mnt"
    backing.mkdir()
    mnt.mkdir()
    args = [sys.executable, "-m", "tests.fusefs", str(backing), str(mnt)] + (["--fold-unicode"] if unicode_fold else [])
    proc = subprocess.Popen(args, cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE)
    deadline = time.time() + 15
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            require("FUSE", False, f"could not mount the FUSE filesystem: {err.strip()[-300:]}")
        time.sleep(0.05)
    try:
        yield mnt
    finally:
        um = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
        subprocess.run([um, "-u", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def ci_mount(tmp_path: Path) -> Iterator[Path]:
    """A case-insensitive, case-preserving mount (ASCII and Unicode case)."""
    yield from mount(tmp_path, unicode_fold=False)


@pytest.fixture
def hfs_mount(tmp_path: Path) -> Iterator[Path]:
    """Also normalisation-insensitive, like HFS+/APFS."""
    yield from mount(tmp_path, unicode_fold=True)


if __name__ == "__main__":
    main()
