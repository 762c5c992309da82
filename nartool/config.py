"""nartool's configuration file: who may use a nartool store and which signatures it trusts.

Files, read in this order (a later file overrides the settings it names):

1. the system file ``/etc/nartool/nartool.conf`` (skipped when absent);
2. ``$NARTOOL_CONFIG`` if that variable is set and non-empty (the file must then exist),
   otherwise ``$XDG_CONFIG_HOME/nartool/nartool.conf``, by default
   ``~/.config/nartool/nartool.conf`` (skipped when absent).

Syntax, the same as Nix's ``nix.conf``::

    # a comment runs from '#' to the end of the line
    trusted-users = root @wheel
    trusted-public-keys = cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=
    extra-trusted-public-keys = my-laptop-1:u9Ymon0hUsBRj78P59o2jMG8oenWdXVVObFfhQKbkDg=

Each non-blank line is ``NAME = VALUE``, with whitespace around the ``=`` (``name=value`` is
rejected, as by Nix). List values are separated by spaces or tabs. ``extra-NAME`` appends to
the list setting ``NAME`` instead of replacing it. An unknown setting, a malformed line or an
invalid value is an error naming the file and line. ``include`` is not supported.

Settings:

{settings}
Trust for ``nartool serve`` (:meth:`Config.load_for_serve`):

The *trust settings* (all of the settings above) decide what a client may do to a store, so
for ``nartool serve`` (typically an ssh forced command, run as the client's login user, who
controls their own home directory and environment) they come **only from the system file**, as
Nix's daemon ignores these settings in a user's configuration. A user's files
(``$NARTOOL_CONFIG``, ``$XDG_CONFIG_HOME``, ``~/.config``) are ignored there, with a warning
naming them (when there are settings that are not trust settings, only their trust settings
are ignored); a client cannot make itself trusted. The one exception is a server running as root, who could edit the
system file anyway: root's own files are read as usual, but only when they are owned by root
and not writable by group or others (otherwise they are ignored, with a warning). The system
file is always used, but a warning is given when it is not owned by root or is writable by its
group or by others (anyone who can write it decides who is trusted). Other commands (e.g.
``store verify --sigs``) act with the invoking user's own rights and read all the files.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence

from ._log import get_logger
from ._record import Declared, Field, Frozen
from .errors import NartoolError, SignatureError

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from .store.signing import PublicKey, SecretKey

# pathlib and the signing module are imported where used: a build reads its settings here, and
# neither is needed unless a file exists or keys are configured (~3 ms of start-up)

log = get_logger(__name__)

SYSTEM_CONFIG = "/etc/nartool/nartool.conf"
USER_CONFIG_RELATIVE = "nartool/nartool.conf"

_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


class SettingValueError(Exception):
    """A setting's value is invalid: the message (``{setting}`` in it stands for the setting's
    name) and the error's fields, made into an error naming the file and line."""

    def __init__(self, message: str, *, rule: str | None, expected: Any = None, got: Any = None, detail: str = "") -> None:
        super().__init__(message)
        self.message, self.rule, self.expected, self.got, self.detail = message, rule, expected, got, detail


def _show_list(v: Any) -> str:
    return " ".join(str(x) for x in v or ())


class Kind(Frozen):
    """A type of setting: how its value tokens parse, whether it is a list (``extra-NAME``
    appends to it) and how a value is written in the documentation."""

    __slots__ = ("name", "parse", "is_list", "show")

    name: str
    parse: Callable[[list[str]], Any]
    is_list: bool
    show: Callable[[Any], str]

    def __init__(self, name: str, parse: Callable[[list[str]], Any], is_list: bool = True,
                 show: Callable[[Any], str] = _show_list) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "parse", parse)
        object.__setattr__(self, "is_list", is_list)
        object.__setattr__(self, "show", show)


def _parse_bool(tokens: list[str]) -> bool:
    value = " ".join(tokens)
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingValueError("invalid Boolean value", rule="bad-boolean", expected="true or false", got=value)


def _parse_keys(tokens: list[str]) -> tuple[PublicKey, ...]:
    from .store.signing import PublicKey

    keys = []
    for t in tokens:
        try:
            keys.append(PublicKey.parse(t))
        except SignatureError as e:
            raise SettingValueError("invalid public key", detail=e.message, rule=e.rule, expected=e.expected,
                              got=e.got) from None
    return tuple(keys)


def _parse_abs_paths(tokens: list[str]) -> tuple[str, ...]:
    for t in tokens:
        if not os.path.isabs(t):
            raise SettingValueError("{setting} entries must be absolute paths", rule="relative-path", expected="an absolute path",
                              got=t)
    return tuple(tokens)


def _parse_uint(tokens: list[str]) -> int:
    value = " ".join(tokens)
    if not value.isdigit():
        raise SettingValueError("{setting} must be a non-negative integer", rule="bad-integer",
                                expected="a non-negative integer", got=value)
    return int(value)


def _parse_max_jobs(tokens: list[str]) -> int:
    value = " ".join(tokens)
    if value == "auto":
        return os.cpu_count() or 1
    if not value.isdigit():
        raise SettingValueError("configuration setting '{setting}' should be 'auto' or an integer",
                                rule="bad-integer", expected="auto or an integer", got=value)
    return int(value)


def _parse_sandbox_mode(tokens: list[str]) -> str:
    value = " ".join(tokens)
    if value not in ("true", "false", "relaxed"):
        raise SettingValueError("option '{setting}' has invalid value", rule="bad-value",
                                expected="true, false or relaxed", got=value)
    return value


BOOL = Kind("Boolean", _parse_bool, is_list=False, show=lambda v: "true" if v else "false")
UINT = Kind("integer", _parse_uint, is_list=False, show=lambda v: "" if v is None else str(v))
MAX_JOBS = Kind("integer or auto", _parse_max_jobs, is_list=False, show=str)
STRING = Kind("string", lambda tokens: " ".join(tokens), is_list=False, show=lambda v: "" if v is None else str(v))
SANDBOX_MODE = Kind("true, false or relaxed", _parse_sandbox_mode, is_list=False, show=str)
STRINGS = Kind("list of strings", tuple)
PUBLIC_KEYS = Kind("list of public keys", _parse_keys, show=lambda v: " ".join(k.name for k in v))
ABS_PATHS = Kind("list of absolute paths", _parse_abs_paths)


class Setting(Frozen):
    """One configuration setting: its name in the files, the :class:`Config` field holding it,
    its kind, default, documentation, and whether it is a *trust setting* (for ``nartool serve``
    honoured only from the system file)."""

    __slots__ = ("name", "field", "kind", "default", "doc", "trust")

    name: str
    field: str
    kind: Kind
    default: Any
    doc: str
    trust: bool

    def __init__(self, name: str, field: str, kind: Kind, default: Any, doc: str, trust: bool) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "doc", doc)
        object.__setattr__(self, "trust", trust)


def setting(name: str, kind: Kind, default: Any, doc: str, *, trust: bool) -> Any:
    """A :class:`Config` field that is the setting ``name`` (the one place a setting is defined:
    parsing, validation and documentation derive from it)."""
    return Field(default, {"setting": (name, kind, doc, trust)})

GroupMembers = Callable[[str], Sequence[str] | None]


def group_members(name: str) -> list[str] | None:
    """Members (``gr_mem``) of group ``name``, or None when there is no such group."""
    try:
        return list(grp.getgrnam(name).gr_mem)
    except KeyError:
        return None


class UserIdentity(Frozen):
    """Who a client is: user and primary group, by name and number.

    ``name`` is the decimal uid when the uid has no passwd entry; ``group`` likewise.
    """

    __slots__ = ("name", "uid", "gid", "group")

    name: str
    uid: int
    gid: int
    group: str

    def __init__(self, name: str, uid: int, gid: int, group: str) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "uid", uid)
        object.__setattr__(self, "gid", gid)
        object.__setattr__(self, "group", group)

    @classmethod
    def from_ids(cls, uid: int, gid: int) -> UserIdentity:
        """Resolve numeric ids (e.g. a socket peer's credentials) to names."""
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return cls(name, uid, gid, group)

    @classmethod
    def current(cls) -> UserIdentity:
        """The identity this process acts as (effective uid and gid)."""
        return cls.from_ids(os.geteuid(), os.getegid())


def match_user(user: UserIdentity, patterns: Iterable[str], members: GroupMembers = group_members) -> bool:
    """Nix's user matching: ``*``, the user name, or ``@group`` (primary group or a member)."""
    pats = list(patterns)
    if "*" in pats or user.name in pats:
        return True
    for p in pats:
        if not p.startswith("@"):
            continue
        if p[1:] == user.group:
            return True
        if user.name in (members(p[1:]) or ()):
            return True
    return False


def _config_error(message: str, source: str, lineno: int, *, rule: str | None,
                  expected: Any = None, got: Any = None, detail: str = "") -> NartoolError:
    """An error about line ``lineno`` of the configuration ``source``."""
    text = f"{message} on line {lineno}" + (f": {detail}" if detail else "")
    return NartoolError(text, path=source, rule=rule, expected=expected, got=got)


class Config(Declared):
    """Effective settings (defaults, then each file in order). Immutable, compared and hashed by
    value, made as a dataclass is (every field by name or in order), with
    :meth:`~nartool._record.Record.replace`."""

    allowed_users: tuple[str, ...] = setting(
        "allowed-users", STRINGS, ("*",), trust=True,
        doc="Users who may use the store. Entries: ``*`` (everyone), a user name (the decimal uid for a uid "
            "without a passwd entry) or ``@group`` (users whose primary group is ``group``, or who are listed "
            "as its members in the group database). Trusted users are always allowed.")
    trusted_users: tuple[str, ...] = setting(
        "trusted-users", STRINGS, ("root",), trust=True,
        doc="Users with full rights, e.g. importing unsigned paths. Same entry forms.")
    trusted_public_keys: tuple[PublicKey, ...] = setting(
        "trusted-public-keys", PUBLIC_KEYS, (), trust=True,
        doc="Public keys (``NAME:base64``) whose signatures are accepted. Unlike Nix, nartool does **not** "
            "trust ``cache.nixos.org-1`` by default; add its key here to trust it.")
    secret_key_files: tuple[str, ...] = setting(
        "secret-key-files", ABS_PATHS, (), trust=True,
        doc="Absolute paths of secret key files; nartool signs with them, and their public halves are "
            "trusted too. As in Nix, unreadable files are skipped (a malformed one is an error), and a "
            "``trusted-public-keys`` entry wins over a key file of the same name.")
    require_sigs: bool = setting(
        "require-sigs", BOOL, True, trust=True,
        doc="Whether paths that are not content-addressed need a trusted signature to be imported. "
            "Booleans are ``true``/``false`` (also ``yes``/``no``, ``1``/``0``).")
    # -- builds (``nartool build``; Nix's names and defaults, see docs/builds.md). Trust settings: a
    # ``nartool serve`` that builds takes them only from the system file, as Nix's daemon does.
    sandbox: str = setting(
        "sandbox", SANDBOX_MODE, "true", trust=True,
        doc="Whether builds run in the sandbox: ``true``, ``false`` or ``relaxed`` (fixed-output derivations and "
            "derivations with ``__noChroot`` run unsandboxed). A store whose real directory differs from its "
            "logical one is always built sandboxed. Aliases ``build-use-sandbox``, ``build-use-chroot``.")
    sandbox_fallback: bool = setting(
        "sandbox-fallback", BOOL, True, trust=True,
        doc="Build without the sandbox when the kernel refuses its namespaces.")
    sandbox_paths: tuple[str, ...] = setting(
        "sandbox-paths", STRINGS, (), trust=True,
        doc="Host paths shown in the sandbox: ``PATH``, ``TARGET=SOURCE``, a trailing ``?`` makes an entry "
            "optional; a store path source brings its closure. Aliases ``build-chroot-dirs``, "
            "``build-sandbox-paths``.")
    pre_build_hook: str = setting(
        "pre-build-hook", STRING, "", trust=True,
        doc="A program run as ``HOOK DRV CHROOTDIR`` before each sandboxed build; it may answer "
            "``extra-sandbox-paths`` followed by paths and an empty line.")
    build_users_group: str | None = setting(
        "build-users-group", STRING, None, trust=True,
        doc="Group whose members are the build users (used only as root). Default: ``nixbld`` as root, empty "
            "otherwise.")
    max_jobs: int = setting(
        "max-jobs", MAX_JOBS, 1, trust=True,
        doc="How many builds run at once (``auto``: one per CPU). Alias ``build-max-jobs``.")
    cores: int | None = setting(
        "cores", UINT, None, trust=True,
        doc="``NIX_BUILD_CORES`` of builders (``0``: all CPUs, as builders read it). Default: the number of CPUs. "
            "Alias ``build-cores``.")
    max_silent_time: int = setting(
        "max-silent-time", UINT, 0, trust=True,
        doc="Seconds a builder may stay silent before it is killed (0: no limit). Alias ``build-max-silent-time``.")
    timeout: int = setting(
        "timeout", UINT, 0, trust=True,
        doc="Seconds a build may run before it is killed (0: no limit). Alias ``build-timeout``.")
    max_build_log_size: int = setting(
        "max-build-log-size", UINT, 0, trust=True,
        doc="Bytes of log a builder may write before it is killed (0: no limit). Alias ``build-max-log-size``.")
    system_features: tuple[str, ...] | None = setting(
        "system-features", STRINGS, None, trust=True,
        doc="Features this machine offers to ``requiredSystemFeatures``. Default: ``nixos-test benchmark "
            "big-parallel``, plus ``kvm`` when ``/dev/kvm`` is usable.")
    system: str | None = setting(
        "system", STRING, None, trust=True,
        doc="The platform this machine builds for. Default: this machine's (e.g. ``x86_64-linux``).")
    keep_build_log: bool = setting(
        "keep-build-log", BOOL, True, trust=True,
        doc="Store each build's raw log under the store's ``log/nix/drvs``. Alias ``build-keep-log``.")
    compress_build_log: bool = setting(
        "compress-build-log", BOOL, True, trust=True,
        doc="Compress stored build logs with bzip2. Alias ``build-compress-log``.")
    filter_syscalls: bool = setting(
        "filter-syscalls", BOOL, True, trust=True,
        doc="Refuse setuid/setgid modes and extended attributes to builders (seccomp).")
    allowed_impure_host_deps: tuple[str, ...] = setting(
        "allowed-impure-host-deps", STRINGS, (), trust=True,
        doc="Host path prefixes a derivation may ask for with ``__impureHostDeps`` (shown in its sandbox, "
            "optional).")
    sandbox_build_dir: str = setting(
        "sandbox-build-dir", STRING, "/build", trust=True,
        doc="Where the build directory appears in the sandbox.")
    sandbox_dev_shm_size: str = setting(
        "sandbox-dev-shm-size", STRING, "50%", trust=True,
        doc="Size of the sandbox's ``/dev/shm``.")
    log_lines: int = setting(
        "log-lines", UINT, 10, trust=True,
        doc="How many of a failed build's last log lines an error shows (when the log is not printed).")
    builders: str = setting(
        "builders", STRING, "", trust=True,
        doc="Remote build machines (Nix's syntax); empty: build locally only.")
    builders_use_substitutes: bool = setting(
        "builders-use-substitutes", BOOL, False, trust=True,
        doc="Whether remote builders may substitute inputs themselves.")
    narinfo_cache_positive_ttl: int = setting(
        "narinfo-cache-positive-ttl", UINT, 3600, trust=False,
        doc="Seconds a remote cache's answer that it has a path (and its ``nix-cache-info``) is used without "
            "asking again; after that it is revalidated (``If-None-Match``, a ``304`` keeps it). Nix's name; "
            "Nix's default is 30 days because Nix never revalidates.")
    narinfo_cache_negative_ttl: int = setting(
        "narinfo-cache-negative-ttl", UINT, 3600, trust=False,
        doc="Seconds a remote cache's answer that it lacks a path is used without asking again (Nix's name "
            "and default).")
    connect_timeout: int = setting(
        "connect-timeout", UINT, 5, trust=False,
        doc="Seconds to wait for an HTTP connection to a cache (Nix's name; Nix's default 0 means curl's "
            "300 s). A cache not answering in time is skipped for the rest of the command.")
    stalled_download_timeout: int = setting(
        "stalled-download-timeout", UINT, 300, trust=False,
        doc="Seconds an HTTP transfer may receive nothing before it fails (Nix's name and default).")
    download_attempts: int = setting(
        "download-attempts", UINT, 5, trust=False,
        doc="How often an HTTP request that failed transiently is tried (Nix's name and default).")
    netrc_file: str = setting(
        "netrc-file", STRING, "/etc/nartool/netrc", trust=False,
        doc="A netrc file whose credentials are sent (HTTP Basic) to the hosts it names (as Nix's, whose "
            "default is ``/etc/nix/netrc``).")
    ssl_cert_file: str = setting(
        "ssl-cert-file", STRING, "", trust=False,
        doc="The CA certificates (a PEM bundle) that ``https://`` caches' certificates are checked against "
            "(current Nix's name; Nix 2.8 has only the environment variables). Empty (the default): "
            "``NIX_SSL_CERT_FILE``, else ``SSL_CERT_FILE``, else the system's certificates — Nix's order.")
    cache_serve_upload_from: tuple[str, ...] = setting(
        "cache-serve-upload-from", STRINGS, ("127.0.0.1", "::1"), trust=True,
        doc="Client addresses or networks (``10.0.0.0/8``) from which ``nartool cache serve --writable`` "
            "accepts uploads (PUT); ``*`` means any.")
    cache_serve_upload_password_file: str = setting(
        "cache-serve-upload-password-file", STRING, "", trust=True,
        doc="If set, ``nartool cache serve --writable`` accepts uploads only with HTTP Basic credentials "
            "whose password is this file's first line (clients put it in their netrc file).")
    substituters: tuple[str, ...] = setting(
        "substituters", STRINGS, (), trust=True,
        doc="Store URIs (binary caches: ``file://``, ``http(s)://``, ``s3://``; or any store) that paths are "
            "fetched from instead of being copied or built, tried by priority (``?priority=N`` or the cache's "
            "``Priority``, lower first; ties in the listed order). Unlike Nix, the default is empty. Alias "
            "``binary-caches``.")
    substitute: bool = setting(
        "substitute", BOOL, True, trust=False,
        doc="Whether to use the substituters at all (``--option substitute false`` turns them off). Alias "
            "``build-use-substitutes``.")
    sources: tuple[str, ...] = ()  # the files that were read, in order

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """The settings (by name, in definition order), from the fields made by :func:`setting`."""
        out = {}
        for field in cls._fields:
            f = cls._declared(field)
            if isinstance(f, Field) and "setting" in f.metadata:
                name, kind, doc, trust = f.metadata["setting"]
                out[name] = Setting(name, field, kind, f.default, doc, trust)
        return out

    # -- loading

    @staticmethod
    def default_paths(env: Mapping[str, str] | None = None) -> list[tuple[Path, bool]]:
        """The files :meth:`load` reads, each with whether it must exist."""
        from pathlib import Path

        return [(Path(p), required) for p, required in _default_files(env)]

    @classmethod
    def load(cls, paths: Sequence[str | os.PathLike[str]] | None = None,
             env: Mapping[str, str] | None = None) -> Config:
        """Read the configuration files. Explicit ``paths`` must all exist; of the default
        ones (:meth:`default_paths`) absent files are skipped."""
        files = _default_files(env) if paths is None else [(_path_name(p), True) for p in paths]
        cfg = cls()
        for raw, required in files:
            try:
                with open(raw, "rb") as f:
                    text = f.read()
            except FileNotFoundError:
                if required:
                    raise NartoolError("configuration file not found", path=_path_name(raw),
                                       rule="config-missing") from None
                continue
            try:
                decoded = text.decode("utf-8")
            except UnicodeDecodeError:
                raise NartoolError("configuration file is not UTF-8", path=_path_name(raw),
                                   rule="config-encoding") from None
            cfg = cls.from_text(decoded, _path_name(raw), base=cfg)
        return cfg

    @classmethod
    def from_text(cls, text: str, source: str = "<string>", base: Config | None = None, *,
                  ignore_trust: list[str] | None = None) -> Config:
        """Apply the settings in ``text`` (named ``source`` in errors) on top of ``base``
        (default: the built-in defaults). With ``ignore_trust``, trust settings are not applied
        (still checked) but their names appended to it."""
        cfg = cls() if base is None else base
        known = cls.settings()
        changes: dict[str, Any] = {}
        for lineno, line in enumerate(text.split("\n"), 1):
            parsed = _parse_line(line, source, lineno)
            if parsed is None:
                continue
            name, tokens = parsed
            st, extra = _lookup(known, name, source, lineno)
            try:
                value = st.kind.parse(tokens)
            except SettingValueError as e:
                raise _config_error(e.message.format(setting=st.name), source, lineno, rule=e.rule,
                                    expected=e.expected, got=e.got, detail=e.detail) from None
            if ignore_trust is not None and st.trust:
                ignore_trust.append(name)
                continue
            if extra:
                value = (*changes.get(st.field, getattr(cfg, st.field)), *value)
            changes[st.field] = value
        return cfg.replace(sources=(*cfg.sources, source), **changes)

    @classmethod
    def load_for_serve(cls, env: Mapping[str, str] | None = None, *, euid: int | None = None,
                       system: str | os.PathLike[str] | None = None, root_uid: int = 0,
                       warn: Callable[[str], None] | None = None) -> Config:
        """The configuration for ``nartool serve``: trust comes from the system file only (see
        the module docstring). ``euid`` (default: this process's) decides whether user files may
        be read at all (root's only); ``root_uid`` is the owner a trusted file must have; ``warn``
        receives warnings (default: logged on ``nartool.config``, which the CLI shows on
        stderr). ``system`` overrides :data:`SYSTEM_CONFIG`."""
        from pathlib import Path

        say = warn if warn is not None else _warn
        uid = os.geteuid() if euid is None else euid
        sys_path = Path(SYSTEM_CONFIG if system is None else system)
        cfg = cls()
        text = _read_checked(sys_path, required=False, root_uid=root_uid, say=say, insecure_ok=True)
        if text is not None:
            cfg = cls.from_text(text, str(sys_path), base=cfg)
        for path, required in cls.default_paths(env)[1:]:
            if uid != root_uid:
                if not path.exists():
                    continue
                if all(st.trust for st in cls.settings().values()):
                    say(f"ignoring '{path}' for serve: trust settings come only from the system configuration "
                        f"'{sys_path}'")
                    continue
                # a user's file: its other settings apply, its trust settings do not
                text = _read_checked(path, required=required, root_uid=root_uid, say=say, insecure_ok=None)
                if text is not None:
                    ignored: list[str] = []
                    cfg = cls.from_text(text, str(path), base=cfg, ignore_trust=ignored)
                    if ignored:
                        say(f"ignoring {', '.join(ignored)} in '{path}' for serve: trust settings come only from "
                            f"the system configuration '{sys_path}'")
                continue
            text = _read_checked(path, required=required, root_uid=root_uid, say=say, insecure_ok=False)
            if text is not None:
                cfg = cls.from_text(text, str(path), base=cfg)
        return cfg

    # -- decisions

    def is_trusted(self, user: UserIdentity, members: GroupMembers = group_members) -> bool:
        return match_user(user, self.trusted_users, members)

    def is_allowed(self, user: UserIdentity, members: GroupMembers = group_members) -> bool:
        """Trusted users are always allowed."""
        return self.is_trusted(user, members) or match_user(user, self.allowed_users, members)

    def secret_keys(self) -> list[SecretKey]:
        """The readable keys of ``secret-key-files`` (unreadable files are skipped)."""
        from .store.signing import load_secret_key

        keys = []
        for f in self.secret_key_files:
            try:
                keys.append(load_secret_key(f))
            except OSError:
                continue
        return keys

    def trusted_keys(self) -> dict[str, PublicKey]:
        """``trusted-public-keys`` plus the public halves of readable ``secret-key-files``;
        the first key of a name wins."""
        out: dict[str, PublicKey] = {}
        for k in self.trusted_public_keys:
            out.setdefault(k.name, k)
        for sk in self.secret_keys():
            out.setdefault(sk.name, sk.public_key())
        return out


def _warn(message: str) -> None:
    log.warning("warning: %s", message)


def file_problems(st: os.stat_result, root_uid: int = 0) -> list[str]:
    """Why a configuration file with status ``st`` cannot be relied on for trust settings:
    not owned by root, or writable by its group or by others."""
    problems = []
    if st.st_uid != root_uid:
        problems.append(f"is owned by uid {st.st_uid}, not by root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append("is writable by " + " and ".join(
            w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if st.st_mode & bit))
    return problems


def _default_files(env: Mapping[str, str] | None) -> list[tuple[str, bool]]:
    """:meth:`Config.default_paths` as plain strings (a build reads its settings at every start:
    pathlib is imported only when a file exists or one is named, see :func:`_path_name`). The
    system file and the one under the configuration directory are joined by hand; they name the
    same files as pathlib's paths (which only drop ``//``, ``/./`` and trailing slashes)."""
    env = os.environ if env is None else env
    files = [(SYSTEM_CONFIG, False)]
    explicit = env.get("NARTOOL_CONFIG")
    if explicit:  # (as pathlib writes it: "x.conf/" is the file x.conf)
        return [*files, (_path_name(explicit), True)]
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):
        base = xdg
    else:
        base = os.path.join(env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir, ".config")
    return [*files, (os.path.join(base, USER_CONFIG_RELATIVE), False)]


def _path_name(path: str | os.PathLike[str]) -> str:
    """A configuration file's name in sources and errors: as ``pathlib`` writes the path (the
    same file; ``a//b/./c`` is written ``a/b/c``)."""
    from pathlib import Path

    return str(Path(path))


def _read_checked(path: Path, *, required: bool, root_uid: int, say: Callable[[str], None],
                  insecure_ok: bool | None) -> str | None:
    """The text of a configuration file, checked as in :meth:`Config.load_for_serve`; None
    when it is absent (and not required) or, unless ``insecure_ok``, untrustworthy. With
    ``insecure_ok=None`` (a file trusted for nothing) ownership and mode are not checked."""
    try:
        with open(path, "rb") as f:
            problems = file_problems(os.fstat(f.fileno()), root_uid)
            data = f.read()
    except FileNotFoundError:
        if required:
            raise NartoolError("configuration file not found", path=str(path), rule="config-missing") from None
        return None
    if problems and insecure_ok is not None:
        what = "; ".join(problems)
        if not insecure_ok:
            say(f"ignoring '{path}' for serve: it {what}")
            return None
        say(f"the system configuration '{path}' {what}: whoever can write it decides who is trusted")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise NartoolError("configuration file is not UTF-8", path=str(path), rule="config-encoding") from None


def _parse_line(line: str, source: str, lineno: int) -> tuple[str, list[str]] | None:
    """``NAME = VALUE…`` → (NAME, value tokens); None for blank and comment lines."""
    from .store.signing import split_key_list

    tokens = split_key_list(line.split("#", 1)[0])
    if not tokens:
        return None
    if tokens[0] in ("include", "!include"):
        raise _config_error(f"'{tokens[0]}' is not supported in nartool configuration files", source, lineno,
                            rule="unsupported-include", expected="NAME = VALUE", got=line.strip())
    if len(tokens) < 2 or tokens[1] != "=":
        raise _config_error("malformed configuration line", source, lineno, rule="config-syntax",
                            expected="NAME = VALUE (spaces around '=')", got=line.strip())
    return tokens[0], tokens[2:]


#: Nix's old names of settings (``--option`` and the files accept both)
ALIASES = {
    "build-use-sandbox": "sandbox", "build-use-chroot": "sandbox",
    "build-chroot-dirs": "sandbox-paths", "build-sandbox-paths": "sandbox-paths",
    "build-extra-chroot-dirs": "extra-sandbox-paths", "build-extra-sandbox-paths": "extra-sandbox-paths",
    "build-max-jobs": "max-jobs", "build-cores": "cores", "build-max-silent-time": "max-silent-time",
    "build-timeout": "timeout", "build-max-log-size": "max-build-log-size", "build-keep-log": "keep-build-log",
    "build-compress-log": "compress-build-log",
    "binary-caches": "substituters", "extra-binary-caches": "extra-substituters",
    "build-use-substitutes": "substitute",
}


def _lookup(known: Mapping[str, Setting], name: str, source: str, lineno: int) -> tuple[Setting, bool]:
    """The setting a name in a file means, and whether it is ``extra-NAME`` (lists only)."""
    name = ALIASES.get(name, name)
    extra = name.startswith("extra-")
    st = known.get(name[len("extra-"):] if extra else name)
    if st is None or (extra and not st.kind.is_list):
        names = ", ".join(sorted(known))
        raise _config_error(f"unknown setting '{name}'", source, lineno, rule="unknown-setting",
                            expected=f"one of {names} (lists also as extra-NAME)", got=name)
    return st, extra


def settings_doc(settings: Iterable[Setting] | None = None) -> str:
    """The settings' reference documentation (reStructuredText definition list), as in the
    module docstring."""
    import textwrap

    out = []
    for st in Config.settings().values() if settings is None else settings:
        default = st.kind.show(st.default)
        head = f"``{st.name}`` (default ``{default}``)" if default else f"``{st.name}`` (default: empty)"
        body = textwrap.fill(st.doc, 92, initial_indent="    ", subsequent_indent="    ")
        trust = "    A trust setting (``nartool serve`` reads it only from the system file).\n" if st.trust else ""
        out.append(f"{head}\n{body}\n{trust}")
    return "".join(out)


class _ConfigModule(types.ModuleType):
    """This module, whose docstring gets the settings' reference when it is read (making it
    at import cost every command ~2 ms of start-up)."""

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return None if _DOC is None else _DOC.replace("{settings}", settings_doc())


_DOC = __doc__
sys.modules[__name__].__class__ = _ConfigModule
