"""The ``.narinfo`` file of a binary cache: parsing (strict), rendering (as Nix writes it).

A narinfo is a list of ``Name: value`` lines, each ending in ``\\n``, describing one store path:
where its compressed NAR lives in the cache (``URL``), how it is compressed, the hash and size
of the compressed file (``FileHash``/``FileSize``) and of the NAR (``NarHash``/``NarSize``), the
path's references (base names), its deriver, its signatures and its content address.

:meth:`NarInfo.render` writes the fields in Nix's order and form, so a narinfo nartool writes
is byte-identical to the one ``nix copy --to file://`` writes for the same path and key.
:meth:`NarInfo.parse` reads everything Nix writes and refuses, with a :class:`NarInfoError`
naming the field and line, what Nix would have to guess about: a missing final newline,
carriage returns, a line without ``": "``, a missing or repeated field, a bad hash, size,
store path or reference, an unsafe URL. Fields it does not know are ignored, as Nix does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import HashFormatError, InvalidPathError, StoreError
from ..hashes import Hash
from ..store.paths import DEFAULT_STORE_DIR, ContentAddress, StorePath
from ..store.signing import fingerprint as path_fingerprint
from ..store.types import PathInfo

if TYPE_CHECKING:
    from ..store.signing import SecretKey

#: compression names a narinfo may carry (Nix's); ``Compression`` absent means bzip2
COMPRESSIONS = ("none", "xz", "bzip2", "zstd", "gzip", "br", "lz4", "lzip")
#: file name extension of a compressed NAR by method (gzip has none, as in Nix)
EXTENSIONS = {"none": "", "xz": ".xz", "bzip2": ".bz2", "zstd": ".zst", "gzip": "", "br": ".br",
              "lz4": ".lz4", "lzip": ".lzip"}
#: fields that may appear at most once
_SINGLE = ("StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize", "References",
           "Deriver", "System", "CA")
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z")
_BLANK_RE = re.compile(r"\s")
_INT_RE = re.compile(r"(0|[1-9][0-9]{0,19})\Z")
#: the most a narinfo may hold (references of a huge closure fit many times over)
MAX_NARINFO_SIZE = 16 << 20


class NarInfoError(StoreError):
    """A narinfo is malformed. ``field`` names the offending field (None for the file as a
    whole), ``line`` its 1-based line number (None when not about one line), ``path`` the file
    (``where``)."""

    def __init__(self, message: str, *, where: str = "", field: str | None = None, line: int | None = None,
                 rule: str, expected: object = None, got: object = None) -> None:
        loc = f"NAR info file '{where}' is corrupt" if where else "NAR info is corrupt"
        detail = message if line is None else f"line {line}: {message}"
        super().__init__(f"{loc}: {detail}", rule=rule, expected=expected, got=got, path=where or None)
        self.field = field
        self.line = line


def nar_url(file_hash: Hash, compression: str) -> str:
    """The key Nix gives a compressed NAR: ``nar/<FileHash nix32>.nar<ext>``."""
    return f"nar/{file_hash.nix32}.nar{EXTENSIONS[compression]}"


def check_url(url: str) -> str | None:
    """Why ``url`` is not a safe relative key inside a cache (None when it is)."""
    if not url:
        return "it is empty"
    if url.startswith("/") or "\\" in url or "\x00" in url:
        return "it must be a relative path"
    if not url.isprintable() or _BLANK_RE.search(url):
        return "it contains blanks or control characters"
    parts = url.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "it has an empty, '.' or '..' component"
    if "?" in url or "#" in url or ":" in parts[0]:
        return "it must be a plain path (no scheme, query or fragment)"
    return None


@dataclass
class NarInfo:
    """One narinfo. ``references`` are full store paths; ``sigs`` in the order read (rendered
    sorted, as Nix keeps them in a set); ``system`` is Nix's rarely written ``System`` field."""

    store_path: str
    url: str
    compression: str
    file_hash: str | None
    file_size: int | None
    nar_hash: str
    nar_size: int
    references: list[str] = field(default_factory=list)
    deriver: str | None = None
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None
    system: str | None = None

    # -- parsing

    @classmethod
    def parse(cls, data: bytes, *, store_dir: str = DEFAULT_STORE_DIR, where: str = "") -> NarInfo:
        """Parse a narinfo strictly (see the module docstring); ``where`` names it in errors."""

        def err(msg: str, rule: str, *, fld: str | None = None, line: int | None = None,
                expected: object = None, got: object = None) -> NarInfoError:
            return NarInfoError(msg, where=where, field=fld, line=line, rule=rule, expected=expected, got=got)

        if len(data) > MAX_NARINFO_SIZE:
            raise err("the file is too large", "too-large", expected=f"at most {MAX_NARINFO_SIZE} bytes",
                      got=len(data))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise err("it is not UTF-8 text", "not-utf8", got=f"byte {e.start}") from None
        if not text:
            raise err("the file is empty", "empty")
        if not text.endswith("\n"):
            raise err("the last line does not end in a newline", "no-final-newline", line=text.count("\n") + 1)
        seen: dict[str, tuple[int, str]] = {}
        sigs: list[str] = []
        for n, line in enumerate(text[:-1].split("\n"), 1):
            if "\r" in line:
                raise err("carriage return in a line (CRLF line ends?)", "crlf", line=n)
            name, sep, value = line.partition(": ")
            if not sep:
                if line.endswith(":") and _NAME_RE.match(line[:-1]):  # "Name:" without value or blank
                    name, value = line[:-1], ""
                else:
                    raise err("expected 'Name: value'", "bad-line", line=n, got=line[:80])
            if not _NAME_RE.match(name):
                raise err("invalid field name", "bad-line", line=n, got=name[:80])
            if name == "Sig":
                sigs.append(value)
                if not value or ":" not in value:
                    raise err("a signature must be NAME:BASE64", "bad-signature", fld="Sig", line=n, got=value[:80])
                continue
            if name in _SINGLE:
                if name in seen:
                    raise err(f"field '{name}' appears twice (lines {seen[name][0]} and {n})", "duplicate-field",
                              fld=name, line=n)
                seen[name] = (n, value)
            # other fields: ignored, as Nix does
        for req in ("StorePath", "URL", "NarHash", "NarSize"):
            if req not in seen:
                raise err(f"required field '{req}' is missing", "missing-field", fld=req)

        def val(name: str) -> tuple[int, str] | None:
            return seen.get(name)

        ln, v = seen["StorePath"]
        try:
            store_path = StorePath.parse(v, store_dir).full(store_dir)
        except InvalidPathError as e:
            raise err(f"bad StorePath: {e.message}", "bad-store-path", fld="StorePath", line=ln, got=v[:120]) from None

        ln, url = seen["URL"]
        why = check_url(url)
        if why:
            raise err(f"bad URL: {why}", "bad-url", fld="URL", line=ln, got=url[:120])

        compression = "bzip2"
        c = val("Compression")
        if c is not None:
            if c[1] not in COMPRESSIONS:
                raise err("unknown compression method", "bad-compression", fld="Compression", line=c[0],
                          expected="|".join(COMPRESSIONS), got=c[1][:40])
            compression = c[1]

        def parse_hash(name: str, *, sha256: bool) -> Hash | None:
            item = val(name)
            if item is None:
                return None
            try:
                h = Hash.parse(item[1])
            except HashFormatError as e:
                raise err(f"bad {name}: {e.message}", "bad-hash", fld=name, line=item[0], got=item[1][:120]) from None
            if ":" not in item[1]:
                raise err(f"{name} must name its algorithm (sha256:…)", "bad-hash", fld=name, line=item[0],
                          got=item[1][:120])
            if sha256 and h.algo != "sha256":
                raise err(f"{name} must be a sha256 hash", "bad-hash", fld=name, line=item[0], got=h.algo)
            return h

        def parse_int(name: str) -> int | None:
            item = val(name)
            if item is None:
                return None
            if not _INT_RE.match(item[1]) or int(item[1]) >= 1 << 63:
                raise err(f"bad {name}: not a decimal size", "bad-size", fld=name, line=item[0], got=item[1][:40])
            return int(item[1])

        file_hash = parse_hash("FileHash", sha256=False)
        file_size = parse_int("FileSize")
        nar_hash = parse_hash("NarHash", sha256=True)
        assert nar_hash is not None
        nar_size = parse_int("NarSize")
        if not nar_size:
            raise err("NarSize must be positive", "bad-size", fld="NarSize", line=seen["NarSize"][0], got=nar_size)

        refs: list[str] = []
        r = val("References")
        if r is not None:
            seen_refs: set[str] = set()
            for tok in r[1].split(" "):
                if not tok:
                    continue
                try:
                    full = StorePath.from_base(tok).full(store_dir)
                except InvalidPathError as e:
                    raise err(f"bad reference: {e.message}", "bad-reference", fld="References", line=r[0],
                              got=tok[:120]) from None
                if full in seen_refs:
                    raise err("a reference is listed twice", "bad-reference", fld="References", line=r[0], got=tok)
                seen_refs.add(full)
                refs.append(full)

        deriver = None
        d = val("Deriver")
        if d is not None and d[1] != "unknown-deriver":
            try:
                deriver = StorePath.from_base(d[1]).full(store_dir)
            except InvalidPathError as e:
                raise err(f"bad Deriver: {e.message}", "bad-deriver", fld="Deriver", line=d[0], got=d[1][:120]) from None

        ca = None
        a = val("CA")
        if a is not None:
            try:
                ContentAddress.parse(a[1])
            except (StoreError, HashFormatError, ValueError) as e:
                raise err(f"bad CA: {getattr(e, 'message', e)}", "bad-ca", fld="CA", line=a[0], got=a[1][:120]) from None
            ca = a[1]
        s = val("System")
        return cls(store_path=store_path, url=url, compression=compression,
                   file_hash=file_hash.prefixed("nix32") if file_hash else None, file_size=file_size,
                   nar_hash=nar_hash.prefixed("nix32"), nar_size=nar_size, references=refs, deriver=deriver,
                   sigs=list(dict.fromkeys(sigs)), ca=ca, system=s[1] if s else None)

    # -- rendering

    def render(self) -> bytes:
        """The narinfo as Nix writes it (field order, sorted references and signatures,
        ``References: `` with a trailing blank when there are none)."""
        lines = [f"StorePath: {self.store_path}", f"URL: {self.url}", f"Compression: {self.compression}"]
        if self.file_hash is not None:
            lines.append(f"FileHash: {Hash.parse(self.file_hash).prefixed('nix32')}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {Hash.parse(self.nar_hash).prefixed('nix32')}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append("References: " + " ".join(sorted(_base(r) for r in self.references)))
        if self.deriver:
            lines.append(f"Deriver: {_base(self.deriver)}")
        if self.system:
            lines.append(f"System: {self.system}")
        lines.extend(f"Sig: {s}" for s in sorted(set(self.sigs)))
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return ("\n".join(lines) + "\n").encode("utf-8")

    # -- signatures

    def fingerprint(self) -> bytes:
        """What a signature signs: ``1;PATH;NARHASH;NARSIZE;REFS`` (see :mod:`nartool.store.signing`)."""
        return path_fingerprint(self.store_path, Hash.parse(self.nar_hash), self.nar_size, self.references)

    def sign(self, key: SecretKey) -> None:
        """Add ``key``'s signature (a deterministic one: signing twice adds nothing)."""
        sig = key.sign(self.fingerprint())
        if sig not in self.sigs:
            self.sigs.append(sig)

    # -- conversion

    @classmethod
    def from_path_info(cls, info: PathInfo, *, url: str, compression: str, file_hash: str | None,
                       file_size: int | None) -> NarInfo:
        return cls(store_path=info.path, url=url, compression=compression, file_hash=file_hash,
                   file_size=file_size, nar_hash=info.nar_hash.prefixed("nix32"), nar_size=info.nar_size,
                   references=sorted(info.references), deriver=info.deriver, sigs=sorted(info.sigs), ca=info.ca)

    def to_path_info(self) -> PathInfo:
        return PathInfo(path=self.store_path, nar_hash=Hash.parse(self.nar_hash), nar_size=self.nar_size,
                        references=frozenset(self.references), deriver=self.deriver, sigs=frozenset(self.sigs),
                        ca=self.ca)


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


__all__ = ["NarInfo", "NarInfoError", "COMPRESSIONS", "EXTENSIONS", "nar_url", "check_url", "MAX_NARINFO_SIZE"]
