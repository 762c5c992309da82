"""Building derivations: one build (:func:`build_derivation`) and the scheduler over many
(:func:`build_paths`), as Nix 2.8's derivation goals and worker do (``docs/builds.md``).

One build: output locks (so that two processes build a derivation once), the platform and
``__noChroot`` checks, the build directory (``$TMPDIR/nix-build-<name>.drv-<n>``, 0700), the
environment (:mod:`.env`), the input closure plus ``sandbox-paths`` and their closures, a build
user, the sandbox (:mod:`.sandbox`), the log loop (raw log, lines, ``max-silent-time``,
``timeout``, ``max-build-log-size``), then the output checks and the registration
(:mod:`.outputs`). Nothing is registered unless every output passed every check.

The scheduler builds input derivations first, independent ones in parallel up to ``max-jobs``
(each in a worker thread; the builders themselves are separate processes), skips derivations
whose outputs are valid, and on Ctrl-C/SIGTERM (a ``KeyboardInterrupt`` in the calling thread)
kills every running build, removes its chroot and registers nothing of it. A finished build's
outputs are registered on a registration thread while its dependents start (:mod:`.registrar`;
``docs/builds.md``, "Registration off the critical path").
"""

from __future__ import annotations

import collections
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from .. import _json as json
from .._log import get_logger
from ..errors import BuildError, NartoolError, SandboxUnavailable, StoreError
from ..fs.osutil import remove_at
from ..store.buildresult import BuildResult, BuildStatus
from ..store.derivation import (
    FIXED,
    BasicDerivation,
    Derivation,
    DerivationOutput,
    drv_name_from_path,
    hash_derivation_modulo,
    read_derivation,
    store_resolver,
)
from ..store.local import LocalStore, PlacedOutputs
from ..store.locks import PathLock
from .env import get_bool_attr, get_strings_attr, make_environment, output_rewrites, rewrite_strings
from .jobs import JobThreads
from .logs import LineAssembler, RawLog, filter_escapes, log_path
from .options import BuildOptions, parse_sandbox_paths
from .outputs import HashMismatch, Output, OutputRejected, check_outputs, examine_outputs, register_outputs
from .registrar import InputRefused, Registrar, RegistrationJob, dependency_failure

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any

log = get_logger(__name__)

LogFn = Callable[[bytes], None]
NoticeFn = Callable[[str], None]

#: statuses that mean success
SUCCESS = (BuildStatus.BUILT, BuildStatus.SUBSTITUTED, BuildStatus.ALREADY_VALID,
           BuildStatus.RESOLVES_TO_ALREADY_VALID)
_READ_SIZE = 4096  # Nix reads the log in chunks of this size (the log limit is checked per chunk)


class Cancelled(BaseException):
    """The build was interrupted (Ctrl-C, SIGTERM, a hung-up client)."""


class DeferredCleanup(JobThreads):
    """Finished builds' clean-up (unmounting and removing the chroot and the build directory,
    then releasing the build user and the output locks) on background threads, off the critical
    path: the scheduler starts the next build at once. Nothing in it decides a result: the
    outputs are registered (synced) or refused before it runs, the builder and every process of
    its build user are dead, and the output locks are held until the chroot is gone, so another
    process building the same derivation waits for it. :meth:`drain` waits for everything
    deferred so far; the scheduler calls it before it returns (also when interrupted), a build
    waiting for a free build user calls it before it polls again. A thread is added only when
    all are busy (see :mod:`.jobs`)."""

    def __init__(self) -> None:
        super().__init__("build clean-up", "clean-up after a build failed")

    def defer(self, fn: Callable[[], None]) -> None:
        self._put(fn)

    def _handle(self, job: object) -> None:
        assert callable(job)
        job()

    def drain(self, *, stop: bool = True) -> None:
        """Wait for every deferred clean-up; the threads then end."""
        super().drain(stop=stop)


class CancelToken:
    """Set from any thread; a running build notices at once (its log loop also waits on a pipe)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self.set_flag = False

    def set(self) -> None:
        self.set_flag = True
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    @property
    def fd(self) -> int:
        return self._r

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def basic_to_derivation(drv_path: str, basic: BasicDerivation) -> Derivation:
    return Derivation(outputs={n: DerivationOutput(p, a, h) for n, p, a, h in basic.outputs}, input_drvs={},
                      input_srcs=list(basic.input_srcs), platform=basic.platform, builder=basic.builder,
                      args=list(basic.args), env=dict(basic.env), name=drv_name_from_path(drv_path))


def _status_text(status: int) -> str:
    if os.WIFEXITED(status):
        return f"failed with exit code {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"failed due to signal {sig} ({signal.strsignal(sig) or 'unknown'})"
    return "died abnormally"


def _make_build_dir(name: str) -> str:
    """``$TMPDIR/nix-build-<drv base name without hash>-<n>`` (the first free ``n`` from 0)."""
    top = os.environ.get("TMPDIR") or "/tmp"
    n = 0
    while True:
        p = os.path.join(top, f"nix-build-{name}-{n}")
        try:
            os.mkdir(p, 0o700)
            return p
        except FileExistsError:
            n += 1


def _remove_tree(path: str) -> None:
    try:
        remove_at(None, os.fsencode(path))
    except OSError as e:
        log.warning("cannot remove '%s': %s", path, e.strerror)


#: hashes modulo of input derivations, by .drv path (a .drv never changes), shared by all builds
_HASH_CACHE: dict[str, Any] = {}
_HASH_CACHE_LOCK = threading.Lock()


def _realisations(store: LocalStore, drv_path: str, drv: Derivation, paths: dict[str, str],
                  full: bool) -> tuple[tuple[str, str], ...]:
    try:
        resolve = store_resolver(store) if full else (lambda p: read_derivation(store, p))
        with _HASH_CACHE_LOCK:
            if len(_HASH_CACHE) > 100_000:
                _HASH_CACHE.clear()
            cache = dict(_HASH_CACHE)
        hashes = hash_derivation_modulo(drv, resolve, store_dir=store.store_dir, cache=cache).hashes
        with _HASH_CACHE_LOCK:
            _HASH_CACHE.update(cache)
    except NartoolError:
        return ()
    out = []
    for name, p in sorted(paths.items()):
        oid = f"sha256:{hashes[name].base16}!{name}"
        obj = {"dependentRealisations": {}, "id": oid, "outPath": p.rsplit("/", 1)[-1], "signatures": []}
        out.append((oid, json.dumps(obj, sort_keys=True, separators=(",", ":"))))
    return tuple(out)


def _path_info_json(store: LocalStore) -> Callable[[Iterable[str]], list[dict[str, Any]]]:
    def f(paths: Iterable[str]) -> list[dict[str, Any]]:
        out = []
        for p in sorted(paths):
            info = store.path_info(p)
            closure = store.closure([p])
            obj: dict[str, Any] = {"closureSize": sum(store.path_info(q).nar_size for q in closure),
                                   "narHash": info.nar_hash.prefixed("nix32"), "narSize": info.nar_size,
                                   "path": p, "references": sorted(info.references)}
            if info.ca:
                obj["ca"] = info.ca
            out.append(obj)
        return out
    return f


# The private classes below are plain classes, not dataclasses: each dataclass costs start-up
# time (its methods are generated and compiled at import, ~0.5 ms apiece).


class _Failure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def _checks_requisites(drv: Derivation) -> bool:
    """Whether checking the outputs reads closures from the store (``*Requisites`` or, with
    structured attributes, ``outputChecks``)."""
    return any(k in drv.env for k in ("allowedRequisites", "disallowedRequisites", "__json"))


def _fail(status: int, message: str) -> _Failure:
    return _Failure(status, message)


class _Build:
    def __init__(self, store: LocalStore, drv_path: str, drv: Derivation, options: BuildOptions,
                 log_fn: LogFn | None, notice: NoticeFn | None, full: bool, keep_colours: bool,
                 cancel: CancelToken | None, wanted: list[str] | None = None, *,
                 cleaner: DeferredCleanup | None = None, realisations: bool = False,
                 registrar: Registrar | None = None, key: object = None,
                 known: Mapping[str, Derivation] | None = None) -> None:
        self.store = store
        self.drv_path = drv_path
        self.drv = drv
        self.options = options
        self.log_fn = log_fn
        self.notice = notice
        self.full = full
        self.keep_colours = keep_colours
        self.cancel = cancel
        self.wanted = wanted
        self.locks: list[PathLock] = []
        self.build_dir: str | None = None
        self.builder: Any = None
        self.build_user: Any = None
        self.raw: RawLog | None = None
        self.cleaner = cleaner
        self.realisations = realisations
        #: with a registrar, the build's outputs are placed in the store by :meth:`_run` and
        #: registered by the registrar (see nartool/build/registrar.py); ``key`` is the
        #: scheduler's handle for the result
        self.registrar = registrar
        self.key = key
        #: derivations already read (the scheduler's), by path
        self.known = known or {}
        #: set when :meth:`prefetch` has finished (or was never called); the scheduler's hook
        #: called once the builder is on its way (it prefetches the next build meanwhile)
        self.prefetched = threading.Event()
        self.prefetched.set()
        self.on_started: Callable[[], None] | None = None
        #: the chroot's skeleton made ahead: (its path, whether a user namespace was expected)
        self.skeleton: tuple[str, bool | None] | None = None
        self.placed: tuple[PlacedOutputs, dict[str, str]] | None = None
        self.handed_over = False
        #: the pending (placed, unregistered) paths among the build's inputs, and the input
        #: derivations with the output paths used
        self.pending_inputs: set[str] = set()
        self.input_outputs: dict[str, set[str]] = {}

    @property
    def name(self) -> str:
        outs = ",".join(sorted(self.wanted)) if self.wanted else "*"
        what = "from .drv file" if self.full else "from in-memory derivation"
        return f"building of '{self.drv_path}!{outs}' {what}"

    def run(self) -> BuildResult:
        """The build's result; with a registrar, when :attr:`handed_over` is set afterwards, the
        result the registration will give if it succeeds (the registrar reports the final one)."""
        start = int(time.time())
        settled = False
        res: BuildResult | None = None
        try:
            res = self._run(start)
            settled = True
            return res
        except _Failure as f:
            settled = True
            return self._failed(BuildResult(
                f.status, f.message, 0 if f.status in (BuildStatus.MISC_FAILURE, BuildStatus.DEPENDENCY_FAILED) else 1,
                False, start, int(time.time())))
        except BuildError as e:  # e.g. malformed structured attributes: the build cannot start
            settled = True
            return self._failed(BuildResult(BuildStatus.MISC_FAILURE, e.message, 0, False, start, int(time.time())))
        finally:
            if self.raw is not None:
                self.raw.close()  # the log is complete when the result is known
                self.raw = None
            if self.placed is not None and settled and res is not None and self.registrar is not None:
                # the registrar decides; once it has, it hands on the clean-up (which releases
                # the output locks and the build user: held until then)
                placed, drv_outputs = self.placed
                self.placed = None
                self.registrar.submit(RegistrationJob(self.key, placed, self.drv_path if self.full else None,
                                                      drv_outputs, res, self.pending_inputs, self.input_outputs,
                                                      self._cleanup, name=self.drv_path))
                self.handed_over = True
            else:
                if self.placed is not None:  # (interrupted after placing them)
                    self.store.discard_build_outputs(self.placed[0])
                    self.placed = None
                builder_done = self.builder is None or self.builder.poll() is not None
                if (settled and builder_done and self.cleaner is not None
                        and (self.builder is not None or self.build_dir is not None)):
                    self.cleaner.defer(self._cleanup)
                else:
                    self._cleanup()

    def _failed(self, r: BuildResult) -> BuildResult:
        """A failure as reported: a dependency failure when an input's registration was refused
        meanwhile (e.g. its output was removed while this build's chroot was made)."""
        reg = self.registrar
        if reg is not None and (reg.failed_inputs(self.input_outputs) or reg.refused_among(self.pending_inputs)):
            return reg.dependency_failed(self.drv_path, self.input_outputs, r.start_time, r.stop_time)
        return r

    def _cleanup(self) -> None:
        if self.raw is not None:
            self.raw.close()
            self.raw = None
        if self.builder is not None:
            try:
                self.builder.cleanup()
            except OSError as e:
                log.warning("cannot clean up the build of '%s': %s", self.drv_path, e)
            self.builder = None
        if self.build_dir is not None:
            _remove_tree(self.build_dir)
            self.build_dir = None
        if self.skeleton is not None:  # (made ahead, never used)
            from .sandbox import _remove_chroot

            _remove_chroot(self.skeleton[0])
            self.skeleton = None
        if self.build_user is not None:
            self.build_user.release()
            self.build_user = None
        for lk in self.locks:
            lk.release()
        self.locks = []

    def _lock_outputs(self, outputs: dict[str, str]) -> bool:
        """Lock every output path (unless :meth:`prefetch` did); True when all of them are
        valid already (nothing to build)."""
        if not self.locks:
            self._take_locks(outputs, wait=True)
        return all(self.store.is_valid(p) for p in outputs.values())

    def _take_locks(self, outputs: dict[str, str], *, wait: bool) -> bool:
        """Make the outputs temporary roots and lock them. Without ``wait``, a lock held
        elsewhere makes it give back the ones taken and return False."""
        paths = sorted(outputs.values())
        for p in paths:
            self.store.temp_root(p)
        lock_paths = [self.store.physical(p) for p in paths]
        for lp in lock_paths:
            lk = PathLock(lp, acquire=False)
            self.locks.append(lk)
            try:
                lk.acquire(wait=False)
            except StoreError:
                if not wait:
                    self.locks.pop()
                    for held in self.locks:
                        held.release()
                    self.locks = []
                    return False
                if self.notice is not None:
                    self.notice("waiting for lock on " + ", ".join(f"'{x}'" for x in lock_paths))  # (real paths, as Nix)
                self._wait_lock(lk)
        return True

    def prefetch(self) -> None:
        """What a build can do before its inputs exist, done ahead (by the scheduler, while an
        input is being built): lock the outputs, take a build user, make the build directory;
        each only if it can be had at once. It never waits and never prints; what it did,
        :meth:`_run` skips, and :meth:`_cleanup` undoes (also when the build never runs)."""
        try:
            kind, outputs = self._checked_outputs()
            if not self._take_locks(outputs, wait=False):
                return
            group = self.options.build_users_group or ""
            if os.geteuid() == 0 and group:
                from .users import acquire_build_user

                try:
                    self.build_user = acquire_build_user(group)
                except BuildError:
                    return  # (the build reports it)
                if self.build_user is None:
                    return
            self._make_own_build_dir()
            # the chroot's skeleton, when the build will be sandboxed (without a pre-build hook,
            # which must see the skeleton made in its own time)
            fixed = kind == FIXED
            if sys.platform == "linux" and self._sandboxed(fixed) and not (self.options.pre_build_hook and self.full):
                from . import sandbox as sbx

                chroot = self._chroot_dir()
                userns = sbx._userns_enabled()
                self.skeleton = (chroot, None)  # (a half-made one is removed too)
                sbx.make_skeleton(chroot, self.store.store_dir, self.build_user, fixed, userns)
                self.skeleton = (chroot, userns)
        except (_Failure, NartoolError, OSError):
            pass  # (the build does it again, and reports what fails)
        finally:
            self.prefetched.set()

    def _wait_lock(self, lk: PathLock) -> None:
        while True:
            if self.cancel is not None and self.cancel.set_flag:
                raise Cancelled()
            try:
                lk.acquire(wait=False)
                return
            except StoreError:
                time.sleep(0.05)

    def _checked_outputs(self) -> tuple[str, dict[str, str]]:
        """The derivation's kind and output paths, after checking its own path and theirs."""
        store, drv, sd = self.store, self.drv, self.store.store_dir
        try:
            kind = drv.type()
        except NartoolError as e:
            raise _fail(BuildStatus.MISC_FAILURE, str(e)) from None
        try:
            if store.parse_path(self.drv_path).full(sd) != self.drv_path or not self.drv_path.endswith(".drv"):
                raise BuildError("not a derivation's store path", path=self.drv_path, rule="bad-drv-path")
        except NartoolError as e:
            raise _fail(BuildStatus.MISC_FAILURE, str(e)) from None
        try:
            outputs = drv.output_paths(sd)
            for p in outputs.values():  # (never let a crafted path lead outside the store)
                if store.parse_path(p).full(sd) != p:
                    raise BuildError("not a canonical store path", path=p, rule="bad-output-path")
        except NartoolError as e:
            raise _fail(BuildStatus.MISC_FAILURE, f"derivation '{self.drv_path}' has an invalid output path: "
                        f"{e}") from None
        if set(outputs) != set(drv.outputs):
            raise _fail(BuildStatus.MISC_FAILURE, f"derivation '{self.drv_path}' has outputs whose paths are not "
                        "known before the build (content-addressed derivations are not supported)")
        return kind, outputs

    def _sandboxed(self, fixed: bool) -> bool:
        """Whether the build runs in the sandbox (``sandbox``, ``__noChroot``, a chroot store)."""
        opts = self.options
        try:
            no_chroot = get_bool_attr(self.drv, "__noChroot")
        except BuildError as e:
            raise _fail(BuildStatus.MISC_FAILURE, e.message) from None
        if opts.sandbox == "true":
            if no_chroot:
                raise _fail(BuildStatus.MISC_FAILURE, f"derivation '{self.drv_path}' has '__noChroot' set, but "
                            "that's not allowed when 'sandbox' is 'true'")
            sandboxed = True
        elif opts.sandbox == "false":
            sandboxed = False
        else:
            sandboxed = not fixed and not no_chroot
        return sandboxed or self.store.real_store_dir != self.store.store_dir

    def _chroot_dir(self) -> str:
        return self.store.real_store_dir + "/" + self.drv_path.rsplit("/", 1)[-1] + ".chroot"

    def _make_own_build_dir(self) -> None:
        self.build_dir = _make_build_dir(self.drv_path.rsplit("/", 1)[-1][33:])
        if self.build_user is not None:
            os.chown(self.build_dir, self.build_user.uid, self.build_user.gid)

    def _run(self, start: int) -> BuildResult:
        store, drv, opts = self.store, self.drv, self.options
        sd = store.store_dir
        kind, outputs = self._checked_outputs()
        if self._lock_outputs(outputs):
            return BuildResult(BuildStatus.ALREADY_VALID, "", 0, False, start, int(time.time()),
                               _realisations(store, self.drv_path, drv, outputs, self.full) if self.realisations else ())
        if sys.platform == "linux":
            from . import zygote
            zygote.prestart()  # its start-up overlaps with the preparations below
        fixed = kind == FIXED
        # platform
        required = sorted(set(get_strings_attr(drv, "requiredSystemFeatures") or []))
        features = set(opts.system_features)
        platforms = {opts.system, "builtin"} | ({"i686-linux"} if opts.system == "x86_64-linux" else set())
        if drv.platform not in platforms or not set(required) <= features:
            raise _fail(BuildStatus.MISC_FAILURE,
                        f"a '{drv.platform}' with features {{{', '.join(required)}}} is required to build "
                        f"'{self.drv_path}', but I am a '{opts.system}' with features "
                        f"{{{', '.join(sorted(features))}}}")
        if drv.builder.startswith("builtin:"):
            raise _fail(BuildStatus.MISC_FAILURE, f"builder '{drv.builder}' (a builtin of Nix) is not supported "
                        "by nartool")
        sandboxed = self._sandboxed(fixed)
        diverted = store.real_store_dir != sd
        valid_outs = {n for n, p in outputs.items() if store.is_valid(p)}
        if valid_outs and not sandboxed:
            raise _fail(BuildStatus.MISC_FAILURE, f"cannot rebuild '{self.drv_path}' without the sandbox while "
                        f"some of its outputs are valid ({', '.join(sorted(valid_outs))})")
        # inputs
        try:
            input_paths = self._input_closure()
        except NartoolError as e:
            raise _fail(BuildStatus.MISC_FAILURE, str(e)) from None
        for p in input_paths:
            store.temp_root(p)
        if self.notice is not None:
            self.notice(f"building '{self.drv_path}'...")
        # build user, build dir, environment
        from .users import acquire_build_user

        group = opts.build_users_group or ""
        if self.build_user is None and os.geteuid() == 0 and group:
            try:
                while True:
                    self.build_user = acquire_build_user(group)
                    if self.build_user is not None:
                        break
                    if self.registrar is not None and self.registrar.pending():
                        self.registrar.drain()  # builds waiting for their registration hold users
                        continue
                    if self.cleaner is not None and self.cleaner.pending():
                        self.cleaner.drain()  # a finished build still holds one: it is freed soon
                        continue
                    if self.notice is not None:
                        self.notice(f"waiting for UID to build '{self.drv_path}'")
                    for _ in range(20):
                        if self.cancel is not None and self.cancel.set_flag:
                            raise Cancelled()
                        time.sleep(0.05)
            except BuildError as e:
                raise _fail(BuildStatus.MISC_FAILURE, e.message) from None
        if self.build_dir is None:
            self._make_own_build_dir()
        assert self.build_dir is not None
        build_dir = self.build_dir

        def registered(f: Callable[..., Any]) -> Callable[..., Any]:
            # what reads the database's view of the inputs (exportReferencesGraph) waits for
            # pending inputs to be registered
            def g(*args: Any) -> Any:
                if self.registrar is not None and self.pending_inputs:
                    self.registrar.drain()
                return f(*args)
            return g

        def environment(top: str) -> Any:
            try:
                return make_environment(
                    drv, store_dir=sd, build_top=top, host_build_top=build_dir, cores=opts.cores,
                    fixed_output=fixed, input_paths=input_paths, outputs=outputs,
                    closure=registered(store.query_closure_paths), references=registered(store.query_references),
                    derivation_outputs=registered(lambda p: store.query_derivation_outputs(p).values()),
                    path_info_json=registered(_path_info_json(store)))
            except NartoolError as e:
                raise _fail(BuildStatus.MISC_FAILURE, e.message) from None

        benv = environment(opts.sandbox_build_dir if sandboxed else self.build_dir)
        for fn, data in benv.files.items():
            p = os.path.join(self.build_dir, fn)
            with open(p, "wb") as f:
                f.write(data)
            if self.build_user is not None:
                os.chown(p, self.build_user.uid, self.build_user.gid)
        # sandbox paths (and their closures)
        from . import sandbox as sbx

        binds: list[sbx.Bind] = []
        extra_inputs: set[str] = set()
        for sp in parse_sandbox_paths(opts.sandbox_paths).values():
            src = sp.source
            if src.startswith(sd + "/"):
                top_path = sd + "/" + src[len(sd) + 1:].split("/", 1)[0]
                if self.registrar is not None and self.registrar.info(top_path) is not None:
                    self.registrar.drain()
                if store.is_valid(top_path):
                    extra_inputs |= store.query_closure_paths([top_path])
                if src == top_path and sp.target == src:
                    continue  # shown as an input path
                src = store.real_store_dir + src[len(sd):]
            binds.append(sbx.Bind(sp.target, src, sp.optional))
        if sandboxed:
            # __impureHostDeps: host paths under allowed-impure-host-deps, optional (as Nix)
            allowed = [os.path.normpath(a) for a in opts.allowed_impure_host_deps]
            for i in get_strings_attr(drv, "__impureHostDeps") or []:
                c = os.path.normpath(i) if i.startswith("/") else i
                if not any(c == a or c.startswith(a.rstrip("/") + "/") for a in allowed):
                    raise _fail(BuildStatus.MISC_FAILURE, f"derivation '{self.drv_path}' requested impure path "
                                f"'{i}', but it was not in allowed-impure-host-deps")
                binds.append(sbx.Bind(i, i, True))
        inputs = sorted((input_paths | extra_inputs) - set(outputs.values()))
        hook = self._hook if (opts.pre_build_hook and sandboxed and self.full) else None
        chroot_dir = self._chroot_dir()
        made = self.skeleton[1] if self.skeleton is not None and sandboxed and hook is None else None
        spec = sbx.SandboxSpec(
            builder=drv.builder.encode("utf-8", "surrogateescape"),
            args=[rewrite_strings(a, output_rewrites(outputs)).encode("utf-8", "surrogateescape") for a in drv.args],
            env=benv.env, store_dir=sd,
            real_store_dir=store.real_store_dir,
            chroot_dir=chroot_dir, skeleton_made=made,
            build_dir=self.build_dir, inputs=inputs, binds=binds, outputs=sorted(outputs.values()),
            host_network=fixed, build_user=self.build_user, sandbox_build_dir=opts.sandbox_build_dir,
            kvm="kvm" in opts.system_features and os.access("/dev/kvm", os.R_OK | os.W_OK),
            dev_shm_size=opts.sandbox_dev_shm_size, filter_syscalls=opts.filter_syscalls, pre_build_hook=hook)
        if not sandboxed:
            for p in outputs.values():
                remove_at(None, os.fsencode(store.physical(p)))  # an unregistered leftover: ours (locked)
            if self.build_user is not None:
                # as Nix's store does as root with a build group: root:<group> 1775, so that build
                # users can create their outputs but not touch each other's entries
                os.chown(store.real_store_dir, 0, self.build_user.gid)
                os.chmod(store.real_store_dir, 0o1775)
        # start
        if sandboxed:
            self.skeleton = None  # (the sandbox's from now on: it removes or remakes it)
        try:
            if sandboxed:
                try:
                    self.builder = sbx.start_sandboxed(spec, wait_exec=False)
                except SandboxUnavailable as e:
                    if not opts.sandbox_fallback or diverted or valid_outs:
                        raise _fail(BuildStatus.MISC_FAILURE, f"unable to start build process ({e.message})") from None
                    # as Nix: the same build without the sandbox, its directories the host's
                    sandboxed = False
                    for p in outputs.values():
                        remove_at(None, os.fsencode(store.physical(p)))
                    spec.env = environment(self.build_dir).env
                    self.builder = sbx.start_unsandboxed(spec, wait_exec=False)
            else:
                self.builder = sbx.start_unsandboxed(spec, wait_exec=False)
        except BuildError as e:
            raise _fail(BuildStatus.MISC_FAILURE, e.message) from None
        if self.on_started is not None:
            self.on_started()  # (the builder's sandbox is being set up meanwhile)
        if opts.keep_build_log:
            self.raw = RawLog(log_path(store.state_dir, self.drv_path, compressed=opts.compress_build_log),
                              compressed=opts.compress_build_log)
        status, failure = self._log_loop()
        setup = self.builder.setup_error()  # (the builder's start did not wait for its execve)
        if setup is not None:
            raise _fail(BuildStatus.MISC_FAILURE, setup.message)
        stop = int(time.time())
        if failure is not None:
            raise failure
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            st = BuildStatus.TRANSIENT_FAILURE if fixed else BuildStatus.PERMANENT_FAILURE
            raise _fail(st, f"builder for '{self.drv_path}' {_status_text(status)}")
        # outputs
        outs = [Output(n, p, self.builder.output_location(p)) for n, p in sorted(outputs.items())
                if n not in valid_outs]
        try:
            order = examine_outputs(store, self.drv_path, drv, outs, input_paths=input_paths,
                                    build_uid=self.build_user.uid if self.build_user is not None else None)
            if self.registrar is not None and self.pending_inputs and _checks_requisites(drv):
                self.registrar.drain()  # (the checks read the closures of the outputs' references)
            check_outputs(store, drv, order)
            if self.registrar is not None:
                self.placed = (store.place_build_outputs([(o.location, o.info) for o in order if o.info is not None]),
                               {o.name: o.path for o in order})
            else:
                register_outputs(store, self.drv_path if self.full else None, order)
        except HashMismatch as e:
            raise _Failure(BuildStatus.OUTPUT_REJECTED, e.message) from None
        except (OutputRejected, BuildError) as e:
            raise _fail(BuildStatus.OUTPUT_REJECTED, e.message) from None
        except NartoolError as e:
            raise _fail(BuildStatus.OUTPUT_REJECTED, str(e)) from None
        return BuildResult(BuildStatus.BUILT, "", 1, False, start, stop,
                           _realisations(store, self.drv_path, drv, outputs, self.full) if self.realisations else ())

    def _input_closure(self) -> set[str]:
        store, drv = self.store, self.drv
        roots = set(drv.input_srcs)
        reg = self.registrar
        for p, names in drv.input_drvs.items():
            outs = store.query_derivation_outputs(p)
            if not outs:  # (not registered yet, e.g. built just now)
                d = self.known.get(p) or read_derivation(store, p)
                outs = d.output_paths(store.store_dir)
            for n in names:
                if n not in outs:
                    raise BuildError(f"derivation '{p}' has no output '{n}'", path=p, rule="bad-input")
                roots.add(outs[n])
            self.input_outputs[p] = {outs[n] for n in names}
        if reg is not None and reg.failed_inputs(self.input_outputs):
            # (an input's registration was refused after this build was scheduled)
            raise _Failure(BuildStatus.DEPENDENCY_FAILED, "")  # (the message: see _failed)
        # (the registrar first: a path leaves it only once it is registered)
        missing = sorted(r for r in roots if (reg is None or reg.info(r) is None) and not store.is_valid(r))
        if missing:
            raise BuildError(f"path '{missing[0]}' is not valid", path=missing[0], rule="invalid-input")
        if reg is None:
            return store.query_closure_paths(roots)
        try:
            paths, self.pending_inputs = reg.closure(roots)
        except InputRefused as e:
            self.pending_inputs = {str(e.args[0])}
            raise _Failure(BuildStatus.DEPENDENCY_FAILED, "") from None  # (the message: see _failed)
        return paths

    def _hook(self, chroot_dir: str) -> list[Any]:
        import subprocess  # (here: a build's start-up does without it)

        from .sandbox import Bind

        hook = self.options.pre_build_hook or ""
        r = subprocess.run([hook, self.drv_path, chroot_dir], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           check=False)
        if r.returncode != 0:
            raise BuildError(f"program '{hook}' {_status_text(r.returncode << 8 if r.returncode >= 0 else -r.returncode)}",
                             rule="pre-build-hook")
        binds: list[Any] = []
        state = "begin"
        text = r.stdout.decode("utf-8", "surrogateescape")
        lines = text.split("\n")[:-1]  # only complete lines
        for line in lines:
            if state == "begin":
                if line in ("extra-sandbox-paths", "extra-chroot-dirs"):
                    state = "paths"
                else:
                    raise BuildError(f"unknown pre-build hook command '{line}'", rule="pre-build-hook")
            elif not line:
                state = "begin"
            else:
                target, eq, source = line.partition("=")
                binds.append(Bind(target, source if eq else target, False))
        return binds

    def _emit(self, line: bytes) -> None:
        if line.startswith(b"@nix "):
            try:
                obj = json.loads(line[5:])
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                if obj.get("action") == "msg" and isinstance(obj.get("msg"), str) and \
                        isinstance(obj.get("level"), int) and obj["level"] <= 3:
                    line = obj["msg"].encode("utf-8", "surrogateescape")
                else:
                    return
        if self.log_fn is not None:
            self.log_fn(filter_escapes(line, keep_colours=self.keep_colours) + b"\n")

    def _log_loop(self) -> tuple[int, _Failure | None]:
        """Read the builder's output until EOF, enforcing the limits; then its wait status."""
        b, opts = self.builder, self.options
        fd = b.log_fd
        assembler = LineAssembler(self._emit)
        started = last = time.monotonic()
        size = 0
        failure: _Failure | None = None
        poller = select.poll()  # (not select(): descriptors may be above FD_SETSIZE)
        poller.register(fd, select.POLLIN)
        if self.cancel is not None:
            poller.register(self.cancel.fd, select.POLLIN)
        try:
            while True:
                now = time.monotonic()
                deadlines = []
                if opts.max_silent_time:
                    deadlines.append(last + opts.max_silent_time)
                if opts.timeout:
                    deadlines.append(started + opts.timeout)
                wait = max(0.0, min(deadlines) - now) if deadlines else None
                ready = [f for f, _ in poller.poll(None if wait is None else int(wait * 1000) + 1)]
                if self.cancel is not None and self.cancel.fd in ready:
                    raise Cancelled()
                if fd in ready:
                    try:
                        data = os.read(fd, _READ_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError:  # EIO: every writer is gone
                        data = b""
                    if not data:
                        break
                    last = time.monotonic()
                    size += len(data)
                    if opts.max_build_log_size and size > opts.max_build_log_size:
                        b.kill()
                        failure = _fail(BuildStatus.LOG_LIMIT_EXCEEDED,
                                        f"{self.name} killed after writing more than {opts.max_build_log_size} "
                                        "bytes of log output")
                        break
                    assembler.feed(data)
                    if self.raw is not None:
                        self.raw.write(data)
                    continue
                now = time.monotonic()
                if opts.max_silent_time and now - last >= opts.max_silent_time:
                    b.kill()
                    failure = _fail(BuildStatus.TIMED_OUT, f"{self.name} timed out after {opts.max_silent_time} "
                                    "seconds of silence")
                    break
                if opts.timeout and now - started >= opts.timeout:
                    b.kill()
                    failure = _fail(BuildStatus.TIMED_OUT, f"{self.name} timed out after {opts.timeout} seconds")
                    break
        except BaseException:
            b.kill()
            raise
        assembler.finish()
        return b.wait(), failure


def build_derivation(store: LocalStore, drv_path: str, drv: Derivation | BasicDerivation, options: BuildOptions,
                     *, log: LogFn | None = None, full_derivation: bool = True, notice: NoticeFn | None = None,
                     keep_colours: bool = False, cancel: CancelToken | None = None,
                     wanted: list[str] | None = None, cleaner: DeferredCleanup | None = None,
                     realisations: bool = False) -> BuildResult:
    """Build one derivation whose inputs are valid (see the module docstring); never raises for a
    failed build (the result says why), only for internal errors and interruptions
    (``KeyboardInterrupt``/:class:`Cancelled`, after the build was killed and cleaned up). With
    ``cleaner``, a finished build's clean-up runs on its threads (the caller drains it). With
    ``realisations``, the result's ``built_outputs`` carries the outputs' realisations (as
    ``BuildDerivation`` replies to clients of protocol minor 6 and later); it is empty
    otherwise (computing them costs a hash of the derivation)."""
    d = basic_to_derivation(drv_path, drv) if isinstance(drv, BasicDerivation) else drv
    if not d.name:
        d.name = drv_name_from_path(drv_path)
    store.temp_root(drv_path)
    return _Build(store, drv_path, d, options, log, notice, full_derivation, keep_colours, cancel, wanted,
                  cleaner=cleaner, realisations=realisations).run()


# -- the scheduler --------------------------------------------------------------------------


class _Node:
    def __init__(self, drv_path: str, drv: Derivation, *, wanted: list[str] | None = None) -> None:
        self.drv_path = drv_path
        self.drv = drv
        self.deps: set[str] = set()
        self.wanted = wanted
        self.result: BuildResult | None = None


#: whether :func:`build_paths` registers finished builds on a :class:`Registrar` while the next
#: ones start (tests turn it off to compare with registering inline)
PIPELINE = True


def _goal_order(drv_path: str) -> tuple[str, str]:
    """Nix's order of goals: by derivation name, then path."""
    return drv_path.rsplit("/", 1)[-1][33:], drv_path


def _parse_target(t: str) -> tuple[str, list[str] | None]:
    p, bang, outs = t.partition("!")
    if not bang or outs == "*":
        return p, None
    return p, [o for o in outs.split(",") if o]


def build_paths(store: LocalStore, targets: list[str], options: BuildOptions, *, log: LogFn | None = None,
                notice: NoticeFn | None = None, keep_colours: bool = False,
                on_failure: Callable[[str, BuildResult], None] | None = None,
                all_results: dict[str, BuildResult] | None = None) -> list[BuildResult]:
    """Build ``targets`` (``DRV`` or ``DRV!OUT,…``) and their input derivations (see the module
    docstring); one :class:`BuildResult` per target. ``on_failure`` hears of each failed
    dependency as it fails (Nix prints those as they happen); ``all_results`` receives the result
    of every derivation involved (for :func:`exit_status`)."""
    nodes: dict[str, _Node] = {}
    todo: list[str] = []
    parsed = [_parse_target(t) for t in targets]
    for p, _ in parsed:
        if not p.endswith(".drv"):
            raise BuildError(f"'{p}' is not a derivation", path=p, rule="not-a-derivation")
    missing = [p for p, _ in parsed if not store.is_valid(p)]
    if missing:  # as Nix
        if notice is not None:
            notice("don't know how to build these paths:" + "".join(f"\n  {p}" for p in sorted(set(missing))))
        raise BuildError(f"cannot build missing derivation '{missing[0]}'", rule="missing-derivation")
    for p, wanted in parsed:
        drv = read_derivation(store, p)
        for o in wanted or []:
            if o not in drv.outputs:
                raise BuildError(f"derivation '{p}' does not have wanted outputs '{o}'", path=p, rule="no-such-output")
        if p not in nodes:
            nodes[p] = _Node(p, drv, wanted=wanted)
            todo.append(p)
        elif nodes[p].wanted is not None:
            nodes[p].wanted = None if wanted is None else sorted(set(nodes[p].wanted or []) | set(wanted))
    while todo:
        p = todo.pop()
        n = nodes[p]
        for dep in sorted(n.drv.input_drvs):
            # an input derivation whose wanted outputs are valid needs no build (nor its inputs)
            n.deps.add(dep)
            if dep not in nodes:
                if not store.is_valid(dep):
                    raise BuildError(f"path '{dep}' is not valid", path=dep, rule="invalid-input")
                nodes[dep] = _Node(dep, read_derivation(store, dep))
                todo.append(dep)
    # prune: nodes whose outputs are all valid are done (their inputs are not needed)
    def valid(n: _Node) -> bool:
        paths = n.drv.output_paths(store.store_dir)
        return bool(paths) and len(paths) == len(n.drv.outputs) and all(store.is_valid(x) for x in paths.values())

    # substitutes first, top-down as Nix: a derivation whose outputs a cache supplies is not
    # built, and its inputs are then neither fetched nor built
    subs = _substituters(store, options)
    needed: set[str] = set()
    stack = [p for p, _ in parsed]
    while stack:
        p = stack.pop()
        if p in needed:
            continue
        needed.add(p)
        if not valid(nodes[p]) and subs is not None:
            _substitute(store, options, subs, nodes[p], notice)
        if not valid(nodes[p]):
            stack.extend(nodes[p].deps)
    if subs is not None:  # the sources of what will be built
        srcs = {s for p in needed if not valid(nodes[p]) for s in nodes[p].drv.input_srcs if not store.is_valid(s)}
        if srcs:
            _fetch(store, options, subs, sorted(srcs), notice)
    for p in needed:
        store.temp_root(p)
    pending = {p for p in needed if not valid(nodes[p])}
    if notice is not None and pending:
        ps = sorted(pending)
        head = "this derivation will be built:" if len(ps) == 1 else f"these {len(ps)} derivations will be built:"
        notice(head + "".join(f"\n  {x}" for x in ps))
    for p in needed - pending:
        nodes[p].result = BuildResult(BuildStatus.ALREADY_VALID)
    cancel = CancelToken()
    cleaner = DeferredCleanup()
    # The scheduling step (:func:`advance`) runs in whichever thread changed the state: a worker
    # that finished a build (it then takes the next job itself, no thread switch between two
    # builds of a chain), the registration thread, or this thread at the start. This thread
    # waits for the end (or Ctrl-C) on ``settled``; idle workers wait for jobs on ``cond``.
    lock = threading.Lock()
    cond = threading.Condition(lock)
    settled = threading.Condition(lock)
    running: dict[str, _Node] = {}   # started, or queued for a worker thread
    #: built, waiting for the registrar: their dependents may start (see nartool/build/registrar.py)
    placed: set[str] = set()
    jobs: collections.deque[_Node] = collections.deque()
    idle = [0]        # worker threads waiting for a job
    stop = [False]    # the worker threads are to end
    halt = [False]    # interrupted: schedule nothing more
    finished = [False]
    trouble: list[BaseException] = []  # an exception of a scheduling step in another thread
    #: builds prepared ahead (see _Build.prefetch), by derivation; taken by the worker that runs
    #: them, undone (on the clean-up threads) when they will not run
    prefetched: dict[str, _Build] = {}
    target_paths = {p for p, _ in parsed}
    failed_any = False
    max_jobs = options.max_jobs
    known = {p: nd.drv for p, nd in nodes.items()}

    def ok(p: str) -> bool | None:
        r = nodes[p].result
        if r is None:
            return True if p in placed else None  # (a refused registration fails it later)
        return r.status in SUCCESS

    def step(spare: int) -> None:
        """Record what is decided, start what is ready (``spare``: the calling worker takes a
        job itself); sets ``finished`` at the end. Called with the lock held."""
        nonlocal failed_any
        while True:
            for p in sorted(pending):
                if nodes[p].result is not None:
                    pending.discard(p)
                    if not ok(p):
                        failed_any = True
                        if on_failure is not None and p not in target_paths:
                            on_failure(p, nodes[p].result)  # type: ignore[arg-type]
            # derivations whose inputs failed (or, without --keep-going, everything not started)
            changed = True
            while changed:
                changed = False
                for p in sorted(pending):
                    if p in running or p in placed or any(d in running or d in placed for d in nodes[p].deps):
                        continue  # (its inputs' results first: a failed input fails it as such)
                    bad = [d for d in nodes[p].deps if d in needed and ok(d) is False]
                    if bad:
                        nodes[p].result = dependency_failure(len(bad), p)
                    elif failed_any and not options.keep_going:
                        # never started: another build failed (Nix gives no message for these)
                        nodes[p].result = BuildResult(BuildStatus.MISC_FAILURE, "")
                    else:
                        continue
                    pending.discard(p)
                    abandon(p)
                    changed = True
            if not pending and not running:
                finished[0] = stop[0] = True
                cond.notify_all()
                settled.notify_all()
                return
            # in Nix's order of goals: by derivation name, then path
            ready = [p for p in sorted(pending, key=_goal_order)
                     if p not in running and p not in placed and all(ok(d) for d in nodes[p].deps if d in needed)]
            if max_jobs == 0 and not options.builders:
                for p in ready:
                    nodes[p].result = BuildResult(BuildStatus.MISC_FAILURE, NO_JOBS)
                    abandon(p)
                if ready:
                    continue
            for p in ready:
                if len(running) >= max(max_jobs, 1):
                    break
                running[p] = nodes[p]
                jobs.append(nodes[p])
                if idle[0] + spare < len(jobs):
                    threading.Thread(target=work, name="build", daemon=True).start()
                cond.notify()
            return

    def advance(spare: int = 0) -> None:
        """:func:`step`, from any thread (lock held); a failure ends the scheduling and is
        raised in the scheduler's own thread."""
        if halt[0]:
            settled.notify_all()  # (the interrupted scheduler waits for the running builds)
            return
        try:
            step(spare)
        except BaseException as e:  # noqa: BLE001 (re-raised by the scheduler's thread)
            trouble.append(e)
            halt[0] = True
            settled.notify_all()

    def abandon(p: str) -> None:
        """Undo a build prepared ahead that will not run (lock held)."""
        b = prefetched.pop(p, None)
        if b is not None:
            def undo(b: _Build = b) -> None:
                b.prefetched.wait()
                b._cleanup()
            cleaner.defer(undo)

    def next_build() -> None:
        """Called by a build once its builder is on its way: prepare the build that comes next
        (the first in Nix's order whose inputs are all built or being built, one not already
        prepared), so that it starts sooner when its inputs are there."""
        with lock:
            if halt[0] or finished[0]:
                return
            order = sorted(pending, key=_goal_order)
            cand = next((p for p in order if p not in running and p not in placed and p not in prefetched
                         and nodes[p].result is None
                         and all(ok(d) or d in running for d in nodes[p].deps if d in needed)), None)
            if cand is None:
                return
            b = _Build(store, cand, nodes[cand].drv, options, log, notice, True, keep_colours, cancel,
                       nodes[cand].wanted, cleaner=cleaner, known=known)
            b.prefetched.clear()
            prefetched[cand] = b
        b.prefetch()

    def registered(key: object, result: BuildResult) -> None:
        with lock:
            n = nodes[str(key)]
            n.result = result
            placed.discard(n.drv_path)
            advance()

    # (remote builds copy their inputs' closures from the database: registered inline)
    registrar = Registrar(store, registered, cleaner.defer) if PIPELINE and not options.builders else None

    def build(n: _Node, reg: Registrar | None, ahead: _Build | None) -> BuildResult | None:
        """The build's result, or None when the registrar has it (it reports the result)."""
        try:
            return _build_one(store, n, options, log, notice, keep_colours, cancel, cleaner, reg, known, ahead,
                              None if options.builders else next_build)
        except (Cancelled, KeyboardInterrupt):
            return BuildResult(BuildStatus.MISC_FAILURE, "interrupted")
        except BaseException as e:  # noqa: BLE001 (reported as the build's result)
            return BuildResult(BuildStatus.MISC_FAILURE, str(e) if isinstance(e, NartoolError)
                               else f"{type(e).__name__}: {e}")

    def work() -> None:
        # a worker thread stays for the next build: starting a thread costs its starter a wait
        # for the new thread (~0.1-1 ms on busy cores). It records its build's result, runs the
        # scheduling step and takes the next job under one hold of the lock.
        done: tuple[_Node, BuildResult | None] | None = None
        while True:
            with lock:
                if done is not None:
                    if done[1] is None:
                        if done[0].result is None:  # (unless the registrar was quicker)
                            placed.add(done[0].drv_path)
                    else:
                        done[0].result = done[1]
                    running.pop(done[0].drv_path, None)
                    advance(1)
                while not jobs:
                    if stop[0]:
                        return
                    idle[0] += 1
                    cond.wait()
                    idle[0] -= 1
                n = jobs.popleft()
                # the registrar when something else may start meanwhile, or must be registered
                # first; the last build alone (e.g. a single one) registers inline
                reg = registrar if len(pending) > 1 or placed else None
                ahead = prefetched.pop(n.drv_path, None)
            done = (n, build(n, reg, ahead))

    try:
        with lock:
            advance()
            while not finished[0] and not trouble:
                settled.wait()
            if trouble:
                raise trouble[0]
    except BaseException:
        cancel.set()
        with lock:
            halt[0] = True
            for n in jobs:  # queued, never started
                running.pop(n.drv_path, None)
            jobs.clear()
            for p in list(prefetched):
                abandon(p)
            stop[0] = True
            cond.notify_all()
            while running:
                settled.wait()
        if registrar is not None:
            registrar.close()  # (builds that finished are registered, as they would have been inline)
        cleaner.drain()
        cancel.close()
        raise
    with lock:
        for p in list(prefetched):  # (none should be left: each ran or was given up)
            abandon(p)
    if registrar is not None:
        registrar.close()
    cleaner.drain()
    cancel.close()
    if all_results is not None:
        all_results.update({p: r for p in needed if (r := nodes[p].result) is not None})
    return [nodes[p].result or BuildResult(BuildStatus.MISC_FAILURE, "not built") for p, _ in parsed]


def _substituters(store: LocalStore, options: BuildOptions) -> Any:
    """The configured substituters (opened once for this call), or None when substitution is
    off: no config, ``substitute = false`` or no ``substituters``."""
    cfg = options.config
    if cfg is None or not cfg.substitute or not cfg.substituters:
        return None
    from ..cache.substitute import Substituters

    return Substituters.open(cfg.substituters, store_dir=store.store_dir, config=cfg)


def _substitute(store: LocalStore, options: BuildOptions, subs: Any, n: _Node, notice: NoticeFn | None) -> None:
    paths = n.drv.output_paths(store.store_dir)
    if paths and len(paths) == len(n.drv.outputs):  # floating outputs have no path to look up
        _fetch(store, options, subs, sorted(x for x in paths.values() if not store.is_valid(x)), notice)


def _fetch(store: LocalStore, options: BuildOptions, subs: Any, paths: list[str], notice: NoticeFn | None) -> None:
    """Fetch ``paths`` (and their closures) from the substituters; what none supplies (or what
    fails the signature policy) is simply left to be built. A broken substituter is a warning."""
    from ..cache.substitute import substitute_paths

    if not paths:
        return
    try:
        got = substitute_paths(store, paths, options.config, substituters=subs)
    except NartoolError as e:
        log.warning("warning: substituting %s: %s", paths[0], e)
        return
    if got and notice is not None:
        ps = sorted(got)
        head = "this path was fetched:" if len(ps) == 1 else f"these {len(ps)} paths were fetched:"
        notice(head + "".join(f"\n  {x}" for x in ps))


_DOCS_URL = "\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html"
#: Nix 2.8's messages when ``max-jobs`` is 0 and no remote machine (or none that fits) is there
NO_JOBS = "unable to start any build; either increase '--max-jobs' or enable remote builds." + _DOCS_URL
NO_MACHINE = "unable to start any build; remote machines may not have all required system features." + _DOCS_URL


def _build_one(store: LocalStore, n: _Node, options: BuildOptions, log: LogFn | None, notice: NoticeFn | None,
               keep_colours: bool, cancel: CancelToken, cleaner: DeferredCleanup,
               registrar: Registrar | None = None, known: Mapping[str, Derivation] | None = None,
               ahead: _Build | None = None, on_started: Callable[[], None] | None = None) -> BuildResult | None:
    """One node's build; None when its registration was handed to ``registrar``, which reports
    the result."""
    if options.builders:
        from ..remote import builders as remote_builders

        res = remote_builders.try_remote_build(store, n.drv_path, n.drv, options, log=log)
        if res is not None:
            return res
        if options.max_jobs == 0:
            return BuildResult(BuildStatus.MISC_FAILURE, NO_MACHINE)
    if not n.drv.name:
        n.drv.name = drv_name_from_path(n.drv_path)
    store.temp_root(n.drv_path)
    if ahead is not None:
        ahead.prefetched.wait()  # (prepared by another worker: done by now, or about to be)
        b = ahead
        b.registrar, b.key = registrar, n.drv_path
    else:
        b = _Build(store, n.drv_path, n.drv, options, log, notice, True, keep_colours, cancel, n.wanted,
                   cleaner=cleaner, registrar=registrar, key=n.drv_path, known=known)
    b.on_started = on_started
    res = b.run()
    return None if b.handed_over else res


def exit_status(results: Iterable[BuildResult]) -> int:
    """Nix's exit status for failed builds: 100 + bit 0 timeout, bit 1 hash mismatch, bit 2 a
    build failure (also set by the first two), or 1 when no such failure happened."""
    mask = 0
    for r in results:
        if r.status == BuildStatus.TIMED_OUT:
            mask |= 0x01 | 0x04
        elif r.status == BuildStatus.PERMANENT_FAILURE:
            mask |= 0x04
        elif r.status == BuildStatus.OUTPUT_REJECTED and r.error_msg.startswith("hash mismatch"):
            mask |= 0x02 | 0x04
    return 0x60 | mask if mask else 1
