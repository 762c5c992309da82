"""Hash text encodings used by Nix: base16, nix32 ("base32"), base64 and SRI.

nix32 is *not* RFC 4648 base32: it uses the alphabet ``0123456789abcdfghijklmnpqrsvwxyz``
and reads the digest as a little-endian integer, emitting the most significant 5-bit group
first.
"""

from __future__ import annotations

from binascii import b2a_base64  # (not base64: a module more to import at start-up)

from ._record import Frozen
from .errors import HashFormatError

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_NIX32_VALUE = {c: i for i, c in enumerate(NIX32_ALPHABET)}

HASH_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def nix32_len(nbytes: int) -> int:
    return (nbytes * 8 - 1) // 5 + 1


def nix32_encode(digest: bytes) -> str:
    n = int.from_bytes(digest, "little")
    length = nix32_len(len(digest))
    alpha = NIX32_ALPHABET
    return "".join(alpha[(n >> (5 * k)) & 31] for k in range(length - 1, -1, -1))


def nix32_decode(text: str, nbytes: int) -> bytes:
    if len(text) != nix32_len(nbytes):
        raise HashFormatError("nix32 string has the wrong length", expected=nix32_len(nbytes), got=len(text))
    n = 0
    for c in text:
        v = _NIX32_VALUE.get(c)
        if v is None:
            raise HashFormatError("invalid character in nix32 string", got=c)
        n = (n << 5) | v
    if n >> (8 * nbytes):
        raise HashFormatError("nix32 string has non-zero spare bits", got=text)
    return n.to_bytes(nbytes, "little")


def sri(algo: str, digest: bytes) -> str:
    return f"{algo}-{b2a_base64(digest, newline=False).decode()}"


class Hash(Frozen):
    """A digest with its algorithm; renders in every Nix text form. Immutable, compared and
    hashed by value (a plain record: see :mod:`nartool._record`)."""

    __slots__ = ("algo", "digest")

    algo: str
    digest: bytes

    def __init__(self, algo: str, digest: bytes) -> None:
        size = HASH_SIZES.get(algo)
        if size is None:
            raise HashFormatError("unknown hash algorithm", got=algo)
        if len(digest) != size:
            raise HashFormatError("digest has the wrong size", expected=size, got=len(digest))
        object.__setattr__(self, "algo", algo)
        object.__setattr__(self, "digest", digest)

    @property
    def base16(self) -> str:
        return self.digest.hex()

    @property
    def nix32(self) -> str:
        return nix32_encode(self.digest)

    @property
    def base64(self) -> str:
        return b2a_base64(self.digest, newline=False).decode()

    @property
    def sri(self) -> str:
        return sri(self.algo, self.digest)

    def prefixed(self, encoding: str = "nix32") -> str:
        """``algo:<digest>`` with the digest in base16, nix32 or base64."""
        body = {"base16": self.base16, "nix32": self.nix32, "base32": self.nix32, "base64": self.base64}[encoding]
        return f"{self.algo}:{body}"

    @classmethod
    def parse(cls, text: str, algo: str | None = None) -> Hash:
        """Parse ``algo:digest``, SRI ``algo-base64``, or a bare digest when ``algo`` is given.

        As in Nix 2.8, the encoding of a non-SRI digest is decided by its length (base64 only
        when padded to full length), and SRI base64 is read as :func:`base64_decode_nix` reads
        it (missing or extra ``=`` padding accepted).
        """
        if not text.isascii():
            raise HashFormatError("hash string is not ASCII", got=text)
        body = text
        sri_form = False
        if ":" in text:
            a, body = text.split(":", 1)
            if algo is not None and a != algo:
                raise HashFormatError("hash has the wrong algorithm", expected=algo, got=a)
            algo = a
        elif "-" in text and text.split("-", 1)[0] in HASH_SIZES:
            a, body = text.split("-", 1)
            if algo is not None and a != algo:
                raise HashFormatError("hash has the wrong algorithm", expected=algo, got=a)
            algo, sri_form = a, True
        if algo is None:
            raise HashFormatError("hash string names no algorithm", got=text)
        size = HASH_SIZES.get(algo)
        if size is None:
            raise HashFormatError("unknown hash algorithm", got=algo)
        if not sri_form and len(body) == 2 * size:
            if body.strip("0123456789abcdefABCDEF"):
                raise HashFormatError("invalid base16 hash", got=text)
            return cls(algo, bytes.fromhex(body))
        if not sri_form and len(body) == nix32_len(size):
            return cls(algo, nix32_decode(body, size))
        if not sri_form and len(body) != base64_len(size):
            raise HashFormatError(f"hash has the wrong length for hash type {algo!r}", got=text)
        digest = base64_decode_nix(body)
        if len(digest) != size:
            raise HashFormatError(f"invalid {'SRI' if sri_form else 'base-64'} hash", got=text)
        return cls(algo, digest)

    def __str__(self) -> str:
        """``algo:<nix32>``, the form Nix prints by default (``sha256:1b8m03r6…``)."""
        return self.prefixed("nix32")

    def __repr__(self) -> str:
        return f"Hash.parse({self.prefixed('nix32')!r})"


def base64_len(nbytes: int) -> int:
    """Length of the padded base64 text of ``nbytes`` bytes."""
    return (nbytes + 2) // 3 * 4


_B64_VALUE = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def base64_decode_nix(text: str) -> bytes:
    """Base64 decoded as Nix 2.8 decodes hashes: up to the first ``=`` (padding may be missing,
    short or long, and whatever follows it is ignored), newlines skipped, unused low bits of the
    last character ignored; any other character outside the alphabet is an error."""
    out = bytearray()
    acc = bits = 0
    for c in text:
        if c == "=":
            break
        if c == "\n":
            continue
        v = _B64_VALUE.get(c)
        if v is None:
            raise HashFormatError("invalid character in base-64 string", got=c)
        acc = (acc << 6 | v) & 0xFFFF
        bits += 6
        if bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xFF)
    return bytes(out)


def compress_hash(digest: bytes, size: int) -> bytes:
    """Nix's ``compressHash``: XOR-fold a digest down to ``size`` bytes."""
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)
