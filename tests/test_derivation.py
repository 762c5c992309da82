"""Derivations (``nartool.store.derivation``, ``nartool derivation``): byte-exact ATerm, output
kinds, hashing modulo, output and ``.drv`` paths — differential against Nix 2.8
(``nix-instantiate`` into stores rooted in tmp, ``nix show-derivation``, ``nix-store -q``)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nartool.store import LocalStore
from nartool.store.derivation import (
    FIXED,
    FLOATING,
    BasicDerivation,
    Derivation,
    DerivationError,
    DerivationOutput,
    check_outputs,
    compute_outputs,
    drv_name_from_path,
    hash_derivation_modulo,
    hash_placeholder,
    parse_derivation,
    parse_derivation_strict,
)

from .helpers import run_cli

Nix = Callable[..., subprocess.CompletedProcess[bytes]]
SD = "/nix/store"


cli = run_cli


# -- Nix-made derivations ---------------------------------------------------------------------

EXPR = r"""
let
  mk = attrs: derivation ({ system = "x86_64-linux"; builder = "/bin/sh"; } // attrs);
  multi = mk { name = "multi"; outputs = [ "out" "dev" "lib" ]; args = [ "-c" "true" ]; };
  flat = mk { name = "flat"; outputHash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
              outputHashAlgo = "sha256"; outputHashMode = "flat"; };
  # the same fixed output from another builder: the same hash modulo as `flat`
  flat2 = mk { name = "flat"; builder = "/bin/bash"; outputHashAlgo = "sha256";
               outputHash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; };
  rec256 = mk { name = "rec"; outputHash = "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
                outputHashMode = "recursive"; };
  sha1f = mk { name = "sha1f"; outputHashAlgo = "sha1"; outputHash = "a9993e364706816aba3e25717850c26c9cd0d89d"; };
  md5r = mk { name = "md5r"; outputHashAlgo = "md5"; outputHashMode = "recursive";
              outputHash = "900150983cd24fb0d6963f7d28e17f72"; };
  sha512f = mk { name = "sha512f"; outputHashAlgo = "sha512";
                 outputHash = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"; };
  src = builtins.toFile "src.txt" "hello\n";
  mid = mk { name = "mid"; dep = multi.dev; inherit flat; };
  # builtin:fetchurl, impureEnvVars, executable (recursive) — as nixpkgs' bootstrap fetches
  fetched = import <nix/fetchurl.nix> { url = "http://example.invalid/x.tar.gz"; executable = true;
                                         sha256 = "0000000000000000000000000000000000000000000000000000"; };
in mk {
  name = "top"; outputs = [ "out" "doc" ];
  args = [ "-c" "x\ny\t\"z\\ $out" "" ];
  inherit flat flat2 rec256 sha1f md5r sha512f src mid fetched;
  m = multi; mlib = multi.lib;
  ctl = builtins.fromJSON "\"\\u0001\\u001f\\u007f\\r é 日本\"";
  "key with spaces\n" = "v";
}
"""


def instantiate(nix: Nix, root: Path, expr: str | bytes, *flags: str) -> str:
    f = root.parent / f"{root.name}.nix"
    f.write_bytes(expr.encode() if isinstance(expr, str) else expr)
    r = nix("nix-instantiate", *flags, "--store", root, f)
    return r.stdout.decode().strip()


@pytest.fixture
def nix_drvs(nix: Nix, tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "nixstore"
    return root, instantiate(nix, root, EXPR)


def show_nix(nix: Nix, root: Path, *args: str) -> bytes:
    return nix("nix", "--extra-experimental-features", "ca-derivations", "show-derivation", "--store", str(root),
               *args).stdout


def loads(b: bytes) -> dict[str, dict[str, object]]:
    """Nix's JSON, whose strings may hold raw bytes that are not UTF-8 (surrogate-escaped)."""
    obj: dict[str, dict[str, object]] = json.loads(b.decode("utf-8", "surrogateescape"))
    return obj


def closure_drvs(root: Path, top: str) -> list[str]:
    """``top`` and the derivations it depends on, inputs first."""
    out: list[str] = []

    def visit(p: str) -> None:
        if p in out:
            return
        for i in parse_derivation((root / p.lstrip("/")).read_bytes()).input_drvs:
            visit(i)
        out.append(p)

    visit(top)
    return out


def blank(obj: dict[str, object]) -> dict[str, object]:
    """A `show` object with its output paths removed and their env variables emptied."""
    d = json.loads(json.dumps(obj))
    for n, o in d["outputs"].items():
        o.pop("path", None)
        if n in d["env"]:
            d["env"][n] = ""
    return d


def test_show_identical_to_nix(nix: Nix, nix_drvs: tuple[Path, str]) -> None:
    root, top = nix_drvs
    for args in ([top], ["-r", top], closure_drvs(root, top)[:3]):
        theirs = show_nix(nix, root, *args)
        ours = cli("--store", root, "derivation", "show", *args)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs
    # a plain .drv file: the same object under the file's path
    plain = cli("derivation", "show", root / top.lstrip("/"))
    assert plain.returncode == 0, plain.stderr
    assert list(json.loads(plain.stdout).values()) == list(loads(show_nix(nix, root, top)).values())
    # an output path that is not valid has no deriver to show
    out = parse_derivation((root / top.lstrip("/")).read_bytes()).outputs["out"].path
    r = cli("--store", root, "derivation", "show", out)
    assert r.returncode == 1 and b"not valid" in r.stderr


def test_parse_print_and_hash_nix_drvs(nix_drvs: tuple[Path, str]) -> None:
    """Every Nix-made .drv prints back to its bytes, has the store path Nix gave it, passes
    Nix's output checks, and recomputing its outputs from a blank copy gives it back."""
    root, top = nix_drvs

    def resolve(p: str) -> Derivation:
        return parse_derivation((root / p.lstrip("/")).read_bytes(), drv_name_from_path(p))

    kinds = set()
    for p in closure_drvs(root, top):
        data = (root / p.lstrip("/")).read_bytes()
        d = parse_derivation_strict(data, drv_name_from_path(p))
        assert d.unparse() == data
        assert d.store_path() == p
        check_outputs(d, resolve)
        kinds.add((d.type(), tuple(sorted({o.hash_algo for o in d.outputs.values()}))))
        b = Derivation.from_json(blank(d.to_json()), d.name)
        assert compute_outputs(b, resolve).unparse() == data
    assert {k for k, _ in kinds} == {"input-addressed", FIXED}
    assert {a for _, algos in kinds for a in algos} >= {"sha256", "r:sha256", "sha1", "r:md5", "sha512"}
    # two fixed-output inputs with the same output hash modulo are merged, as in Nix
    t = resolve(top)
    flats = [p for p in t.input_drvs if p.endswith("-flat.drv")]
    assert len(flats) == 2
    assert len({hash_derivation_modulo(resolve(p), resolve).hashes["out"] for p in flats}) == 1


def _seed_sources(nix: Nix, nroot: Path, ours: Path, paths: list[str]) -> None:
    srcs = sorted({s for p in paths for s in parse_derivation((nroot / p.lstrip("/")).read_bytes()).input_srcs})
    if srcs:
        exp = nix("nix-store", "--store", nroot, "--export", *srcs).stdout
        r = cli("--store", ours, "store", "import", input=exp)
        assert r.returncode == 0, r.stderr


def add_all(nix: Nix, nroot: Path, ours: Path, top: str, *, show_features: tuple[str, ...] = ()) -> None:
    """`derivation add` every derivation of ``top``'s closure (blanked) into ``ours``; each must
    come out with the path and bytes nix-instantiate made."""
    paths = closure_drvs(nroot, top)
    _seed_sources(nix, nroot, ours, paths)
    shown = loads(show_nix(nix, nroot, "-r", top))
    for p in paths:
        r = cli("--store", ours, "derivation", "add", input=json.dumps(blank(shown[p])).encode())
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == p
        assert (ours / p.lstrip("/")).read_bytes() == (nroot / p.lstrip("/")).read_bytes()


def test_add_reproduces_nix_instantiate(nix: Nix, nix_drvs: tuple[Path, str], tmp_path: Path) -> None:
    nroot, top = nix_drvs
    ours = tmp_path / "ours"
    add_all(nix, nroot, ours, top)
    # Nix reads our store: same outputs, references and a clean verify
    for q in ("--outputs", "--references"):
        assert nix("nix-store", "--store", ours, "-q", q, top).stdout == \
            nix("nix-store", "--store", nroot, "-q", q, top).stdout
    nix("nix-store", "--store", ours, "--verify", "--check-contents")
    # the show form keyed by path is accepted too, and --dry-run adds nothing
    shown = loads(show_nix(nix, nroot, "-r", top))
    r = cli("--store", ours, "derivation", "add", "--dry-run", input=json.dumps({top: blank(shown[top])}).encode())
    assert r.stdout.decode().strip() == top
    flat = next(p for p in shown if p.endswith("-flat.drv") and shown[p]["builder"] == "/bin/sh")
    r = cli("--store", tmp_path / "dry", "derivation", "add", "--dry-run", input=json.dumps(blank(shown[flat])).encode())
    assert r.returncode == 0 and r.stdout.decode().strip() == flat
    assert not (tmp_path / "dry" / flat.lstrip("/")).exists()


def test_add_refuses_wrong_paths_and_missing_inputs(nix: Nix, nix_drvs: tuple[Path, str], tmp_path: Path) -> None:
    nroot, top = nix_drvs
    shown = loads(show_nix(nix, nroot, top))[top]
    empty = tmp_path / "empty"
    r = cli("--store", empty, "derivation", "add", input=json.dumps(blank(shown)).encode())
    assert r.returncode == 1 and b"input derivation" in r.stderr, r.stderr
    wrong = blank(shown)
    wrong["env"]["out"] = "/nix/store/00000000000000000000000000000000-top"
    ours = tmp_path / "ours"
    add_all(nix, nroot, ours, top)
    r = cli("--store", ours, "derivation", "add", input=json.dumps(wrong).encode())
    assert r.returncode == 1 and b"wrong value" in r.stderr, r.stderr
    r = cli("--store", ours, "derivation", "add", input=b"{not json")
    assert r.returncode == 1 and b"invalid JSON" in r.stderr


def test_floating_and_deferred(nix: Nix, tmp_path: Path) -> None:
    """Floating content-addressed outputs (hash placeholders) and the deferred outputs of what
    depends on them, as Nix 2.8 makes them with ca-derivations."""
    expr = """
    let mk = attrs: derivation ({ system = "x86_64-linux"; builder = "/bin/sh"; } // attrs);
        ca = mk { name = "ca"; __contentAddressed = true; outputHashMode = "recursive";
                  outputHashAlgo = "sha256"; outputs = [ "out" "dev" ]; };
    in mk { name = "consumer"; dep = ca; d = ca.dev; }
    """
    nroot = tmp_path / "nixstore"
    top = instantiate(nix, nroot, expr, "--extra-experimental-features", "ca-derivations")
    r = cli("--store", nroot, "derivation", "show", "-r", top)
    assert r.stdout == show_nix(nix, nroot, "-r", top)
    shown = json.loads(r.stdout)
    ca = next(p for p in shown if p.endswith("-ca.drv"))
    assert shown[ca]["env"]["out"] == hash_placeholder("out")
    d = parse_derivation((nroot / ca.lstrip("/")).read_bytes(), "ca")
    assert d.type() == FLOATING and d.output_paths() == {}
    c = parse_derivation((nroot / top.lstrip("/")).read_bytes(), "consumer")
    assert c.type() == "deferred"
    assert hash_derivation_modulo(c, lambda p: parse_derivation((nroot / p.lstrip("/")).read_bytes())).deferred
    add_all(nix, nroot, tmp_path / "ours", top)


# -- non-UTF-8 derivations ----------------------------------------------------------------------


def _escape_raw(b: bytes) -> str:
    """Nix's JSON (raw bytes) in nartool's form: each byte that is not UTF-8 as \\udcXX."""
    return re.sub("[\udc80-\udcff]", lambda m: f"\\u{ord(m.group()):04x}", b.decode("utf-8", "surrogateescape"))


def test_latin1_nix_instantiate(nix: Nix, tmp_path: Path) -> None:
    """A .nix file in latin-1 makes a .drv holding the byte 0xE9: shown with \\udce9 where Nix
    writes the raw byte, and `derivation add` reproduces it from that JSON."""
    expr = ('derivation { name = "latin"; system = "x86_64-linux"; builder = "/bin/sh"; '
            'args = [ "-c" "echo caf\xe9" ]; "v\xe9" = "\xff\xfe"; }').encode("latin-1")
    nroot = tmp_path / "nixstore"
    top = instantiate(nix, nroot, expr)
    data = (nroot / top.lstrip("/")).read_bytes()
    assert b"caf\xe9" in data and b"\xff\xfe" in data
    d = parse_derivation(data, "latin")
    assert d.unparse() == data and d.store_path() == top
    ours = cli("--store", nroot, "derivation", "show", top)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.decode("utf-8") == _escape_raw(show_nix(nix, nroot, top))
    assert json.loads(ours.stdout)[top]["env"]["v\udce9"] == "\udcff\udcfe"
    add_all(nix, nroot, tmp_path / "ours", top)


def _outputs_rows(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as c:
        return sorted(c.execute("SELECT v.path, o.id, o.path FROM DerivationOutputs o JOIN ValidPaths v "
                                "ON v.id = o.drv").fetchall())


def test_latin1_handwritten_registers_outputs(nix: Nix, tmp_path: Path) -> None:
    """A hand-written non-UTF-8 .drv added to a nartool store and (through its export) to a Nix
    store: Nix accepts it (so its output paths are the ones Nix computes), and both stores
    record the same DerivationOutputs."""
    blank_drv = (b'Derive([("dev","","",""),("out","","","")],[],[],"x86_64-linux","/bin/sh",'
                 b'["-c","echo \xe9t\xe9 > $out\\n"],[("builder","/bin/sh"),("caf\xe9","na\xefve \x80\x9f"),'
                 b'("dev",""),("name","hand"),("out",""),("outputs","out dev"),("system","x86_64-linux")])')
    with pytest.raises(UnicodeDecodeError):
        blank_drv.decode("utf-8")
    d = compute_outputs(parse_derivation(blank_drv, "hand"), lambda p: Derivation())
    data = d.unparse()
    assert data.startswith(b'Derive([("dev","/nix/store/') and b"na\xefve \x80\x9f" in data
    ours = tmp_path / "ours"
    with LocalStore(ours) as s:
        info = s.add_text("hand.drv", data)
        assert info.path == d.store_path()
        assert s.query_derivation_outputs(info.path) == d.output_paths()
    exp = cli("--store", ours, "store", "export", info.path)
    assert exp.returncode == 0, exp.stderr
    nroot = tmp_path / "nixstore"
    nix("nix-store", "--store", nroot, "--import", input=exp.stdout)  # Nix checks the output paths
    q = [nix("nix-store", "--store", r, "-q", "--outputs", info.path).stdout for r in (ours, nroot)]
    assert q[0] == q[1] and len(q[0].split()) == 2
    rows = [_outputs_rows(r / "nix/var/nix/db/db.sqlite") for r in (ours, nroot)]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    # and the other way round: a store Nix wrote (and nartool's `show`) agree on it
    assert cli("--store", nroot, "derivation", "show", info.path).returncode == 0


def test_fixed_output_registered_with_computed_path(tmp_path: Path) -> None:
    fo = Derivation(outputs={"out": DerivationOutput("", "r:sha1", "a9993e364706816aba3e25717850c26c9cd0d89d")},
                    platform="x86_64-linux", builder="/bin/sh", env={"out": "", "name": "fx"}, name="fx")
    d = compute_outputs(fo, lambda p: Derivation())
    with LocalStore(tmp_path / "s") as s:
        info = s.add_text("fx.drv", d.unparse())
        assert s.query_derivation_outputs(info.path) == {"out": d.outputs["out"].path}


# -- parsing: round trip and errors ------------------------------------------------------------

_text = st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape"))
# Nix prints output names, paths, hash algorithms and the platform without escapes: they round-trip
# only without '"' and '\' (as in Nix)
_raw = st.binary(max_size=12).filter(lambda b: b'"' not in b and b"\\" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))
_name = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=8)
_path = _name.map(lambda n: f"{SD}/{'a' * 32}-{n}")
_output = st.one_of(
    _path.map(DerivationOutput),
    st.just(DerivationOutput()),
    st.tuples(_path, st.sampled_from(["sha256", "r:sha256", "sha1", "r:md5"])).map(
        lambda t: DerivationOutput(t[0], t[1], {"sha256": "ab" * 32, "sha1": "cd" * 20, "md5": "ef" * 16}[
            t[1].removeprefix("r:")])),
    st.sampled_from(["r:sha256", "sha512"]).map(lambda a: DerivationOutput("", a)),
)
_drv = st.builds(
    Derivation,
    outputs=st.dictionaries(_raw, _output, max_size=3),
    input_drvs=st.dictionaries(_path, st.lists(_raw, max_size=3).map(lambda xs: sorted(set(xs), key=_b)), max_size=3),
    input_srcs=st.lists(_path, max_size=3).map(lambda xs: sorted(set(xs))),
    platform=_raw, builder=_text, args=st.lists(_text, max_size=4), env=st.dictionaries(_text, _text, max_size=5),
)


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


@given(_drv)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parse_print_round_trip(d: Derivation) -> None:
    data = d.unparse()
    back = parse_derivation(data)
    assert back.unparse() == data
    assert parse_derivation_strict(data).unparse() == data
    assert back.outputs == d.outputs and back.env == d.env and back.args == d.args
    assert back.platform == d.platform and back.builder == d.builder and back.input_srcs == d.input_srcs


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parse_arbitrary_bytes_never_crashes(data: bytes) -> None:
    try:
        parse_derivation(b"Derive([" + data)
    except DerivationError as e:
        assert e.offset is not None and 0 <= e.offset <= len(data) + 8


HELLO = (b'Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[],[],"x86_64-linux",'
         b'"/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","hello"),'
         b'("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])')


@pytest.mark.parametrize("data,offset,fragment", [
    (b"", 0, "expected 'Derive(['"),
    (b"Derive(", 0, "expected 'Derive(['"),
    (HELLO[:40], 15, "unterminated string"),
    (HELLO[:-2], len(HELLO) - 2, "unexpected end"),
    (HELLO.replace(b'"x86_64-linux"', b"x86_64-linux"), HELLO.index(b'x86_64-linux') - 1, "expected '\"'"),
    (HELLO.replace(b'/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","",""', b'nix","",""', 1), 8, "bad path"),
    (HELLO.replace(b'"",""', b'"sha257","ab"', 1), 8, "unknown hash algorithm"),
    (HELLO.replace(b'"",""', b'"sha256","abc"', 1), 8, "invalid fixed output hash"),
    (HELLO.replace(b'"",""', b'"r:sha256",""', 1), 8, "has no path"),
    (HELLO.replace(b"[],[]", b'[("x.drv",["out"])],[]'), HELLO.index(b"[],[]") + 2, "bad path"),
])
def test_malformed_drv_errors(data: bytes, offset: int, fragment: str, tmp_path: Path) -> None:
    with pytest.raises(DerivationError) as ei:
        parse_derivation(data)
    assert ei.value.offset == offset, str(ei.value)
    assert fragment in str(ei.value)
    assert f"at byte {offset}" in str(ei.value)
    f = tmp_path / "bad.drv"
    f.write_bytes(data)
    r = cli("derivation", "show", f)
    assert r.returncode == 1 and f"at byte {offset}".encode() in r.stderr and r.stdout == b""


def test_nix_lenient_corners() -> None:
    """What Nix 2.8's parser accepts beyond its printer's form: a missing list separator,
    trailing bytes, unsorted and duplicate entries (first output, last env value win)."""
    loose = HELLO.replace(b'["-c","echo', b'["-c""echo') + b"junk"
    d = parse_derivation(loose)
    assert d.args == ["-c", "echo hi > $out"] and d.unparse() == HELLO
    dup = HELLO.replace(b'("system","x86_64-linux")', b'("system","a"),("system","x86_64-linux"),("builder","/x")')
    assert parse_derivation(dup).env["system"] == "x86_64-linux"
    assert parse_derivation(dup).env["builder"] == "/x"
    with pytest.raises(DerivationError):
        parse_derivation_strict(dup)


def test_type_rules() -> None:
    ia = DerivationOutput("/nix/store/" + "a" * 32 + "-x")
    fx = DerivationOutput("/nix/store/" + "a" * 32 + "-x", "sha256", "ab" * 32)
    with pytest.raises(DerivationError, match="mix"):
        Derivation(outputs={"out": ia, "dev": fx}).type()
    with pytest.raises(DerivationError, match="only one fixed"):
        Derivation(outputs={"out": fx, "dev": fx}).type()
    with pytest.raises(DerivationError, match="named"):
        Derivation(outputs={"bin": fx}).type()
    with pytest.raises(DerivationError, match="at least one"):
        Derivation().type()
    assert Derivation(outputs={"out": DerivationOutput("", "r:sha256", "impure")}).type() == "impure"


def test_from_json_refuses_stray_surrogates() -> None:
    obj = {"outputs": {"out": {}}, "inputSrcs": [], "inputDrvs": {}, "system": "s", "builder": "\ud800",
           "args": [], "env": {"name": "x"}}
    with pytest.raises(DerivationError, match="surrogate"):
        Derivation.from_json(obj)


# -- BasicDerivation -----------------------------------------------------------------------------


def test_basic_derivation_wire() -> None:
    fx = Derivation(outputs={"out": DerivationOutput("", "r:sha256", "ab" * 32)}, platform="x86_64-linux",
                    builder="/bin/sh", args=["-c", "caf\udce9"], env={"b": "2", "a": "1"}, name="fx",
                    input_drvs={f"{SD}/{'b' * 32}-dep.drv": ["out"]}, input_srcs=[f"{SD}/{'c' * 32}-src"])
    b = BasicDerivation.from_derivation(fx, [f"{SD}/{'d' * 32}-dep", f"{SD}/{'c' * 32}-src"])
    assert b.outputs[0][1] == fx.output_path("out") and b.outputs[0][1].endswith("-fx")
    assert b.input_srcs == [f"{SD}/{'c' * 32}-src", f"{SD}/{'d' * 32}-dep"]
    assert b.env == [("a", "1"), ("b", "2")]
    wire = b.to_wire()
    assert len(wire) % 8 == 0 and wire[:8] == (1).to_bytes(8, "little")
    assert b"caf\xe9\0\0\0\0" in wire
    back, n = BasicDerivation.from_wire(wire + b"rest")
    assert back == b and n == len(wire)
    with pytest.raises(DerivationError):
        BasicDerivation.from_wire(wire[:-8])
    # without input derivations the inputs stay the derivation's own
    fx.input_drvs = {}
    assert BasicDerivation.from_derivation(fx, ["/x"]).input_srcs == [f"{SD}/{'c' * 32}-src"]


def test_drv_name_from_path() -> None:
    assert drv_name_from_path("/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello-2.1.drv") == "hello-2.1"
    assert drv_name_from_path("/some/dir/my-pkg.drv") == "my-pkg"
    assert drv_name_from_path("mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-x.drv") == "x"


def test_non_utf8_drv_registers_outputs(tmp_path: Path) -> None:
    """(Without Nix.) A .drv that is not UTF-8 is parsed and its outputs are recorded."""
    blank_drv = (b'Derive([("out","","","")],[],[],"x86_64-linux","/bin/sh",["-c","\xe9"],'
                 b'[("builder","/bin/sh"),("name","l1"),("out",""),("system","x86_64-linux"),("\xff","\xfe")])')
    d = compute_outputs(parse_derivation(blank_drv, "l1"), lambda p: Derivation())
    with LocalStore(tmp_path / "s") as s:
        info = s.add_text("l1.drv", d.unparse())
        assert s.query_derivation_outputs(info.path) == {"out": d.outputs["out"].path}
    r = cli("--store", tmp_path / "s", "derivation", "show", info.path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)[info.path]
    assert shown["args"] == ["-c", "\udce9"] and shown["env"]["\udcff"] == "\udcfe"
    assert b"\\udcff" in r.stdout and r.stdout.decode("utf-8")  # valid UTF-8, bytes escaped


def test_show_output_path_means_its_deriver(tmp_path: Path) -> None:
    from nartool.nar import nar_bytes
    from nartool.nar.events import File
    from nartool.store import export as X

    blank_drv = (b'Derive([("out","","","")],[],[],"x86_64-linux","/bin/sh",[],'
                 b'[("builder","/bin/sh"),("name","d"),("out",""),("system","x86_64-linux")])')
    d = compute_outputs(parse_derivation(blank_drv, "d"), lambda p: Derivation())
    root = tmp_path / "s"
    with LocalStore(root) as s:
        drv = s.add_text("d.drv", d.unparse()).path
        out = d.outputs["out"].path
        rec = b"".join(bytes(c) for c in X.record_chunks(out, [], drv, [nar_bytes([File(b"", False, 1, [b"x"])])]))
        s.import_paths(rec + X.end_chunk())
    by_out = cli("--store", root, "derivation", "show", out)
    assert by_out.returncode == 0, by_out.stderr
    assert by_out.stdout == cli("--store", root, "derivation", "show", drv).stdout
    assert list(json.loads(by_out.stdout)) == [drv]


def test_outputs_outside_the_store_refused(tmp_path: Path) -> None:
    """As Nix: a .drv whose output is not a store path is not registered at all."""
    from nartool.errors import NartoolError

    drv = (b'Derive([("out","/etc/passwd","","")],[],[],"x86_64-linux","/bin/sh",[],'
           b'[("name","bad"),("out","/etc/passwd")])')
    with LocalStore(tmp_path / "s") as s:
        with pytest.raises(NartoolError, match="/etc/passwd"):
            s.add_text("bad.drv", drv)
        assert s.all_paths() == [] and os.listdir(s.real_store_dir) == []


def test_drv_with_wrong_outputs_refused(tmp_path: Path) -> None:
    """A .drv is content-addressed, so anyone allowed to import may add one: one that names
    an output its contents do not give (here: another derivation's output) would let a build
    place chosen contents at that path. Refused at registration, as Nix does, for every way
    in (add_text, add_nar, import), also with correct input derivations."""
    from nartool.errors import NartoolError
    from nartool.store.derivation import parse_derivation

    fo = Derivation(outputs={"out": DerivationOutput("", "sha256", "ab" * 32)}, platform="x86_64-linux",
                    builder="/bin/sh", env={"name": "fo"}, name="fo")
    good = compute_outputs(fo, lambda p: Derivation())
    with LocalStore(tmp_path / "s") as s:
        gi = s.add_text("fo.drv", good.unparse(), sorted(good.references()))
        victim = "/nix/store/" + "z" * 32 + "-victim"
        dep = Derivation(outputs={"out": DerivationOutput("")}, input_drvs={gi.path: ["out"]}, platform="x86_64-linux",
                         builder="/bin/sh", env={"name": "dep", "out": ""}, name="dep")
        ok = compute_outputs(dep, lambda p: parse_derivation(good.unparse(), "fo"))
        oi = s.add_text("dep.drv", ok.unparse(), sorted(ok.references()))
        assert s.query_derivation_outputs(oi.path) == ok.output_paths()
        bad = parse_derivation(ok.unparse(), "dep")
        bad.outputs["out"].path = victim
        bad.env["out"] = victim
        with pytest.raises(NartoolError) as e:
            s.add_text("dep.drv", bad.unparse(), sorted(bad.references()))
        assert e.value.rule == "bad-output" and "incorrect output" in e.value.message
        assert sorted(s.all_paths()) == sorted([gi.path, oi.path])
        assert len(os.listdir(s.real_store_dir)) == 2


def test_add_to_a_store_without_add_text(tmp_path: Path) -> None:
    """`derivation add` on stores without add_text goes through add_nar with the text content
    address: a store that checks content addresses accepts it, the .drv reads back and its
    outputs are recorded."""
    from nartool.cli.derivation import _text_info, _text_nar
    from nartool.store.derivation import read_derivation

    fo = Derivation(outputs={"out": DerivationOutput("", "sha256", "ab" * 32)}, platform="x86_64-linux",
                    builder="/bin/sh", env={"name": "fo"}, name="fo")
    d = compute_outputs(fo, lambda p: Derivation())
    data, path = d.unparse(), d.store_path()
    with LocalStore(tmp_path / "s") as s:
        info = s.add_nar(_text_info(path, data, d.references()), _text_nar(data))
        assert info.path == path and info.ca and info.ca.startswith("text:sha256:")
        assert read_derivation(s, path).unparse() == data
        assert s.query_derivation_outputs(path) == d.output_paths()


def test_basic_derivation_read_by_nix_serve(nix: Nix, tmp_path: Path) -> None:
    """Nix 2.8's `nix-store --serve --write` reads our BuildDerivation body (non-UTF-8 bytes
    included) and builds it: the output it locks is the fixed output path we compute, and its
    reply is a build result (the builder is missing in the store's chroot), not a protocol
    error."""
    import select
    import struct
    import time

    def u64(n: int) -> bytes:
        return struct.pack("<Q", n)

    fo = Derivation(outputs={"out": DerivationOutput("", "r:sha1", "a9993e364706816aba3e25717850c26c9cd0d89d")},
                    platform="x86_64-linux", builder="/bin/sh", args=["-c", "echo caf\udce9 > $out"],
                    env={"name": "fo", "v\udce9": "\udcff"}, name="fo")
    d = compute_outputs(fo, lambda p: Derivation())
    drv_path = d.store_path().encode()
    req = (u64(0x390C9DEB) + u64(0x206) + u64(8) + u64(len(drv_path)) + drv_path + b"\0" * (-len(drv_path) % 8)
           + BasicDerivation.from_derivation(d).to_wire() + u64(0) * 5)
    root = tmp_path / "s"
    p = subprocess.Popen(["nix-store", "--serve", "--write", "--store", root, "--option", "sandbox", "false",
                          "--option", "build-users-group", ""],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    try:
        p.stdin.write(req)
        p.stdin.flush()  # stdin stays open: Nix stops a build when its client hangs up
        out = b""
        deadline = time.monotonic() + 60
        while len(out) < 16 + 16 and time.monotonic() < deadline:
            if select.select([p.stdout], [], [], 1)[0]:
                chunk = p.stdout.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                out += chunk
    finally:
        p.stdin.close()
        p.wait(30)
    stderr = p.stderr.read()
    assert out[:8] == u64(0x5452EECB), stderr
    status, n = struct.unpack("<QQ", out[16:32])
    assert status != 0 and b"protocol" not in stderr.lower(), stderr
    assert os.path.exists(root / (d.outputs["out"].path.lstrip("/") + ".lock")), os.listdir(root / "nix/store")


def test_show_plain_files(tmp_path: Path) -> None:
    fo = compute_outputs(Derivation(outputs={"out": DerivationOutput("", "sha256", "ab" * 32)}, platform="p",
                                    builder="/bin/sh", env={"name": "fo"}, name="fo"), lambda p: Derivation())
    f = tmp_path / "my weird name.drv"  # not a store path name: the recorded output path is shown
    f.write_bytes(fo.unparse())
    r = cli("derivation", "show", f)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[str(f)]["outputs"]["out"]["path"] == fo.outputs["out"].path
    r = cli("derivation", "show", tmp_path / "missing.drv")
    assert r.returncode == 1 and b"No such file" in r.stderr and r.stdout == b""


_token = st.one_of(st.binary(min_size=1, max_size=4).filter(lambda b: b'"' not in b and b"\\" not in b),
                   st.integers(0, 255).map(lambda c: b"\\" + bytes([c])))


@given(st.lists(_token, max_size=12))
@settings(max_examples=500, deadline=None)
def test_string_escapes_as_nix_reads_them(tokens: list[bytes]) -> None:
    """Any escaped byte stands for itself, except n, r, t (fast and slow paths agree)."""
    from nartool.store.derivation import _P

    want = b"".join({b"\\n": b"\n", b"\\r": b"\r", b"\\t": b"\t"}.get(t, t[1:]) if t[:1] == b"\\" else t
                    for t in tokens)
    p = _P(b'"' + b"".join(tokens) + b'",')
    assert _b(p.string()) == want and p.s[p.i :] == b","
