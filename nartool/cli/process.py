"""The ``nartool`` process's set-up, shared by the click command tree (:mod:`.main`) and the
click-free fast path of ``nartool build`` (:mod:`.fastbuild`): termination signals, the
diagnostics handler, and ``--store`` accepted after the subcommand. Imports no click."""

from __future__ import annotations

import signal
import sys

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _handle_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal, a dropped SSH session) unwind like Ctrl-C, so
    that temporaries are removed and locks released. A signal ignored by whoever started us
    (``nohup``) stays ignored."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _on_sigterm)


#: subcommands with a --store option of their own (not the global one)
_OWN_STORE_OPTION = frozenset({"serve"})
#: global options that take a value
_GLOBAL_VALUE_OPTIONS = frozenset({"--store", "--store-dir"})


def hoist_store_option(args: list[str]) -> list[str]:
    """``--store URI`` after the subcommand (``nartool store query --store URI …``) is the
    global option, as Nix's ``--store`` is accepted anywhere: move it in front of the subcommand
    (where a later one wins over an earlier global one). Not past ``--``, and not for commands
    with their own ``--store``."""
    cmd_at = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return args
        if a in _GLOBAL_VALUE_OPTIONS:
            i += 2
            continue
        if not a.startswith("-"):
            cmd_at = i
            break
        i += 1
    if cmd_at is None or args[cmd_at] in _OWN_STORE_OPTION:
        return args
    hoisted: list[str] = []
    rest: list[str] = []
    i = cmd_at
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i:])
            break
        if a == "--store" and i + 1 < len(args):
            hoisted += [a, args[i + 1]]
            i += 2
            continue
        if a.startswith("--store="):
            hoisted.append(a)
        else:
            rest.append(a)
        i += 1
    return args[:cmd_at] + hoisted + rest


_handler_class: Any = None


def _stderr_handler_class(logging: Any) -> Any:
    """The handler writing library diagnostics as plain lines on the current ``sys.stderr``
    (one class per process, made when ``logging`` is first needed)."""
    global _handler_class
    if _handler_class is None:
        class StderrHandler(logging.Handler):  # type: ignore[misc]
            def emit(self, record: Any) -> None:
                try:
                    sys.stderr.write(self.format(record) + "\n")
                    sys.stderr.flush()
                except Exception:
                    self.handleError(record)

        _handler_class = StderrHandler
    return _handler_class


def _configure_diagnostics(logging: Any, debug: bool) -> None:
    cls = _stderr_handler_class(logging)
    logger = logging.getLogger("nartool")
    for h in [h for h in logger.handlers if isinstance(h, cls)]:
        logger.removeHandler(h)
    handler = cls()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def _show_diagnostics(debug: bool) -> None:
    """The ``nartool`` loggers' messages on stderr: INFO and up, DEBUG too with --debug. Set up
    now when ``logging`` is imported already, else at the first use of a nartool logger
    (importing ``logging`` costs ~8 ms of start-up, and most commands never log)."""
    if "logging" in sys.modules:
        _configure_diagnostics(sys.modules["logging"], debug)
    else:
        from .._log import when_used

        when_used(lambda logging: _configure_diagnostics(logging, debug))


def _ignore_termination() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):  # not the main thread (an embedding program)
                pass


def run_guarded(command: Callable[[], int], debug: bool) -> int:
    """The process's set-up (diagnostics, termination signals), then ``command``; returns its
    exit status. Shared by the click command tree (:func:`.main.main`) and the click-free fast
    paths (:func:`.fastbuild.run_fast`), which then exit each in its own way."""
    _show_diagnostics(debug)
    _handle_termination()
    try:
        return command()
    except KeyboardInterrupt:  # a signal that landed while an outcome was being reported
        return 130
    finally:
        # The outcome is settled: a signal from now on must not turn a finished (committed)
        # command into a death by SIGINT during interpreter shutdown.
        _ignore_termination()


def status_of(e: BaseException, debug: bool, say: Callable[[str], object]) -> int:
    """The exit status of a command that ended with ``e`` (neither an interruption nor one of
    click's own exceptions), reported as the CLI reports errors (``say`` writes a line on
    stderr): a reader of stdout that went away, 141 without a word; ``sys.exit``; a nartool or
    system error, one ``error:`` line (1); anything else, an internal error (2)."""
    if isinstance(e, BrokenPipeError):
        import os

        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 141
    if isinstance(e, SystemExit):
        if isinstance(e.code, str):
            say(e.code)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    from ..errors import NartoolError
    from .common import report_error  # (loads click, for the message)

    if isinstance(e, (NartoolError, OSError)):
        return report_error(e, debug)
    return report_error(e, debug) or 2
