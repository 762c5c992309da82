"""The one exception hierarchy of nartool.

Every error carries structured fields besides its message so that callers (and ``--json``
output) can act on them: ``offset`` (byte offset in the input stream), ``expected``/``got``
(what a rule wanted and what the input had), ``path`` (a path inside a NAR or on disk, as
bytes or str) and ``rule`` (a short stable identifier of the violated rule, e.g.
``"unsorted-entries"``).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any


def _show(v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        if len(b) > 64:
            return repr(b[:64])[:-1] + "...'"
        return repr(b)
    s = str(v)
    if not s or s != s.strip() or not s.isprintable():
        return repr(s)  # an empty value, surrounding blanks or control characters: made visible
    return s


class NartoolError(Exception):
    """Base class. ``str(err)`` is one line suitable for a user."""

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        expected: Any = None,
        got: Any = None,
        path: bytes | str | None = None,
        rule: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.expected = expected
        self.got = got
        self.path = path
        self.rule = rule

    def __str__(self) -> str:
        parts = [self.message]
        if self.path is not None:
            p = self.path
            shown = os.fsdecode(p) if isinstance(p, bytes) else p
            parts.append(f"(path {shown!r})")
        if self.offset is not None:
            parts.append(f"at byte {self.offset} (0x{self.offset:x})")
        # only the sides that are known: never "expected None"
        sides = [f"{k} {_show(v)}" for k, v in (("expected", self.expected), ("got", self.got)) if v is not None]
        if sides:
            parts.append(f"[{', '.join(sides)}]")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"error": type(self).__name__, "message": self.message}
        for k in ("offset", "rule"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        for k in ("expected", "got", "path"):
            v = getattr(self, k)
            if v is not None:
                d[k] = os.fsdecode(v) if isinstance(v, bytes) else str(v)
        return d


class NarError(NartoolError):
    """A NAR stream breaks the format (or a configured limit)."""


class TruncatedError(NarError):
    """The input ended before the structure did."""


class HashFormatError(NartoolError):
    """A hash string could not be parsed."""


class FsError(NartoolError):
    """A filesystem source or sink cannot do what was asked (unsupported file type,
    destination exists, name collision, ...)."""


class CaseCollisionError(FsError):
    """Two names collide on a case- or normalisation-insensitive filesystem."""


class StoreError(NartoolError):
    """A store operation failed (invalid path, hash mismatch, live path, ...)."""


class UnsupportedError(StoreError):
    """A store lacks an optional capability (e.g. referrers of a remote store, adding to a
    read-only one). ``uri`` names the store, ``operation`` what was asked."""

    def __init__(self, uri: str, operation: str, detail: str | None = None) -> None:
        msg = f"store '{uri}' does not support {operation}" + (f" ({detail})" if detail else "")
        super().__init__(msg, rule="unsupported")
        self.uri = uri
        self.operation = operation


class InvalidPathError(StoreError):
    """A string is not a valid store path (or not valid in this store)."""


class ExportFormatError(StoreError):
    """A ``nix-store --export`` stream is malformed."""


class ProtocolError(NartoolError):
    """The peer broke the serve protocol (or refused us)."""


class SignatureError(NartoolError):
    """A key or signature is malformed or does not verify."""


class BuildError(NartoolError):
    """A build could not be set up or run (sandbox setup, build users, builder failure)."""


class SandboxUnavailable(BuildError):
    """The kernel refused the namespaces a sandboxed build needs (clone/unshare gave EPERM or
    EINVAL); the caller decides whether to fall back to an unsandboxed build."""
