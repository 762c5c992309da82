"""Building derivations as Nix 2.8 does (``docs/builds.md``): the public Python API.

* :class:`BuildOptions` — the build settings (from the configuration and ``--option``);
* :func:`build_derivation` — one derivation whose inputs are valid;
* :func:`build_paths` — the scheduler: input derivations first, up to ``max-jobs`` at once;
* :func:`read_log` — a stored build log.
"""

from __future__ import annotations

from ..remote.messages import BuildResult, BuildStatus
from .goal import SUCCESS, CancelToken, build_derivation, build_paths, exit_status
from .logs import filter_escapes, read_log
from .options import BuildOptions, parse_sandbox_paths

__all__ = ["BuildOptions", "BuildResult", "BuildStatus", "CancelToken", "SUCCESS", "build_derivation", "build_paths",
           "exit_status", "filter_escapes", "parse_sandbox_paths", "read_log"]
