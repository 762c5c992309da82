"""``.drv`` files: Nix's ATerm derivation format (parse and print).

``Derive([outputs],[inputDrvs],[inputSrcs],"platform","builder",[args],[env])`` where an
output is ``("name","path","hashAlgo","hash")``, an input drv ``("path",["out",…])`` and an
env entry ``("key","value")``. Strings use C-like escapes (``\\n \\r \\t \\\\ \\"``).
The parser is strict: anything but exactly this shape is a :class:`DerivationError` with the
byte offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import StoreError

T = TypeVar("T")


class DerivationError(StoreError):
    """A ``.drv`` file is malformed."""


@dataclass
class DerivationOutput:
    path: str
    hash_algo: str = ""
    hash: str = ""


@dataclass
class Derivation:
    outputs: dict[str, DerivationOutput] = field(default_factory=dict)
    input_drvs: dict[str, list[str]] = field(default_factory=dict)
    input_srcs: list[str] = field(default_factory=list)
    platform: str = ""
    builder: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def unparse(self, *, mask_outputs: bool = False) -> str:
        """The ATerm text, byte-identical to Nix's (builder, args and env escaped)."""
        outs = ",".join(
            f'("{n}","{"" if mask_outputs else o.path}","{o.hash_algo}","{o.hash}")'
            for n, o in sorted(self.outputs.items()))
        drvs = ",".join(f'("{p}",[{",".join(chr(34) + o + chr(34) for o in sorted(os_))}])'
                        for p, os_ in sorted(self.input_drvs.items()))
        srcs = ",".join(f'"{s}"' for s in sorted(self.input_srcs))
        args = ",".join(_esc(a) for a in self.args)
        env = ",".join(f"({_esc(k)},{_esc('' if mask_outputs and k in self.outputs else v)})"
                       for k, v in sorted(self.env.items()))
        return (f"Derive([{outs}],[{drvs}],[{srcs}],{_esc(self.platform)},{_esc(self.builder)},"
                f"[{args}],[{env}])")


_ESC = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESC = {"n": "\n", "r": "\r", "t": "\t"}


def _esc(s: str) -> str:
    return '"' + "".join(_ESC.get(c, c) for c in s) + '"'


class _P:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def err(self, msg: str) -> DerivationError:
        return DerivationError(f"malformed derivation: {msg}", offset=self.i, rule="bad-drv",
                               got=self.s[self.i : self.i + 20])

    def lit(self, t: str) -> None:
        if not self.s.startswith(t, self.i):
            raise self.err(f"expected {t!r}")
        self.i += len(t)

    def peek(self, t: str) -> bool:
        return self.s.startswith(t, self.i)

    def string(self) -> str:
        self.lit('"')
        out = []
        s, i = self.s, self.i
        while True:
            j = i
            while j < len(s) and s[j] not in '"\\':
                j += 1
            out.append(s[i:j])
            if j >= len(s):
                self.i = j
                raise self.err("unterminated string")
            if s[j] == '"':
                self.i = j + 1
                return "".join(out)
            if j + 1 >= len(s):
                self.i = j
                raise self.err("unterminated escape")
            c = s[j + 1]
            out.append(_UNESC.get(c, c))
            i = j + 2

    def list_of(self, item: Callable[[], T]) -> list[T]:
        self.lit("[")
        out: list[T] = []
        if self.peek("]"):
            self.i += 1
            return out
        while True:
            out.append(item())
            if self.peek(","):
                self.i += 1
                continue
            self.lit("]")
            return out

    def strings(self) -> list[str]:
        return self.list_of(self.string)

    def output(self) -> tuple[str, str, str, str]:
        self.lit("(")
        a = self.string()
        self.lit(",")
        b = self.string()
        self.lit(",")
        c = self.string()
        self.lit(",")
        d = self.string()
        self.lit(")")
        return a, b, c, d

    def input_drv(self) -> tuple[str, list[str]]:
        self.lit("(")
        a = self.string()
        self.lit(",")
        b = self.strings()
        self.lit(")")
        return a, b

    def pair(self) -> tuple[str, str]:
        self.lit("(")
        a = self.string()
        self.lit(",")
        b = self.string()
        self.lit(")")
        return a, b


def parse_derivation(text: str | bytes) -> Derivation:
    """Parse a ``.drv`` file's text (strict)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DerivationError("derivation is not UTF-8", offset=e.start, rule="bad-drv") from None
    p = _P(text)
    p.lit("Derive(")
    d = Derivation()
    for name, path, algo, h in p.list_of(p.output):
        if name in d.outputs:
            raise p.err(f"duplicate output {name!r}")
        d.outputs[name] = DerivationOutput(path, algo, h)
    p.lit(",")
    for drv_path, outs in p.list_of(p.input_drv):
        d.input_drvs[drv_path] = outs
    p.lit(",")
    d.input_srcs = p.strings()
    p.lit(",")
    d.platform = p.string()
    p.lit(",")
    d.builder = p.string()
    p.lit(",")
    d.args = p.strings()
    p.lit(",")
    for k, v in p.list_of(p.pair):
        d.env[k] = v
    p.lit(")")
    if p.i != len(text):
        raise p.err("trailing data after the derivation")
    return d
