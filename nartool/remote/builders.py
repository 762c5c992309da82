"""Remote builders: Nix's machines file, machine selection, and building one derivation on a
serve-protocol machine (what Nix's ``build-remote`` hook does).

**Machines** (:func:`parse_machines`), as Nix's ``builders`` setting and ``/etc/nix/machines``:
entries are separated by newlines or ``;``; ``#`` starts a comment; an entry ``@FILE`` is
replaced by the entries of FILE (a missing file counts as empty). Each entry is
whitespace-separated columns, ``-`` or a missing column meaning the default:

====  =====================  ==========================================================
col   field                  default / form
====  =====================  ==========================================================
1     store URI              required; without ``://`` (and not a path) ``ssh://`` is put in front
2     systems                comma-separated; default: this machine's system
3     ssh identity file      none
4     max jobs               1 (an unsigned integer)
5     speed factor           1 (unsigned integer, at least 1)
6     supported features     comma-separated
7     mandatory features     comma-separated (also count as supported)
8     public host key        base64 of an OpenSSH public key line (must decode as base64)
====  =====================  ==========================================================

**Selection** (:func:`select_machine`), as Nix 2.8: a machine fits a derivation when it lists
its system, supports all of its ``requiredSystemFeatures`` and the derivation requires all of
the machine's mandatory features. Slots are lock files ``<state>/current-load/<uri with / as _>-<n>``
(``n`` < max jobs), shared with every process on this machine (Nix uses the same files); a
fitting machine with a free slot is ranked by load / speed factor (lowest first), then by speed
factor (highest), then by load (lowest). When fitting machines exist but all their slots are
taken and the derivation cannot be built locally, the build waits for a slot.

**Building** (:func:`try_remote_build`): the derivation's input closure (its input sources and
the outputs of its input derivations, with their closure) is copied to the machine with one
validity query and pipelined ``AddToStoreNar`` commands (references first); then
``BuildDerivation`` sends the derivation inline (the ``.drv`` file is never copied) with the
build settings (``max-silent-time``, ``timeout``, ``max-build-log-size``); the remote's stderr —
the build log — is streamed line by line to ``log``; after a successful build the outputs the
local store lacks are copied back (``QueryPathInfos`` + ``DumpStorePath``). Only ``ssh://``
machines are supported (``localhost`` runs the remote program locally, as in Nix).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._log import get_logger
from ..errors import BuildError, NartoolError
from ..store.derivation import BasicDerivation, Derivation, read_derivation
from ..store.ops import closure, copy_paths
from .messages import BuildDerivationRequest, BuildResult, BuildSettings, BuildStatus

log_ = get_logger(__name__)

#: how deep ``@FILE`` entries may nest (a file including itself would loop otherwise)
MAX_INCLUDE_DEPTH = 16
#: how often a build waiting for a busy machine looks for a free slot (seconds)
SLOT_POLL = 0.25
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def this_system() -> str:
    """The Nix system name of this machine (``x86_64-linux``, ``aarch64-linux``, …)."""
    m = platform.machine().lower()
    m = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i686", "i586": "i686"}.get(m, m)
    return f"{m}-{platform.system().lower()}"


@dataclass(frozen=True)
class Machine:
    """One build machine (a line of the machines file)."""

    uri: str
    systems: tuple[str, ...]
    ssh_key: str = ""
    max_jobs: int = 1
    speed_factor: int = 1
    supported_features: frozenset[str] = field(default_factory=frozenset)
    mandatory_features: frozenset[str] = field(default_factory=frozenset)
    public_host_key: str = ""

    def all_supported(self, features: Iterable[str]) -> bool:
        return all(f in self.supported_features or f in self.mandatory_features for f in features)

    def mandatory_met(self, features: Iterable[str]) -> bool:
        fs = set(features)
        return all(f in fs for f in self.mandatory_features)

    def fits(self, system: str, features: Iterable[str]) -> bool:
        fs = set(features)
        return (system == "builtin" or system in self.systems) and self.all_supported(fs) and self.mandatory_met(fs)

    @property
    def slot_name(self) -> str:
        """The machine's part of its slot lock files' names (Nix's ``escapeUri``)."""
        return self.uri.replace("/", "_")


def _machine_error(message: str, line: str, **kw: Any) -> BuildError:
    return BuildError(f"bad machine specification: {message}: '{line}'", rule="bad-machine", **kw)


def _with_scheme(uri: str) -> str:
    special = ("auto", "daemon", "local")
    if ("://" in uri or "/" in uri or uri in special or uri.startswith("?")
            or any(uri.startswith(s + "?") for s in special)):
        return uri
    return "ssh://" + uri


def expand_lines(text: str, *, depth: int = 0) -> list[str]:
    """The machine entries of ``text`` (a ``builders`` value or a machines file), with
    ``@FILE`` entries replaced by FILE's entries."""
    out: list[str] = []
    for raw in re.split(r"[\n;]", text):
        line = raw.strip().split("#", 1)[0]
        if not line:
            continue
        if line.startswith("@"):
            path = line[1:].strip()
            if depth >= MAX_INCLUDE_DEPTH:
                raise BuildError(f"machines files nest more than {MAX_INCLUDE_DEPTH} deep", path=path,
                                 rule="bad-machine")
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                    content = fh.read()
            except FileNotFoundError:
                log_.debug("cannot find machines file '%s'", path)
                continue
            except OSError as e:
                raise BuildError(f"cannot read machines file: {e.strerror}", path=path, rule="bad-machine") from None
            out.extend(expand_lines(content, depth=depth + 1))
            continue
        out.append(line)
    return out


def parse_machine_line(line: str, default_system: str) -> Machine:
    tokens = line.split()

    def is_set(i: int) -> bool:
        return len(tokens) > i and tokens[i] not in ("", "-")

    def uint(i: int) -> int:
        t = tokens[i]
        if not t.isdigit() or int(t) > 0xFFFFFFFF:
            raise _machine_error(f"column #{i} is not an unsigned integer", line, got=t)
        return int(t)

    def words(i: int) -> list[str]:
        return [w for w in tokens[i].split(",") if w] if is_set(i) else []

    if not is_set(0):
        raise _machine_error("store URL was not found at the first column of a row", line)
    host_key = ""
    if is_set(7):
        host_key = tokens[7]
        try:
            base64.b64decode(host_key, validate=True)
        except binascii.Error as e:
            raise _machine_error(f"column #7 is not a valid base64 string ({e})", line, got=host_key) from None
    return Machine(
        uri=_with_scheme(tokens[0]),
        systems=tuple(words(1)) if is_set(1) else (default_system,),
        ssh_key=tokens[2] if is_set(2) else "",
        max_jobs=uint(3) if is_set(3) else 1,
        speed_factor=max(1, uint(4) if is_set(4) else 1),
        supported_features=frozenset(words(5)),
        mandatory_features=frozenset(words(6)),
        public_host_key=host_key,
    )


def parse_machines(builders: str, default_system: str | None = None) -> list[Machine]:
    """Every machine of a ``builders`` value (see the module docstring)."""
    system = default_system or this_system()
    return [parse_machine_line(line, system) for line in expand_lines(builders)]


# -- slots ------------------------------------------------------------------------------------


class SlotLock:
    """One held build slot of a machine (an exclusive ``flock`` on its slot file)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __enter__(self) -> SlotLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def select_machine(machines: Sequence[Machine], system: str, features: Iterable[str],
                   load_dir: str) -> tuple[Machine | None, SlotLock | None, bool]:
    """(machine, its held slot, whether any machine fits at all). ``(None, None, True)`` means
    fitting machines exist but all their slots are taken."""
    os.makedirs(load_dir, exist_ok=True)
    fs = set(features)
    right_type = False
    best: tuple[Machine, SlotLock, int] | None = None
    for m in machines:
        if not m.fits(system, fs):
            continue
        right_type = True
        free: SlotLock | None = None
        load = 0
        for slot in range(m.max_jobs):
            path = os.path.join(load_dir, f"{m.slot_name}-{slot}")
            fd = _try_lock(path)
            if fd is None:
                load += 1
            elif free is None:
                free = SlotLock(fd, path)
            else:
                os.close(fd)
        if free is None:
            continue
        if best is None or _better(m, load, best[0], best[2]):
            if best is not None:
                best[1].release()
            best = (m, free, load)
        else:
            free.release()
    if best is None:
        return None, None, right_type
    return best[0], best[1], right_type


def _better(m: Machine, load: int, bm: Machine, bload: int) -> bool:
    a, b = load / m.speed_factor, bload / bm.speed_factor
    if a != b:
        return a < b
    if m.speed_factor != bm.speed_factor:
        return m.speed_factor > bm.speed_factor
    return load < bload


# -- building ---------------------------------------------------------------------------------


class _LineLog:
    """Receives the remote's stderr and hands ``log`` whole lines, each ending with ``\\n``."""

    def __init__(self, log: Callable[[bytes], None] | None) -> None:
        self.log = log
        self.partial = b""
        self.tail: list[bytes] = []

    def write(self, data: bytes) -> int:
        buf = self.partial + bytes(data)
        *lines, self.partial = buf.split(b"\n")
        for ln in lines:
            self._emit(ln + b"\n")
        return len(data)

    def _emit(self, line: bytes) -> None:
        self.tail = (self.tail + [line])[-10:]
        if self.log is not None:
            self.log(line)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if self.partial:
            self._emit(self.partial + b"\n")
            self.partial = b""


def _env(drv: Derivation | BasicDerivation) -> Mapping[str, str]:
    return drv.env if isinstance(drv.env, dict) else dict(drv.env)


def required_features(drv: Derivation | BasicDerivation) -> set[str]:
    """``requiredSystemFeatures`` of the derivation (space-separated in its environment)."""
    return set(_env(drv).get("requiredSystemFeatures", "").split())


def _opt(options: Any, name: str, default: Any) -> Any:
    return getattr(options, name, default)


def _input_paths(store: Any, drv: Derivation) -> list[str]:
    """The input closure: input sources plus the wanted outputs of the input derivations,
    closed under references, in dependency order."""
    inputs = set(drv.input_srcs)
    for inp, names in drv.input_drvs.items():
        d = read_derivation(store, inp)
        for n in names:
            p = d.output_path(n, store.store_dir) if n in d.outputs else None
            if not p:
                raise BuildError(f"cannot build remotely: output '{n}' of input derivation has no known path "
                                 "(content-addressed derivations are not supported)", path=inp,
                                 rule="unsupported")
            inputs.add(p)
    return closure(store, sorted(inputs))


def build_settings(options: Any) -> BuildSettings:
    """The build settings sent along (Nix's remote-build client sends these)."""
    return BuildSettings(max_silent_time=int(_opt(options, "max_silent_time", 0)),
                         build_timeout=int(_opt(options, "timeout", 0)),
                         max_log_size=int(_opt(options, "max_build_log_size", 0)),
                         build_repeat=0, enforce_determinism=False,
                         keep_failed=bool(_opt(options, "keep_failed", False)))


def open_machine_store(machine: Machine, store_dir: str, stderr_to: object = None) -> Any:
    """The machine as an ``ssh://`` store (its key and host key as store parameters)."""
    from urllib.parse import parse_qsl, urlencode

    from .store import SSHStore

    if not machine.uri.startswith("ssh://"):
        raise BuildError(f"cannot build on '{machine.uri}': only ssh:// build machines are supported",
                         rule="unsupported-machine", got=machine.uri)
    rest = machine.uri[len("ssh://"):]
    host, _, query = rest.partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if machine.ssh_key:
        params.setdefault("ssh-key", machine.ssh_key)
    if machine.public_host_key:
        params.setdefault("base64-ssh-public-host-key", machine.public_host_key)
    rest = host + ("?" + urlencode(params) if params else "")
    return SSHStore.from_uri(rest, store_dir, stderr_to=stderr_to)


def _can_build_locally(options: Any, system: str, features: set[str]) -> bool:
    if int(_opt(options, "max_jobs", 1)) == 0:
        return False
    local_system = _opt(options, "system", None) or this_system()
    extra = _opt(options, "extra_platforms", ()) or ()
    if system not in ("builtin", local_system, *extra):
        return False
    local_features = set(_opt(options, "system_features", ()) or ())
    return features <= local_features if features else True


def try_remote_build(store: Any, drv_path: str, drv: Derivation | BasicDerivation, options: Any, *,
                     log: Callable[[bytes], None] | None = None,
                     wait: Callable[[float], None] = time.sleep) -> BuildResult | None:
    """Build ``drv`` (whose inputs are valid in ``store``) on one of ``options.builders``'
    machines; None when no machine fits (or every fitting one failed to connect) and the
    derivation may be built locally instead. Never raises for a failed build: the result
    carries the remote's status and message."""
    machines = parse_machines(_opt(options, "builders", "") or "", _opt(options, "system", None) or None)
    if not machines:
        return None
    system = drv.platform
    if system == "builtin":
        return None  # builtin builders run where the build is asked for
    features = required_features(drv)
    local_ok = _can_build_locally(options, system, features)
    state_dir = getattr(store, "state_dir", None)
    load_dir = os.path.join(state_dir, "current-load") if state_dir else os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"nartool-current-load-{os.getuid()}")
    disabled: set[Machine] = set()
    while True:
        candidates = [m for m in machines if m not in disabled]
        machine, slot, right_type = select_machine(candidates, system, features, load_dir)
        if machine is None or slot is None:
            if right_type and not local_ok:
                wait(SLOT_POLL)  # postpone: a fitting machine is busy and we may not build here
                continue
            return None
        with slot:
            try:
                return _build_on(store, machine, drv_path, drv, options, log)
            except _ConnectFailed as e:
                log_.error("cannot build on '%s': %s", machine.uri, e)
                disabled.add(machine)


class _ConnectFailed(Exception):
    pass


def _build_on(store: Any, machine: Machine, drv_path: str, drv: Derivation | BasicDerivation, options: Any,
              log: Callable[[bytes], None] | None) -> BuildResult:

    sink = _LineLog(log)
    remote = open_machine_store(machine, store.store_dir, stderr_to=sink)
    # builders-use-substitutes: the machine first tries its own substituters for missing inputs
    remote.substitute = bool(_opt(options, "builders_use_substitutes", False))

    def failed(why: str, status: int = BuildStatus.MISC_FAILURE, r: BuildResult | None = None) -> BuildResult:
        msg = f"build of '{drv_path}' on '{machine.uri}' failed: {why}"
        if r is None:
            return BuildResult(status, msg)
        return BuildResult(status, msg, r.times_built, r.is_non_deterministic, r.start_time, r.stop_time, ())

    try:
        try:
            # the session starts with the copy's validity query (no round trip of its own): a
            # machine that cannot be reached is skipped
            remote.client  # noqa: B018 - connects
        except (NartoolError, OSError) as e:
            raise _ConnectFailed(str(e)) from None
        log_.info("building '%s' on '%s'...", drv_path, machine.uri)
        try:
            if isinstance(drv, Derivation):
                inputs = _input_paths(store, drv)
                basic = BasicDerivation.from_derivation(drv, inputs, store.store_dir)
            else:
                basic, inputs = drv, closure(store, drv.input_srcs)
            _upload(store, remote, machine, inputs)
            req = BuildDerivationRequest(drv_path, basic, build_settings(options))
            result: BuildResult = remote.build_derivation(req)
            if result.status not in (BuildStatus.BUILT, BuildStatus.ALREADY_VALID, BuildStatus.SUBSTITUTED,
                                     BuildStatus.RESOLVES_TO_ALREADY_VALID):
                return failed(_ANSI.sub("", result.error_msg), result.status, result)
            outs = [o[1] for o in basic.outputs if o[1]]
            missing = [p for p in outs if not store.is_valid(p)]
            if missing:
                copy_paths(remote, store, missing, direction="from")
            return result
        except (NartoolError, OSError) as e:
            # the inputs could not be prepared, the machine refused an upload, died, spoke
            # nonsense or its outputs did not come back intact: this build failed there
            return failed(str(e))
    finally:
        remote.close()  # the remote's last log lines are passed on before this returns
        sink.finish()


def _upload(store: Any, remote: Any, machine: Machine, inputs: Sequence[str]) -> None:
    """Copy ``inputs`` (a closure) to the machine, one upload per machine at a time (as Nix's
    upload lock), while the local store keeps them."""
    state_dir = getattr(store, "state_dir", None)
    fd = -1
    if state_dir:
        d = os.path.join(state_dir, "current-load")
        os.makedirs(d, exist_ok=True)
        fd = os.open(os.path.join(d, f"{machine.slot_name}.upload-lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        copy_paths(store, remote, inputs, direction="to")
    finally:
        if fd >= 0:
            os.close(fd)


__all__ = ["Machine", "parse_machines", "parse_machine_line", "expand_lines", "select_machine", "SlotLock",
           "try_remote_build", "build_settings", "open_machine_store", "required_features", "this_system"]
