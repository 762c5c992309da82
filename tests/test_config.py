"""nartool.conf parsing, file precedence, user matching and key trust."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

import nartool.config as config_mod
from nartool.config import Config, UserIdentity, group_members, match_user
from nartool.errors import NartoolError, SignatureError
from nartool.store.signing import PublicKey, SecretKey

from .helpers import run_cli

ALICE = UserIdentity("alice", 1000, 1000, "alice")
BOB = UserIdentity("bob", 1001, 100, "users")


def members_of(table: dict[str, list[str]]) -> config_mod.GroupMembers:
    return lambda name: table.get(name)


NO_GROUPS = members_of({})


def error_of(text: str) -> NartoolError:
    with pytest.raises(NartoolError) as e:
        Config.from_text(text, "test.conf")
    return e.value


# ---------------------------------------------------------------- parsing


def test_defaults() -> None:
    c = Config()
    assert c.allowed_users == ("*",) and c.trusted_users == ("root",)
    assert c.require_sigs is True
    assert c.trusted_keys() == {}  # cache.nixos.org is not trusted by default
    assert Config.from_text("") == Config(sources=("<string>",))


def test_parse_full_file() -> None:
    k1, k2 = SecretKey.generate("k1").public_key(), SecretKey.generate("k2").public_key()
    text = (
        "# nartool settings\n"
        "\n"
        "   \t\n"
        f"trusted-public-keys = {k1.to_text()}\t{k2.to_text()}  # two keys\n"
        "trusted-users = root @wheel   alice\r\n"
        "allowed-users =\n"
        "require-sigs = false#no space before the comment\n"
        "secret-key-files = /etc/nartool/a.sec /etc/nartool/b.sec\n"
    )
    c = Config.from_text(text, "x.conf")
    assert c.trusted_public_keys == (k1, k2)
    assert c.trusted_users == ("root", "@wheel", "alice")
    assert c.allowed_users == ()
    assert c.require_sigs is False
    assert c.secret_key_files == ("/etc/nartool/a.sec", "/etc/nartool/b.sec")
    assert c.sources == ("x.conf",)


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("yes", True), ("1", True), ("false", False), ("no", False), ("0", False)])
def test_booleans(value: str, expected: bool) -> None:
    assert Config.from_text(f"require-sigs = {value}").require_sigs is expected


def test_later_lines_replace_and_extra_appends() -> None:
    c = Config.from_text("trusted-users = a\ntrusted-users = b c\nextra-trusted-users = d\n"
                         "extra-allowed-users = @users\n")
    assert c.trusted_users == ("b", "c", "d")
    assert c.allowed_users == ("*", "@users")  # extra- appends to the inherited value
    c2 = Config.from_text("extra-trusted-users = e\n", base=c)
    assert c2.trusted_users == ("b", "c", "d", "e")


@pytest.mark.parametrize(("text", "line", "rule"), [
    ("trusted-substituters = https://cache.nixos.org", 1, "unknown-setting"),
    ("# ok\n\ntrusted-users = root\nTrusted-Users = root\n", 4, "unknown-setting"),
    ("extra-require-sigs = true", 1, "unknown-setting"),
    ("include /etc/other.conf", 1, "unsupported-include"),
    ("\n!include other.conf", 2, "unsupported-include"),
    ("trusted-users=root", 1, "config-syntax"),
    ("trusted-users root", 1, "config-syntax"),
    ("\n\nrequire-sigs", 3, "config-syntax"),
    ("require-sigs = maybe", 1, "bad-boolean"),
    ("require-sigs = true false", 1, "bad-boolean"),
    ("require-sigs =", 1, "bad-boolean"),
    ("\ntrusted-public-keys = k:AAAA", 2, "bad-key-size"),
    ("trusted-public-keys = nocolon", 1, "bad-key"),
    ("secret-key-files = relative/key.sec", 1, "relative-path"),
])
def test_errors_name_file_line_and_rule(text: str, line: int, rule: str) -> None:
    e = error_of(text)
    assert e.rule == rule
    assert e.path == "test.conf"
    assert f"on line {line}" in str(e)
    assert "\n" not in str(e)


def test_unknown_setting_error_lists_known_ones() -> None:
    e = error_of("trusted-user = root")
    assert "unknown setting 'trusted-user'" in str(e) and "trusted-users" in str(e)


# ---------------------------------------------------------------- files


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_later_files_override(tmp_path: Path) -> None:
    system = write(tmp_path / "system.conf", "trusted-users = root @wheel\nrequire-sigs = false\n")
    user = write(tmp_path / "user.conf", "trusted-users = alice\n")
    c = Config.load([system, user])
    assert c.trusted_users == ("alice",)
    assert c.require_sigs is False  # kept from the system file
    assert c.sources == (str(system), str(user))
    with pytest.raises(NartoolError) as e:
        Config.load([system, tmp_path / "missing.conf"])
    assert e.value.rule == "config-missing"


def test_default_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = write(tmp_path / "etc" / "nartool.conf", "trusted-users = sys\nallowed-users = @users\n")
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG", str(system))
    home = tmp_path / "home"
    xdg = tmp_path / "xdg"
    write(home / ".config" / "nartool" / "nartool.conf", "trusted-users = from-home\n")
    write(xdg / "nartool" / "nartool.conf", "trusted-users = from-xdg\n")
    explicit = write(tmp_path / "explicit.conf", "trusted-users = from-env\n")

    assert Config.load(env={"HOME": str(home)}).trusted_users == ("from-home",)
    assert Config.load(env={"HOME": str(home), "XDG_CONFIG_HOME": str(xdg)}).trusted_users == ("from-xdg",)
    both = Config.load(env={"HOME": str(home), "XDG_CONFIG_HOME": str(xdg), "NARTOOL_CONFIG": str(explicit)})
    assert both.trusted_users == ("from-env",)
    assert both.allowed_users == ("@users",)  # the system file is read first
    assert both.sources == (str(system), str(explicit))
    # relative XDG_CONFIG_HOME is ignored (XDG spec); an empty NARTOOL_CONFIG counts as unset
    assert Config.load(env={"HOME": str(home), "XDG_CONFIG_HOME": "rel", "NARTOOL_CONFIG": ""}).trusted_users == (
        "from-home",)
    # absent optional files are skipped; an explicit $NARTOOL_CONFIG must exist
    assert Config.load(env={"HOME": str(tmp_path / "nohome")}).trusted_users == ("sys",)
    with pytest.raises(NartoolError) as e:
        Config.load(env={"HOME": str(home), "NARTOOL_CONFIG": str(tmp_path / "nope.conf")})
    assert e.value.rule == "config-missing" and e.value.path == str(tmp_path / "nope.conf")


def test_file_names_are_written_as_pathlib_writes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are opened by plain names (a build reads its settings without pathlib), named
    in sources and errors as pathlib writes them: a trailing slash, ``//`` and ``/./`` name the
    same file as before."""
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG", str(tmp_path / "no-system.conf"))
    conf = write(tmp_path / "x.conf", "trusted-users = bob\n")
    for name in (f"{conf}/", f"{tmp_path}//x.conf", f"{tmp_path}/./x.conf"):
        for c in (Config.load(env={"NARTOOL_CONFIG": name}), Config.load([name])):
            assert c.trusted_users == ("bob",) and c.sources == (str(conf),)
    xdg = tmp_path / "xdg"
    write(xdg / "nartool" / "nartool.conf", "trusted-users = carol\n")
    c = Config.load(env={"XDG_CONFIG_HOME": f"{xdg}//"})
    assert c.trusted_users == ("carol",) and c.sources == (str(xdg / "nartool" / "nartool.conf"),)
    assert Config.default_paths({"XDG_CONFIG_HOME": f"{xdg}/"})[1] == (xdg / "nartool" / "nartool.conf", False)
    with pytest.raises(NartoolError) as e:
        Config.load(env={"NARTOOL_CONFIG": f"{tmp_path}/missing.conf/"})
    assert e.value.rule == "config-missing" and e.value.path == str(tmp_path / "missing.conf")


def test_reading_no_files_imports_neither_pathlib_nor_signing(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom nartool.config import Config\n"
            "c = Config.load(env={'HOME': sys.argv[1]})\n"
            "print(sorted(m for m in ('pathlib', 'nartool.store.signing') if m in sys.modules))\n")
    # (-S: without the site hooks of this environment, which may load pathlib themselves)
    r = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                       cwd="/", env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if Path(config_mod.SYSTEM_CONFIG).exists():
        pytest.skip(f"{config_mod.SYSTEM_CONFIG} exists here")
    assert r.stdout.strip() == "[]"


def test_load_reports_file_of_error(tmp_path: Path) -> None:
    good = write(tmp_path / "a.conf", "trusted-users = root\n")
    bad = write(tmp_path / "b.conf", "# x\nfoo = bar\n")
    with pytest.raises(NartoolError) as e:
        Config.load([good, bad])
    assert e.value.path == str(bad) and "on line 2" in str(e.value)
    binary = tmp_path / "c.conf"
    binary.write_bytes(b"trusted-users = \xff\n")
    with pytest.raises(NartoolError) as e:
        Config.load([binary])
    assert e.value.rule == "config-encoding"


# ---------------------------------------------------------------- users


def test_match_star_and_names() -> None:
    assert match_user(ALICE, ["*"], NO_GROUPS)
    assert match_user(ALICE, ["bob", "alice"], NO_GROUPS)
    assert not match_user(ALICE, ["bob", "Alice", "1000", "@1000"], NO_GROUPS)
    assert not match_user(ALICE, [], NO_GROUPS)


def test_match_uid_without_passwd_entry() -> None:
    uid = next(u for u in range(54321, 60000) if not _has_passwd(u))
    user = UserIdentity.from_ids(uid, uid)
    assert user.name == str(uid) and user.group == str(uid)
    assert match_user(user, [str(uid)], NO_GROUPS)
    assert match_user(user, [f"@{uid}"], NO_GROUPS)  # the gid fallback name, as in Nix


def _has_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_match_group_primary_and_member() -> None:
    groups = members_of({"wheel": ["carol", "bob"], "users": []})
    assert match_user(BOB, ["@users"], groups)  # primary group (even with no gr_mem entry)
    assert match_user(BOB, ["@wheel"], groups)  # listed member
    assert not match_user(ALICE, ["@wheel", "@users"], groups)
    assert not match_user(ALICE, ["@nosuchgroup"], groups)
    assert not match_user(BOB, ["wheel", "users"], groups)  # without '@' these are user names


def test_group_members_reads_the_group_database() -> None:
    assert group_members("root") is not None
    assert group_members("no-such-group-nartool") is None


def test_trusted_users_are_always_allowed() -> None:
    c = Config.from_text("trusted-users = @wheel\nallowed-users = carol\n")
    groups = members_of({"wheel": ["alice"]})
    assert c.is_trusted(ALICE, groups) and c.is_allowed(ALICE, groups)
    assert not c.is_trusted(BOB, groups) and not c.is_allowed(BOB, groups)
    carol = UserIdentity("carol", 1002, 1002, "carol")
    assert c.is_allowed(carol, groups) and not c.is_trusted(carol, groups)
    default = Config()
    assert default.is_allowed(BOB, groups) and not default.is_trusted(BOB, groups)


def test_current_user() -> None:
    me = UserIdentity.current()
    assert me.uid == os.geteuid() and me.gid == os.getegid()
    assert me.name == pwd.getpwuid(me.uid).pw_name
    assert Config().is_trusted(me) == (me.name == "root")
    assert Config.from_text(f"trusted-users = @{me.group}").is_trusted(me)


# ---------------------------------------------------------------- keys


def test_trusted_keys_include_secret_key_files(tmp_path: Path) -> None:
    listed = SecretKey.generate("listed-1").public_key()
    own = SecretKey.generate("own-1")
    shadowed = SecretKey.generate("listed-1")  # same name as a trusted-public-keys entry
    (tmp_path / "own.sec").write_text(own.to_text())
    (tmp_path / "shadowed.sec").write_text(shadowed.to_text())
    (tmp_path / "dir.sec").mkdir()
    c = Config.from_text(
        f"trusted-public-keys = {listed.to_text()}\n"
        f"secret-key-files = {tmp_path / 'missing.sec'} {tmp_path / 'dir.sec'} {tmp_path / 'own.sec'} "
        f"{tmp_path / 'shadowed.sec'}\n")
    keys = c.trusted_keys()
    assert keys == {"listed-1": listed, "own-1": own.public_key()}  # first key of a name wins
    assert isinstance(keys["own-1"], PublicKey)
    assert [k.name for k in c.secret_keys()] == ["own-1", "listed-1"]


def test_corrupt_secret_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "bad.sec").write_text("bad-1:AAAA")
    c = Config.from_text(f"secret-key-files = {tmp_path / 'bad.sec'}")
    with pytest.raises(SignatureError) as e:
        c.trusted_keys()
    assert e.value.path == str(tmp_path / "bad.sec")


# ---------------------------------------------------------------- trust for serve


def _serve_files(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    system = write(tmp_path / "etc" / "nartool.conf", "trusted-users = root\nallowed-users = @users\n")
    system.chmod(0o644)
    home = tmp_path / "home"
    write(home / ".config" / "nartool" / "nartool.conf", "trusted-users = *\n").chmod(0o644)
    xdg = write(tmp_path / "xdg" / "nartool" / "nartool.conf", "trusted-users = *\nrequire-sigs = false\n")
    xdg.chmod(0o644)
    explicit = write(tmp_path / "explicit.conf",
                     f"trusted-users = *\nallowed-users = *\nsecret-key-files = {tmp_path / 'k.sec'}\n")
    explicit.chmod(0o644)
    return system, {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "NARTOOL_CONFIG": str(explicit)}


@pytest.mark.parametrize("var", ["HOME", "XDG_CONFIG_HOME", "NARTOOL_CONFIG"])
def test_serve_ignores_user_trust_settings(tmp_path: Path, var: str) -> None:
    """Old behaviour: serve used Config.load(), so the login user's own file could say
    `trusted-users = *` (and a secret key file of theirs became trusted)."""
    system, full_env = _serve_files(tmp_path)
    env = {"HOME": full_env["HOME"]} if var == "HOME" else {"HOME": str(tmp_path / "nohome"), var: full_env[var]}
    warnings: list[str] = []
    me = os.geteuid()  # the system file's owner: "root" here, so that only the user files draw a warning
    c = Config.load_for_serve(env, euid=me + 1, root_uid=me, system=system, warn=warnings.append)
    assert c.trusted_users == ("root",) and c.allowed_users == ("@users",)
    assert c.require_sigs is True and c.secret_key_files == ()
    # the user's file is read for its other settings (there are some that are not trust settings)
    assert c.sources[0] == str(system)
    assert not c.is_trusted(ALICE, NO_GROUPS) and not c.is_allowed(ALICE, NO_GROUPS)
    assert len(warnings) == 1 and "ignoring" in warnings[0] and "system configuration" in warnings[0]
    # the same files for other commands (the user's own rights): read as before
    assert Config.load(env=env).trusted_users == ("*",)


def test_serve_without_system_file_uses_defaults(tmp_path: Path) -> None:
    _, env = _serve_files(tmp_path)
    c = Config.load_for_serve(env, euid=1000, system=tmp_path / "absent.conf", warn=lambda m: None)
    assert c.replace(sources=()) == Config()  # the user's file gave only trust settings
    # a missing $NARTOOL_CONFIG is no error for a user (the file is not read at all)
    Config.load_for_serve({"NARTOOL_CONFIG": str(tmp_path / "nope")}, euid=1000, system=tmp_path / "absent.conf")


def test_serve_as_root_reads_roots_own_files(tmp_path: Path) -> None:
    system, env = _serve_files(tmp_path)
    me = os.geteuid()
    warnings: list[str] = []
    c = Config.load_for_serve(env, euid=me, root_uid=me, system=system, warn=warnings.append)
    assert c.trusted_users == ("*",) and c.allowed_users == ("*",)
    assert c.sources == (str(system), env["NARTOOL_CONFIG"]) and warnings == []
    # ... but not one that others can write (it is ignored, with a warning)
    Path(env["NARTOOL_CONFIG"]).chmod(0o664)
    c = Config.load_for_serve(env, euid=me, root_uid=me, system=system, warn=warnings.append)
    assert c.trusted_users == ("root",) and c.sources == (str(system),)
    assert len(warnings) == 1 and "ignoring" in warnings[0] and "writable by its group" in warnings[0]
    # nor one owned by someone else (pretend root is another uid)
    Path(env["NARTOOL_CONFIG"]).chmod(0o644)
    warnings.clear()
    c = Config.load_for_serve(env, euid=me + 1, root_uid=me + 1, system=system, warn=warnings.append)
    assert c.trusted_users == ("root",)
    assert any("ignoring" in w and f"owned by uid {me}" in w for w in warnings)
    with pytest.raises(NartoolError) as e:  # for root, an explicit $NARTOOL_CONFIG must exist
        Config.load_for_serve({"NARTOOL_CONFIG": str(tmp_path / "nope")}, euid=me, root_uid=me, system=system)
    assert e.value.rule == "config-missing"


@pytest.mark.parametrize(("mode", "root_offset", "fragments"), [
    (0o644, 0, []),
    (0o664, 0, ["writable by its group"]),
    (0o646, 0, ["writable by others"]),
    (0o666, 0, ["writable by its group and others"]),
    (0o644, 1, ["owned by uid"]),
])
def test_insecure_system_file_is_used_with_a_warning(tmp_path: Path, mode: int, root_offset: int,
                                                     fragments: list[str]) -> None:
    system, _ = _serve_files(tmp_path)
    system.chmod(mode)
    warnings: list[str] = []
    root = os.stat(system).st_uid + root_offset
    c = Config.load_for_serve({"HOME": str(tmp_path / "nohome")}, euid=root + 1, root_uid=root, system=system,
                              warn=warnings.append)
    assert c.allowed_users == ("@users",)  # still the admin's settings
    if not fragments:
        assert warnings == []
    else:
        assert len(warnings) == 1 and str(system) in warnings[0]
        assert all(f in warnings[0] for f in fragments)


def test_serve_cli_ignores_insecure_user_file(tmp_path: Path) -> None:
    """Through `nartool serve` (run as root here: root's own file is honoured only when only
    root can write it). Old behaviour: the group-writable file was obeyed."""

    cfg = tmp_path / "nartool.conf"
    cfg.write_text("allowed-users = nobody-at-all\ntrusted-users = nobody-at-all\n")
    cfg.chmod(0o664)
    if os.stat(cfg).st_uid != os.geteuid() or os.geteuid() != 0:
        pytest.skip("needs to run as root")
    from nartool.remote import wire

    hello = wire.SERVE_MAGIC_1.to_bytes(8, "little") + wire.PROTOCOL_VERSION.to_bytes(8, "little")
    env = {"NARTOOL_CONFIG": str(cfg)}
    r = run_cli("serve", "--store", tmp_path / "st", input=hello, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"ignoring" in r.stderr and b"writable by its group" in r.stderr
    cfg.chmod(0o644)  # now root's own, safe file: obeyed
    r = run_cli("serve", "--store", tmp_path / "st", input=hello, env=env, timeout=60)
    assert r.returncode == 1 and b"is not allowed to use this store" in r.stderr
