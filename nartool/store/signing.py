"""Nix's Ed25519 signing keys and store path signatures (``docs/store.md``, Signatures).

Text formats, all ASCII and written without a trailing newline:

* secret key: ``NAME:base64(64 bytes)``, the libsodium secret key, i.e. the 32-byte seed
  followed by the 32-byte public key;
* public key: ``NAME:base64(32 bytes)``;
* signature: ``NAME:base64(64-byte detached Ed25519 signature)``.

Parsing splits at the first ``:``; name and body must both be non-empty. The base64 decoder
skips ``\\n`` (so a key file with a trailing newline loads), otherwise it is strict: padding is
required and nothing may follow it (Nix 2.8 stops reading at the first ``=``).

What is signed is a path's *fingerprint* (:func:`fingerprint`). Ed25519 is deterministic, so
signing the same fingerprint with the same key gives the same signature as Nix.

The Ed25519 arithmetic comes from the optional ``cryptography`` package (the ``signing``
extra, installed by ``install.sh``), imported on first use: parsing keys and signatures and
everything unsigned works without it; signing, verifying and deriving a public key raise
:class:`CryptographyMissingError` (exit status 1, naming the fix) when it is absent.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import NartoolError, SignatureError
from ..hashes import Hash
from .types import PathInfo

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SECRET_KEY_BYTES = 64
SIGNATURE_BYTES = 64

# Nix's tokenizeString default separators (not Python's wider notion of whitespace)
_LIST_SEPARATORS = re.compile(r"[ \t\n\r]+")


INSTALL_HINT = "pip install 'nartool[signing]' (or rerun install.sh)"


class CryptographyMissingError(NartoolError):
    """Signing or verifying was needed but the ``cryptography`` package is not importable.
    Deliberately not a :class:`SignatureError`: it must not read as "badly signed"."""


def require_cryptography() -> None:
    """Import ``cryptography``'s Ed25519 support, or raise :class:`CryptographyMissingError`."""
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError:
        raise CryptographyMissingError(
            "signing and verifying signatures need the Python package 'cryptography', which is not "
            f"installed: {INSTALL_HINT}", rule="missing-cryptography") from None


def _split(text: str, what: str, rule: str, *, secret: bool = False) -> tuple[str, str]:
    """Split ``NAME:BODY`` at the first colon; both parts must be non-empty."""
    name, colon, body = text.partition(":")
    if not colon or not name or not body:
        if secret:  # show nothing of what may be a secret
            raise SignatureError(f"{what} is not of the form NAME:BASE64", rule=rule)
        raise SignatureError(f"{what} is not of the form NAME:BASE64", rule=rule,
                             expected="NAME:BASE64", got=_clip(text))
    return name, body


def _clip(text: str) -> str:
    """A shortened rendering of user input for error messages."""
    return repr(text if len(text) <= 24 else text[:16] + "…")


def _b64decode(body: str, size: int, what: str, size_rule: str, *, secret: bool = False) -> bytes:
    """Decode base64 (``\\n`` skipped) and check the decoded size."""
    try:
        raw = base64.b64decode(body.replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        if secret:
            raise SignatureError(f"{what} is not valid base64", rule="bad-base64") from None
        raise SignatureError(f"{what} is not valid base64", rule="bad-base64",
                             expected="padded base64", got=_clip(body)) from None
    if len(raw) != size:
        raise SignatureError(f"{what} has the wrong size (in bytes, once decoded)", rule=size_rule,
                             expected=size, got=len(raw))
    return raw


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _check_name(name: str) -> None:
    """Names we create must survive ``to_text``/``parse`` and whitespace-separated key lists."""
    if not name or ":" in name or _LIST_SEPARATORS.search(name) or not name.isprintable():
        raise SignatureError("key name must be non-empty, without ':', whitespace or control characters",
                             rule="bad-key-name", expected="a name like cache.example.org-1", got=repr(name))


def parse_signature(text: str) -> tuple[str, bytes]:
    """Split a ``NAME:base64`` signature into its key name and the 64 signature bytes."""
    name, body = _split(text, "signature", "bad-signature")
    return name, _b64decode(body, SIGNATURE_BYTES, "signature", "bad-signature-size")


def _verify_raw(public: bytes, message: bytes, sig: bytes) -> bool:
    require_cryptography()
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class PublicKey:
    """A named Ed25519 public key (``trusted-public-keys`` entry)."""

    name: str
    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != PUBLIC_KEY_BYTES:
            raise SignatureError("public key has the wrong size (in bytes)", rule="bad-key-size",
                                 expected=PUBLIC_KEY_BYTES, got=len(self.key))

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse ``NAME:base64(32 bytes)``."""
        name, body = _split(text, "public key", "bad-key")
        return cls(name, _b64decode(body, PUBLIC_KEY_BYTES, "public key", "bad-key-size"))

    def to_text(self) -> str:
        return f"{self.name}:{_b64encode(self.key)}"

    def verify(self, message: bytes, sig_text: str) -> bool:
        """True iff ``sig_text`` is this key's valid signature of ``message``.

        A signature by another key name is simply not valid (False); a signature that is
        not ``NAME:base64`` of 64 bytes raises :class:`SignatureError`.
        """
        name, sig = parse_signature(sig_text)
        return name == self.name and _verify_raw(self.key, message, sig)


@dataclass(frozen=True)
class SecretKey:
    """A named libsodium Ed25519 secret key: 32-byte seed + 32-byte public key."""

    name: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != SECRET_KEY_BYTES:
            raise SignatureError("secret key has the wrong size (in bytes)", rule="bad-key-size",
                                 expected=SECRET_KEY_BYTES, got=len(self.key))
        derived = _public_from_seed(self.key[:SEED_BYTES])
        if derived != self.key[SEED_BYTES:]:
            raise SignatureError("secret key is corrupt: its public half does not match its seed",
                                 rule="key-mismatch")

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        """A fresh random key named ``name``."""
        _check_name(name)
        seed = os.urandom(SEED_BYTES)
        return cls(name, seed + _public_from_seed(seed))

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        """Parse ``NAME:base64(64 bytes)`` (a trailing newline is tolerated)."""
        name, body = _split(text, "secret key", "bad-key", secret=True)
        return cls(name, _b64decode(body, SECRET_KEY_BYTES, "secret key", "bad-key-size", secret=True))

    def to_text(self) -> str:
        return f"{self.name}:{_b64encode(self.key)}"

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self.key[SEED_BYTES:])

    def sign(self, message: bytes) -> str:
        """The detached signature of ``message`` as ``NAME:base64``."""
        require_cryptography()
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        sig = Ed25519PrivateKey.from_private_bytes(self.key[:SEED_BYTES]).sign(message)
        return f"{self.name}:{_b64encode(sig)}"


def _public_from_seed(seed: bytes) -> bytes:
    require_cryptography()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    priv = Ed25519PrivateKey.from_private_bytes(seed)
    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(path: str, nar_hash: Hash, nar_size: int, references: Iterable[str]) -> bytes:
    """The message Nix signs for a store path:
    ``1;PATH;sha256:NIX32;NARSIZE;REF1,REF2,…`` with full reference paths, sorted.

    Nix refuses to compute it for an unknown (zero) NAR size and asserts a SHA-256 hash.
    """
    if nar_size <= 0:
        raise SignatureError("cannot compute the fingerprint of a path whose NAR size is unknown",
                             rule="unknown-nar-size", path=path, got=nar_size)
    if nar_hash.algo != "sha256":
        raise SignatureError("cannot compute the fingerprint of a path whose NAR hash is not SHA-256",
                             rule="not-sha256", path=path, expected="sha256", got=nar_hash.algo)
    refs = sorted(references)
    for p in [path, *refs]:
        if not p.startswith("/") or "," in p or ";" in p:
            raise SignatureError("fingerprint needs full store paths", rule="bad-store-path",
                                 expected="/…/store/HASH-NAME", got=p)
    text = f"1;{path};sha256:{nar_hash.nix32};{nar_size};{','.join(refs)}"
    return text.encode("utf-8")


def path_info_fingerprint(info: PathInfo) -> bytes:
    return fingerprint(info.path, info.nar_hash, info.nar_size, info.references)


def sign_path_info(info: PathInfo, key: SecretKey) -> str:
    """The ``NAME:base64`` signature of ``info``'s fingerprint (``info`` is not modified)."""
    return key.sign(path_info_fingerprint(info))


def _key_map(keys: Mapping[str, PublicKey] | Iterable[PublicKey]) -> Mapping[str, PublicKey]:
    if isinstance(keys, Mapping):
        return keys
    out: dict[str, PublicKey] = {}
    for k in keys:
        out.setdefault(k.name, k)
    return out


def count_valid_signatures(info: PathInfo, keys: Mapping[str, PublicKey] | Iterable[PublicKey]) -> int:
    """How many of ``info.sigs`` verify against ``keys`` (looked up by signature name).

    As in Nix, signatures by unknown key names are not valid and are not inspected further;
    a malformed signature under a trusted name raises :class:`SignatureError`.
    """
    trusted = _key_map(keys)
    if not info.sigs:
        return 0
    message = path_info_fingerprint(info)
    good = 0
    for sig_text in sorted(info.sigs):
        name, colon, _ = sig_text.partition(":")
        pub = trusted.get(name) if colon and name else None
        if pub is None:
            continue
        _, sig = parse_signature(sig_text)
        if _verify_raw(pub.key, message, sig):
            good += 1
    return good


def verify_path_info(info: PathInfo, keys: Mapping[str, PublicKey] | Iterable[PublicKey]) -> bool:
    """True iff at least one signature of ``info`` verifies against ``keys``.

    Only signatures are considered: exempting content-addressed paths or honouring
    ``require-sigs = false`` is the caller's policy.
    """
    return count_valid_signatures(info, keys) > 0


def load_secret_key(file: str | os.PathLike[str]) -> SecretKey:
    """Read a secret key file as written by ``nix-store --generate-binary-cache-key``."""
    with open(file, "rb") as fh:
        data = fh.read()
    try:
        return SecretKey.parse(data.decode("ascii"))
    except UnicodeDecodeError:
        raise SignatureError("secret key file is not ASCII", rule="bad-key", path=os.fspath(file)) from None
    except SignatureError as e:
        e.path = os.fspath(file)
        raise


def load_public_keys(texts: Iterable[str]) -> dict[str, PublicKey]:
    """Parse public keys into a name → key map; as in Nix, the first key of a name wins."""
    out: dict[str, PublicKey] = {}
    for text in texts:
        k = PublicKey.parse(text)
        out.setdefault(k.name, k)
    return out


def split_key_list(value: str) -> list[str]:
    """Split a setting value on spaces, tabs and newlines, dropping empty items."""
    return [t for t in _LIST_SEPARATORS.split(value) if t]


def parse_key_list(value: str) -> dict[str, PublicKey]:
    """Parse a whitespace-separated ``trusted-public-keys`` value."""
    return load_public_keys(split_key_list(value))
