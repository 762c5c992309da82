"""Store URIs, as Nix writes them, opened through one registry (:func:`open_store`).

| URI | store |
|---|---|
| *(none)*, ``local``, ``auto`` | the embedded default local store (:func:`~nartool.store.local.default_root`) |
| ``/DIR``, ``DIR``, ``local?root=DIR`` | a local store rooted at ``DIR`` (the layout of ``nix-store --store DIR``) |
| ``memory://`` | a new, empty in-memory store |
| ``ssh://[USER@]HOST[?remote-program=…&remote-store=…&ssh-key=…&compress=true]`` | a serve-protocol server (:class:`nartool.remote.store.SSHStore`) |
| ``file:///DIR[?compression=…&secret-key=…]`` | a binary cache in a directory (:class:`nartool.cache.store.BinaryCacheStore`) |
| ``http://HOST[/PREFIX]``, ``https://…`` | a binary cache on a web server (:mod:`nartool.cache.http`) |
| ``s3://BUCKET[/PREFIX][?region=…&endpoint=…&scheme=…&profile=…]`` | a binary cache in an S3 bucket (:mod:`nartool.cache.s3`) |

Every scheme is one row of a table (:data:`STORE_TYPES`); :func:`register_store_type` adds
one (binary caches register here). Parameters common to every store: ``store`` (the logical
store directory, default ``/nix/store``). An unknown scheme is an error naming the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .._record import Frozen
from ..errors import StoreError
from .base import BaseStore
from .paths import DEFAULT_STORE_DIR

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any


class StoreURI(Frozen):
    """A parsed store URI: ``scheme``, what follows ``scheme://`` up to ``?`` (``authority``,
    e.g. ``user@host`` or a path) and the query parameters. Immutable, compared by value."""

    __slots__ = ("text", "scheme", "authority", "params")

    text: str
    scheme: str
    authority: str
    params: Mapping[str, str]

    def __init__(self, text: str, scheme: str, authority: str, params: Mapping[str, str]) -> None:
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "authority", authority)
        object.__setattr__(self, "params", params)

    @property
    def rest(self) -> str:
        """What follows ``scheme://`` (authority and query)."""
        return self.text.split("://", 1)[1] if "://" in self.text else self.text


if TYPE_CHECKING:
    #: opens a store: ``(uri, store_dir, options) -> store``
    Opener = Callable[[StoreURI, str, Mapping[str, Any]], BaseStore]


def parse_store_uri(uri: str | None) -> StoreURI:
    text = (uri or "").strip()
    if not text or text in ("local", "auto"):
        return StoreURI(text, "local", "", {})
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        return StoreURI(text, "local", "", {"root": text})
    from urllib.parse import parse_qsl, unquote  # (here: a plain directory, the usual case, needs neither)

    if text.startswith(("local?", "auto?")):
        return StoreURI(text, "local", "", dict(parse_qsl(text.split("?", 1)[1], keep_blank_values=True)))
    if "://" not in text:  # any other word is a directory, as nartool's --store ROOT always was
        return StoreURI(text, "local", "", {"root": text})
    scheme, _, rest = text.partition("://")
    authority, _, query = rest.partition("?")
    return StoreURI(text, scheme, unquote(authority), dict(parse_qsl(query, keep_blank_values=True)))


def _open_local(u: StoreURI, store_dir: str, opts: Mapping[str, Any]) -> BaseStore:
    import os

    from .local import LocalStore, default_root

    root = u.params.get("root") or default_root()
    return LocalStore(os.path.expanduser(root), store_dir, case_hack=opts.get("case_hack"))


def _open_memory(u: StoreURI, store_dir: str, opts: Mapping[str, Any]) -> BaseStore:
    from .memory import MemoryStore

    return MemoryStore(store_dir)


def _open_ssh(u: StoreURI, store_dir: str, opts: Mapping[str, Any]) -> BaseStore:
    from ..remote.store import SSHStore

    return SSHStore.from_uri(u.rest, store_dir, ssh_opts=opts.get("ssh_opts") or ())


#: scheme → opener (or ``"module:function"``, imported when first used)
STORE_TYPES: dict[str, Opener | str] = {
    "local": _open_local,
    "memory": _open_memory,
    "ssh": _open_ssh,
    "file": "nartool.cache.store:open_file_store",
    "s3": "nartool.cache.s3:open_s3_store",
    "http": "nartool.cache.http:open_http_store",
    "https": "nartool.cache.http:open_http_store",
}


def register_store_type(scheme: str, opener: Opener | str) -> None:
    """Make ``scheme://…`` URIs open with ``opener`` (a function or ``"module:function"``)."""
    STORE_TYPES[scheme] = opener


def open_store(uri: str | None = None, *, store_dir: str | None = None, **options: Any) -> BaseStore:
    """Open the store a URI names (see the module docstring). ``store_dir`` (or the URI's
    ``store`` parameter) sets the logical store directory; ``options`` go to the opener
    (``case_hack`` for local stores, ``ssh_opts`` for ssh ones)."""
    u = parse_store_uri(uri)
    opener = STORE_TYPES.get(u.scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in sorted(STORE_TYPES) if s != "local")
        raise StoreError(f"don't know how to open store '{u.text}' (known: a directory, local?root=DIR, {known})",
                         rule="unknown-store-type", got=u.scheme)
    if isinstance(opener, str):
        module, _, attr = opener.partition(":")
        import importlib  # (here: a plain directory, the usual store, needs no module imported)

        opener = getattr(importlib.import_module(module), attr)
        assert callable(opener)
    sd = u.params.get("store") or store_dir or DEFAULT_STORE_DIR
    return opener(u, sd, options)


__all__ = ["StoreURI", "parse_store_uri", "open_store", "register_store_type", "STORE_TYPES"]
