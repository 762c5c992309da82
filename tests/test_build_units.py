"""Unit tests of the build layer's parts that need no sandbox: the log filter and line assembly,
settings (names, aliases, defaults, errors), sandbox-paths parsing, the builder environment, the
exit status scheme, and the scheduler (ordering, parallelism, failures) with a fake builder."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from nartool.build import (
    BuildOptions,
    BuildResult,
    BuildStatus,
    exit_status,
    filter_escapes,
    parse_sandbox_paths,
)
from nartool.build import goal as goal_mod
from nartool.build.env import (
    make_environment,
    pass_as_file_name,
    structured_attrs_shell,
    validity_registration,
)
from nartool.build.logs import LineAssembler, RawLog, iter_lines, log_path, read_log
from nartool.config import Config
from nartool.errors import NartoolError
from nartool.store.derivation import Derivation, DerivationOutput, compute_outputs, store_resolver
from nartool.store.local import LocalStore

# -- log filter (Nix 2.8's filterANSIEscapes, verified rows of the sandbox notes) ----------------

FILTER_CASES = [
    (b"L1 \x1b[pnest-open\x1b[q end", b"L1 nest-open end", b"L1 nest-open end"),
    (b"L2 \x1b[1;31mred\x1b[0m plain", b"L2 red plain", b"L2 \x1b[1;31mred\x1b[0m plain"),
    (b"L3 \x1b[2Kerase \x1b[5Acursor \x1b]0;title\x07osc", b"L3 erase cursor 0;titleosc",
     b"L3 erase cursor 0;titleosc"),
    (b"L4 tab\there", b"L4 tab  here", b"L4 tab  here"),
    (b"L6 bell\x07 \x1b(B charset \x1bM rev", b"L6 bell (B charset  rev", b"L6 bell (B charset  rev"),
    (b"\x1b[3p\x1b[a\x1b[b\x1b[s\x1b[e\x1b[w", b"", b""),
    (b"\xc3\xa9\tx", b"\xc3\xa9       x", b"\xc3\xa9       x"),  # one column for a 2-byte character
    (b"a\x80\tb", b"a\x80      b", b"a\x80      b"),  # a stray continuation byte takes a column
    (b"plain", b"plain", b"plain"),
    (b"trailing esc \x1b", b"trailing esc ", b"trailing esc "),
    (b"\x1b[", b"", b""),
]


@pytest.mark.parametrize(("line", "not_tty", "tty"), FILTER_CASES)
def test_filter_escapes(line: bytes, not_tty: bytes, tty: bytes) -> None:
    assert filter_escapes(line) == not_tty
    assert filter_escapes(line, keep_colours=True) == tty


def test_line_assembly() -> None:
    assert list(iter_lines(b"L5 abcdef\rXY\n")) == [b"XY abcdef"]
    assert list(iter_lines(b"one\ntwo")) == [b"one", b"two"]
    assert list(iter_lines(b"\r\n\n")) == [b"", b""]
    assert list(iter_lines(b"abc\r\rd\n")) == [b"dbc"]
    got: list[bytes] = []
    la = LineAssembler(got.append)
    for b in b"split across\r chunks\nx":  # byte by byte
        la.feed(bytes([b]))
    la.finish()
    assert got == [b" chunkscross", b"x"]


def test_long_lines_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    from nartool.build import logs

    monkeypatch.setattr(logs, "MAX_LINE", 5)
    assert list(iter_lines(b"abcdefghij\rXY\nshort\n")) == [b"XYcde", b"short"]


def test_raw_log_roundtrip(tmp_path: Path) -> None:
    state = str(tmp_path / "nix" / "var" / "nix")
    drv = "/nix/store/0jwy4pln7syrbpf4f11c4g4y75k301cj-hello.drv"
    p = log_path(state, drv)
    assert p == str(tmp_path / "nix/var/log/nix/drvs/0j/wy4pln7syrbpf4f11c4g4y75k301cj-hello.drv.bz2")
    raw = RawLog(p)
    raw.write(b"\x1b[31mraw\r\x07\n")
    raw.close()
    assert read_log(state, drv) == b"\x1b[31mraw\r\x07\n"
    with pytest.raises(NartoolError, match="not available"):
        read_log(state, drv.replace("hello", "other"))


# -- settings ---------------------------------------------------------------------------------

def test_settings_names_aliases_defaults() -> None:
    o = BuildOptions.from_config(Config())
    assert o.sandbox == "true" and o.sandbox_fallback and o.max_jobs == 1 and o.max_silent_time == 0
    assert o.timeout == 0 and o.max_build_log_size == 0 and o.keep_build_log and o.compress_build_log
    assert o.cores == (os.cpu_count() or 1) and o.sandbox_paths == [] and o.pre_build_hook is None
    assert o.build_users_group == ("nixbld" if os.geteuid() == 0 else "")
    assert {"benchmark", "big-parallel", "nixos-test"} <= set(o.system_features)
    cfg = Config.from_text("build-use-sandbox = relaxed\nbuild-chroot-dirs = /a\nextra-sandbox-paths = /b=/c?\n"
                           "build-max-silent-time = 5\nbuild-timeout = 7\nbuild-max-log-size = 9\n"
                           "build-cores = 0\nbuild-users-group =\n")
    o = BuildOptions.from_config(cfg, {"build-extra-sandbox-paths": "/d", "max-jobs": "auto"})
    assert o.sandbox == "relaxed" and o.sandbox_paths == ["/a", "/b=/c?", "/d"]
    assert (o.max_silent_time, o.timeout, o.max_build_log_size, o.cores) == (5, 7, 9, 0)
    assert o.build_users_group == "" and o.max_jobs == (os.cpu_count() or 1)
    assert BuildOptions.from_config(Config(), {"build-use-chroot": "false"}).sandbox == "false"


@pytest.mark.parametrize(("name", "value", "msg"), [
    ("sandbox", "maybe", "invalid value"),
    ("max-jobs", "many", "should be 'auto' or an integer"),
    ("timeout", "-1", "non-negative integer"),
    ("sandbox-fallback", "perhaps", "Boolean"),
])
def test_settings_errors(name: str, value: str, msg: str) -> None:
    with pytest.raises(NartoolError, match=msg):
        BuildOptions.from_config(Config(), {name: value})


def test_unknown_option_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    o = BuildOptions.from_config(Config(), {"no-such-setting": "1", "max-jobs": "3"})
    assert o.max_jobs == 3 and "unknown setting 'no-such-setting'" in caplog.text


def test_sandbox_paths_parsing() -> None:
    got = parse_sandbox_paths(["/dev/nvidiactl?", "/opt-x=/host/dir?", "/bin/sh=/nix/store/x-bb/bin/sh", "/usr",
                               "/t=/a", "/t=/b", "/e=/s=t"])
    assert got["/dev/nvidiactl"].optional and got["/dev/nvidiactl"].source == "/dev/nvidiactl"
    assert got["/opt-x"].source == "/host/dir" and got["/opt-x"].optional
    assert got["/bin/sh"].source == "/nix/store/x-bb/bin/sh" and not got["/bin/sh"].optional
    assert got["/usr"].source == "/usr"
    assert got["/t"].source == "/b"  # the entry sorting later wins
    assert got["/e"].source == "/s=t"  # split at the first '='


# -- environment ------------------------------------------------------------------------------

def _drv(env: dict[str, str], fixed: bool = False) -> Derivation:
    outs = {"out": DerivationOutput("/nix/store/3bm8vwsq22cxmwz21vifir6ldp798x8d-x", "", "")}
    if fixed:
        outs = {"out": DerivationOutput("", "sha256", "00" * 32)}
    return Derivation(outputs=outs, platform="x86_64-linux", builder="/bin/sh", env={"name": "x", **env}, name="x")


def _env(drv: Derivation, fixed: bool = False, **kw: object) -> dict[bytes, bytes]:
    be = make_environment(drv, store_dir="/nix/store", build_top="/build", host_build_top="/tmp/nix-build-x.drv-0",
                          cores=3, fixed_output=fixed, input_paths=set(), outputs={"out": "/nix/store/o-x"},
                          closure=lambda ps: set(ps), references=lambda p: [],
                          derivation_outputs=lambda p: [], **kw)  # type: ignore[arg-type]
    keys = [k for k, _ in be.env]
    assert keys == sorted(keys)  # as Nix's std::map hands them to execve
    return dict(be.env) | {b"__files__": repr(sorted(be.files)).encode()}


def test_environment_basics() -> None:
    e = _env(_drv({"PATH": "/mine", "TMPDIR": "/not-this", "TERM": "dumb", "a": "1", "big": "data",
                   "passAsFile": "big"}))
    assert e[b"PATH"] == b"/mine" and e[b"HOME"] == b"/homeless-shelter" and e[b"NIX_STORE"] == b"/nix/store"
    assert e[b"NIX_BUILD_CORES"] == b"3" and e[b"TMPDIR"] == b"/build" and e[b"PWD"] == b"/build"
    assert e[b"TERM"] == b"xterm-256color" and e[b"NIX_LOG_FD"] == b"2" and e[b"a"] == b"1"
    assert b"big" not in e and e[b"bigPath"] == b"/build/" + pass_as_file_name("big").encode()
    assert pass_as_file_name("big").startswith(".attr-") and len(pass_as_file_name("big")) == 6 + 52
    assert b"NIX_OUTPUT_CHECKED" not in e


def test_environment_fixed_output_impure_vars() -> None:
    e = _env(_drv({"impureEnvVars": "http_proxy UNSET_ONE"}, fixed=True), fixed=True,
             impure_environ={"http_proxy": "http://p:3128"})
    assert e[b"NIX_OUTPUT_CHECKED"] == b"1" and e[b"http_proxy"] == b"http://p:3128" and e[b"UNSET_ONE"] == b""
    # not for an ordinary derivation
    e = _env(_drv({"impureEnvVars": "http_proxy"}), impure_environ={"http_proxy": "x"})
    assert b"http_proxy" not in e


def test_structured_attrs() -> None:
    e = _env(_drv({"__json": '{"s":"it\'s","n":42,"f":1.5,"t":true,"no":false,"z":null,"l":[1,"a"],'
                             '"o":{"b":2,"a":"x"},"nested":{"a":[1]},"bad-name":1}'}))
    assert e[b"NIX_ATTRS_SH_FILE"] == b"/tmp/nix-build-x.drv-0/.attrs.sh"  # 2.8's host path, kept
    assert b"s" not in e and b"__json" not in e
    sh = structured_attrs_shell({"s": "it's", "n": 42, "f": 1.5, "t": True, "no": False, "z": None, "l": [1, "a"],
                                 "o": {"b": 2, "a": "x"}, "nested": {"a": [1]}, "bad-name": 1})
    assert sh == ("declare -a l=(1 'a' )\ndeclare n=42\ndeclare no=\ndeclare -A o=(['a']='x' ['b']=2 )\n"
                  "declare s='it'\\''s'\ndeclare t=1\ndeclare z=''\n")


def test_export_references_graph_format() -> None:
    refs = {"/nix/store/b-b": ["/nix/store/a-a"], "/nix/store/a-a": []}
    assert validity_registration(refs, lambda p: refs[p]) == \
        b"/nix/store/a-a\n\n0\n/nix/store/b-b\n\n1\n/nix/store/a-a\n"
    with pytest.raises(NartoolError, match="odd number of tokens"):
        _env(_drv({"exportReferencesGraph": "one"}))
    with pytest.raises(NartoolError, match="invalid file name"):
        _env(_drv({"exportReferencesGraph": "../x /nix/store/a-a"}))
    with pytest.raises(NartoolError, match="not in the input closure"):
        _env(_drv({"exportReferencesGraph": "g /nix/store/3bm8vwsq22cxmwz21vifir6ldp798x8d-y"}))


def test_exit_status() -> None:
    r = BuildResult
    assert exit_status([r(BuildStatus.PERMANENT_FAILURE)]) == 100
    assert exit_status([r(BuildStatus.TIMED_OUT)]) == 101
    assert exit_status([r(BuildStatus.OUTPUT_REJECTED, "hash mismatch in fixed-output derivation")]) == 102
    assert exit_status([r(BuildStatus.TIMED_OUT), r(BuildStatus.PERMANENT_FAILURE)]) == 101
    assert exit_status([r(BuildStatus.LOG_LIMIT_EXCEEDED)]) == 1
    assert exit_status([r(BuildStatus.OUTPUT_REJECTED, "output '…' is not allowed")]) == 1
    assert exit_status([r(BuildStatus.DEPENDENCY_FAILED), r(BuildStatus.PERMANENT_FAILURE)]) == 100


# -- the scheduler, with a fake builder -----------------------------------------------------------


def _graph(st: LocalStore) -> dict[str, str]:
    """a <- b, a <- c, {b, c} <- d, and an independent e: .drv paths by letter."""
    paths: dict[str, str] = {}

    def add(n: str, deps: list[str]) -> None:
        d = Derivation(outputs={"out": DerivationOutput()}, input_drvs={paths[x]: ["out"] for x in deps},
                       platform="x86_64-linux", builder="/bin/sh", env={"name": n, "out": "", "builder": "/bin/sh",
                                                                        "system": "x86_64-linux"}, name=n)
        full = compute_outputs(d, store_resolver(st), st.store_dir)
        paths[n] = st.add_text(n + ".drv", full.unparse(), full.references()).path

    add("a", [])
    add("b", ["a"])
    add("c", ["a"])
    add("d", ["b", "c"])
    add("e", [])
    return paths


#: the threads the fake builds ran in (the objects: an ident may be reused)
threads: list[threading.Thread] = []


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[LocalStore, dict[str, str], list[tuple[str, str, float]],
                                                                   set[str]]:
    st = LocalStore(tmp_path / "s")
    paths = _graph(st)
    events: list[tuple[str, str, float]] = []
    failing: set[str] = set()
    lock = threading.Lock()
    threads.clear()

    def build_one(store: LocalStore, n: goal_mod._Node, *a: object) -> BuildResult:
        name = n.drv.name
        with lock:
            events.append(("start", name, time.monotonic()))
            threads.append(threading.current_thread())
        time.sleep(0.15)
        with lock:
            events.append(("end", name, time.monotonic()))
        if name in failing:
            return BuildResult(BuildStatus.PERMANENT_FAILURE, f"builder for '{n.drv_path}' failed with exit code 1")
        out = n.drv.outputs["out"].path
        os.makedirs(store.physical(out))
        store.register_built_path(out)
        return BuildResult(BuildStatus.BUILT)

    monkeypatch.setattr(goal_mod, "_build_one", build_one)
    return st, paths, events, failing


def _order(events: list[tuple[str, str, float]], kind: str) -> list[str]:
    return [n for k, n, _ in events if k == kind]


def test_scheduler_dependency_order_and_parallelism(fake: tuple[LocalStore, dict[str, str],
                                                                list[tuple[str, str, float]], set[str]]) -> None:
    st, paths, events, _ = fake
    res = goal_mod.build_paths(st, [paths["d"], paths["e"]], BuildOptions(max_jobs=2))
    assert [r.status for r in res] == [BuildStatus.BUILT, BuildStatus.BUILT]
    t = {(k, n): at for k, n, at in events}
    for before, after in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
        assert t[("end", before)] <= t[("start", after)]
    # never more than two at once, and some overlap happened
    running = peak = 0
    for k, _, _ in sorted(events, key=lambda e: (e[2], e[0] == "start")):
        running += 1 if k == "start" else -1
        peak = max(peak, running)
    assert peak == 2 and len({id(t) for t in threads}) == 2  # two worker threads, reused
    # all valid now: nothing is built again
    events.clear()
    res = goal_mod.build_paths(st, [paths["d"]], BuildOptions(max_jobs=2))
    assert res[0].status == BuildStatus.ALREADY_VALID and events == []


def test_scheduler_one_at_a_time(fake: tuple[LocalStore, dict[str, str], list[tuple[str, str, float]],
                                             set[str]]) -> None:
    st, paths, events, _ = fake
    before = threading.active_count()
    goal_mod.build_paths(st, [paths["d"], paths["e"]], BuildOptions(max_jobs=1))
    ev = [k for k, _, _ in sorted(events, key=lambda e: e[2])]
    assert ev == ["start", "end"] * 5
    # one worker thread ran them all, one after the other, and is gone
    assert len({id(t) for t in threads}) == 1
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert threading.active_count() == before


def test_scheduler_failure_and_keep_going(fake: tuple[LocalStore, dict[str, str], list[tuple[str, str, float]],
                                                      set[str]]) -> None:
    st, paths, events, failing = fake
    failing.add("b")
    seen: list[str] = []
    every: dict[str, BuildResult] = {}
    res = goal_mod.build_paths(st, [paths["d"], paths["e"]], BuildOptions(max_jobs=1, keep_going=True),
                               on_failure=lambda p, r: seen.append(p), all_results=every)
    assert res[0].status == BuildStatus.DEPENDENCY_FAILED
    assert res[0].error_msg == f"1 dependencies of derivation '{paths['d']}' failed to build"
    assert res[1].status == BuildStatus.BUILT  # independent: built with --keep-going
    assert seen == [paths["b"]] and "d" not in _order(events, "start")
    assert exit_status(every.values()) == 100


def test_scheduler_stops_without_keep_going(fake: tuple[LocalStore, dict[str, str], list[tuple[str, str, float]],
                                                        set[str]]) -> None:
    st, paths, events, failing = fake
    failing.add("a")
    res = goal_mod.build_paths(st, [paths["d"], paths["e"]], BuildOptions(max_jobs=1))
    assert res[0].status == BuildStatus.DEPENDENCY_FAILED
    started = _order(events, "start")
    assert started[0] in ("a", "e") and "b" not in started and "d" not in started


def test_scheduler_max_jobs_zero_without_builders(fake: tuple[LocalStore, dict[str, str],
                                                              list[tuple[str, str, float]], set[str]]) -> None:
    st, paths, events, _ = fake
    res = goal_mod.build_paths(st, [paths["e"]], BuildOptions(max_jobs=0))
    assert res[0].status == BuildStatus.MISC_FAILURE and res[0].error_msg == (
        "unable to start any build; either increase '--max-jobs' or enable remote builds."
        "\nhttps://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html")
    assert events == []


def test_scheduler_rejects_bad_targets(fake: tuple[LocalStore, dict[str, str], list[tuple[str, str, float]],
                                                   set[str]]) -> None:
    st, paths, _, _ = fake
    with pytest.raises(NartoolError, match="does not have wanted outputs 'dev'"):
        goal_mod.build_paths(st, [paths["e"] + "!dev"], BuildOptions())
    with pytest.raises(NartoolError, match="is not a derivation"):
        goal_mod.build_paths(st, ["/nix/store/3bm8vwsq22cxmwz21vifir6ldp798x8d-x"], BuildOptions())


def test_sandbox_unavailable_on_a_diverted_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel refuses the namespaces, a diverted store (every test store) cannot fall back
    to an unsandboxed build: the build fails naming the cause, nothing is left behind."""
    from nartool.build import sandbox as sbx
    from nartool.errors import SandboxUnavailable

    def refuse(spec: object, **kw: object) -> object:
        raise SandboxUnavailable("cannot create the build sandbox: unshare(user, mount): Operation not permitted")

    monkeypatch.setattr(sbx, "start_sandboxed", refuse)
    monkeypatch.setattr(sbx, "start_unsandboxed", lambda spec, **kw: pytest.fail("no fallback on a diverted store"))
    st = LocalStore(tmp_path / "s")
    paths = _graph(st)
    res = goal_mod.build_paths(st, [paths["a"]], BuildOptions(sandbox_fallback=True, build_users_group=""))
    assert res[0].status == BuildStatus.MISC_FAILURE and "Operation not permitted" in res[0].error_msg
    assert not [n for n in os.listdir(st.real_store_dir) if n.endswith(".chroot")]
    assert not [n for n in os.listdir(os.environ.get("TMPDIR") or "/tmp") if n.startswith("nix-build-a.drv-")]


def test_crafted_paths_are_refused(tmp_path: Path) -> None:
    st = LocalStore(tmp_path / "s")
    d = Derivation(outputs={"out": DerivationOutput("/nix/store/../../../etc/x")}, platform="x86_64-linux",
                   builder="/bin/sh", name="x")
    r = goal_mod.build_derivation(st, "/nix/store/3bm8vwsq22cxmwz21vifir6ldp798x8d-x.drv", d, BuildOptions())
    assert r.status == BuildStatus.MISC_FAILURE and "invalid output path" in r.error_msg
    d.outputs["out"].path = "/nix/store/3bm8vwsq22cxmwz21vifir6ldp798x8d-x"
    r = goal_mod.build_derivation(st, "/nix/store/../x.drv", d, BuildOptions())
    assert r.status == BuildStatus.MISC_FAILURE
    assert os.listdir(st.real_store_dir) == []
