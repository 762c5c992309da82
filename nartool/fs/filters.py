"""Gitignore-style path filters for dumps (``--exclude``, ``--exclude-from``), via ``pathspec``.

Paths are matched relative to the dumped root, with ``/`` separators; a directory is
matched with a trailing slash so that ``build/`` patterns work. As in git, an excluded
directory is skipped whole: nothing inside it can be re-included.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import FsError
from .source import Exclude


def exclude_filter(patterns: Iterable[str] = (), files: Iterable[str | os.PathLike[str]] = ()) -> Exclude | None:
    """An ``exclude(relpath, is_dir)`` predicate for :func:`nartool.fs.dump_events`, or None."""
    lines = list(patterns)
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="surrogateescape") as fh:
                lines += fh.read().splitlines()
        except OSError as e:
            raise FsError(f"cannot read exclude file: {e.strerror}", path=os.fsdecode(f), rule="io") from e
    if not lines:
        return None
    from pathspec import GitIgnoreSpec  # imported when used: it costs ~25 ms at start-up

    spec = GitIgnoreSpec.from_lines(lines)

    def exclude(rel: bytes, is_dir: bool) -> bool:
        p = os.fsdecode(rel)
        return bool(spec.match_file(p + "/" if is_dir else p))

    return exclude
