"""``.drv`` files: Nix's ATerm derivations, read and printed as bytes, and what Nix computes
from them (see ``docs/derivations.md``).

``Derive([outputs],[inputDrvs],[inputSrcs],"platform","builder",[args],[env])`` where an
output is ``("name","path","hashAlgo","hash")``, an input drv ``("path",["out",…])`` and an
env entry ``("key","value")``. Strings may hold any byte; the builder, args and env are
printed with C-like escapes (``\\n \\r \\t \\\\ \\"``), the other strings as they are.

Text is handled as bytes throughout: a ``.drv`` need not be UTF-8 (Nix copies the bytes of
Nix-language strings as they are, so latin-1 or cp1252 text ends up in derivations). In the
Python objects every string is a ``str`` in which each byte that is not part of valid UTF-8
is the lone surrogate ``U+DCxx`` (Python's ``surrogateescape``), so printing gives back the
exact bytes that were read.

The parser accepts what Nix 2.8's parser accepts (including its looser corners: a list
separator may be missing, trailing bytes are ignored, duplicate keys resolve as in Nix) and
checks what Nix checks (paths start with ``/``, output hash algorithms and fixed hashes
parse). Every refusal is a :class:`DerivationError` with the byte offset.
:meth:`Derivation.unparse` prints Nix's canonical form (outputs, inputs and env sorted);
for a ``.drv`` Nix wrote, that is the file's bytes exactly.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import struct
from collections.abc import Callable, Iterable, Mapping

from .._record import Record
from ..errors import HashFormatError, InvalidPathError, NartoolError, StoreError
from ..hashes import HASH_SIZES, NIX32_ALPHABET, Hash, nix32_encode
from .paths import DEFAULT_STORE_DIR, make_fixed_output_path, make_store_path, make_text_path

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any


class DerivationError(StoreError):
    """A ``.drv`` file is malformed, or a derivation is inconsistent."""


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


# -- outputs -------------------------------------------------------------------------------

#: output kinds, as :attr:`DerivationOutput.kind` names them
INPUT_ADDRESSED = "input-addressed"
FIXED = "fixed"
FLOATING = "floating"
DEFERRED = "deferred"
IMPURE = "impure"


class DerivationOutput(Record):
    """One output, as its four ATerm fields: ``path``, ``hash_algo`` (``[r:]<algo>`` for
    content-addressed outputs) and ``hash`` (base16 for fixed outputs).

    The kind follows from which fields are set, as in Nix: no ``hash_algo`` — input-addressed
    (with a path) or deferred (without); a ``hash_algo`` — fixed (with a ``hash``), floating
    content-addressed (without) or impure (``hash`` = ``impure``).

    A mutable record compared by value (unhashable), with :meth:`~nartool._record.Record.replace`."""

    __slots__ = ("path", "hash_algo", "hash")

    def __init__(self, path: str = "", hash_algo: str = "", hash: str = "") -> None:  # noqa: A002
        self.path = path
        self.hash_algo = hash_algo
        self.hash = hash

    @property
    def kind(self) -> str:
        if not self.hash_algo:
            return INPUT_ADDRESSED if self.path else DEFERRED
        if self.hash == "impure":
            return IMPURE
        return FIXED if self.hash else FLOATING

    @property
    def method(self) -> str:
        """``recursive`` (NAR hash, ``r:`` prefix) or ``flat`` (a content-addressed output)."""
        return "recursive" if self.hash_algo.startswith("r:") else "flat"

    @property
    def algo(self) -> str:
        return self.hash_algo[2:] if self.hash_algo.startswith("r:") else self.hash_algo

    def fixed_hash(self) -> Hash:
        """The expected content hash of a fixed output (Nix accepts base16, nix32 or base64 in
        the ``.drv``; it always prints base16)."""
        if self.algo not in HASH_SIZES:
            raise DerivationError("unknown hash algorithm in derivation output", got=self.hash_algo,
                                  rule="bad-drv")
        if ":" in self.hash or "-" in self.hash:
            raise DerivationError("fixed output hash must be an unprefixed digest", got=self.hash, rule="bad-drv")
        try:
            return Hash.parse(self.hash, self.algo)
        except HashFormatError as e:
            raise DerivationError(f"invalid fixed output hash: {e.message}", got=self.hash, rule="bad-drv") from None


def output_path_name(drv_name: str, output: str) -> str:
    """The name part of an output's store path: ``<drv name>`` for ``out``, else
    ``<drv name>-<output>``."""
    return drv_name if output == "out" else f"{drv_name}-{output}"


def make_output_path(output: str, h: Hash, drv_name: str, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """An input-addressed output's path: fingerprint ``output:<name>`` over the derivation's
    hash modulo (``makeOutputPath``)."""
    return make_store_path("output:" + output, h, output_path_name(drv_name, output), store_dir)


def fixed_output_path(o: DerivationOutput, drv_name: str, output: str = "out",
                      store_dir: str = DEFAULT_STORE_DIR) -> str:
    """A fixed output's path, from its method and hash (``makeFixedOutputPath``)."""
    return make_fixed_output_path(output_path_name(drv_name, output), o.fixed_hash(),
                                  recursive=o.method == "recursive", store_dir=store_dir)


def hash_placeholder(output: str) -> str:
    """``hashPlaceholder``: what a floating output's env variable holds before the build."""
    return "/" + nix32_encode(hashlib.sha256(b"nix-output:" + _enc(output)).digest())


# -- the derivation ------------------------------------------------------------------------


class Derivation(Record):
    """A derivation, as its ATerm fields, plus its name. A mutable record compared by value
    (unhashable), with :meth:`~nartool._record.Record.replace`; the collections left out (or
    None) start empty."""

    __slots__ = ("outputs", "input_drvs", "input_srcs", "platform", "builder", "args", "env", "name")

    def __init__(self, outputs: dict[str, DerivationOutput] | None = None, input_drvs: dict[str, list[str]] | None = None,
                 input_srcs: list[str] | None = None, platform: str = "", builder: str = "",
                 args: list[str] | None = None, env: dict[str, str] | None = None, name: str = "") -> None:
        self.outputs: dict[str, DerivationOutput] = {} if outputs is None else outputs
        self.input_drvs: dict[str, list[str]] = {} if input_drvs is None else input_drvs
        self.input_srcs: list[str] = [] if input_srcs is None else input_srcs
        self.platform = platform
        self.builder = builder
        self.args: list[str] = [] if args is None else args
        self.env: dict[str, str] = {} if env is None else env
        #: the name (the ``.drv`` path's name without ``.drv``): needed for fixed output paths
        self.name = name

    def unparse(self, *, mask_outputs: bool = False,
                input_drvs: Mapping[str, Iterable[str]] | None = None) -> bytes:
        """The ATerm bytes in Nix's canonical form (``Derivation::unparse``).

        ``mask_outputs`` empties the output paths and the env variables named like an output;
        ``input_drvs`` replaces the input derivations (as hashing modulo does)."""
        out: list[bytes] = [b"Derive(["]
        for i, (n, o) in enumerate(sorted(self.outputs.items(), key=_key)):
            out += [b"," if i else b"", b"(", _uq(n), b",", _uq("" if mask_outputs else o.path), b",",
                    _uq(o.hash_algo), b",", _uq(o.hash), b")"]
        out.append(b"],[")
        drvs = self.input_drvs if input_drvs is None else input_drvs
        for i, (p, names) in enumerate(sorted(drvs.items(), key=_key)):
            out += [b"," if i else b"", b"(", _uq(p), b",[",
                    b",".join(_uq(n) for n in sorted(set(names), key=_enc)), b"])"]
        out += [b"],[", b",".join(_uq(s) for s in sorted(set(self.input_srcs), key=_enc)), b"],",
                _uq(self.platform), b",", _q(self.builder), b",[", b",".join(_q(a) for a in self.args), b"],["]
        for i, (k, v) in enumerate(sorted(self.env.items(), key=_key)):
            out += [b"," if i else b"", b"(", _q(k), b",", _q("" if mask_outputs and k in self.outputs else v), b")"]
        out.append(b"])")
        return b"".join(out)

    def type(self) -> str:
        """The derivation's kind, from its outputs' kinds (``BasicDerivation::type``):
        ``input-addressed``, ``deferred`` (input-addressed, paths not known yet), ``fixed``,
        ``floating`` or ``impure``. Mixed kinds are an error, as in Nix."""
        kinds = {o.kind for o in self.outputs.values()}
        if not kinds:
            raise DerivationError("derivation must have at least one output", rule="bad-drv")
        if len(kinds) > 1:
            raise DerivationError("can't mix derivation output types", got=sorted(kinds), rule="bad-drv")
        kind = kinds.pop()
        if kind == FIXED:
            if len(self.outputs) > 1:
                raise DerivationError("only one fixed output is allowed", rule="bad-drv")
            if "out" not in self.outputs:
                raise DerivationError('single fixed output must be named "out"', rule="bad-drv")
        if kind == FLOATING and len({o.algo for o in self.outputs.values()}) > 1:
            raise DerivationError("all floating outputs must use the same hash type", rule="bad-drv")
        return kind

    def references(self) -> set[str]:
        """What the ``.drv`` refers to: its input sources and input derivations (never its
        outputs)."""
        return set(self.input_srcs) | set(self.input_drvs)

    def output_path(self, output: str, store_dir: str = DEFAULT_STORE_DIR) -> str | None:
        """The path Nix takes for ``output`` (``DerivationOutput::path``): an input-addressed
        output's recorded path, a fixed output's computed one (from the hash and
        :attr:`name`; the recorded one when the name is not known), none for the others."""
        o = self.outputs[output]
        if o.kind == INPUT_ADDRESSED:
            return o.path
        if o.kind == FIXED:
            return fixed_output_path(o, self.name, output, store_dir) if self.name else o.path
        return None

    def output_paths(self, store_dir: str = DEFAULT_STORE_DIR) -> dict[str, str]:
        """The outputs whose paths are known, as Nix registers them in ``DerivationOutputs``."""
        paths = {n: self.output_path(n, store_dir) for n in self.outputs}
        return {n: p for n, p in paths.items() if p}

    def store_path(self, store_dir: str = DEFAULT_STORE_DIR) -> str:
        """The ``.drv``'s own store path: a text path over :meth:`unparse` with
        :meth:`references` (``writeDerivation``)."""
        if not self.name:
            raise DerivationError("the derivation has no name", rule="no-name")
        data = self.unparse()
        return make_text_path(self.name + ".drv", Hash("sha256", hashlib.sha256(data).digest()),
                              self.references(), store_dir)

    def to_json(self, store_dir: str = DEFAULT_STORE_DIR) -> dict[str, object]:
        """The object ``nix show-derivation`` (Nix 2.8) prints for this derivation, in its key
        order (strings may carry ``surrogateescape`` bytes)."""
        outs: dict[str, object] = {}
        for n, o in sorted(self.outputs.items(), key=_key):
            kind = o.kind
            if kind == INPUT_ADDRESSED:
                outs[n] = {"path": o.path}
            elif kind == FIXED:
                try:
                    path = self.output_path(n, store_dir)
                except InvalidPathError:  # a .drv file whose name is no store path name
                    path = o.path
                outs[n] = {"path": path, "hashAlgo": o.hash_algo, "hash": o.fixed_hash().base16}
            elif kind == FLOATING:
                outs[n] = {"hashAlgo": o.hash_algo}
            elif kind == IMPURE:
                outs[n] = {"hashAlgo": o.hash_algo, "impure": True}
            else:
                outs[n] = {}
        return {
            "outputs": outs,
            "inputSrcs": sorted(set(self.input_srcs), key=_enc),
            "inputDrvs": {p: sorted(set(os_), key=_enc) for p, os_ in sorted(self.input_drvs.items(), key=_key)},
            "system": self.platform,
            "builder": self.builder,
            "args": list(self.args),
            "env": dict(sorted(self.env.items(), key=_key)),
        }

    @classmethod
    def from_json(cls, obj: object, name: str | None = None) -> Derivation:
        """A derivation from the object :meth:`to_json` makes (``nix show-derivation``'s form).
        The name is ``name``, else the object's ``name`` key, else ``env.name``."""
        if not isinstance(obj, dict):
            raise DerivationError("a derivation must be a JSON object", rule="bad-json")
        _check_encodable(obj, "")
        d = cls()
        outs = _get(obj, "outputs", dict)
        for n, o in outs.items():
            if not isinstance(o, dict):
                raise DerivationError("an output must be a JSON object", path=f"outputs.{n}", rule="bad-json")
            unknown = set(o) - {"path", "hashAlgo", "hash", "impure"}
            if unknown:
                raise DerivationError("unknown output field", path=f"outputs.{n}", got=sorted(unknown),
                                      rule="bad-json")
            out = DerivationOutput(_get(o, "path", str, ""), _get(o, "hashAlgo", str, ""), _get(o, "hash", str, ""))
            if o.get("impure") is True:
                out.hash = "impure"
            d.outputs[n] = out
        d.input_srcs = [_str(s, "inputSrcs") for s in _get(obj, "inputSrcs", list, [])]
        for p, names in _get(obj, "inputDrvs", dict, {}).items():
            if not isinstance(names, list):
                raise DerivationError("inputDrvs values must be lists of output names", path=f"inputDrvs.{p}",
                                      rule="bad-json")
            d.input_drvs[p] = [_str(n, "inputDrvs") for n in names]
        d.platform = _get(obj, "system", str)
        d.builder = _get(obj, "builder", str)
        d.args = [_str(a, "args") for a in _get(obj, "args", list, [])]
        d.env = {k: _str(v, f"env.{k}") for k, v in _get(obj, "env", dict, {}).items()}
        d.name = name or _get(obj, "name", str, "") or d.env.get("name", "")
        for n, o in d.outputs.items():
            _check_output(o, n, from_json=True)
        return d


def _key(item: tuple[str, object]) -> bytes:
    return _enc(item[0])


def _uq(s: str) -> bytes:
    return b'"' + _enc(s) + b'"'


_ESC_RE = re.compile(rb'["\\\n\r\t]')


def _q(s: str) -> bytes:
    b = _enc(s)
    if _ESC_RE.search(b):
        b = b.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n").replace(
            b"\r", b"\\r").replace(b"\t", b"\\t")
    return b'"' + b + b'"'


_MISSING = object()


def _get(obj: dict[str, object], key: str, typ: type, default: object = _MISSING) -> Any:
    v = obj.get(key, default)
    if v is _MISSING:
        raise DerivationError(f"missing field {key!r}", path=key, rule="bad-json")
    if not isinstance(v, typ):
        raise DerivationError(f"field {key!r} must be a {typ.__name__}", path=key, rule="bad-json")
    return v


def _check_encodable(v: object, where: str) -> None:
    """Every string must stand for bytes: characters, or U+DC80..U+DCFF for single bytes."""
    if isinstance(v, str):
        try:
            _enc(v)
        except UnicodeEncodeError as e:
            raise DerivationError("a string holds a lone surrogate that stands for no byte "
                                  "(only \\udc80-\\udcff do)", path=where or None, got=v[e.start : e.end],
                                  rule="bad-json") from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_encodable(k, where)
            _check_encodable(x, f"{where}.{k}" if where else str(k))
    elif isinstance(v, list):
        for x in v:
            _check_encodable(x, where)


def _str(v: object, where: str) -> str:
    if not isinstance(v, str):
        raise DerivationError("expected a string", path=where, rule="bad-json", got=v)
    return v


def _check_output(o: DerivationOutput, name: str, offset: int | None = None, *, from_json: bool = False) -> None:
    """What Nix's parser checks of an output (``parseDerivationOutput``); ``from_json``: a
    fixed output's path may be empty (to be computed)."""
    def err(msg: str, got: object) -> DerivationError:
        return DerivationError(f"output {name!r}: {msg}", offset=offset, got=got, rule="bad-drv")

    kind = o.kind
    if o.hash_algo and o.algo not in HASH_SIZES:
        raise err("unknown hash algorithm", o.hash_algo)
    if kind == FIXED:
        if (o.path or not from_json) and not o.path.startswith("/"):
            raise err("bad path", o.path)
        try:
            o.fixed_hash()
        except DerivationError as e:
            raise err(e.message, o.hash) from None
    elif kind in (FLOATING, IMPURE):
        if o.path:
            raise err(f"a {kind} output has no path", o.path)
    elif kind == INPUT_ADDRESSED and not o.path.startswith("/"):
        raise err("bad path", o.path)
    elif kind == DEFERRED and o.hash:
        raise err("a hash without a hash algorithm", o.hash)


# -- parsing ---------------------------------------------------------------------------------

_STR_STOP = re.compile(rb'["\\]')
#: a string's closing quote: the first quote after an even run of backslashes (each pair an
#: escaped backslash), found from the opening quote
_STR_END = re.compile(rb'[^\\](?:\\\\)*"', re.DOTALL)
#: an escape other than those Nix prints (may also match after an escaped backslash: then the
#: slow path decides)
_STR_ODD_ESCAPE = re.compile(rb'\\[^nrt"\\]', re.DOTALL)


class _P:
    def __init__(self, data: bytes) -> None:
        self.s = data
        self.i = 0

    def err(self, msg: str, at: int | None = None) -> DerivationError:
        i = self.i if at is None else at
        return DerivationError(f"malformed derivation: {msg}", offset=i, rule="bad-drv", got=self.s[i : i + 24])

    def lit(self, t: bytes) -> None:
        if not self.s.startswith(t, self.i):
            raise self.err(f"expected {t.decode()!r}")
        self.i += len(t)

    def end_of_list(self) -> bool:
        """Nix's ``endOfList``: ``,`` → more; ``]`` → done; anything else → another item."""
        c = self.s[self.i : self.i + 1]
        if c == b",":
            self.i += 1
            return False
        if c == b"]":
            self.i += 1
            return True
        if not c:
            raise self.err("unexpected end of the derivation (in a list)")
        return False

    def string(self) -> str:
        self.lit(b'"')
        s, i = self.s, self.i
        m = _STR_END.search(s, i - 1)  # from the opening quote, which is no backslash
        if m is not None:  # the common case, at C speed: only the escapes Nix prints
            body = s[i : m.end() - 1]
            self.i = m.end()
            if b"\\" not in body:
                return _dec(body)
            if not _STR_ODD_ESCAPE.search(body):
                return _dec(codecs.escape_decode(body)[0])
        out: list[bytes] = []
        while True:
            m = _STR_STOP.search(s, i)
            if m is None:
                raise self.err("unterminated string", self.i - 1)
            j = m.start()
            out.append(s[i:j])
            if s[j] == 0x22:  # '"'
                self.i = j + 1
                return _dec(b"".join(out))
            if j + 1 >= len(s):
                raise self.err("unterminated string", self.i - 1)
            c = s[j + 1 : j + 2]
            out.append({b"n": b"\n", b"r": b"\r", b"t": b"\t"}.get(c, c))
            i = j + 2

    def path(self) -> str:
        at = self.i
        p = self.string()
        if not p.startswith("/"):
            raise self.err(f"bad path {p!r} in derivation", at)
        return p

    def strings(self, paths: bool = False) -> list[str]:
        out: list[str] = []
        while not self.end_of_list():
            out.append(self.path() if paths else self.string())
        return out


def parse_derivation(data: bytes | str, name: str = "") -> Derivation:
    """Parse a ``.drv`` file's bytes as Nix 2.8 does (a ``str`` is taken as its UTF-8 form,
    ``surrogateescape`` characters as the bytes they stand for). ``name`` is the derivation's
    name (its ``.drv`` path's name without ``.drv``)."""
    if isinstance(data, str):
        data = _enc(data)
    p = _P(bytes(data))
    d = Derivation(name=name)
    p.lit(b"Derive([")
    while not p.end_of_list():
        at = p.i
        p.lit(b"(")
        out_name = p.string()
        p.lit(b",")
        o = DerivationOutput(p.string())
        p.lit(b",")
        o.hash_algo = p.string()
        p.lit(b",")
        o.hash = p.string()
        p.lit(b")")
        _check_output(o, out_name, at)
        d.outputs.setdefault(out_name, o)  # as Nix: the first of duplicate outputs stays
    p.lit(b",[")
    while not p.end_of_list():
        p.lit(b"(")
        drv_path = p.path()
        p.lit(b",[")
        d.input_drvs[drv_path] = sorted(set(p.strings()), key=_enc)
        p.lit(b")")
    p.lit(b",[")
    d.input_srcs = sorted(set(p.strings(paths=True)), key=_enc)
    p.lit(b",")
    d.platform = p.string()
    p.lit(b",")
    d.builder = p.string()
    p.lit(b",[")
    d.args = p.strings()
    p.lit(b",[")
    while not p.end_of_list():
        p.lit(b"(")
        k = p.string()
        p.lit(b",")
        d.env[k] = p.string()  # as Nix: the last of duplicate variables wins
        p.lit(b")")
    p.lit(b")")
    return d


def parse_derivation_strict(data: bytes, name: str = "") -> Derivation:
    """:func:`parse_derivation`, and the bytes must be exactly Nix's canonical form (what
    :meth:`Derivation.unparse` prints): no trailing bytes, lists sorted, no duplicates."""
    d = parse_derivation(data, name)
    again = d.unparse()
    if again != data:
        i = next((k for k, (a, b) in enumerate(zip(again, data, strict=False)) if a != b), min(len(again), len(data)))
        raise DerivationError("derivation is not in canonical form" if i < len(again) else
                              "trailing data after the derivation", offset=i, rule="bad-drv", got=data[i : i + 24])
    return d


# -- hashing modulo and output paths ---------------------------------------------------------

#: reads an input derivation by its ``.drv`` store path (with its name set)
Resolver = Callable[[str], Derivation]


class DrvHash(Record):
    """``hashDerivationModulo``'s answer: a hash per output, and whether it is ``deferred``
    (the derivation or one of its inputs has outputs whose paths are not known yet)."""

    __slots__ = ("hashes", "deferred")

    def __init__(self, hashes: dict[str, Hash], deferred: bool = False) -> None:
        self.hashes = hashes
        self.deferred = deferred


IMPURE_OUTPUT_HASH = Hash("sha256", hashlib.sha256(b"impure").digest())


def hash_derivation_modulo(drv: Derivation, resolve: Resolver, *, mask_outputs: bool = True,
                           store_dir: str = DEFAULT_STORE_DIR, cache: dict[str, DrvHash] | None = None) -> DrvHash:
    """Nix's ``hashDerivationModulo``.

    A fixed-output derivation hashes to ``sha256("fixed:out:<[r:]algo>:<hex>:<out path>")``,
    whatever its builder: a changed fetcher does not change what depends on it. Any other
    derivation hashes to the SHA-256 of its ATerm (output paths masked with
    ``mask_outputs``) in which every input derivation's path is replaced by that input's own
    hash modulo (base16, unmasked, recursively). ``resolve`` reads an input derivation by path;
    ``cache`` memoizes inputs by path across calls."""
    cache = {} if cache is None else cache
    kind = drv.type()
    if kind == FIXED:
        hashes = {}
        for n, o in drv.outputs.items():
            path = fixed_output_path(o, drv.name, n, store_dir)
            fp = f"fixed:out:{o.hash_algo}:{o.fixed_hash().base16}:{path}"
            hashes[n] = Hash("sha256", hashlib.sha256(_enc(fp)).digest())
        return DrvHash(hashes)
    if kind == IMPURE:
        return DrvHash({n: IMPURE_OUTPUT_HASH for n in drv.outputs}, deferred=True)
    deferred = kind == FLOATING
    inputs: dict[str, set[str]] = {}
    for drv_path, names in drv.input_drvs.items():
        res = cache.get(drv_path)
        if res is None:
            res = hash_derivation_modulo(_resolve(resolve, drv_path), resolve, mask_outputs=False,
                                         store_dir=store_dir, cache=cache)
            cache[drv_path] = res
        deferred = deferred or res.deferred
        for n in names:
            h = res.hashes.get(n)
            if h is None:
                raise DerivationError(f"input derivation has no output {n!r}", path=drv_path, rule="bad-input")
            inputs.setdefault(h.base16, set()).add(n)
    h = Hash("sha256", hashlib.sha256(drv.unparse(mask_outputs=mask_outputs, input_drvs=inputs)).digest())
    return DrvHash({n: h for n in drv.outputs}, deferred)


def _resolve(resolve: Resolver, drv_path: str) -> Derivation:
    try:
        d = resolve(drv_path)
        d.name = d.name or drv_name_from_path(drv_path)
        return d
    except DerivationError as e:
        raise DerivationError(f"input derivation {drv_path}: {e.message}", offset=e.offset, rule=e.rule,
                              got=e.got, path=drv_path) from None
    except (NartoolError, OSError) as e:
        raise DerivationError(f"cannot read input derivation: {e}", path=drv_path, rule="bad-input") from None


def compute_outputs(drv: Derivation, resolve: Resolver, store_dir: str = DEFAULT_STORE_DIR) -> Derivation:
    """The derivation with its output paths (and the env variables that carry them) filled in,
    exactly as ``derivation`` in the Nix language makes them (``derivationStrict``).

    ``drv`` comes with its output paths empty: outputs with a ``hash`` are fixed (path from
    the hash and the name), with only a ``hash_algo`` floating (env variable: the hash
    placeholder), the rest input-addressed (paths from the hash modulo of the derivation with
    the paths and their env variables empty; deferred, and left empty, when an input
    derivation's outputs are not known yet). An env variable for an output that already holds
    a value must equal what is computed; a missing one is added."""
    if not drv.name:
        raise DerivationError("the derivation has no name (give one, or set env.name)", rule="no-name")
    d = drv.replace(outputs={n: o.replace() for n, o in drv.outputs.items()}, env=dict(drv.env))
    kind = d.type() if any(o.hash_algo for o in d.outputs.values()) else DEFERRED
    computed: dict[str, str] = {}
    if kind == FIXED:
        computed = {n: fixed_output_path(o, d.name, n, store_dir) for n, o in d.outputs.items()}
    elif kind in (FLOATING, IMPURE):
        computed = {n: hash_placeholder(n) for n in d.outputs}
    else:
        for n, o in d.outputs.items():
            o.path = ""
            d.env[n] = ""
        h = hash_derivation_modulo(d, resolve, store_dir=store_dir)
        if not h.deferred:
            computed = {n: make_output_path(n, h.hashes[n], d.name, store_dir) for n in d.outputs}
    for n, o in d.outputs.items():
        given_path, given_env = drv.outputs[n].path, drv.env.get(n, "")
        want = computed.get(n, "")
        if given_path and kind != FLOATING and given_path != want:
            raise DerivationError(f"output {n!r} has the wrong path", expected=want or "(empty: deferred)",
                                  got=given_path, rule="bad-output")
        if given_env and given_env != want:
            raise DerivationError(f"env variable {n!r} has the wrong value", expected=want, got=given_env,
                                  rule="bad-output")
        if kind in (FIXED, INPUT_ADDRESSED, DEFERRED):
            o.path = want
        d.env[n] = want
    return d


def check_outputs(drv: Derivation, resolve: Resolver, store_dir: str = DEFAULT_STORE_DIR, *,
                  cache: dict[str, DrvHash] | None = None) -> None:
    """What Nix checks when it registers a ``.drv`` (``checkDerivationOutputs``): every
    input-addressed output path is the one computed, and each known output's env variable
    names it. ``cache`` memoizes the input derivations' hashes across calls (as for
    :func:`hash_derivation_modulo`; without one, registering a chain of N derivations one
    by one costs O(N²))."""
    drv.type()
    h: DrvHash | None = None
    for n, o in drv.outputs.items():
        if o.kind == INPUT_ADDRESSED:
            h = h or hash_derivation_modulo(drv, resolve, store_dir=store_dir, cache=cache)
            want = make_output_path(n, h.hashes[n], drv.name, store_dir)
            if o.path != want:
                raise DerivationError(f"derivation has incorrect output {o.path!r}", expected=want, rule="bad-output")
        elif o.kind == FIXED:
            want = fixed_output_path(o, drv.name, n, store_dir)
        else:
            continue
        if drv.env.get(n) != want:
            raise DerivationError(f"derivation has incorrect environment variable {n!r}", expected=want,
                                  got=drv.env.get(n), rule="bad-output")


def drv_name_from_path(drv_path: str) -> str:
    """``/nix/store/<hash>-hello.drv`` → ``hello``; a file name without a store hash part
    (``my-pkg.drv``) keeps its whole name (``my-pkg``)."""
    base = drv_path.rsplit("/", 1)[-1]
    if len(base) > 33 and base[32] == "-" and all(c in NIX32_ALPHABET for c in base[:32]):
        base = base[33:]
    return base[:-4] if base.endswith(".drv") else base


#: the largest ``.drv`` read from a store or a file
DRV_READ_MAX = 64 << 20


def read_drv_bytes(store: Any, drv_path: str) -> bytes:
    """The bytes of the ``.drv`` at ``drv_path`` in ``store`` (any store with ``nar_events``)."""
    from ..nar.events import File

    data: bytes | None = None
    for ev in store.nar_events(drv_path):
        if not isinstance(ev, File) or data is not None:
            raise DerivationError("not a derivation: the store path is not a regular file", path=drv_path,
                                  rule="not-a-file")
        if ev.size > DRV_READ_MAX:
            raise DerivationError("derivation too large", path=drv_path, got=ev.size, rule="too-large")
        data = b"".join(bytes(c) for c in ev.chunks)
    return data or b""


def read_derivation(store: Any, drv_path: str) -> Derivation:
    """Read and parse the ``.drv`` at ``drv_path`` in ``store`` (its name set)."""
    data = read_drv_bytes(store, drv_path)
    try:
        return parse_derivation(data, drv_name_from_path(drv_path))
    except DerivationError as e:
        e.path = drv_path
        raise


def store_resolver(store: Any) -> Resolver:
    """A :data:`Resolver` reading input derivations from ``store`` (each parsed once)."""
    seen: dict[str, Derivation] = {}

    def resolve(drv_path: str) -> Derivation:
        d = seen.get(drv_path)
        if d is None:
            d = seen[drv_path] = read_derivation(store, drv_path)
        return d

    return resolve


# -- BasicDerivation (the serve protocol's BuildDerivation) ----------------------------------


class BasicDerivation(Record):
    """A derivation as ``BuildDerivation`` sends it: no input derivations, their outputs
    folded into ``input_srcs``; outputs as (name, path, hashAlgo, hash), sorted by name."""

    __slots__ = ("outputs", "input_srcs", "platform", "builder", "args", "env")

    def __init__(self, outputs: list[tuple[str, str, str, str]], input_srcs: list[str], platform: str, builder: str,
                 args: list[str], env: list[tuple[str, str]]) -> None:
        self.outputs = outputs
        self.input_srcs = input_srcs
        self.platform = platform
        self.builder = builder
        self.args = args
        self.env = env

    @classmethod
    def from_derivation(cls, drv: Derivation, input_paths: Iterable[str] | None = None,
                        store_dir: str = DEFAULT_STORE_DIR) -> BasicDerivation:
        """As Nix's remote builder hook makes it: ``input_paths`` (the closure of the input
        sources and of the wanted outputs of the input derivations) replaces ``input_srcs`` when
        the derivation has input derivations. A fixed output carries its computed path."""
        outs = []
        for n, o in sorted(drv.outputs.items(), key=_key):
            path = (drv.output_path(n, store_dir) or "") if o.kind in (FIXED, INPUT_ADDRESSED) else ""
            h = o.fixed_hash().base16 if o.kind == FIXED else o.hash
            outs.append((n, path, o.hash_algo, h))
        srcs = set(drv.input_srcs)
        if drv.input_drvs and input_paths is not None:
            srcs = set(input_paths)
        return cls(outs, sorted(srcs, key=_enc), drv.platform, drv.builder, list(drv.args),
                   sorted(drv.env.items(), key=_key))

    def to_wire(self) -> bytes:
        """The fields as the serve protocol writes them (after ``str drvPath``): u64 counts
        and length-prefixed strings padded to 8 bytes."""
        out = [_u64(len(self.outputs))]
        for o in self.outputs:
            out += [_wstr(x) for x in o]
        out += [_u64(len(self.input_srcs)), *(_wstr(s) for s in self.input_srcs),
                _wstr(self.platform), _wstr(self.builder), _u64(len(self.args)), *(_wstr(a) for a in self.args),
                _u64(len(self.env))]
        for k, v in self.env:
            out += [_wstr(k), _wstr(v)]
        return b"".join(out)

    @classmethod
    def from_wire(cls, data: bytes) -> tuple[BasicDerivation, int]:
        """Read :meth:`to_wire`'s form; returns it and the number of bytes read."""
        r = _WireReader(data)
        outs = [(r.str_(), r.str_(), r.str_(), r.str_()) for _ in range(r.count())]
        srcs = [r.str_() for _ in range(r.count())]
        platform, builder = r.str_(), r.str_()
        args = [r.str_() for _ in range(r.count())]
        env = [(r.str_(), r.str_()) for _ in range(r.count())]
        return cls(outs, srcs, platform, builder, args, env), r.i


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _wstr(s: str) -> bytes:
    b = _enc(s)
    return _u64(len(b)) + b + b"\0" * (-len(b) % 8)


class _WireReader:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.i = 0

    def _take(self, n: int) -> bytes:
        if self.i + n > len(self.d):
            raise DerivationError("basic derivation ends early", offset=self.i, rule="truncated")
        b = self.d[self.i : self.i + n]
        self.i += n
        return b

    def count(self) -> int:
        n: int = struct.unpack("<Q", self._take(8))[0]
        if n > len(self.d):
            raise DerivationError("count too large", offset=self.i - 8, got=n, rule="bad-count")
        return n

    def str_(self) -> str:
        n = self.count()
        b = self._take(n)
        if any(self._take(-n % 8)):
            raise DerivationError("non-zero string padding", offset=self.i, rule="bad-padding")
        return _dec(b)
