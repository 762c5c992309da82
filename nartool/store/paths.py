"""Store paths: syntax, validation and computation exactly as Nix 2.8 does them.

``<store dir>/<32-char nix32 hash part>-<name>``. The hash part is the nix32 of the SHA-256
of a *fingerprint* (``TYPE:sha256:<hex>:<store dir>:<name>``), XOR-folded to 20 bytes. See
``docs/store.md`` (Store paths, Content addresses) for the verified examples these functions reproduce.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from .._record import Frozen, Ordered
from ..errors import InvalidPathError
from ..hashes import NIX32_ALPHABET, Hash, compress_hash, nix32_encode

HASH_PART_LEN = 32
MAX_NAME_LEN = 211
DEFAULT_STORE_DIR = "/nix/store"

_HASH_CHARS = frozenset(NIX32_ALPHABET)
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+\Z")


def validate_name(name: str, *, what: str = "store path name") -> None:
    """Raise :class:`InvalidPathError` unless ``name`` is a valid store path name (Nix 2.8 rules)."""
    if not name:
        raise InvalidPathError(f"{what} is empty", rule="bad-name", got=name)
    if len(name) > MAX_NAME_LEN:
        raise InvalidPathError(f"{what} is longer than {MAX_NAME_LEN} characters", rule="bad-name",
                               expected=f"<= {MAX_NAME_LEN}", got=len(name), path=name)
    if not _NAME_RE.match(name):
        bad = next(c for c in name if not re.match(r"[A-Za-z0-9+\-._?=]", c))
        raise InvalidPathError(f"{what} contains illegal character {bad!r}", rule="bad-name", got=name)


def check_hash_part(h: str, path: str) -> None:
    if len(h) != HASH_PART_LEN or not _HASH_CHARS.issuperset(h):
        raise InvalidPathError("store path has an invalid hash part", rule="bad-hash-part", got=h, path=path)


class StorePath(Ordered):
    """A parsed store path: hash part and name (the store dir is kept by the caller). Immutable,
    compared, ordered and hashed by value."""

    __slots__ = ("hash_part", "name")

    hash_part: str
    name: str

    def __init__(self, hash_part: str, name: str) -> None:
        object.__setattr__(self, "hash_part", hash_part)
        object.__setattr__(self, "name", name)

    @property
    def base(self) -> str:
        return f"{self.hash_part}-{self.name}"

    def full(self, store_dir: str = DEFAULT_STORE_DIR) -> str:
        return f"{store_dir}/{self.hash_part}-{self.name}"

    @classmethod
    def from_base(cls, base: str) -> StorePath:
        if len(base) < HASH_PART_LEN + 2:
            raise InvalidPathError("too short to be a valid store path", rule="bad-path", got=base, path=base)
        h, sep, name = base[:HASH_PART_LEN], base[HASH_PART_LEN], base[HASH_PART_LEN + 1 :]
        check_hash_part(h, base)
        if sep != "-":
            # Nix 2.8 does not check the separator; we do (as newer Nix), since nothing valid lacks it
            raise InvalidPathError("store path lacks '-' after the hash part", rule="bad-path", got=base, path=base)
        validate_name(name)
        return cls(h, name)

    @classmethod
    def parse(cls, path: str, store_dir: str = DEFAULT_STORE_DIR) -> StorePath:
        """Parse a full store path ``<store_dir>/<hash>-<name>``."""
        if "\0" in path:
            raise InvalidPathError("store path contains a NUL byte", rule="bad-path", path=path.replace("\0", "\\0"))
        prefix = store_dir + "/"
        if not path.startswith(prefix):
            raise InvalidPathError(f"path is not in the store {store_dir!r}", rule="not-in-store", path=path)
        base = path[len(prefix) :]
        if "/" in base:
            raise InvalidPathError("path is below a store path, not a store path", rule="bad-path", path=path)
        return cls.from_base(base)


def parse_path(path: str, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """Validate ``path`` as a full store path and return it unchanged."""
    StorePath.parse(path, store_dir)
    return path


def to_store_path(path: str, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """The store path containing ``path`` (which may be below one, e.g. ``…-x/bin/sh``)."""
    prefix = store_dir + "/"
    if not path.startswith(prefix):
        raise InvalidPathError(f"path is not in the store {store_dir!r}", rule="not-in-store", path=path)
    base = path[len(prefix) :].split("/", 1)[0]
    return prefix + StorePath.from_base(base).base


# -- computation -----------------------------------------------------------------------------


def make_store_path(type_: str, inner: Hash, name: str, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """``makeStorePath``: the path for fingerprint ``type:sha256:<hex>:<store_dir>:<name>``."""
    validate_name(name)
    if inner.algo != "sha256":
        raise InvalidPathError("store path fingerprints use sha256", rule="bad-hash", got=inner.algo)
    fp = f"{type_}:sha256:{inner.base16}:{store_dir}:{name}".encode()
    digest = compress_hash(hashlib.sha256(fp).digest(), 20)
    return f"{store_dir}/{nix32_encode(digest)}-{name}"


def _type_with_refs(kind: str, references: Iterable[str], self_ref: bool) -> str:
    t = kind
    for r in sorted(references):
        t += ":" + r
    if self_ref:
        t += ":self"
    return t


def make_text_path(name: str, text_hash: Hash, references: Iterable[str] = (),
                   store_dir: str = DEFAULT_STORE_DIR) -> str:
    """A text object (``builtins.toFile``, ``.drv`` files): SHA-256 of the bytes, with references."""
    return make_store_path(_type_with_refs("text", references, False), text_hash, name, store_dir)


def make_fixed_output_path(name: str, h: Hash, *, recursive: bool, references: Iterable[str] = (),
                           self_ref: bool = False, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """``makeFixedOutputPath``: recursive sha256 uses ``source`` (with references); every other
    content address uses ``output:out`` over ``fixed:out:[r:]<algo>:<hex>:`` (no references)."""
    refs = list(references)
    if recursive and h.algo == "sha256":
        return make_store_path(_type_with_refs("source", refs, self_ref), h, name, store_dir)
    if refs or self_ref:
        raise InvalidPathError("fixed-output paths other than recursive sha256 cannot have references",
                               rule="bad-ca")
    inner = f"fixed:out:{'r:' if recursive else ''}{h.algo}:{h.base16}:".encode()
    return make_store_path("output:out", Hash("sha256", hashlib.sha256(inner).digest()), name, store_dir)


# -- content addresses (``ca`` column) --------------------------------------------------------


class ContentAddress(Frozen):
    """A content address (the ``ca`` column): method and hash. Immutable, compared and hashed
    by value."""

    __slots__ = ("method", "hash")

    method: str  # "text", "flat" or "recursive"
    hash: Hash

    def __init__(self, method: str, hash: Hash) -> None:  # noqa: A002
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "hash", hash)

    def render(self) -> str:
        if self.method == "text":
            return f"text:{self.hash.algo}:{self.hash.nix32}"
        r = "r:" if self.method == "recursive" else ""
        return f"fixed:{r}{self.hash.algo}:{self.hash.nix32}"

    @classmethod
    def parse(cls, text: str) -> ContentAddress:
        from ..errors import HashFormatError

        try:
            if text.startswith("text:"):
                h = Hash.parse(text[5:])
                if h.algo != "sha256":
                    raise InvalidPathError("text content addresses use sha256", rule="bad-ca", got=text)
                return cls("text", h)
            if text.startswith("fixed:r:"):
                return cls("recursive", Hash.parse(text[8:]))
            if text.startswith("fixed:"):
                return cls("flat", Hash.parse(text[6:]))
        except HashFormatError as e:
            raise InvalidPathError(f"invalid content address: {e.message}", rule="bad-ca", got=text) from None
        raise InvalidPathError("invalid content address", rule="bad-ca", expected="text:… or fixed:…", got=text)

    def store_path(self, name: str, references: Iterable[str] = (), store_dir: str = DEFAULT_STORE_DIR,
                   self_path: str | None = None) -> str:
        """The path this content address gives ``name`` with ``references`` (a reference equal to
        ``self_path`` counts as a self reference)."""
        refs = [r for r in references if r != self_path]
        self_ref = self_path is not None and self_path in references
        if self.method == "text":
            if self_ref:
                raise InvalidPathError("text paths cannot refer to themselves", rule="bad-ca")
            return make_text_path(name, self.hash, refs, store_dir)
        return make_fixed_output_path(name, self.hash, recursive=self.method == "recursive", references=refs,
                                      self_ref=self_ref, store_dir=store_dir)


def ca_matches(path: str, ca: str | None, references: Iterable[str], store_dir: str = DEFAULT_STORE_DIR) -> bool:
    """True when ``ca`` reproduces ``path`` (Nix's ``isContentAddressed``): such a path needs no signature."""
    if not ca:
        return False
    try:
        sp = StorePath.parse(path, store_dir)
        return ContentAddress.parse(ca).store_path(sp.name, references, store_dir, self_path=path) == path
    except InvalidPathError:
        return False
