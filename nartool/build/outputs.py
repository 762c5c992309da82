"""After the builder: checking, canonicalising, hashing and registering a build's outputs, as
Nix 2.8's ``registerOutputs``/``checkOutputs`` do, except that a rejected output never enters
the store (Nix moves outputs into the store before its reference checks and leaves a rejected
one there, unregistered; here every check runs while the outputs are still where the builder
left them, and they are moved into the store only to be registered, all in one transaction).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping

from .._record import Record
from ..errors import BuildError, FsError, NartoolError
from ..fs.canonical import canonicalise_tree
from ..fs.source import dump_events, dump_nar
from ..hashes import Hash
from ..nar.hashing import NarDigest, tee_nar
from ..store.derivation import Derivation, DerivationOutput
from ..store.local import LocalStore
from ..store.refs import RefScanner
from ..store.types import PathInfo
from .env import get_strings_attr, structured_attrs

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import Any


class OutputRejected(BuildError):
    """An output failed a check (``BuildResult`` status OutputRejected)."""


class HashMismatch(OutputRejected):
    """A fixed-output derivation's output has another hash than declared."""


class Output(Record):
    """One output on its way into the store: its name, its logical store path, the host path
    where it is now and, once examined, its path info."""

    __slots__ = ("name", "path", "location", "info")

    def __init__(self, name: str, path: str, location: str, info: PathInfo | None = None) -> None:
        self.name = name
        self.path = path
        self.location = location
        self.info = info


def _drain(events: Iterable[Any]) -> None:
    """Consume ``events`` and every file's chunks (which is what feeds :func:`tee_nar`'s sink)."""
    for ev in events:
        chunks = getattr(ev, "chunks", None)
        if chunks is not None:
            for _ in chunks:
                pass


def _fixed_hash(o: DerivationOutput, location: str, st: os.stat_result) -> Hash:
    """The content hash of a fixed output as declared: flat (the file's bytes, which must be a
    non-executable regular file) or recursive (its NAR)."""
    h = hashlib.new(o.algo)
    if o.method == "flat":
        if not stat.S_ISREG(st.st_mode) or st.st_mode & stat.S_IXUSR:
            raise OutputRejected(f"output path '{location}' should be a non-executable regular file since "
                                 "recursive hashing is not enabled (outputHashMode=flat)", rule="flat-output")
        with open(location, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    else:
        for c in dump_nar(location):
            h.update(c)
    return Hash(o.algo, h.digest())


def examine_outputs(store: LocalStore, drv_path: str, drv: Derivation, outputs: list[Output], *,
                    input_paths: set[str], build_uid: int | None) -> list[Output]:
    """Steps 1–6 of Nix's ``registerOutputs`` for each output (existence, tamper check,
    canonicalisation, reference scan, NAR hash, fixed-output hash); returns the outputs in
    dependency order (an output after those it refers to). Raises :class:`OutputRejected`."""
    owner = (os.geteuid(), os.getegid()) if os.geteuid() == 0 else None
    candidates = {store.parse_path(p).hash_part: p for p in input_paths}
    for o in outputs:
        candidates[store.parse_path(o.path).hash_part] = o.path
    stats: dict[str, os.stat_result] = {}
    for o in outputs:
        try:
            st = os.lstat(o.location)
        except FileNotFoundError:
            raise OutputRejected(f"builder for '{drv_path}' failed to produce output path for output '{o.name}' "
                                 f"at '{o.path}'", path=o.path, rule="missing-output") from None
        if (not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) or \
                (build_uid is not None and st.st_uid != build_uid):
            raise OutputRejected(f"suspicious ownership or permission on '{o.path}' for output '{o.name}'; "
                                 "rejecting this build output", path=o.path, rule="suspicious-output")
        try:
            canonicalise_tree(o.location, owner=owner)
        except FsError as e:
            raise OutputRejected(f"output '{o.path}': {e}", path=o.path, rule=e.rule) from None
        scanner = RefScanner(candidates)
        digest = NarDigest()

        def sink(b: bytes | bytearray | memoryview, scanner: RefScanner = scanner, digest: NarDigest = digest) -> None:
            digest(b)
            scanner.update(b)

        try:
            _drain(tee_nar(dump_events(o.location, names=store.names), sink))
        except NartoolError as e:
            raise OutputRejected(f"output '{o.path}' cannot be archived: {e}", path=o.path, rule=e.rule) from None
        refs = frozenset(candidates[h] for h in scanner.found)
        o.info = PathInfo(o.path, digest.hash(), digest.size, refs, deriver=drv_path, ultimate=True)
        stats[o.name] = os.lstat(o.location)
    by_path = {o.path: o for o in outputs}
    order = _topo(drv_path, outputs, by_path)
    for o in order:
        d = drv.outputs[o.name]
        if d.kind == "fixed":
            assert o.info is not None
            if o.info.references:
                # its content address would name another path (one computed with references): Nix
                # 2.8 would register it there and leave the declared output invalid; refused here
                raise OutputRejected(f"the output '{o.path}' of fixed-output derivation '{drv_path}' refers to "
                                     "store paths, which a fixed output cannot: "
                                     + ", ".join(sorted(o.info.references)), path=o.path,
                                     rule="fixed-output-references")
            wanted = d.fixed_hash()
            got = _fixed_hash(d, o.location, stats[o.name])
            method = "r:" if d.method == "recursive" else ""
            o.info.ca = f"fixed:{method}{got.prefixed('nix32')}"
            if got != wanted:
                raise HashMismatch(f"hash mismatch in fixed-output derivation '{drv_path}':\n"
                                   f"  specified: {wanted.sri}\n     got:    {got.sri}", path=drv_path,
                                   rule="hash-mismatch", expected=wanted.sri, got=got.sri)
    return order


def _topo(drv_path: str, outputs: list[Output], by_path: Mapping[str, Output]) -> list[Output]:
    order: list[Output] = []
    state: dict[str, int] = {}

    def visit(o: Output, parent: Output | None) -> None:
        s = state.get(o.name)
        if s == 2:
            return
        if s == 1:
            assert parent is not None
            raise OutputRejected(f"cycle detected in build of '{drv_path}' in the references of output "
                                 f"'{o.name}' from output '{parent.name}'", rule="output-cycle")
        state[o.name] = 1
        assert o.info is not None
        for r in sorted(o.info.references):
            if r != o.path and r in by_path:
                visit(by_path[r], o)
        state[o.name] = 2
        order.append(o)

    for o in sorted(outputs, key=lambda x: x.name):
        visit(o, None)
    return order


def check_outputs(store: LocalStore, drv: Derivation, outputs: list[Output]) -> None:
    """``allowedReferences``, ``allowedRequisites``, ``disallowedReferences``,
    ``disallowedRequisites`` (and with structured attributes ``outputChecks.<out>`` with
    ``maxSize``/``maxClosureSize``), as Nix 2.8 applies them."""
    infos = {o.path: o.info for o in outputs if o.info is not None}
    by_name = {o.name: o.path for o in outputs}
    for name in drv.outputs:
        if name not in by_name:
            by_name[name] = drv.outputs[name].path

    def closure(path: str) -> tuple[set[str], int]:
        done: set[str] = set()
        size = 0
        todo = [path]
        while todo:
            p = todo.pop()
            if p in done:
                continue
            done.add(p)
            info = infos.get(p) or store.query_path_info(p)
            if info is None:
                continue
            size += info.nar_size
            todo.extend(info.references)
        return done, size

    sa = structured_attrs(drv)
    for o in sorted(outputs, key=lambda x: x.name):
        info = o.info
        assert info is not None
        if sa is not None:
            oc = sa.get("outputChecks")
            spec = oc.get(o.name) if isinstance(oc, dict) else None
            if not isinstance(spec, dict):
                continue
            checks: dict[str, Any] = {}
            for k in ("allowedReferences", "allowedRequisites", "disallowedReferences", "disallowedRequisites"):
                v = spec.get(k)
                if v is not None:
                    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                        raise BuildError(f"attribute '{k}' of derivation must be a list of strings", rule="bad-attr")
                    checks[k] = v
            ignore_self = False
            max_size, max_closure = spec.get("maxSize"), spec.get("maxClosureSize")
        else:
            checks = {k: v for k in ("allowedReferences", "allowedRequisites", "disallowedReferences",
                                     "disallowedRequisites") if (v := get_strings_attr(drv, k)) is not None}
            ignore_self = True
            max_size = max_closure = None
        if isinstance(max_size, int) and info.nar_size > max_size:
            raise OutputRejected(f"path '{info.path}' is too large at {info.nar_size} bytes; limit is {max_size} "
                                 "bytes", path=info.path, rule="too-large")
        if isinstance(max_closure, int):
            size = closure(info.path)[1]
            if size > max_closure:
                raise OutputRejected(f"closure of path '{info.path}' is too large at {size} bytes; limit is "
                                     f"{max_closure} bytes", path=info.path, rule="too-large")
        for key, allowed, recursive in (("allowedReferences", True, False), ("allowedRequisites", True, True),
                                        ("disallowedReferences", False, False),
                                        ("disallowedRequisites", False, True)):
            if key not in checks:
                continue
            spec_paths: set[str] = set()
            for s in checks[key]:
                if _is_store_path(store, s):
                    spec_paths.add(s)
                elif s in drv.outputs and by_name.get(s):
                    spec_paths.add(by_name[s])
                else:
                    raise OutputRejected(f"derivation contains an illegal reference specifier '{s}'",
                                         rule="illegal-reference-specifier", got=s)
            used = set(closure(info.path)[0]) if recursive else set(info.references)
            if recursive and ignore_self:
                used.discard(info.path)
            bad = sorted(p for p in used if (p not in spec_paths) == allowed)
            if bad:
                raise OutputRejected(f"output '{info.path}' is not allowed to refer to the following paths:"
                                     + "".join(f"\n  {p}" for p in bad), path=info.path, rule="disallowed-reference")


def _is_store_path(store: LocalStore, s: str) -> bool:
    try:
        return store.parse_path(s).full(store.store_dir) == s
    except NartoolError:
        return False


def register_outputs(store: LocalStore, drv_path: str | None, outputs: list[Output],
                     on_moved: Callable[[Output], None] | None = None) -> list[PathInfo]:
    """Move the (examined and checked) outputs into the store by ``rename`` and register them in
    one transaction (see :meth:`LocalStore.register_build_outputs`)."""
    infos = store.register_build_outputs([(o.location, o.info) for o in outputs if o.info is not None],
                                         drv_path=drv_path,
                                         drv_outputs={o.name: o.path for o in outputs})
    return infos
