"""The ``nartool`` command's entry point: :func:`nartool.cli.main.main` with the garbage
collector held back, for start-up time; a plain ``nartool build`` command line goes to the
click-free fast path (:mod:`nartool.cli.fastbuild`) instead.

No collection runs while click and the CLI load (thousands of new objects, several full
collections for nothing), and what they made is then frozen out of later collections. When the
command has run, everything is frozen again: a short-lived process otherwise spends ~10 ms in a
last collection at exit. (Reference counting frees as usual throughout; only the search for
unreachable cycles is skipped, which finalization never guaranteed anyway.)
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    try:
        args = sys.argv[1:]
        fast = None
        if "build" in args:
            from .fastbuild import parse
            from .process import hoist_store_option

            fast = parse(hoist_store_option(list(args)))
        if fast is None:
            from .main import main as run
    finally:
        gc.freeze()
        gc.enable()
    try:
        if fast is not None:
            from .fastbuild import main as run_fast

            run_fast(fast)
        else:
            run()
    finally:
        gc.freeze()
