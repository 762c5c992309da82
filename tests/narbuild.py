"""Build NAR byte strings token by token (for malformed-input tests)."""

from __future__ import annotations

from nartool.nar.format import enc_str, u64


def s(b: bytes | str) -> bytes:
    return enc_str(b.encode() if isinstance(b, str) else b)


def toks(*parts: bytes | str | int) -> bytes:
    """Concatenate tokens: str/bytes become padded strings, int becomes a raw u64."""
    out = b""
    for p in parts:
        out += u64(p) if isinstance(p, int) else s(p)
    return out


MAGIC = s("nix-archive-1")


def reg(data: bytes = b"", executable: bool = False) -> bytes:
    return toks("(", "type", "regular") + (toks("executable", "") if executable else b"") + toks("contents", data, ")")


def link(target: bytes) -> bytes:
    return toks("(", "type", "symlink", "target", target, ")")


def entry(name: bytes, node: bytes) -> bytes:
    return toks("entry", "(", "name", name, "node") + node + toks(")")


def dir_(*entries: bytes) -> bytes:
    return toks("(", "type", "directory") + b"".join(entries) + toks(")")


def nar(node: bytes) -> bytes:
    return MAGIC + node
