"""A finished build's clean-up (chroot and build directory removal, build user and lock release)
runs off the critical path, on the scheduler's background threads, and is complete when
``build_paths`` returns: real sandboxed builds with busybox."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from nartool.build import BuildOptions, BuildStatus
from nartool.build import goal as goal_mod
from nartool.build import sandbox as sbx
from nartool.store.local import LocalStore

from .buildkit import nartool_store, static_busybox, write_drv
from .conftest import require


def _need_sandbox() -> None:
    require("SANDBOX", static_busybox(), "no static busybox (install busybox-static)")
    reason = sbx.sandbox_unavailable_reason() if sys.platform == "linux" else "not Linux"
    require("SANDBOX", reason is None, f"the build sandbox cannot run here: {reason}")


def test_deferred_cleanup_drain_waits_and_logs_failures(caplog: pytest.LogCaptureFixture) -> None:
    c = goal_mod.DeferredCleanup()
    done: list[int] = []
    gate = threading.Event()

    def slow() -> None:
        gate.wait(5)
        time.sleep(0.05)
        done.append(1)

    def bad() -> None:
        raise OSError(5, "Input/output error")

    c.defer(slow)
    c.defer(bad)
    assert c.pending() and done == []
    gate.set()
    with caplog.at_level(logging.WARNING, logger="nartool.build.goal"):
        c.drain()
    assert done == [1] and not c.pending()
    assert "clean-up after a build failed" in caplog.text
    c.drain()  # nothing left: returns at once


def test_deferred_cleanup_reuses_its_threads_and_ends_them() -> None:
    """An idle clean-up thread takes the next job (no thread started per build); a job deferred
    while all are busy gets a thread of its own; drain() ends them."""
    before = threading.active_count()
    c = goal_mod.DeferredCleanup()
    ran: list[threading.Thread] = []  # (the objects: an ident may be reused by a later thread)
    for _ in range(5):
        c.defer(lambda: ran.append(threading.current_thread()))
        deadline = time.monotonic() + 5
        # (until the thread waits again: just after a job it is neither busy nor idle yet, and a
        # job deferred then gets a thread of its own)
        while (c.pending() or not c._idle) and time.monotonic() < deadline:
            time.sleep(0.005)
    assert len(ran) == 5 and len({id(t) for t in ran}) == 1
    gate = threading.Event()
    c.defer(lambda: gate.wait(5))
    deadline = time.monotonic() + 5
    while not c._busy and time.monotonic() < deadline:  # the slow job has started
        time.sleep(0.005)
    c.defer(lambda: ran.append(threading.current_thread()))
    deadline = time.monotonic() + 5
    while len(ran) < 6 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(ran) == 6, "the second job waited for the busy thread"
    gate.set()
    c.drain()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert threading.active_count() == before


def _store_and_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LocalStore, Path]:
    """A store with busybox, and a TMPDIR of its own (where build directories go)."""
    top = tmp_path / "tmp"
    top.mkdir()
    monkeypatch.setenv("TMPDIR", str(top))
    st, _ = nartool_store(tmp_path / "store", tmp_path)
    return st, top


def test_chain_cleans_up_off_the_critical_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_sandbox()
    st, top = _store_and_tmpdir(tmp_path, monkeypatch)
    prev: str | None = None
    drvs: list[str] = []
    for i in range(3):
        script = f"echo {i} > $out" if prev is None else f"cat {prev} > $out; echo {i} >> $out"
        drv = write_drv(st, f"chain-{i}", script, input_drvs={drvs[-1]: ["out"]} if drvs else None,
                        inputs=None)
        drvs.append(drv)
        prev = st.query_derivation_outputs(drv)["out"]
    threads: list[str] = []
    real_remove = sbx._remove_chroot

    def spy(path: str, extra: tuple[str, ...] = ()) -> list[str]:
        threads.append(threading.current_thread().name)
        return real_remove(path, extra)

    monkeypatch.setattr(sbx, "_remove_chroot", spy)
    res = goal_mod.build_paths(st, [drvs[-1]], BuildOptions(sandbox="true", build_users_group=""))
    assert [r.status for r in res] == [BuildStatus.BUILT]
    # every chroot was removed by the background clean-up, all of it before build_paths returned
    assert threads == ["build clean-up"] * 3
    assert not [n for n in os.listdir(st.real_store_dir) if n.endswith(".chroot")]
    assert os.listdir(top) == []
    out = st.query_derivation_outputs(drvs[-1])["out"]
    assert Path(st.physical(out)).read_text() == "0\n1\n2\n"


def test_failed_build_is_cleaned_up_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_sandbox()
    st, top = _store_and_tmpdir(tmp_path, monkeypatch)
    drv = write_drv(st, "fails", "echo partial > $out; exit 3")
    res = goal_mod.build_paths(st, [drv], BuildOptions(sandbox="true", build_users_group=""))
    assert res[0].status == BuildStatus.PERMANENT_FAILURE
    assert not [n for n in os.listdir(st.real_store_dir) if n.endswith(".chroot")]
    assert os.listdir(top) == []
    assert not st.is_valid(st.query_derivation_outputs(drv)["out"])


def test_mount_points_under_reads_escaped_tables(tmp_path: Path) -> None:
    """The mount table escapes space, tab, newline and backslash in octal; a chroot's mount
    points are found under such names too, and a table without the chroot's name is skipped."""
    from nartool.build.sandbox import _mount_points_under

    table = tmp_path / "mountinfo"
    root = str(tmp_path / "a b\\c")
    esc = root.replace("\\", "\\134").replace(" ", "\\040")
    table.write_text(f"36 35 98:0 / / rw - ext4 /dev/root rw\n"
                     f"37 36 98:0 /x {esc}/nix/store/x ro - ext4 /dev/root rw\n"
                     f"38 36 0:5 / {esc}/dev/null rw - devtmpfs udev rw\n"
                     f"39 36 0:5 / {esc}-other/dev rw - devtmpfs udev rw\n")
    assert _mount_points_under(root, str(table), real=True) == [f"{root}/nix/store/x", f"{root}/dev/null"]
    assert _mount_points_under(str(tmp_path / "elsewhere"), str(table), real=True) == []
    assert _mount_points_under(root, str(tmp_path / "no-such-table"), real=True) == []
