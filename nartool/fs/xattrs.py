"""Extended attributes: NARs carry none. Dumps ignore them, store-bound restores strip them.

The standard library's ``os.listxattr``/``os.removexattr`` are used where they exist (Linux); the
``xattr`` package only where they don't (macOS), which is the only platform it is installed on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

_list: Callable[..., list[str]]
_remove_fd: Callable[[int, str], None]

if hasattr(os, "listxattr"):
    def _list(target: int | bytes, symlink: bool = False) -> list[str]:
        return os.listxattr(target, follow_symlinks=not symlink)

    def _remove_fd(fd: int, name: str) -> None:
        os.removexattr(fd, name)
else:  # pragma: no cover - macOS
    import xattr

    def _list(target: int | bytes, symlink: bool = False) -> list[str]:
        return list(xattr.listxattr(target, symlink=symlink))

    def _remove_fd(fd: int, name: str) -> None:
        xattr.removexattr(fd, name)


def list_fd(fd: int) -> list[str]:
    try:
        return _list(fd)
    except OSError:
        return []


def strip_fd(fd: int) -> None:
    """Remove every extended attribute of the open file ``fd`` (e.g. macOS quarantine)."""
    for name in list_fd(fd):
        try:
            _remove_fd(fd, name)
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
            names = _list(p, symlink=True)
        except OSError:
            continue
        if names:
            yield p, names
