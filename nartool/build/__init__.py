"""Building derivations as Nix 2.8 does (``docs/builds.md``): the public Python API.

* :class:`BuildOptions` — the build settings (from the configuration and ``--option``);
* :func:`build_derivation` — one derivation whose inputs are valid;
* :func:`build_paths` — the scheduler: input derivations first, up to ``max-jobs`` at once;
* :func:`read_log` — a stored build log.
"""

from __future__ import annotations

from .._lazy import lazy_getattr

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from ..store.buildresult import BuildResult, BuildStatus
    from .goal import SUCCESS, CancelToken, build_derivation, build_paths, exit_status
    from .logs import filter_escapes, read_log
    from .options import BuildOptions, parse_sandbox_paths

# imported when first used (``from nartool.build import build_paths`` works as usual), so that
# the sandbox zygote (``nartool.build.zygote``) can be started before the heavy modules load
_LAZY = {"BuildResult": "..store.buildresult", "BuildStatus": "..store.buildresult", "SUCCESS": ".goal",
         "CancelToken": ".goal", "build_derivation": ".goal", "build_paths": ".goal", "exit_status": ".goal",
         "filter_escapes": ".logs", "read_log": ".logs", "BuildOptions": ".options",
         "parse_sandbox_paths": ".options"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())

__all__ = ["BuildOptions", "BuildResult", "BuildStatus", "CancelToken", "SUCCESS", "build_derivation", "build_paths",
           "exit_status", "filter_escapes", "parse_sandbox_paths", "read_log"]
