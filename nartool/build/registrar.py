"""Registering finished builds off the scheduler's critical path.

Registering a build's outputs costs a ``syncfs`` and a transaction (~1 ms, more when the file
system is busy), and in a chain of derivations nothing else can run meanwhile: the next build
waits for its input to be valid. The scheduler (:func:`nartool.build.goal.build_paths`) instead
hands a built and checked derivation to a :class:`Registrar`: its outputs are already in their
places in the store (:meth:`LocalStore.place_build_outputs`), unregistered, and the registrar's
one thread syncs and registers them (:meth:`LocalStore.commit_build_outputs`) while the next
build starts. What that build sees of its pending inputs comes from here (:meth:`info`,
:meth:`closure`), exactly what the registration will write.

The rules that keep this equivalent to registering inline:

* Jobs are registered one at a time, in the order they were handed in, so a path is registered
  after every path it refers to (a dependent build is handed in after its inputs).
* A job whose pending inputs failed to register is not registered: its outputs are removed and
  it fails as a dependency failure (a sequential scheduler would never have started it).
* Until its registration is decided, a build keeps its output locks, its temporary roots and its
  build user: another process that wants the same output waits for the lock, and the garbage
  collector leaves the unregistered output alone. The build's clean-up (which releases them) is
  handed to the clean-up threads only after the registration.
* Whoever needs the database's view of a pending path (a derivation that exports its references
  graph, a remote build, an exhausted pool of build users) calls :meth:`drain` first.
* The scheduler drains the registrar before it returns, also when interrupted: a build that
  finished before the interruption is registered, as it would have been inline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .._log import get_logger
from ..errors import NartoolError
from ..store.buildresult import BuildResult, BuildStatus
from ..store.local import LocalStore, PlacedOutputs
from ..store.types import PathInfo
from .jobs import JobThreads

log = get_logger(__name__)


def dependency_failure(n: int, drv_path: str, start: int = 0, stop: int = 0) -> BuildResult:
    """Nix's result for a derivation ``n`` of whose dependencies failed."""
    return BuildResult(BuildStatus.DEPENDENCY_FAILED, f"{n} dependencies of derivation '{drv_path}' failed to build",
                       0, False, start, stop)


class InputRefused(Exception):
    """A build's input closure reaches a path whose registration was refused."""


class RegistrationJob:
    """One built derivation waiting for its registration."""

    __slots__ = ("key", "placed", "drv_path", "drv_outputs", "result", "deps", "inputs", "cleanup", "name")

    def __init__(self, key: object, placed: PlacedOutputs, drv_path: str | None, drv_outputs: dict[str, str],
                 result: BuildResult, deps: set[str], inputs: dict[str, set[str]], cleanup: Callable[[], None], *,
                 name: str) -> None:
        self.key = key                  # the scheduler's handle (told back with the result)
        self.placed = placed
        self.drv_path = drv_path        # for DerivationOutputs rows (None: not a full derivation)
        self.drv_outputs = drv_outputs
        self.result = result            # the result once registered
        self.deps = deps                # pending paths the build used as inputs
        self.inputs = inputs            # its input derivations -> the output paths it used
        self.cleanup = cleanup          # the build's clean-up, run (deferred) once decided
        self.name = name                # the derivation, for messages


class Registrar(JobThreads):
    """One thread registering handed-in builds in order (see the module docstring).
    ``on_done(key, result)`` is called on that thread for each job, after its registration or
    its refusal; ``defer`` receives each job's clean-up then."""

    def __init__(self, store: LocalStore, on_done: Callable[[object, BuildResult], None],
                 defer: Callable[[Callable[[], None]], None]) -> None:
        super().__init__("build registration", "after a registration", max_threads=1)
        self._store = store
        self._on_done = on_done
        self._defer = defer
        #: placed, unregistered outputs: path -> info (removed once registered or refused)
        self._infos: dict[str, PathInfo] = {}
        #: paths whose registration was refused
        self._failed: set[str] = set()

    # -- what builds see of pending outputs -------------------------------------------------

    def info(self, path: str) -> PathInfo | None:
        """The info of ``path`` if it is placed and waiting for its registration."""
        with self._lock:
            return self._infos.get(path)

    def closure(self, roots: Iterable[str]) -> tuple[set[str], set[str]]:
        """The closure of ``roots`` over pending and valid paths, and which of its paths are
        pending. A pending path is looked up here before the database, and removed from here
        only after its registration is committed, so a path registered meanwhile is found in
        the database. Raises :class:`InputRefused` when the closure reaches a refused path."""
        with self._lock:
            infos = dict(self._infos)
            failed = set(self._failed)
        pending: set[str] = set()
        valid_roots: set[str] = set()
        todo = list(roots)
        seen: set[str] = set()
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            if p in failed:
                raise InputRefused(p)
            info = infos.get(p)
            if info is None:
                valid_roots.add(p)
                continue
            pending.add(p)
            todo.extend(info.references)
        return pending | self._store.query_closure_paths(valid_roots), pending

    def refused_among(self, paths: Iterable[str]) -> bool:
        """Whether the registration of any of ``paths`` was refused."""
        with self._lock:
            return not self._failed.isdisjoint(paths)

    def failed_inputs(self, inputs: dict[str, set[str]]) -> int:
        """How many of the input derivations ``inputs`` (derivation -> output paths used) have
        an output whose registration was refused."""
        with self._lock:
            return sum(1 for outs in inputs.values() if not outs.isdisjoint(self._failed))

    def dependency_failed(self, name: str, inputs: dict[str, set[str]], start: int = 0, stop: int = 0) -> BuildResult:
        """The result of a build some of whose inputs' registrations were refused (Nix's
        message for failed dependencies), or of one that failed after that."""
        return dependency_failure(max(self.failed_inputs(inputs), 1), name, start, stop)

    # -- jobs ---------------------------------------------------------------------------------

    def submit(self, job: RegistrationJob) -> None:
        with self._lock:
            for info in job.placed.infos:
                self._infos[info.path] = info
        self._put(job)

    def _handle(self, job: object) -> None:
        assert isinstance(job, RegistrationJob)
        with self._lock:
            failed = not job.deps.isdisjoint(self._failed)
        result = self._register(job, failed)
        with self._lock:
            for info in job.placed.infos:
                self._infos.pop(info.path, None)
                if result.status != BuildStatus.BUILT:
                    self._failed.add(info.path)
        try:
            self._defer(job.cleanup)
        except Exception as e:  # noqa: BLE001 (e.g. no thread to be had: clean up here)
            log.warning("deferring the clean-up of '%s' failed: %s", job.name, e)
            job.cleanup()
        self._on_done(job.key, result)

    def _register(self, job: RegistrationJob, deps_failed: bool) -> BuildResult:
        r = job.result
        if deps_failed:
            self._store.discard_build_outputs(job.placed)
            return self.dependency_failed(job.name, job.inputs, r.start_time, r.stop_time)
        try:
            self._store.commit_build_outputs(job.placed, drv_path=job.drv_path, drv_outputs=job.drv_outputs)
        except NartoolError as e:
            return BuildResult(BuildStatus.OUTPUT_REJECTED, str(e), 1, False, r.start_time, r.stop_time)
        except Exception as e:  # noqa: BLE001 (reported as the build's result, as inline)
            return BuildResult(BuildStatus.MISC_FAILURE, f"{type(e).__name__}: {e}", 0, False, r.start_time,
                               r.stop_time)
        return r
