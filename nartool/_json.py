""":mod:`json`, imported at its first use.

Importing ``json`` loads three modules and compiles six regular expressions (~1 ms). The store,
the build environment and the scheduler use it only now and then (a store's settings file when
it is created, structured attributes, a builder's ``@nix`` lines, realisations), so a plain
build does without it: they call these functions instead, which import ``json`` when first
called and then go straight to it. They take what the ``json`` functions take.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import IO, Any


def loads(s: str | bytes | bytearray, **kwargs: Any) -> Any:
    import json

    return json.loads(s, **kwargs)


def load(fp: IO[str] | IO[bytes], **kwargs: Any) -> Any:
    import json

    return json.load(fp, **kwargs)


def dumps(obj: Any, **kwargs: Any) -> str:
    import json

    return json.dumps(obj, **kwargs)


def dump(obj: Any, fp: IO[str], **kwargs: Any) -> None:
    import json

    json.dump(obj, fp, **kwargs)
