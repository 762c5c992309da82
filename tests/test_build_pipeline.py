"""The scheduler registers a finished build on its registrar thread while the next build starts
(nartool/build/registrar.py): the store ends up exactly as with inline registration, a refused
registration fails the builds that used the output and leaves nothing behind, locks are held
until the registration is decided, and an interruption still registers what finished. Real
sandboxed builds with busybox."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nartool.build import BuildOptions, BuildStatus
from nartool.build import goal as goal_mod
from nartool.build import registrar as reg_mod
from nartool.errors import StoreError
from nartool.store.local import LocalStore, PlacedOutputs
from nartool.store.locks import PathLock

from .buildkit import nartool_store, write_drv
from .test_build_cleanup import _need_sandbox

OPTS = BuildOptions(sandbox="true", build_users_group="")


def _store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str = "store") -> LocalStore:
    top = tmp_path / f"tmp-{name}"
    top.mkdir()
    monkeypatch.setenv("TMPDIR", str(top))
    st, _ = nartool_store(tmp_path / name, tmp_path)
    return st


def _chain(st: LocalStore, n: int, last_env: dict[str, str] | None = None) -> list[str]:
    """``n`` derivations, each output a file naming (and so referring to) the previous one."""
    drvs: list[str] = []
    for i in range(n):
        prev = st.query_derivation_outputs(drvs[-1])["out"] if drvs else "none"
        drvs.append(write_drv(st, f"link-{i}", f"echo {prev} {i} > $out",
                              input_drvs={drvs[-1]: ["out"]} if drvs else None,
                              env=last_env if i == n - 1 else None))
    return drvs


def _db_rows(st: LocalStore) -> tuple[list[Any], list[Any], list[Any]]:
    """The registration as Nix reads it: valid paths in id order (without the time), references
    and derivation outputs by path."""
    db = sqlite3.connect(st.db.path)
    try:
        paths = db.execute("select path, hash, narSize, deriver, ultimate, ca, sigs from ValidPaths "
                           "order by id").fetchall()
        refs = db.execute("select a.path, b.path from Refs r join ValidPaths a on a.id = r.referrer "
                          "join ValidPaths b on b.id = r.reference order by 1, 2").fetchall()
        outs = db.execute("select d.path, o.id, o.path from DerivationOutputs o join ValidPaths d "
                          "on d.id = o.drv order by 1, 2").fetchall()
    finally:
        db.close()
    return paths, refs, outs


def _leftovers(st: LocalStore) -> list[str]:
    """Entries of the store directory that are neither valid nor lock files."""
    return sorted(n for n in os.listdir(st.real_store_dir)
                  if not n.endswith(".lock") and not st.is_valid(f"{st.store_dir}/{n}"))


def _spy_commits(monkeypatch: pytest.MonkeyPatch,
                 before: Callable[[LocalStore, PlacedOutputs], Exception | None]) -> list[str]:
    """Call ``before(store, placed)`` ahead of every commit of placed build outputs; an
    exception it returns is raised by the database's registration inside that commit. Returns
    the committing threads' names."""
    real = LocalStore.commit_build_outputs
    threads: list[str] = []

    def spy(self: LocalStore, placed: PlacedOutputs, **kw: Any) -> Any:
        threads.append(threading.current_thread().name)
        exc = before(self, placed)
        if exc is None:
            return real(self, placed, **kw)

        def refuse(*args: Any) -> None:
            raise exc

        self.db.register = refuse  # type: ignore[method-assign,assignment]
        try:
            return real(self, placed, **kw)
        finally:
            del self.db.register

    monkeypatch.setattr(LocalStore, "commit_build_outputs", spy)
    return threads


def test_chain_registers_as_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_sandbox()
    st = _store(tmp_path, monkeypatch, "piped")
    drvs = _chain(st, 4)
    threads = _spy_commits(monkeypatch, lambda s, p: None)
    res = goal_mod.build_paths(st, [drvs[-1]], OPTS)
    assert [r.status for r in res] == [BuildStatus.BUILT]
    # off the worker: the pipeline really ran (the last build registers inline when the one
    # before it was registered by the time it started: nothing else is pending then)
    assert threads[:3] == ["build registration"] * 3 and threads[3] in ("build registration", "build")
    monkeypatch.setattr(goal_mod, "PIPELINE", False)
    st2 = _store(tmp_path, monkeypatch, "inline")
    drvs2 = _chain(st2, 4)
    assert drvs2 == drvs
    res2 = goal_mod.build_paths(st2, [drvs2[-1]], OPTS)
    assert [r.status for r in res2] == [BuildStatus.BUILT]
    assert threads[4:] == ["build"] * 4
    assert _db_rows(st) == _db_rows(st2)
    last = st.query_derivation_outputs(drvs[-1])["out"]
    assert len(st.query_closure_paths([last])) == 4
    assert _leftovers(st) == [] and _leftovers(st2) == []


def test_refused_registration_fails_what_used_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first output's registration is refused after the second build has started on it:
    the first fails with the store's error, the second (built on the unregistered input) as a
    dependency failure, the third never starts; nothing of them stays in the store."""
    _need_sandbox()
    st = _store(tmp_path, monkeypatch)
    drvs = _chain(st, 3)
    first = st.query_derivation_outputs(drvs[0])["out"]
    second_started = threading.Event()
    real_closure = reg_mod.Registrar.closure

    def closure(self: reg_mod.Registrar, roots: Any) -> Any:
        out = real_closure(self, roots)
        if first in out[1]:
            second_started.set()
        return out

    monkeypatch.setattr(reg_mod.Registrar, "closure", closure)

    def refuse(store: LocalStore, placed: PlacedOutputs) -> Exception | None:
        if placed.infos[0].path == first:
            assert second_started.wait(10), "the second build never started on the pending input"
            return StoreError("disk on fire", path=first, rule="io")
        return None

    _spy_commits(monkeypatch, refuse)
    every: dict[str, Any] = {}
    res = goal_mod.build_paths(st, [drvs[-1]], OPTS, all_results=every)
    assert every[drvs[0]].status == BuildStatus.OUTPUT_REJECTED and "disk on fire" in every[drvs[0]].error_msg
    assert every[drvs[1]].status == BuildStatus.DEPENDENCY_FAILED
    assert every[drvs[1]].error_msg == f"1 dependencies of derivation '{drvs[1]}' failed to build"
    assert res[0].status == BuildStatus.DEPENDENCY_FAILED
    assert goal_mod.exit_status(every.values()) == 1
    outs = [st.query_derivation_outputs(d)["out"] for d in drvs]
    assert not any(st.is_valid(o) for o in outs)
    assert _leftovers(st) == []  # the placed outputs removed, no chroot left


def test_locks_held_until_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a placed output waits for its registration, its lock is still held (another
    process wanting it waits) and the output is in its place."""
    _need_sandbox()
    st = _store(tmp_path, monkeypatch)
    drvs = _chain(st, 3)
    seen: list[str] = []

    def check(store: LocalStore, placed: PlacedOutputs) -> Exception | None:
        for info in placed.infos:
            assert os.path.lexists(store.physical(info.path))
            assert not store.is_valid(info.path)
            other = PathLock(store.physical(info.path), acquire=False)  # (another open file: flock)
            with pytest.raises(StoreError):
                other.acquire(wait=False)
            seen.append(info.path)
        return None

    _spy_commits(monkeypatch, check)
    res = goal_mod.build_paths(st, [drvs[-1]], OPTS)
    assert [r.status for r in res] == [BuildStatus.BUILT]
    assert seen == [st.query_derivation_outputs(d)["out"] for d in drvs]
    for p in seen:  # released afterwards
        lk = PathLock(st.physical(p), acquire=False)
        lk.acquire(wait=False)
        lk.release()


def test_interrupt_registers_what_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (a KeyboardInterrupt in the scheduler's thread) while the second build's
    registration is pending (the third build has started on its output meanwhile): the
    scheduler kills the third and waits for the registration, so both finished builds are
    valid, the third is not, and nothing is left behind."""
    _need_sandbox()
    st = _store(tmp_path, monkeypatch)
    drvs = _chain(st, 3)
    second = st.query_derivation_outputs(drvs[1])["out"]

    def interrupt(store: LocalStore, placed: PlacedOutputs) -> Exception | None:
        if placed.infos[0].path == second:
            # (a real signal to the scheduler's thread: it wakes from its wait, as on Ctrl-C)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            time.sleep(0.3)  # (the scheduler is interrupted meanwhile)
        return None

    _spy_commits(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        goal_mod.build_paths(st, [drvs[-1]], OPTS)
    outs = [st.query_derivation_outputs(d)["out"] for d in drvs]
    assert st.is_valid(outs[0]) and st.is_valid(outs[1])
    assert not st.is_valid(outs[2])
    assert _leftovers(st) == []
    assert not [n for n in os.listdir(st.real_store_dir) if n.endswith(".chroot")]


def test_pending_inputs_in_reference_graphs_and_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A derivation exporting its pending input's references graph, and one whose
    ``disallowedRequisites`` names a pending path of its closure: the same graph, the same
    refusal, as with inline registration (the registrar is drained first)."""
    _need_sandbox()
    results = []
    for pipeline in (True, False):
        monkeypatch.setattr(goal_mod, "PIPELINE", pipeline)
        st = _store(tmp_path, monkeypatch, f"s{pipeline}")
        drvs = _chain(st, 2)
        first = st.query_derivation_outputs(drvs[0])["out"]
        second = st.query_derivation_outputs(drvs[1])["out"]
        graph = write_drv(st, "graph", "cat graph > $out; echo $(cat $inp) >> $out",
                          input_drvs={drvs[1]: ["out"]}, env={"exportReferencesGraph": f"graph {second}",
                                                               "inp": second})
        refused = write_drv(st, "refused", "echo $(cat $inp) > $out", input_drvs={drvs[1]: ["out"]},
                            env={"disallowedRequisites": first, "inp": second})
        every: dict[str, Any] = {}
        goal_mod.build_paths(st, [graph, refused], BuildOptions(sandbox="true", build_users_group="",
                                                                keep_going=True), all_results=every)
        text = Path(st.physical(st.query_derivation_outputs(graph)["out"])).read_text()
        assert first in text and second in text
        assert every[refused].status == BuildStatus.OUTPUT_REJECTED
        assert "is not allowed to refer to the following paths" in every[refused].error_msg
        results.append((text, every[refused].error_msg, _db_rows(st)[1]))
        assert _leftovers(st) == []
    assert results[0] == results[1]


_KILLER = """
import os, signal, sys
from nartool.build import BuildOptions
from nartool.build import goal
from nartool.store.local import LocalStore

root, target, victim = sys.argv[1:4]
real = LocalStore.commit_build_outputs

def commit(self, placed, **kw):
    if placed.infos[0].path == victim:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while this registration is pending
    return real(self, placed, **kw)

LocalStore.commit_build_outputs = commit
with LocalStore(root) as st:
    goal.build_paths(st, [target], BuildOptions(sandbox="true", build_users_group=""))
"""


def test_kill_9_while_a_registration_is_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the process while the second output waits for its registration (the third
    build may have started on it): the first output is registered, nothing else is, and the next
    garbage collection leaves no chroot and no unregistered output behind."""
    import subprocess
    import sys

    from .helpers import run_cli

    _need_sandbox()
    st = _store(tmp_path, monkeypatch)
    drvs = _chain(st, 3)
    outs = [st.query_derivation_outputs(d)["out"] for d in drvs]
    root = st.root
    st.close()
    r = subprocess.run([sys.executable, "-c", _KILLER, str(root), drvs[-1], outs[1]], capture_output=True,
                       check=False, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    with LocalStore(root) as s:
        assert s.is_valid(outs[0]) and not s.is_valid(outs[1]) and not s.is_valid(outs[2])
        assert os.path.lexists(s.physical(outs[1]))  # placed, never registered
    time.sleep(1)  # (the helpers notice their owner's death and end the builder)
    g = run_cli("--store", str(root), "store", "gc")
    assert g.returncode == 0, g.stderr
    with LocalStore(root) as s:
        assert _leftovers(s) == []
        assert not [n for n in os.listdir(s.real_store_dir) if n.endswith(".chroot")]


def test_registrar_survives_a_failing_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A result callback or a clean-up hand-off that raises is logged; the thread goes on (a
    later job is still registered and drain() returns), and the clean-up still runs."""
    import logging

    from nartool.store.buildresult import BuildResult as Result

    st = _store(tmp_path, monkeypatch)
    cleaned: list[str] = []
    told: list[object] = []

    def on_done(key: object, result: Result) -> None:
        told.append(key)
        if key == "first":
            raise RuntimeError("callback broke")

    def defer(fn: Callable[[], None]) -> None:
        if not cleaned:
            fn()  # (the first one is run, then the hand-off "fails")
            raise RuntimeError("no thread")
        fn()

    reg = reg_mod.Registrar(st, on_done, defer)
    with caplog.at_level(logging.WARNING, logger="nartool.build.registrar"):
        for key in ("first", "second"):
            reg.submit(reg_mod.RegistrationJob(key, PlacedOutputs([], []), None, {}, Result(BuildStatus.BUILT),
                                               set(), {}, lambda k=key: cleaned.append(k), name=key))
        closer = threading.Thread(target=reg.close, daemon=True)
        closer.start()
        closer.join(20)
        assert not closer.is_alive(), "the registrar's thread died: close() waits forever"
    assert told == ["first", "second"]
    assert cleaned[0] == "first" and "second" in cleaned
    assert "callback broke" in caplog.text and "no thread" in caplog.text


def test_a_single_build_registers_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing else to start, a build registers on its own worker: no registration thread."""
    _need_sandbox()
    st = _store(tmp_path, monkeypatch)
    drv = write_drv(st, "alone", "echo alone > $out")
    threads = _spy_commits(monkeypatch, lambda s, p: None)
    res = goal_mod.build_paths(st, [drv], OPTS)
    assert [r.status for r in res] == [BuildStatus.BUILT]
    assert threads == ["build"]
    assert "build registration" not in [t.name for t in threading.enumerate()]


def test_next_build_prepared_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a build runs, the next one of the chain is prepared (outputs locked, build
    directory and chroot skeleton made); it then runs with what was prepared."""
    _need_sandbox()
    st = _store(tmp_path, monkeypatch)
    drvs = _chain(st, 3)
    prepared: list[str] = []
    used: list[str] = []
    real_prefetch = goal_mod._Build.prefetch
    real_run = goal_mod._Build._run

    def prefetch(self: goal_mod._Build) -> None:
        real_prefetch(self)
        assert self.locks and self.build_dir is not None and os.path.isdir(self.build_dir)
        assert self.skeleton is not None and self.skeleton[1] is not None  # (made completely)
        assert os.path.isdir(self.skeleton[0] + "/etc") and os.path.isdir(self.skeleton[0] + st.store_dir)
        prepared.append(self.drv_path)

    def run(self: goal_mod._Build, start: int) -> Any:
        if self.locks:
            used.append(self.drv_path)
        return real_run(self, start)

    monkeypatch.setattr(goal_mod._Build, "prefetch", prefetch)
    monkeypatch.setattr(goal_mod._Build, "_run", run)
    res = goal_mod.build_paths(st, [drvs[-1]], OPTS)
    assert [r.status for r in res] == [BuildStatus.BUILT]
    assert prepared == drvs[1:] and used == drvs[1:]
    assert _leftovers(st) == []


def test_prepared_build_undone_when_its_input_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build prepared ahead never runs when its input fails: its locks are released, its
    build directory and its chroot skeleton removed."""
    _need_sandbox()
    st = _store(tmp_path, monkeypatch)
    first = write_drv(st, "fails-first", "echo partial > $out; exit 1")
    second = write_drv(st, "after-failure", "echo never > $out", input_drvs={first: ["out"]})
    every: dict[str, Any] = {}
    res = goal_mod.build_paths(st, [second], OPTS, all_results=every)
    assert every[first].status == BuildStatus.PERMANENT_FAILURE
    assert res[0].status == BuildStatus.DEPENDENCY_FAILED
    top = Path(os.environ["TMPDIR"])
    assert list(top.iterdir()) == []  # (no build directory left, the prepared one included)
    out = st.query_derivation_outputs(second)["out"]
    lk = PathLock(st.physical(out), acquire=False)
    lk.acquire(wait=False)  # (released)
    lk.release()
    assert _leftovers(st) == []
