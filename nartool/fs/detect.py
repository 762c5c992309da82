"""Probe whether a filesystem folds letter case, at run time (per filesystem, not per platform)."""

from __future__ import annotations

import os

from .osutil import temp_name


def _swap(name: bytes) -> bytes | None:
    swapped = name.swapcase()
    return swapped if swapped != name else None


def is_case_insensitive(directory: str | bytes | os.PathLike[str]) -> bool:
    """True if names in ``directory`` are looked up case-insensitively.

    Uses an existing entry with a letter when there is one (works on read-only trees),
    otherwise creates and removes a probe file. Unknown (unwritable, empty) → False.
    """
    d = os.fsencode(directory)
    try:
        names = set(os.listdir(d))
    except OSError:
        return False
    for n in names:
        s = _swap(n)
        if s is not None and s not in names:
            return os.path.lexists(os.path.join(d, s))
    probe = temp_name(b"case-probe")
    path = os.path.join(d, probe)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        return os.path.lexists(os.path.join(d, probe.swapcase()))
    finally:
        os.unlink(path)


def nearest_existing_dir(path: str | bytes | os.PathLike[str]) -> bytes:
    p = os.path.abspath(os.fsencode(path))
    while not os.path.isdir(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p
