"""The record classes that were dataclasses (nartool/_record.py): each still behaves as the
dataclass it was. For every converted type a reference dataclass is made here from the old
declaration (field names, order, defaults, frozen or not, order=True), and the two must agree
on the constructor (positional order, keywords, defaults), equality, hashing, immutability,
``replace``, pickling, ``copy`` and the repr."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
from typing import Any

import pytest

from nartool._record import Record
from nartool.build.options import BuildOptions, SandboxPath
from nartool.build.outputs import Output
from nartool.build.sandbox import Bind, SandboxSpec
from nartool.build.users import BuildUser
from nartool.config import Config, Kind, Setting, UserIdentity, _show_list
from nartool.hashes import Hash
from nartool.store.buildresult import BuildResult, BuildStatus
from nartool.store.derivation import BasicDerivation, Derivation, DerivationOutput, DrvHash
from nartool.store.paths import ContentAddress, StorePath
from nartool.store.types import PathInfo
from nartool.store.uri import StoreURI

H = Hash("sha256", bytes(range(32)))
H2 = Hash("sha256", bytes(32))
NO = dataclasses.MISSING  # (no default)
LIST, DICT, FROZENSET = object(), object(), object()  # (default factories)


def _bool_parse(tokens: list[str]) -> bool:
    return tokens == ["true"]


#: the old declarations: type -> (frozen, order, [(field, default)]), ``NO`` for no default,
#: then two values per field (``a``, and ``b`` differing from it in each field)
SPECS: dict[type, tuple[bool, bool, list[tuple[str, Any]], dict[str, Any], dict[str, Any]]] = {
    StorePath: (True, True, [("hash_part", NO), ("name", NO)],
                dict(hash_part="a" * 32, name="x"), dict(hash_part="b" * 32, name="y")),
    ContentAddress: (True, False, [("method", NO), ("hash", NO)],
                     dict(method="flat", hash=H), dict(method="recursive", hash=H2)),
    PathInfo: (False, False, [("path", NO), ("nar_hash", NO), ("nar_size", NO), ("references", FROZENSET),
                              ("deriver", None), ("registration_time", 0), ("ultimate", False), ("sigs", FROZENSET),
                              ("ca", None)],
               dict(path="/nix/store/x", nar_hash=H, nar_size=8, references=frozenset({"/a"}), deriver="/d.drv",
                    registration_time=5, ultimate=True, sigs=frozenset({"k:s"}), ca="fixed:sha256:x"),
               dict(path="/nix/store/y", nar_hash=H2, nar_size=9, references=frozenset(), deriver=None,
                    registration_time=6, ultimate=False, sigs=frozenset(), ca=None)),
    DerivationOutput: (False, False, [("path", ""), ("hash_algo", ""), ("hash", "")],
                       dict(path="/p", hash_algo="sha256", hash="ab"), dict(path="/q", hash_algo="", hash="")),
    Derivation: (False, False, [("outputs", DICT), ("input_drvs", DICT), ("input_srcs", LIST), ("platform", ""),
                                ("builder", ""), ("args", LIST), ("env", DICT), ("name", "")],
                 dict(outputs={"out": DerivationOutput("/p")}, input_drvs={"/d.drv": ["out"]}, input_srcs=["/s"],
                      platform="x86_64-linux", builder="/b", args=["-c"], env={"a": "b"}, name="n"),
                 dict(outputs={}, input_drvs={}, input_srcs=[], platform="", builder="", args=[], env={}, name="")),
    DrvHash: (False, False, [("hashes", NO), ("deferred", False)],
              dict(hashes={"out": H}, deferred=True), dict(hashes={}, deferred=False)),
    BasicDerivation: (False, False, [("outputs", NO), ("input_srcs", NO), ("platform", NO), ("builder", NO), ("args", NO),
                                     ("env", NO)],
                      dict(outputs=[("out", "/p", "", "")], input_srcs=["/s"], platform="p", builder="/b",
                           args=["a"], env=[("k", "v")]),
                      dict(outputs=[], input_srcs=[], platform="q", builder="/c", args=[], env=[])),
    BuildResult: (True, False, [("status", NO), ("error_msg", ""), ("times_built", 0), ("is_non_deterministic", False),
                                ("start_time", 0), ("stop_time", 0), ("built_outputs", ())],
                  dict(status=BuildStatus.BUILT, error_msg="", times_built=1, is_non_deterministic=False,
                       start_time=10, stop_time=11, built_outputs=(("out", "{}"),)),
                  dict(status=BuildStatus.MISC_FAILURE, error_msg="no", times_built=0, is_non_deterministic=True,
                       start_time=0, stop_time=0, built_outputs=())),
    StoreURI: (True, False, [("text", NO), ("scheme", NO), ("authority", NO), ("params", NO)],
               dict(text="ssh://h", scheme="ssh", authority="h", params={}),
               dict(text="local", scheme="local", authority="", params={"root": "/r"})),
    SandboxPath: (True, False, [("target", NO), ("source", NO), ("optional", False)],
                  dict(target="/t", source="/s", optional=True), dict(target="/u", source="/v", optional=False)),
    Bind: (False, False, [("target", NO), ("source", NO), ("optional", False)],
           dict(target="/t", source="/s", optional=True), dict(target="/u", source="/v", optional=False)),
    Output: (False, False, [("name", NO), ("path", NO), ("location", NO), ("info", None)],
             dict(name="out", path="/p", location="/l", info=None),
             dict(name="dev", path="/q", location="/m", info=PathInfo("/q", H, 1))),
    UserIdentity: (True, False, [("name", NO), ("uid", NO), ("gid", NO), ("group", NO)],
                   dict(name="u", uid=1, gid=2, group="g"), dict(name="v", uid=3, gid=4, group="h")),
    Kind: (True, False, [("name", NO), ("parse", NO), ("is_list", True), ("show", _show_list)],
           dict(name="k", parse=_bool_parse, is_list=False, show=str), dict(name="l", parse=tuple, is_list=True,
                                                                            show=repr)),
    Setting: (True, False, [("name", NO), ("field", NO), ("kind", NO), ("default", NO), ("doc", NO), ("trust", NO)],
              dict(name="a-b", field="a_b", kind=Kind("k", tuple), default=(), doc="d", trust=True),
              dict(name="c", field="c", kind=Kind("l", tuple), default=("x",), doc="e", trust=False)),
}


def _factory(default: Any) -> Any:
    return {LIST: list, DICT: dict, FROZENSET: frozenset}.get(default)


def _reference(cls: type) -> type:
    """The dataclass ``cls`` was (same name, fields, defaults, frozen, order)."""
    frozen, order, fields, _a, _b = SPECS[cls]
    specs: list[Any] = []
    for name, default in fields:
        if _factory(default) is not None:
            specs.append((name, Any, dataclasses.field(default_factory=_factory(default))))
        elif default is NO:
            specs.append((name, Any))
        else:
            specs.append((name, Any, dataclasses.field(default=default)))
    ref = dataclasses.make_dataclass(cls.__name__, specs, frozen=frozen, order=order)
    ref.__qualname__ = cls.__qualname__
    return ref


@pytest.mark.parametrize("cls", list(SPECS), ids=lambda c: c.__name__)
def test_record_behaves_as_its_dataclass(cls: type) -> None:
    frozen, order, fields, a_kw, b_kw = SPECS[cls]
    ref = _reference(cls)
    names = [n for n, _d in fields]
    assert issubclass(cls, Record) and list(cls._fields) == names  # type: ignore[attr-defined]
    # the constructor: the same parameters in the same order, the same defaults (a factory's
    # default may be None, giving what the factory gave)
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params] == names
    for p, (name, default) in zip(params, fields, strict=True):
        if default is NO:
            assert p.default is inspect.Parameter.empty, name
        elif _factory(default) is None:
            assert p.default == default, name
    required = {n: a_kw[n] for n, d in fields if d is NO}
    assert repr(cls(**required)) == repr(ref(**required))
    # positionally and by name alike; equality field by field, and only within the class
    a, a2, b = cls(*a_kw.values()), cls(**a_kw), cls(**b_kw)
    ra, rb = ref(**a_kw), ref(**b_kw)
    assert a == a2 and (a != a2) is False and a != b and (a == b) == (ra == rb)
    assert a != ref(**a_kw) and a != tuple(a_kw.values()) and a != object()
    for name in names:  # each field takes part
        assert cls(**{**a_kw, name: b_kw[name]}) != a, name
    # the repr, as the dataclass's
    assert repr(a) == repr(ra) and repr(b) == repr(rb)
    # replace: a new record, the old one unchanged; an unknown field refused
    c = a.replace(**{names[0]: b_kw[names[0]]})
    assert c == cls(**{**a_kw, names[0]: b_kw[names[0]]}) and a == a2 and c is not a
    assert a.replace() == a and a.replace() is not a
    with pytest.raises(TypeError):
        a.replace(no_such_field=1)
    # pickling and copying
    assert pickle.loads(pickle.dumps(a)) == a and pickle.loads(pickle.dumps(b)) == b
    assert copy.copy(a) == a and copy.deepcopy(b) == b
    # hashing and immutability: as the frozen or mutable dataclass
    if frozen:
        if cls is not StoreURI:  # (its params is a dict: unhashable, as the dataclass's was)
            assert hash(a) == hash(a2) == hash(ra) and {a, a2, b} == {a, b}
        with pytest.raises(AttributeError):
            setattr(a, names[0], b_kw[names[0]])
        with pytest.raises(AttributeError):
            delattr(a, names[0])
        with pytest.raises(AttributeError):
            a.no_such_field = 1  # type: ignore[attr-defined]
        assert a == a2
    else:
        with pytest.raises(TypeError):
            hash(a)
        setattr(a, names[0], b_kw[names[0]])
        assert a == c and a != a2
    # ordering (order=True): by the fields in order, as the dataclass's
    if order:
        assert (a < b) == (ra < rb) and (a <= b) == (ra <= rb) and (a > b) == (ra > rb) and (a >= b) == (ra >= rb)
        assert sorted([b, a]) == sorted([a, b])
        with pytest.raises(TypeError):
            a < ref(**a_kw)  # noqa: B015


def test_mutable_defaults_are_not_shared() -> None:
    d1, d2 = Derivation(), Derivation()
    d1.outputs["out"] = DerivationOutput()
    d1.args.append("x")
    assert d2.outputs == {} and d2.args == []
    o1, o2 = BuildOptions(), BuildOptions()
    o1.sandbox_paths.append("/x")
    assert o2.sandbox_paths == []
    u1, u2 = BuildUser("a", 1, 1), BuildUser("b", 2, 2)
    u1.supplementary_gids.append(3)
    assert u2.supplementary_gids == []


def test_build_options_and_spec_keep_their_defaults() -> None:
    import os

    from nartool.build.options import default_build_users_group, default_system, default_system_features

    o = BuildOptions()
    assert (o.cores, o.system, o.system_features, o.build_users_group) == (
        os.cpu_count() or 1, default_system(), default_system_features(), default_build_users_group())
    assert BuildOptions(cores=3, build_users_group="g").replace(max_jobs=2) == BuildOptions(max_jobs=2, cores=3,
                                                                                          build_users_group="g")
    with pytest.raises(TypeError):
        hash(o)
    s = SandboxSpec(b"/b", [], [], "/nix/store", "/r", "/c", "/d", [], [], [], False, None)
    assert (s.sandbox_build_dir, s.kvm, s.dev_shm_size, s.filter_syscalls, s.pre_build_hook, s.platform,
            s.impersonate_linux_26, s.personality, s.no_user_namespace) == ("/build", False, "50%", True, None, "",
                                                                            False, [], False)
    assert s.replace(kvm=True).kvm and s == s.replace() and repr(s).startswith("SandboxSpec(builder=b'/b', args=[]")


def test_build_user_keeps_its_lock_out_of_comparisons() -> None:
    u = BuildUser("nixbld1", 30001, 30000, [30000], "nixbld", "/l", _fd=None)
    assert u == BuildUser("nixbld1", 30001, 30000, [30000], "nixbld", "/l") and "_fd" not in repr(u)


def test_config_is_a_record_made_as_its_dataclass_was() -> None:
    c = Config()
    fields = list(Config._fields)
    assert fields[0] == "allowed_users" and fields[-1] == "sources" and len(fields) == len(Config.settings()) + 1
    assert c == Config() and hash(c) == hash(Config()) and c != Config(sources=("x",))
    # positionally and by name, defaults for the rest
    assert Config(("a",)) == Config(allowed_users=("a",)) != c
    with pytest.raises(TypeError):
        Config(("a",), allowed_users=("b",))
    with pytest.raises(TypeError):
        Config(no_such_setting=1)
    with pytest.raises(TypeError):
        Config(*range(len(fields) + 1))
    with pytest.raises(AttributeError):
        c.sandbox = "false"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del c.sandbox  # type: ignore[misc]
    d = c.replace(max_jobs=4, sources=("f",))
    assert d.max_jobs == 4 and c.max_jobs == 1 and d == Config(max_jobs=4, sources=("f",))
    assert pickle.loads(pickle.dumps(d)) == d and copy.deepcopy(d) == d
    # the repr: every field in order, as the dataclass's
    assert repr(c) == "Config(" + ", ".join(f"{f}={getattr(c, f)!r}" for f in fields) + ")"
    # read on the class, a field is its default (as on the dataclass)
    assert Config.max_jobs == 1 and Config.sources == ()


def test_an_undeclared_attribute_is_refused() -> None:
    """(Stricter than the dataclass, which had a ``__dict__``: a misspelt field fails.)"""
    info = PathInfo("/nix/store/x", H, 1)
    with pytest.raises(AttributeError):
        info.nar_sise = 2  # type: ignore[attr-defined]
