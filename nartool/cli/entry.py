"""The ``nartool`` command's entry point: :func:`nartool.cli.main.main` with the garbage
collector held back, for start-up time.

No collection runs while click and the CLI load (thousands of new objects, several full
collections for nothing), and what they made is then frozen out of later collections. When the
command has run, everything is frozen again: a short-lived process otherwise spends ~10 ms in a
last collection at exit. (Reference counting frees as usual throughout; only the search for
unreachable cycles is skipped, which finalization never guaranteed anyway.)
"""

from __future__ import annotations

import gc


def main() -> None:
    gc.disable()
    try:
        from .main import main as run
    finally:
        gc.freeze()
        gc.enable()
    try:
        run()
    finally:
        gc.freeze()
