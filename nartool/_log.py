"""Loggers that import the standard :mod:`logging` at their first use.

``logging`` and what it imports cost ~8 ms of every command's start-up, and most runs never log.
``get_logger(name)`` stands in for ``logging.getLogger(name)`` at module level; the first call
of any of its methods imports ``logging``, gives the ``nartool`` logger its ``NullHandler`` (a
library stays silent unless the application configures a handler) and runs the hooks registered
with :func:`when_used` (the CLI's stderr handler), then forwards to the real logger.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    import logging
    from typing import Any

_hooks: list[Callable[[Any], None]] = []
_ready = False
_lock = threading.Lock()


def _logging() -> Any:
    global _ready
    import logging

    if not _ready:
        with _lock:
            if not _ready:
                logging.getLogger("nartool").addHandler(logging.NullHandler())
                for hook in _hooks:
                    hook(logging)
                _hooks.clear()
                _ready = True
    return logging


def when_used(hook: Callable[[Any], None]) -> None:
    """Run ``hook(logging)`` once ``logging`` is first needed by a nartool logger (at once if it
    has been already)."""
    with _lock:
        if not _ready:
            _hooks.append(hook)
            return
    hook(sys.modules["logging"])


class _LazyLogger:
    __slots__ = ("_name", "_real")

    def __init__(self, name: str) -> None:
        self._name = name
        self._real: Any = None

    def __getattr__(self, attr: str) -> Any:
        real = self._real
        if real is None:
            real = self._real = _logging().getLogger(self._name)
        return getattr(real, attr)


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, imported and looked up at its first use."""
    return _LazyLogger(name)  # type: ignore[return-value]
