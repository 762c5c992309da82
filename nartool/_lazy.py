"""Names of a package imported from their modules at first use (PEP 562), so that a command
loads only the modules it needs."""

from __future__ import annotations

from collections.abc import Callable

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any


def lazy_getattr(package: str, where: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` comes from the module ``where[name]``
    (relative to ``package``), imported at first use; it is then kept in ``namespace`` (the
    package's globals), so that the next use is a plain lookup."""

    def __getattr__(name: str) -> Any:
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(mod, package), name)
        namespace[name] = value
        return value

    return __getattr__
