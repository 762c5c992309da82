"""The builder's environment and the files written into its build directory, as Nix 2.8 makes
them (``docs/builds.md``).

Nix keeps the environment in a map sorted by name, so the builder's ``environ`` is in byte
order of the names whatever order the values were set in; later assignments override earlier
ones: ``PATH``, ``HOME``, ``NIX_STORE``, ``NIX_BUILD_CORES``; then the derivation's variables
(``passAsFile`` ones as files); then ``NIX_BUILD_TOP``, ``TMPDIR``, ``TEMPDIR``, ``TMP``,
``TEMP``, ``PWD``; structured attributes; for fixed-output derivations ``NIX_OUTPUT_CHECKED``
and ``impureEnvVars``; then ``NIX_LOG_FD`` and ``TERM``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping

from .. import _json as json
from .._record import Record
from ..errors import BuildError
from ..hashes import nix32_encode
from ..store.derivation import Derivation

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any

HOMELESS_SHELTER = "/homeless-shelter"
# (patterns, compiled by re at their first use: most builds need neither)
_EXPORT_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
_SHELL_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def rewrite_strings(s: str, rewrites: Mapping[str, str]) -> str:
    """Nix's ``rewriteStrings``: every occurrence of each key replaced by its value, keys in order."""
    for old, new in sorted(rewrites.items()):
        if old != new and old:
            s = s.replace(old, new)
    return s


def output_rewrites(outputs: Mapping[str, str]) -> dict[str, str]:
    """Each output's placeholder (``hashPlaceholder``) → its path, as Nix rewrites the builder's
    arguments, environment and files."""
    from ..store.derivation import hash_placeholder

    return {hash_placeholder(name): path for name, path in outputs.items()}


class BuildEnv(Record):
    """What :func:`make_environment` decided: the environment (sorted by name, as bytes) and the
    files (name relative to the build directory → contents) to write before the builder starts."""

    __slots__ = ("env", "files")

    def __init__(self, env: list[tuple[bytes, bytes]], files: dict[str, bytes] | None = None) -> None:
        self.env = env
        self.files: dict[str, bytes] = {} if files is None else files


def structured_attrs(drv: Derivation) -> dict[str, Any] | None:
    """The derivation's structured attributes (``__json``), or None without them."""
    raw = drv.env.get("__json")
    if raw is None:
        return None
    try:
        obj = json.loads(_b(raw))
    except ValueError as e:
        raise BuildError(f"cannot process __json attribute: {e}", rule="bad-structured-attrs") from None
    if not isinstance(obj, dict):
        raise BuildError("the __json attribute is not a JSON object", rule="bad-structured-attrs")
    return obj


def get_attr(drv: Derivation, name: str) -> Any:
    """An attribute as Nix's ``ParsedDerivation`` reads it: from the structured attributes when
    there are some (a JSON value), else the environment string (None when absent)."""
    sa = structured_attrs(drv)
    if sa is not None:
        return sa.get(name)
    return drv.env.get(name)


def get_bool_attr(drv: Derivation, name: str) -> bool:
    """``__noChroot``-style booleans: ``"1"`` in the environment, ``true`` in structured attrs."""
    sa = structured_attrs(drv)
    if sa is not None:
        v = sa.get(name, False)
        if not isinstance(v, bool):
            raise BuildError(f"attribute '{name}' of derivation must be a Boolean", rule="bad-attr")
        return v
    return drv.env.get(name) == "1"


def get_strings_attr(drv: Derivation, name: str) -> list[str] | None:
    """A list attribute: a JSON list of strings, or the environment string split at blanks."""
    sa = structured_attrs(drv)
    if sa is not None:
        v = sa.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise BuildError(f"attribute '{name}' of derivation must be a list of strings", rule="bad-attr")
        return list(v)
    s = drv.env.get(name)
    return None if s is None else s.split()


def pass_as_file_name(name: str) -> str:
    """The file a ``passAsFile`` variable is written to: ``.attr-<nix32 sha256 of the name>``."""
    return ".attr-" + nix32_encode(hashlib.sha256(_b(name)).digest())


def validity_registration(paths: Iterable[str], references: Callable[[str], Iterable[str]]) -> bytes:
    """``nix-store --register-validity`` text without hashes or derivers (what
    ``exportReferencesGraph`` files hold): per path, sorted, the path, an empty deriver line,
    the number of references and the references, sorted."""
    out: list[str] = []
    for p in sorted(paths):
        refs = sorted(references(p))
        out += [p, "", str(len(refs)), *refs]
    return _b("".join(x + "\n" for x in out))


def _shell_escape(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _simple(v: Any) -> str | None:
    if isinstance(v, bool):
        return "1" if v else ""
    if isinstance(v, str):
        return _shell_escape(v)
    if isinstance(v, (int, float)):
        return str(int(v)) if float(v).is_integer() else None
    if v is None:
        return "''"
    return None


def structured_attrs_shell(attrs: Mapping[str, Any]) -> str:
    """``.attrs.sh``: a bash ``declare`` per attribute whose name is a shell name and whose value
    is a simple value, a list of simple values or an object of simple values (others skipped)."""
    out = []
    for k, v in sorted(attrs.items()):
        if not re.fullmatch(_SHELL_NAME, k):
            continue
        s = _simple(v)
        if s is not None:
            out.append(f"declare {k}={s}\n")
        elif isinstance(v, list):
            items = [_simple(x) for x in v]
            if all(x is not None for x in items):
                out.append(f"declare -a {k}=(" + "".join(f"{x} " for x in items) + ")\n")
        elif isinstance(v, dict):
            pairs = {kk: _simple(x) for kk, x in sorted(v.items())}
            if all(x is not None for x in pairs.values()):
                out.append(f"declare -A {k}=(" + "".join(f"[{_shell_escape(kk)}]={x} " for kk, x in pairs.items())
                           + ")\n")
    return "".join(out)


def export_references_closure(roots: Iterable[str], input_paths: set[str], closure: Callable[[Iterable[str]], set[str]],
                              derivation_outputs: Callable[[str], Iterable[str]]) -> set[str]:
    """The closure ``exportReferencesGraph`` exports for ``roots`` (each must be in the input
    closure), plus the closures of the outputs of any ``.drv`` in it."""
    roots = list(roots)
    for r in roots:
        if r not in input_paths:
            raise BuildError(f"cannot export references of path '{r}' because it is not in the input closure "
                             "of the derivation", path=r, rule="export-not-input")
    paths = closure(roots)
    for p in list(paths):
        if p.endswith(".drv"):
            paths |= closure([o for o in derivation_outputs(p)])
    return paths


def make_environment(drv: Derivation, *, store_dir: str, build_top: str, host_build_top: str, cores: int,
                     fixed_output: bool, input_paths: set[str], outputs: Mapping[str, str],
                     closure: Callable[[Iterable[str]], set[str]],
                     references: Callable[[str], Iterable[str]],
                     derivation_outputs: Callable[[str], Iterable[str]],
                     path_info_json: Callable[[Iterable[str]], list[dict[str, Any]]] | None = None,
                     impure_environ: Mapping[str, str] | None = None) -> BuildEnv:
    """The environment of ``drv``'s builder and the files for its build directory.

    ``build_top`` is the build directory as the builder sees it (``/build`` in the sandbox),
    ``host_build_top`` where it is on the host (Nix 2.8 puts the host path into
    ``NIX_ATTRS_*_FILE``). ``input_paths`` is the input closure; ``outputs`` the output paths
    by name; ``closure``/``references``/``derivation_outputs`` query the store."""
    env: dict[str, str] = {}
    files: dict[str, bytes] = {}
    rw = output_rewrites(outputs)
    env["PATH"] = "/path-not-set"
    env["HOME"] = HOMELESS_SHELTER
    env["NIX_STORE"] = store_dir
    env["NIX_BUILD_CORES"] = str(cores)
    sa = structured_attrs(drv)
    if sa is None:
        pass_as_file = set(drv.env.get("passAsFile", "").split())
        for k, v in drv.env.items():
            if k in pass_as_file:
                fn = pass_as_file_name(k)
                files[fn] = _b(rewrite_strings(v, rw))
                env[k + "Path"] = build_top + "/" + fn
            else:
                env[k] = v
    for k in ("NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"):
        env[k] = build_top
    if sa is None:
        tokens = drv.env.get("exportReferencesGraph", "").split()
        if len(tokens) % 2:
            raise BuildError(f"odd number of tokens in 'exportReferencesGraph': '{drv.env['exportReferencesGraph']}'",
                             rule="bad-export-references")
        for name, p in zip(tokens[::2], tokens[1::2], strict=True):
            if not re.fullmatch(_EXPORT_NAME, name):
                raise BuildError(f"invalid file name '{name}' in 'exportReferencesGraph'", rule="bad-export-references")
            if not p.startswith(store_dir + "/"):
                raise BuildError(f"'exportReferencesGraph' contains a non-store path '{p}'",
                                 rule="bad-export-references")
            sp = store_dir + "/" + p[len(store_dir) + 1:].split("/", 1)[0]
            files[name] = validity_registration(
                export_references_closure([sp], input_paths, closure, derivation_outputs), references)
    else:
        attrs = dict(sa)
        attrs["outputs"] = dict(outputs)
        erg = attrs.get("exportReferencesGraph")
        if isinstance(erg, dict) and path_info_json is not None:
            for name, val in erg.items():
                roots = [val] if isinstance(val, str) else [x for x in val if isinstance(x, str)] \
                    if isinstance(val, list) else []
                roots = [store_dir + "/" + r[len(store_dir) + 1:].split("/", 1)[0] for r in roots
                         if r.startswith(store_dir + "/")]
                attrs[name] = path_info_json(
                    sorted(export_references_closure(roots, input_paths, closure, derivation_outputs)))
        files[".attrs.sh"] = _b(rewrite_strings(structured_attrs_shell(attrs), rw))
        files[".attrs.json"] = _b(rewrite_strings(
            json.dumps(attrs, separators=(",", ":"), ensure_ascii=False, sort_keys=True), rw))
        # Nix 2.8 names the files by their host path (fixed in 2.15): kept, for identical builds
        env["NIX_ATTRS_SH_FILE"] = host_build_top + "/.attrs.sh"
        env["NIX_ATTRS_JSON_FILE"] = host_build_top + "/.attrs.json"
    if fixed_output:
        env["NIX_OUTPUT_CHECKED"] = "1"
        environ = os.environ if impure_environ is None else impure_environ
        for name in get_strings_attr(drv, "impureEnvVars") or []:
            env[name] = environ.get(name, "")
    env["NIX_LOG_FD"] = "2"
    env["TERM"] = "xterm-256color"
    # (the output placeholders are replaced in "NAME=VALUE" as a whole, as Nix does)
    pairs = [rewrite_strings(f"{k}={v}", rw).partition("=") for k, v in env.items()]
    return BuildEnv(sorted((_b(k), _b(v)) for k, _, v in pairs), files)
