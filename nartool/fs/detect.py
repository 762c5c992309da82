"""Probe whether a filesystem folds letter case, at run time (per filesystem, not per platform)."""

from __future__ import annotations

import os

from .osutil import temp_name


def _swap(name: bytes) -> bytes | None:
    swapped = name.swapcase()
    return swapped if swapped != name else None


def is_case_insensitive(directory: str | bytes | os.PathLike[str]) -> bool:
    """True if names in ``directory`` are looked up case-insensitively.

    Uses existing entries with letters when there are some (works on read-only trees),
    otherwise creates and removes a probe file. Unknown (unwritable, empty) → False.
    """
    d = os.fsencode(directory)
    # Look up a few existing names with their case swapped. If a swapped name resolves but is
    # not itself an entry of the directory, lookups fold case. The check streams the listing
    # (it may hold millions of entries) instead of keeping it.
    candidates: dict[bytes, bytes] = {}  # swapped name -> name
    try:
        with os.scandir(d) as it:
            for e in it:
                swapped = _swap(e.name)
                if swapped is not None and swapped not in candidates:
                    candidates[swapped] = e.name
                    if len(candidates) == 3:
                        break
        if candidates:
            for swapped in candidates:
                if not os.path.lexists(os.path.join(d, swapped)):
                    return False
            listed = set()
            with os.scandir(d) as it:
                for e in it:
                    if e.name in candidates:
                        listed.add(e.name)
            if len(listed) < len(candidates):
                return True
    except OSError:
        return False
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
