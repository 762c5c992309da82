"""``nartool build`` without click: the command's body (:func:`run_build`, which the click
command in :mod:`.build` calls too) and a fast path for its usual command lines.

Loading click and the command tree costs ~10 ms of a build's start-up, about a fifth of what
``nix-store --realise`` takes for a whole trivial build. :func:`parse` recognises the plain forms
of ``nartool [--store URI] [--store-dir DIR] [--debug] build [OPTIONS] TARGET…`` (``--store``
also after the subcommand), and answers ``None`` for everything else: ``--help``, ``--version``,
``--refresh``, ``--``, an unknown or malformed option, short options run together, an option
value or target that starts with ``-``, no target. Those go through click as before, which
parses and reports them; the fast path never gives a usage error of its own.

The fast path starts the sandbox zygote before it imports the store and build modules, so the
zygote's own start-up runs on another core meanwhile, and holds the garbage collector back while
they load (as :mod:`.entry` does for the command tree). Errors are reported as the click command
reports them (:func:`.common.report_error`; click is imported then, for the message only). One
difference: when stdout is a pipe whose reader has gone, the fast path exits with 141 as
:func:`.main._run` means to, where click (8.4, 8.5) catches the error first and exits with 1.
When the command is done, the process leaves without the interpreter's finalization if nothing
needs it (:func:`_exit`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .process import run_guarded, status_of

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any, NoReturn

#: value options of ``build`` (long and short names) and the attribute each sets
_VALUE_OPTIONS = {"--max-jobs": "max_jobs", "-j": "max_jobs", "--cores": "cores",
                  "--max-silent-time": "max_silent_time", "--timeout": "timeout"}


class BuildArgs:
    """A ``nartool build`` command line, parsed."""

    __slots__ = ("store", "store_dir", "debug", "targets", "options", "keep_going", "max_jobs", "cores",
                 "max_silent_time", "timeout", "as_json")

    def __init__(self) -> None:
        #: ``--store``/``--store-dir`` as given (None: not given; the environment or the default then)
        self.store: str | None = None
        self.store_dir: str | None = None
        self.debug = False
        self.targets: list[str] = []
        self.options: list[tuple[str, str]] = []
        self.keep_going = False
        self.max_jobs: str | None = None
        self.cores: str | None = None
        self.max_silent_time: str | None = None
        self.timeout: str | None = None
        self.as_json = False


def _value(args: list[str], i: int) -> tuple[str, int] | None:
    """The value of the option at ``args[i]`` (``--name=value`` or ``--name value``) and the
    index after it; None when it is missing or looks like an option (click decides then)."""
    name, eq, value = args[i].partition("=")
    if eq and name.startswith("--"):
        return (value, i + 1) if not value.startswith("-") else None
    if i + 1 >= len(args) or args[i + 1].startswith("-"):
        return None
    return args[i + 1], i + 2


def parse(args: list[str]) -> BuildArgs | None:
    """``args`` (after :func:`.process.hoist_store_option`) as a plain ``build`` command line,
    or None when click should parse it."""
    a = BuildArgs()
    i = 0
    while True:  # the global options
        if i >= len(args):
            return None
        t = args[i]
        if t == "build":
            i += 1
            break
        if t == "--debug":
            a.debug = True
            i += 1
            continue
        name = t.partition("=")[0]
        if name not in ("--store", "--store-dir"):
            return None
        got = _value(args, i)
        if got is None:
            return None
        if name == "--store":
            a.store = got[0]
        else:
            a.store_dir = got[0]
        i = got[1]
    while i < len(args):  # build's options and targets (interspersed, as click allows)
        t = args[i]
        if not t.startswith("-"):
            a.targets.append(t)
            i += 1
        elif t in ("--keep-going", "-k"):
            a.keep_going = True
            i += 1
        elif t == "--json":
            a.as_json = True
            i += 1
        elif t == "--option":
            if i + 2 >= len(args):
                return None
            name, value = args[i + 1], args[i + 2]
            if name.startswith("-") or value.startswith("-"):
                return None
            a.options.append((name, value))
            i += 3
        else:
            field = _VALUE_OPTIONS.get(t.partition("=")[0] if t.startswith("--") else t)
            got = _value(args, i) if field is not None else None
            if field is None or got is None:
                return None
            setattr(a, field, got[0])
            i = got[1]
    return a if a.targets else None


def main(a: BuildArgs) -> None:
    """Run ``nartool build`` as :func:`.main.main` runs a command."""
    run_fast(lambda: _build(a), a.debug)


def run_fast(body: Callable[[], int], debug: bool) -> NoReturn:
    """Run a command's ``body`` (which returns the exit status) as :func:`.main.main` runs a
    command: diagnostics, termination signals, errors reported, the exit status. Shared by the
    click-free fast paths (this module's and :mod:`.fastnar`)."""
    _exit(run_guarded(lambda: _run(body, debug), debug))


def _exit(code: int) -> NoReturn:
    """Leave with ``code`` as ``sys.exit`` does, but without the interpreter's finalization
    (~3 ms of tearing down modules and objects) when nothing depends on it: the outcome is
    settled and reported, the store closed, stdout and stderr are flushed here, no other thread
    is running and no ``atexit`` handler is registered. Otherwise (a flush that fails, say on a
    closed pipe) the interpreter exits as usual."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    import atexit
    import threading

    ncallbacks = getattr(atexit, "_ncallbacks", None)
    if threading.active_count() == 1 and ncallbacks is not None and ncallbacks() == 0:
        os._exit(code)
    sys.exit(code)


def _run(body: Callable[[], int], debug: bool) -> int:
    """The command; returns the exit status (errors reported on stderr, as :func:`.main._run`
    reports them)."""
    try:
        return body()
    except KeyboardInterrupt:
        # (click writes an empty line before its own handling of an interruption)
        _stderr_line("")
        _stderr_line("interrupted")
        return 130
    except (Exception, SystemExit) as e:  # noqa: BLE001
        return status_of(e, debug, _stderr_line)


def _stderr_line(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass


def _stdout_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _build(a: BuildArgs) -> int:
    import gc

    gc.disable()  # (no collection while the modules load; what they made is frozen)
    try:
        if sys.platform == "linux":
            from ..build import zygote

            zygote.prestart()
        # loaded here, with the collector held back (the sandbox and build users are otherwise
        # imported by the first build)
        from ..build import goal  # noqa: F401
        if sys.platform == "linux":
            from ..build import sandbox, users  # noqa: F401
        from ..store.uri import open_store
    finally:
        gc.freeze()
        gc.enable()
    store = open_store(a.store if a.store is not None else (os.environ.get("NARTOOL_STORE") or None),
                       store_dir=(a.store_dir if a.store_dir is not None
                                  else (os.environ.get("NARTOOL_STORE_DIR") or "/nix/store")),
                       case_hack=None)
    try:
        return run_build(store, a.targets, a.options, keep_going=a.keep_going, max_jobs=a.max_jobs, cores=a.cores,
                         max_silent_time=a.max_silent_time, timeout=a.timeout, as_json=a.as_json, echo=_stdout_line)
    finally:
        store.close()


def _stderr_write(data: bytes) -> None:
    try:
        sys.stderr.flush()
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
    except (OSError, ValueError):
        pass


def run_build(store: Any, targets: list[str] | tuple[str, ...], options: list[tuple[str, str]] | tuple[tuple[str, str], ...],
              *, keep_going: bool, max_jobs: str | None, cores: str | None, max_silent_time: str | None,
              timeout: str | None, as_json: bool, echo: Callable[[str], Any]) -> int:
    """Build ``targets`` (``DRV`` or ``DRV!OUT,…``) in ``store`` and print their output paths
    (or the JSON results) with ``echo``; the log and the errors go to stderr. Returns the exit
    status (0, or Nix's status of the failure)."""
    # (from their modules, not through nartool.build's lazy names, which import importlib)
    from ..build.goal import SUCCESS, build_paths, exit_status
    from ..build.options import BuildOptions
    from ..store.buildresult import BuildStatus
    from ..store.local import LocalStore

    if not isinstance(store, LocalStore):
        from ..errors import UnsupportedError

        raise UnsupportedError(store.uri, "builds (they need a local store)")
    overrides = dict(options)
    for name, value in (("max-jobs", max_jobs), ("cores", cores), ("max-silent-time", max_silent_time),
                        ("timeout", timeout)):
        if value is not None:
            overrides[name] = value
    opts = BuildOptions.from_config(None, overrides, keep_going=keep_going)
    tty = sys.stderr.isatty()
    paths = [store.follow(t.split("!", 1)[0]) + (("!" + t.split("!", 1)[1]) if "!" in t else "") for t in targets]

    def notice(msg: str) -> None:
        if msg.startswith("error: "):
            msg = msg.replace("\n", "\n       ")  # Nix indents an error's further lines under its text
        _stderr_write(msg.encode("utf-8", "surrogateescape") + b"\n")

    def on_failure(drv: str, r: Any) -> None:
        notice(f"error: {r.error_msg}")

    every: dict[str, Any] = {}
    results = build_paths(store, paths, opts, log=_stderr_write, notice=notice, keep_colours=tty,
                          on_failure=on_failure, all_results=every)
    failed = [(t, r) for t, r in zip(paths, results, strict=True) if r.status not in SUCCESS]
    out: list[dict[str, Any]] = []
    for t, r in zip(paths, results, strict=True):
        drv_path, _, wanted = t.partition("!")
        outs = store.query_derivation_outputs(drv_path)
        if wanted and wanted != "*":
            outs = {k: v for k, v in outs.items() if k in wanted.split(",")}
        ok = r.status in SUCCESS
        out.append({"drvPath": drv_path, "outputs": outs if ok else {}, "status": BuildStatus(r.status).name,
                    **({"error": r.error_msg} if not ok else {})})
        if ok and not as_json and not failed:  # (as nix-store -r: no paths at all after a failure)
            for _, p in sorted(outs.items()):
                echo(p)
    if as_json:
        import json

        echo(json.dumps(out, separators=(",", ":"), ensure_ascii=False))
    if failed:
        if len(failed) == 1 and failed[0][1].error_msg:
            notice(f"error: {failed[0][1].error_msg}")
        else:
            # as Nix: every failed target's error, the first one's last, then the summary (sorted)
            for _, r in failed[1:] + failed[:1]:
                if r.error_msg:  # (not for a target that was never started)
                    notice(f"error: {r.error_msg}")
            notice("error: build of " + ", ".join(f"'{t}'" for t in sorted({t for t, _ in failed})) + " failed")
        return int(exit_status(every.values()))
    return 0
