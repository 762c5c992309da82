"""The ``nartool`` command's entry point: :func:`nartool.cli.main.main` with the garbage
collector held back, for start-up time; a plain ``nartool build`` command line goes to the
click-free fast path (:mod:`nartool.cli.fastbuild`) instead, and plain ``nartool nar hash`` /
``nar restore`` command lines to :mod:`nartool.cli.fastnar`.

No collection runs while click and the CLI load (thousands of new objects, several full
collections for nothing), and what they made is then frozen out of later collections. When the
command has run, everything is frozen again: a short-lived process otherwise spends ~10 ms in a
last collection at exit. (Reference counting frees as usual throughout; only the search for
unreachable cycles is skipped, which finalization never guaranteed anyway.)
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from functools import partial


def main() -> None:
    gc.disable()
    try:
        args = sys.argv[1:]
        run: Callable[[], None] | None = None
        if "build" in args:
            from . import fastbuild
            from .process import hoist_store_option

            build_args = fastbuild.parse(hoist_store_option(list(args)))
            if build_args is not None:
                run = partial(fastbuild.main, build_args)
        elif "nar" in args:
            from . import fastnar

            nar_args = fastnar.parse(args)
            if nar_args is not None:
                run = partial(fastnar.main, nar_args)
        if run is None:
            from .main import main as click_main

            run = click_main
    finally:
        gc.freeze()
        gc.enable()
    try:
        run()
    finally:
        gc.freeze()
