"""``nartool serve --write`` as a build machine: the serve protocol's ``BuildPaths`` (6) and
``BuildDerivation`` (8), on top of :mod:`nartool.build`.

Behaviour follows ``nix-store --serve --write`` (Nix 2.8, with the 2.13+ refusal of repeated
builds):

* The build settings sent by the client (``maxSilentTime``, ``buildTimeout``, ``maxLogSize``,
  ``keepFailed``) replace the machine's ``max-silent-time``, ``timeout``,
  ``max-build-log-size`` and ``keep-failed`` for the build, as Nix's server sets them. A
  non-zero ``buildRepeat`` is refused: ``client requested repeating builds, but this is not
  currently implemented``. The build log is not stored on the machine (``keep-build-log =
  false``) and the machine never forwards the build to builders of its own (``builders`` empty).
* The build log goes to stderr as the builder writes it: whole lines, escape sequences
  filtered (stderr is not a terminal for the client), each line ending with a newline.
* ``BuildDerivation``'s reply is a ``BuildResult``: status, error message (Nix's wording and
  colours), then for client minor ≥ 3 ``timesBuilt``/``isNonDeterministic``/start and stop
  time, and for client minor ≥ 6 the built outputs as Nix's realisations: id
  ``sha256:<hash>!<output>`` where the hash is that of the derivation *as received* (no input
  derivations) with its output paths masked — or, for a fixed-output derivation,
  ``sha256("fixed:out:<algo>:<hex>:<path>")`` — and a compact JSON object with sorted keys whose
  ``outPath`` is the output's base name.
* ``BuildPaths`` replies ``0``, or Nix's exit status (100 build failure, 101 timeout, 102 hash
  mismatch, 104 check mismatch, 1 anything else) and the error text with its ``error: ``
  prefix, in colour as Nix sends it.
* The inputs uploaded in the session and the outputs of every build stay temp roots of the
  session (the garbage collector keeps them until the session ends).
* A client that hangs up during a build interrupts it: the session's input is watched for
  hang-up while the build runs (as Nix's ``MonitorFdHup``), and the build is killed.

Access (Nix's daemon rules as the model, ``docs/remote-builds.md``): building needs
``--write`` and a user that ``allowed-users`` admits (checked at the start of every session).
``BuildDerivation`` of an input-addressed derivation — which lets the client choose any output
path, so it amounts to full control of the store — needs a user in ``trusted-users``, as the
Nix daemon requires (``you are not privileged to build input-addressed derivations``).
A fixed-output derivation from an untrusted user must carry the output path its hash and name
give. ``BuildPaths`` builds derivations already in the store, whose outputs follow from the
``.drv`` itself, and is open to every allowed user. The uploads a build needs follow the import rules of
:mod:`nartool.remote.serve` (unsigned paths only from trusted users or with ``require-sigs =
false``).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import NartoolError
from ..store.derivation import (
    FIXED,
    INPUT_ADDRESSED,
    BasicDerivation,
    Derivation,
    DerivationOutput,
    drv_name_from_path,
    hash_derivation_modulo,
)
from . import messages as M
from . import wire as W

if TYPE_CHECKING:
    from ..store.local import LocalStore
    from .serve import _Server

#: the first words of every error line, coloured as Nix prints it
ERROR_PREFIX = "\x1b[31;1merror:\x1b[0m "
REPEAT_REFUSED = "client requested repeating builds, but this is not currently implemented"
_SUCCESS = (M.BuildStatus.BUILT, M.BuildStatus.SUBSTITUTED, M.BuildStatus.ALREADY_VALID,
            M.BuildStatus.RESOLVES_TO_ALREADY_VALID)


# -- hang-up ----------------------------------------------------------------------------------


class HangupMonitor:
    """Watches ``fd`` (the session's input) while a build runs; when the client hangs up it calls
    ``on_hangup`` (which cancels the build: the build layer kills its builder), or, without one,
    interrupts the main thread with KeyboardInterrupt when the session is served from it."""

    def __init__(self, fd: int | None, on_hangup: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.fired = False
        self.on_hangup = on_hangup
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interrupt = threading.current_thread() is threading.main_thread()
        self._wake_r = self._wake_w = -1

    def _watch(self) -> None:
        assert self.fd is not None
        p = select.poll()
        p.register(self.fd, select.POLLHUP | getattr(select, "POLLRDHUP", 0))
        p.register(self._wake_r, select.POLLIN)  # __exit__ wakes the poll at once
        while not self._stop.is_set():
            try:
                events = p.poll()
            except OSError:
                return
            if self._stop.is_set():
                return
            if any(fd == self.fd and ev & (select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0))
                   for fd, ev in events):
                if self._stop.is_set():
                    return
                self.fired = True
                if self.on_hangup is not None:
                    self.on_hangup()
                elif self._interrupt:
                    # a real SIGINT (not just the flag interrupt_main sets): it also breaks the
                    # main thread out of a blocking wait
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                return

    def __enter__(self) -> HangupMonitor:
        if self.fd is not None:
            self._wake_r, self._wake_w = os.pipe()
            self._thread = threading.Thread(target=self._watch, daemon=True, name="nartool-serve-hangup")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


# -- helpers ----------------------------------------------------------------------------------


def exit_status(results: Iterable[M.BuildResult]) -> int:
    """Nix's exit status for failed builds (``Worker::exitStatus``): 0x60 plus bit 0 timeout,
    bit 1 hash mismatch, bit 2 build failure, bit 3 check mismatch; 1 for any other failure."""
    mask = 0
    timed_out = hash_mismatch = build_failure = check_mismatch = False
    for r in results:
        st = r.status
        if st in _SUCCESS:
            continue
        if st == M.BuildStatus.TIMED_OUT:
            timed_out = build_failure = True
        elif st == M.BuildStatus.OUTPUT_REJECTED and "hash mismatch" in r.error_msg:
            hash_mismatch = build_failure = True
        elif st == M.BuildStatus.NOT_DETERMINISTIC:
            check_mismatch = True
        elif st in (M.BuildStatus.PERMANENT_FAILURE, M.BuildStatus.LOG_LIMIT_EXCEEDED,
                    M.BuildStatus.OUTPUT_REJECTED, M.BuildStatus.DEPENDENCY_FAILED):
            build_failure = True
        else:
            return 1
    if timed_out:
        mask |= 1
    if hash_mismatch:
        mask |= 2
    if build_failure:
        mask |= 4
    if check_mismatch:
        mask |= 8
    return 0x60 | mask if mask else 1


def basic_as_derivation(drv_path: str, basic: BasicDerivation) -> Derivation:
    """The received derivation as a :class:`Derivation` without input derivations (its ATerm
    is what the remote-build realisation ids hash)."""
    return Derivation(outputs={n: DerivationOutput(p, a, h) for n, p, a, h in basic.outputs}, input_drvs={},
                      input_srcs=list(basic.input_srcs), platform=basic.platform, builder=basic.builder,
                      args=list(basic.args), env=dict(basic.env), name=drv_name_from_path(drv_path))


def _no_inputs(_p: str) -> Derivation:
    raise NartoolError("a received derivation has no input derivations", rule="bug")


def realisations(drv_path: str, basic: BasicDerivation, store_dir: str,
                 paths: dict[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """The ``builtOutputs`` of a build of ``basic``: (id, realisation JSON) per output whose
    path is known (``paths`` adds the paths of outputs only known after the build)."""
    drv = basic_as_derivation(drv_path, basic)
    hashes = hash_derivation_modulo(drv, _no_inputs, store_dir=store_dir).hashes
    out = []
    for name, path, _algo, _h in basic.outputs:
        p = path or (paths or {}).get(name, "")
        if not p:
            continue
        oid = f"sha256:{hashes[name].base16}!{name}"
        obj = {"dependentRealisations": {}, "id": oid, "outPath": p.rsplit("/", 1)[-1], "signatures": []}
        out.append((oid, json.dumps(obj, sort_keys=True, separators=(",", ":"))))
    return tuple(sorted(out))


def _m(s: str) -> str:
    return f"\x1b[35;1m{s}\x1b[0m"


#: Nix's build failure messages and which of their parts it colours
_COLOURED: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"builder for '(.+)' failed with exit code (\d+)"),
     lambda m: f"builder for '{_m(m[1])}' failed with exit code {m[2]}"),
    (re.compile(r"builder for '(.+)' (failed due to signal .*)"), lambda m: f"builder for '{_m(m[1])}' {m[2]}"),
    (re.compile(r"(.+) timed out after (\d+) seconds of silence"),
     lambda m: f"{_m(m[1])} timed out after {_m(m[2])} seconds of silence"),
    (re.compile(r"(.+) timed out after (\d+) seconds"), lambda m: f"{_m(m[1])} timed out after {_m(m[2])} seconds"),
    (re.compile(r"(.+) killed after writing more than (\d+) bytes of log output"),
     lambda m: f"{_m(m[1])} killed after writing more than {_m(m[2])} bytes of log output"),
)


def nix_colours(message: str) -> str:
    """A build error message with Nix's colours (as its ``BuildResult.errorMsg`` carries them:
    a reset first, the quoted values in bold magenta). Already coloured text is kept."""
    if not message or "\x1b" in message:
        return message
    for pat, fmt in _COLOURED:
        m = pat.fullmatch(message)
        if m:
            return "\x1b[0m" + fmt(m)
    return "\x1b[0m" + message


def nix_error_text(message: str) -> str:
    """``message`` as Nix sends it in ``BuildPaths``' reply: coloured ``error:`` prefix."""
    return ERROR_PREFIX + message


def _log_writer(server: _Server) -> Callable[[bytes], None]:
    buf = getattr(server.log, "buffer", None)

    def write(line: bytes) -> None:
        if not line.endswith(b"\n"):
            line += b"\n"
        try:
            if buf is not None:
                buf.write(line)
                buf.flush()
            else:
                server.log.write(line.decode("utf-8", "replace"))
                server.log.flush()
        except (OSError, ValueError):
            pass

    return write


def _options(server: _Server, settings: M.BuildSettings) -> Any:
    from ..build import BuildOptions
    from ..config import Config

    overrides = dict(server.build_overrides)
    overrides.update({
        "max-silent-time": str(settings.max_silent_time),
        "timeout": str(settings.build_timeout),
        "max-build-log-size": str(settings.max_log_size),
        "keep-build-log": "false",
        "builders": "",
    })
    config = server.config if server.config is not None else Config()
    return BuildOptions.from_config(config, overrides)


def _read_settings(server: _Server) -> M.BuildSettings:
    from .serve import ServeExit

    settings = M.BuildSettings.read(server.src, server.minor)
    if settings.build_repeat > 0:
        raise ServeExit(REPEAT_REFUSED)
    return settings


HANGUP_MESSAGE = "the client closed the connection during the build; the build was killed"


@contextmanager
def _watched(server: _Server, on_hangup: Callable[[], None] | None = None) -> Iterator[HangupMonitor]:
    from ..build.goal import Cancelled
    from .serve import ServeExit

    mon = HangupMonitor(server.in_fd, on_hangup)
    try:
        with mon:
            yield mon
    except (KeyboardInterrupt, Cancelled):
        if mon.fired:
            raise ServeExit(HANGUP_MESSAGE) from None
        raise


def _local_store(server: _Server) -> LocalStore:
    from ..store.local import LocalStore
    from .serve import ServeExit

    if not isinstance(server.store, LocalStore):
        raise ServeExit(f"cannot build in '{server.store.uri}': only a local store can build")
    return server.store


# -- the commands -----------------------------------------------------------------------------


def build_derivation(server: _Server) -> None:
    """``BuildDerivation`` (8): ``str drvPath``, the BasicDerivation, the build settings."""
    from .serve import ServeExit

    req = M.BuildDerivationRequest.read(server.src, server.store_dir, server.minor)
    if req.settings.build_repeat > 0:
        raise ServeExit(REPEAT_REFUSED)
    store, sd = _local_store(server), server.store_dir
    basic = req.drv
    drv = basic_as_derivation(req.drv_path, basic)
    try:
        kind = drv.type()
        for name, path, _a, _h in basic.outputs:
            if path:
                W.check_store_path(path, sd, f"output '{name}'")
        for p in basic.input_srcs:
            W.check_store_path(p, sd, "inputSrcs")
    except NartoolError as e:
        raise ServeExit(f"invalid derivation '{req.drv_path}': {e}") from None
    if not server.policy.trusted:
        if kind == INPUT_ADDRESSED:
            raise ServeExit(f"you are not privileged to build input-addressed derivations (user "
                            f"'{server.policy.user}' is not in 'trusted-users' on this machine)")
        if kind == FIXED:
            # the output path must be the one its hash and name give, or an untrusted user could
            # put content of their choosing at any path
            for name, path, _a, _h in basic.outputs:
                want = drv.output_path(name, sd)
                if path != want:
                    raise ServeExit(f"fixed-output derivation '{req.drv_path}' has output '{name}' at '{path}', "
                                    f"but its hash and name give '{want}'")
    missing = sorted(set(basic.input_srcs) - store.query_valid_paths(basic.input_srcs))
    if missing:
        result = M.BuildResult(M.BuildStatus.MISC_FAILURE, f"path '{missing[0]}' is not valid")
        M.write_build_result(server.w, result, server.minor)
        server.w.flush()
        return
    for p in basic.input_srcs:
        store.temp_root(p)
    outs = {name: path for name, path, _a, _h in basic.outputs if path}
    for p in outs.values():
        store.temp_root(p)
    options = _options(server, req.settings)
    from ..build import CancelToken
    from ..build import build_derivation as run_build
    from ..build.goal import DeferredCleanup

    # the chroot's removal overlaps with sending the result (the output locks are held until
    # it is done; the build's outputs are registered before the result is known)
    cleaner = DeferredCleanup()
    try:
        cancel = CancelToken()
        try:
            with _watched(server, cancel.set):
                # every output is wanted (Nix names the goal '<drv>!<outputs>' in its messages)
                result = run_build(store, req.drv_path, basic, options, log=_log_writer(server), full_derivation=False,
                                   cancel=cancel, wanted=sorted(o[0] for o in basic.outputs), cleaner=cleaner,
                                   realisations=True)
        finally:
            cancel.close()
        built = dict(outs)
        for oid, rjson in result.built_outputs:  # outputs whose paths were only known after the build
            try:
                name = oid.rsplit("!", 1)[1]
                built.setdefault(name, f"{sd}/{json.loads(rjson)['outPath']}")
            except (IndexError, KeyError, ValueError):
                continue
        for p in built.values():
            store.temp_root(p)
        if result.status == M.BuildStatus.ALREADY_VALID:
            # as Nix 2.8: nothing was built, no times; the outputs are still listed
            result = M.BuildResult(result.status, "", 0, False, 0, 0, realisations(req.drv_path, basic, sd, built))
        elif result.status in _SUCCESS:
            result = M.BuildResult(result.status, result.error_msg, result.times_built, result.is_non_deterministic,
                                   result.start_time, result.stop_time, realisations(req.drv_path, basic, sd, built))
        elif result.status == M.BuildStatus.TIMED_OUT:
            # as Nix 2.8 reports a timed-out build: not counted as built, a start time but no stop time
            result = M.BuildResult(result.status, nix_colours(result.error_msg), 0, False,
                                   result.start_time or result.stop_time, 0, ())
        else:
            result = M.BuildResult(result.status, nix_colours(result.error_msg), result.times_built,
                                   result.is_non_deterministic, result.start_time, result.stop_time, ())
        M.write_build_result(server.w, result, server.minor)
        server.w.flush()
    finally:
        cleaner.drain()


def _bogus_derivation(store: LocalStore, drv_paths: list[str]) -> str | None:
    """Why one of the derivations that building ``drv_paths`` involves may not be built: one
    whose output paths are not those its contents give (Nix never lets such a ``.drv`` into its
    store; without this check an uploaded one could place any content at any path)."""
    from ..store.derivation import DerivationError, check_outputs, store_resolver

    resolve = store_resolver(store)
    seen: set[str] = set()
    todo = list(drv_paths)
    while todo:
        p = todo.pop()
        if p in seen or not store.is_valid(p):
            continue  # (an invalid one is reported by the scheduler)
        seen.add(p)
        try:
            d = resolve(p)
            check_outputs(d, resolve, store.store_dir)
        except DerivationError as e:
            return f"derivation '{p}' cannot be built here: {e}"
        todo.extend(d.input_drvs)
    return None


def build_paths(server: _Server) -> None:
    """``BuildPaths`` (6): ``list<str>`` of ``PATH`` or ``DRV!OUT,…``, the build settings."""
    from .serve import ServeExit

    src, sd = server.src, server.store_dir
    at = src.offset
    targets = W.read_str_list(src, "paths", W.MAX_PATH_LEN)
    for t in targets:
        W.check_store_path(t.split("!", 1)[0], sd, "paths", at)
    settings = _read_settings(server)
    store = _local_store(server)
    plain = [t for t in targets if "!" not in t and not t.endswith(".drv")]
    invalid = [t for t in plain if not store.is_valid(t)]
    if invalid:
        # Nix would substitute a non-derivation path; with no substituters that fails
        msg = f"path '{invalid[0]}' is required, but there is no substituter that can build it"
        server.w.u64(1).str_(nix_error_text(msg)).flush()
        return
    drvs = [t for t in targets if "!" in t or t.endswith(".drv")]
    for t in drvs:
        store.temp_root(t.split("!", 1)[0])
    if not drvs:
        server.w.u64(0).flush()
        return
    bad = _bogus_derivation(store, [t.split("!", 1)[0] for t in drvs])
    if bad:
        server.w.u64(1).str_(nix_error_text(bad)).flush()
        return
    options = _options(server, settings)
    from ..build import build_paths as run_builds

    try:
        with _watched(server):
            results = run_builds(store, drvs, options, log=_log_writer(server))
    except ServeExit:
        raise
    except NartoolError as e:
        server.w.u64(1).str_(nix_error_text(str(e))).flush()
        return
    failed = [r for r in results if r.status not in _SUCCESS]
    if not failed:
        server.w.u64(0).flush()
        return
    if len(failed) == 1:
        msg = nix_colours(failed[0].error_msg)
    else:
        msg = "build of " + ", ".join(f"'{t}'" for t in drvs) + " failed"
    if not msg.startswith(ERROR_PREFIX):
        msg = nix_error_text(msg.removeprefix("\x1b[0m"))
    server.w.u64(exit_status(results)).str_(msg).flush()


__all__ = ["build_derivation", "build_paths", "exit_status", "realisations", "HangupMonitor", "basic_as_derivation",
           "REPEAT_REFUSED"]
