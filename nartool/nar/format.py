"""Wire primitives of the NAR format: u64 little-endian integers and zero-padded strings,
plus the fused byte tokens (length prefix + keyword + padding) that readers compare against
instead of decoding."""

from __future__ import annotations

PAD = tuple(bytes(i) for i in range(8))


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def enc_str(b: bytes) -> bytes:
    n = len(b)
    return n.to_bytes(8, "little") + b + PAD[(-n) & 7]


MAGIC = b"nix-archive-1"
TOK_MAGIC = enc_str(MAGIC)
TOK_OPEN = enc_str(b"(")
TOK_CLOSE = enc_str(b")")
TOK_TYPE = enc_str(b"type")
TOK_REGULAR = enc_str(b"regular")
TOK_DIRECTORY = enc_str(b"directory")
TOK_SYMLINK = enc_str(b"symlink")
TOK_EXECUTABLE = enc_str(b"executable")
TOK_CONTENTS = enc_str(b"contents")
TOK_TARGET = enc_str(b"target")
TOK_ENTRY = enc_str(b"entry")
TOK_NAME = enc_str(b"name")
TOK_NODE = enc_str(b"node")
EMPTY_STR = enc_str(b"")

# Fused sequences the writer emits in one piece.
HDR_REGULAR = TOK_OPEN + TOK_TYPE + TOK_REGULAR + TOK_CONTENTS
HDR_EXECUTABLE = TOK_OPEN + TOK_TYPE + TOK_REGULAR + TOK_EXECUTABLE + EMPTY_STR + TOK_CONTENTS
HDR_SYMLINK = TOK_OPEN + TOK_TYPE + TOK_SYMLINK + TOK_TARGET
HDR_DIRECTORY = TOK_OPEN + TOK_TYPE + TOK_DIRECTORY
ENTRY_OPEN = TOK_ENTRY + TOK_OPEN + TOK_NAME
#: after the name: ``node``
NODE = TOK_NODE
CLOSE = TOK_CLOSE
#: closes a node inside an entry, then the entry
CLOSE2 = TOK_CLOSE + TOK_CLOSE


def validate_name(name: bytes, max_name: int) -> str | None:
    """Return why ``name`` is not a valid directory entry name, or ``None``."""
    if not name:
        return "empty entry name"
    if name == b"." or name == b"..":
        return "entry name is '.' or '..'"
    if b"/" in name:
        return "entry name contains '/'"
    if b"\0" in name:
        return "entry name contains NUL"
    if len(name) > max_name:
        return f"entry name longer than {max_name} bytes"
    return None


def validate_target(target: bytes, max_target: int) -> str | None:
    """Return why ``target`` is not a valid symlink target, or ``None``."""
    if not target:
        return "empty symlink target"
    if b"\0" in target:
        return "symlink target contains NUL"
    if len(target) > max_target:
        return f"symlink target longer than {max_target} bytes"
    return None
