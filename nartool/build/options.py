"""Build settings as a build uses them (:class:`BuildOptions`), from a :class:`~nartool.config.Config`
plus ``--option NAME VALUE`` overrides, with Nix 2.8's names and defaults (``docs/builds.md``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .._log import get_logger
from ..config import Config
from ..errors import NartoolError

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


@dataclass(frozen=True)
class SandboxPath:
    """One ``sandbox-paths`` entry, parsed as Nix 2.8 does: a trailing ``?`` (of the whole entry)
    makes it optional, then the entry splits at the first ``=`` into ``target=source``."""

    target: str
    source: str
    optional: bool = False


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


@dataclass
class BuildOptions:
    """Settings of a build (Nix names in the comments; defaults as Nix 2.8's)."""

    sandbox: str = "true"                       # sandbox: true | false | relaxed
    sandbox_fallback: bool = True               # sandbox-fallback
    max_jobs: int = 1                           # max-jobs
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)  # cores (NIX_BUILD_CORES, verbatim)
    max_silent_time: int = 0                    # max-silent-time
    timeout: int = 0                            # timeout
    max_build_log_size: int = 0                 # max-build-log-size
    keep_going: bool = False                    # --keep-going
    sandbox_paths: list[str] = field(default_factory=list)   # sandbox-paths (+ extra-sandbox-paths)
    allowed_impure_host_deps: list[str] = field(default_factory=list)  # allowed-impure-host-deps
    pre_build_hook: str | None = None           # pre-build-hook
    build_users_group: str | None = None        # build-users-group (None: nixbld as root, else empty)
    system_features: tuple[str, ...] = field(default_factory=default_system_features)
    system: str = field(default_factory=default_system)
    builders: str = ""                          # builders
    builders_use_substitutes: bool = False
    filter_syscalls: bool = True                # filter-syscalls
    keep_build_log: bool = True                 # keep-build-log
    compress_build_log: bool = True             # compress-build-log
    sandbox_build_dir: str = "/build"           # sandbox-build-dir
    sandbox_dev_shm_size: str = "50%"           # sandbox-dev-shm-size
    log_lines: int = 10                         # log-lines
    #: where substitutes come from before building (``substituters``, ``substitute``,
    #: ``trusted-public-keys``, ``require-sigs``); None: no substitution (set by from_config)
    config: Config | None = None

    def __post_init__(self) -> None:
        if self.build_users_group is None:
            self.build_users_group = default_build_users_group()

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
