"""Extended attributes: NARs carry none. Dumps ignore them, store-bound restores strip them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import xattr


def list_fd(fd: int) -> list[str]:
    try:
        return list(xattr.listxattr(fd))
    except OSError:
        return []


def strip_fd(fd: int) -> None:
    """Remove every extended attribute of the open file ``fd`` (e.g. macOS quarantine)."""
    for name in list_fd(fd):
        try:
            xattr.removexattr(fd, name)
        except OSError:
            pass  # e.g. system.* attributes that cannot be removed


def files_with_xattrs(root: str | bytes) -> Iterator[tuple[bytes, list[str]]]:
    """``(path, attribute names)`` for every file, directory or symlink under ``root`` carrying some."""
    top = os.fsencode(root)
    paths = [top]
    for dirpath, dirnames, filenames in os.walk(top):
        paths += [os.path.join(dirpath, n) for n in dirnames + filenames]
    for p in paths:
        try:
            names = list(xattr.listxattr(p, symlink=True))
        except OSError:
            continue
        if names:
            yield p, names
