"""Build settings as a build uses them (:class:`BuildOptions`), from a :class:`~nartool.config.Config`
plus ``--option NAME VALUE`` overrides, with Nix 2.8's names and defaults (``docs/builds.md``)."""

from __future__ import annotations

import os

from .._log import get_logger
from .._record import Frozen, Record
from ..config import Config
from ..errors import NartoolError

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any

log = get_logger(__name__)

#: Nix's default ``system-features`` (``kvm`` is added when ``/dev/kvm`` is usable)
DEFAULT_SYSTEM_FEATURES = ("benchmark", "big-parallel", "nixos-test")


def default_system() -> str:
    """This machine's Nix platform string, e.g. ``x86_64-linux``."""
    if hasattr(os, "uname"):  # (what the platform module reports on POSIX, without importing it)
        uname = os.uname()
        machine, kernel = uname.machine.lower(), uname.sysname.lower()
    else:  # pragma: no cover - not POSIX
        import platform

        machine, kernel = platform.machine().lower(), platform.system().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i686", "i586": "i686"}.get(machine, machine)
    return f"{machine}-{kernel}"


def default_system_features() -> tuple[str, ...]:
    feats = list(DEFAULT_SYSTEM_FEATURES)
    if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK):
        feats.append("kvm")
    return tuple(sorted(feats))


def default_build_users_group() -> str:
    """Nix 2.8: ``nixbld`` when running as root, empty otherwise."""
    return "nixbld" if os.geteuid() == 0 else ""


class SandboxPath(Frozen):
    """One ``sandbox-paths`` entry, parsed as Nix 2.8 does: a trailing ``?`` (of the whole entry)
    makes it optional, then the entry splits at the first ``=`` into ``target=source``.
    Immutable, compared and hashed by value."""

    __slots__ = ("target", "source", "optional")

    target: str
    source: str
    optional: bool

    def __init__(self, target: str, source: str, optional: bool = False) -> None:
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "optional", optional)


def parse_sandbox_paths(entries: list[str] | tuple[str, ...]) -> dict[str, SandboxPath]:
    """``sandbox-paths`` entries → by target. Nix keeps the setting as a sorted set of entry
    strings, so of two entries naming one target the one sorting later wins."""
    out: dict[str, SandboxPath] = {}
    for entry in sorted(set(entries)):
        optional = entry.endswith("?")
        if optional:
            entry = entry[:-1]
        target, eq, source = entry.partition("=")
        out[target] = SandboxPath(target, source if eq else target, optional)
    return out


class BuildOptions(Record):
    """Settings of a build (Nix names in the comments; defaults as Nix 2.8's). A mutable record
    compared by value (unhashable), with :meth:`~nartool._record.Record.replace`.

    Left out (or None): ``cores`` is the number of CPUs, ``sandbox_paths`` and
    ``allowed_impure_host_deps`` are empty, ``system_features`` and ``system`` are this
    machine's (:func:`default_system_features`, :func:`default_system`), ``build_users_group``
    is ``nixbld`` as root and empty otherwise."""

    __slots__ = ("sandbox", "sandbox_fallback", "max_jobs", "cores", "max_silent_time", "timeout", "max_build_log_size",
                 "keep_going", "sandbox_paths", "allowed_impure_host_deps", "pre_build_hook", "build_users_group",
                 "system_features", "system", "builders", "builders_use_substitutes", "filter_syscalls",
                 "keep_build_log", "compress_build_log", "sandbox_build_dir", "sandbox_dev_shm_size", "log_lines",
                 "config")

    def __init__(self, sandbox: str = "true", sandbox_fallback: bool = True, max_jobs: int = 1,
                 cores: int | None = None, max_silent_time: int = 0, timeout: int = 0, max_build_log_size: int = 0,
                 keep_going: bool = False, sandbox_paths: list[str] | None = None,
                 allowed_impure_host_deps: list[str] | None = None, pre_build_hook: str | None = None,
                 build_users_group: str | None = None, system_features: tuple[str, ...] | None = None,
                 system: str | None = None, builders: str = "", builders_use_substitutes: bool = False,
                 filter_syscalls: bool = True, keep_build_log: bool = True, compress_build_log: bool = True,
                 sandbox_build_dir: str = "/build", sandbox_dev_shm_size: str = "50%", log_lines: int = 10,
                 config: Config | None = None) -> None:
        self.sandbox = sandbox                                  # sandbox: true | false | relaxed
        self.sandbox_fallback = sandbox_fallback                # sandbox-fallback
        self.max_jobs = max_jobs                                # max-jobs
        self.cores: int = os.cpu_count() or 1 if cores is None else cores  # cores (NIX_BUILD_CORES, verbatim)
        self.max_silent_time = max_silent_time                  # max-silent-time
        self.timeout = timeout                                  # timeout
        self.max_build_log_size = max_build_log_size            # max-build-log-size
        self.keep_going = keep_going                            # --keep-going
        self.sandbox_paths: list[str] = [] if sandbox_paths is None else sandbox_paths  # (+ extra-sandbox-paths)
        self.allowed_impure_host_deps: list[str] = [] if allowed_impure_host_deps is None else allowed_impure_host_deps
        self.pre_build_hook = pre_build_hook                    # pre-build-hook
        self.build_users_group: str | None = (                  # build-users-group
            default_build_users_group() if build_users_group is None else build_users_group)
        self.system_features: tuple[str, ...] = (
            default_system_features() if system_features is None else system_features)
        self.system: str = default_system() if system is None else system
        self.builders = builders                                # builders
        self.builders_use_substitutes = builders_use_substitutes
        self.filter_syscalls = filter_syscalls                  # filter-syscalls
        self.keep_build_log = keep_build_log                    # keep-build-log
        self.compress_build_log = compress_build_log            # compress-build-log
        self.sandbox_build_dir = sandbox_build_dir              # sandbox-build-dir
        self.sandbox_dev_shm_size = sandbox_dev_shm_size        # sandbox-dev-shm-size
        self.log_lines = log_lines                              # log-lines
        #: where substitutes come from before building (``substituters``, ``substitute``,
        #: ``trusted-public-keys``, ``require-sigs``); None: no substitution (set by from_config)
        self.config = config

    @classmethod
    def from_config(cls, config: Config | None = None, overrides: dict[str, str] | None = None,
                    **fields: Any) -> BuildOptions:
        """The options ``config`` (default: the loaded configuration files) gives, with
        ``overrides`` (``--option NAME VALUE``, Nix's names and aliases, ``extra-NAME`` appends)
        applied on top; ``fields`` set :class:`BuildOptions` fields directly (e.g. ``keep_going``)."""
        cfg = Config.load() if config is None else config
        for name, value in (overrides or {}).items():
            if "\n" in value or "#" in value:
                raise NartoolError("invalid value for --option", got=f"{name} {value}", rule="bad-option")
            try:
                cfg = Config.from_text(f"{name} = {value}", "--option", base=cfg)
            except NartoolError as e:
                if e.rule == "unknown-setting":  # as Nix: a warning, the rest goes on
                    log.warning("warning: unknown setting '%s'", name)
                    continue
                raise NartoolError(f"--option {name}: {e.message.replace(' on line 1', '')}", rule=e.rule,
                                   expected=e.expected, got=e.got) from None
        opts = cls(
            sandbox=cfg.sandbox, sandbox_fallback=cfg.sandbox_fallback, max_jobs=cfg.max_jobs,
            cores=cfg.cores if cfg.cores is not None else os.cpu_count() or 1,
            max_silent_time=cfg.max_silent_time, timeout=cfg.timeout, max_build_log_size=cfg.max_build_log_size,
            sandbox_paths=list(cfg.sandbox_paths), pre_build_hook=cfg.pre_build_hook or None,
            allowed_impure_host_deps=list(cfg.allowed_impure_host_deps),
            build_users_group=cfg.build_users_group,
            system_features=tuple(cfg.system_features) if cfg.system_features is not None
            else default_system_features(),
            system=cfg.system or default_system(), builders=cfg.builders,
            builders_use_substitutes=cfg.builders_use_substitutes, filter_syscalls=cfg.filter_syscalls,
            keep_build_log=cfg.keep_build_log, compress_build_log=cfg.compress_build_log,
            sandbox_build_dir=cfg.sandbox_build_dir, sandbox_dev_shm_size=cfg.sandbox_dev_shm_size,
            log_lines=cfg.log_lines, config=cfg)
        for k, v in fields.items():
            setattr(opts, k, v)
        return opts
