"""Issue 11, "what a new user hits first": messages, flag conflicts, sub-paths of store paths,
serve's trust hints, JSON shapes, gc sizes, progress, portability switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nartool.errors import NartoolError

from .helpers import cli_argv, cli_env, run_cli

run = run_cli


# --- item 10: error rough edges -------------------------------------------------------------

def test_error_shows_only_known_sides() -> None:
    assert str(NartoolError("bad", got="sp ace")) == "bad [got sp ace]"
    assert str(NartoolError("bad", expected="x")) == "bad [expected x]"
    assert str(NartoolError("bad", expected="x", got=" y")) == "bad [expected x, got ' y']"
    assert "None" not in str(NartoolError("bad", expected=None, got=""))


def test_restore_error_names_destination(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hi")
    nar = tmp_path / "f.nar"
    assert run("nar", "dump", f, "-o", nar).returncode == 0
    dest = tmp_path / "ro" / "x"
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        r = run("nar", "restore", dest, nar)
    finally:
        (tmp_path / "ro").chmod(0o755)
    if r.returncode == 0:
        pytest.skip("running as root: a read-only directory does not refuse")
    err = r.stderr.decode()
    assert str(dest) in err and "nartool-tmp" not in err, err


def test_restore_into_proc_names_destination(tmp_path: Path) -> None:
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    f = tmp_path / "f"
    f.write_bytes(b"hi")
    nar = tmp_path / "f.nar"
    assert run("nar", "dump", f, "-o", nar).returncode == 0
    r = run("nar", "restore", "/proc/nartool-x", nar)
    assert r.returncode == 1
    assert "'/proc/nartool-x'" in r.stderr.decode() and "tmp" not in r.stderr.decode(), r.stderr


def test_gc_counts_swept_leftovers(tmp_path: Path) -> None:
    from nartool.store import LocalStore

    s = tmp_path / "s"
    st = LocalStore(s)
    st.close()
    left = s / "nix/store" / ("0" * 32 + "-leftover")
    (left / "sub").mkdir(parents=True)
    (left / "sub/big").write_bytes(b"x" * 300_000)
    (left / "f").write_bytes(b"y" * 200_000)
    (left / "sub").chmod(0o555)  # as a canonicalised, interrupted add leaves it
    r = run("--store", s, "store", "gc", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytesFreed"] >= 500_000
    assert not left.exists()
    (s / "nix/store" / ("1" * 32 + "-x")).mkdir()
    (s / "nix/store" / ("1" * 32 + "-x") / "f").write_bytes(b"z" * (3 << 20))
    r = run("--store", s, "store", "gc")
    assert "3.00 MiB freed" in r.stdout.decode(), r.stdout


# --- item 6: conflicting flags ----------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("store", "query", "-R", "--size", "/nix/store/x"),
    ("store", "query", "--references", "--referrers", "/nix/store/x"),
    ("store", "gc", "--print-live", "--print-dead"),
    ("nar", "hash", "--base16", "--sri", "."),
])
def test_conflicting_flags_are_refused(args: tuple[str, ...], tmp_path: Path) -> None:
    r = run("--store", tmp_path / "s", *args)
    assert r.returncode == 2, r
    assert b"conflicts with earlier flag" in r.stderr, r.stderr


def test_repeated_flag_is_fine(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hi")
    r = run("nar", "hash", "--base16", "--base16", f)
    assert r.returncode == 0 and len(r.stdout.strip()) == 64, r
    assert run("nar", "hash", f).stdout.startswith(b"sha256-")


# --- item 5: paths inside store paths -----------------------------------------------------------

def _tree_store(tmp_path: Path) -> tuple[Path, str, Path]:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub/file").write_bytes(b"hello\n")
    (d / "top").write_bytes(b"top\n")
    (d / "fl").symlink_to("sub/file")
    (d / "ln").symlink_to("sub")
    (d / "abs").symlink_to("/etc")
    s = tmp_path / "s"
    r = run("--store", s, "store", "add", d)
    assert r.returncode == 0, r.stderr
    return s, r.stdout.decode().strip(), d


def test_store_paths_inside_store_paths(tmp_path: Path) -> None:
    s, p, d = _tree_store(tmp_path)
    assert run("--store", s, "store", "ls", p + "/sub").stdout == b"./file\n"
    assert run("--store", s, "store", "ls", p, "/sub").stdout == b"./file\n"
    assert run("--store", s, "store", "ls", p + "/sub/file").stdout == b"file\n"
    assert run("--store", s, "store", "ls", p + "/ln/file").stdout == b"file\n"  # through a symlink
    assert run("--store", s, "store", "ls", "-l", p + "/ln").stdout.endswith(b" ln -> sub\n")
    assert run("--store", s, "store", "cat", p + "/sub/file").stdout == b"hello\n"
    assert run("--store", s, "store", "cat", p + "/ln/file").stdout == b"hello\n"
    assert run("--store", s, "store", "cat", p, "top").stdout == b"top\n"
    r = run("--store", s, "store", "cat", p + "/sub")
    assert r.returncode == 1 and f"path '{p}/sub' is not a regular file".encode() in r.stderr, r.stderr
    r = run("--store", s, "store", "ls", p + "/nope")
    assert r.returncode == 1 and f"path '{p}/nope' does not exist".encode() in r.stderr, r.stderr
    r = run("--store", s, "store", "ls", p + "/abs/passwd")
    assert r.returncode == 1 and b"leads outside the store" in r.stderr, r.stderr
    sub = run("--store", s, "store", "dump", p + "/sub")
    assert sub.returncode == 0, sub.stderr
    from nartool import api

    assert sub.stdout == b"".join(api.dump_chunks(d / "sub"))  # what `nix-store --dump DIR/sub` writes
    whole = run("--store", s, "store", "dump", p).stdout
    assert whole == b"".join(api.dump_chunks(d))


def test_store_ls_cat_match_nix(tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    s, p, _ = _tree_store(tmp_path)
    for sub in ("", "/sub", "/sub/file", "/ln", "/ln/file", "/fl"):
        for flags in ((), ("-l",), ("-R",), ("--json",)):
            ours = run("--store", s, "store", "ls", *flags, p + sub)
            theirs = nix("nix", "store", "ls", "--store", s, *flags, p + sub)
            # (Nix 2.8 ends its JSON without a newline; nartool prints one)
            assert ours.stdout.rstrip(b"\n") == theirs.stdout.rstrip(b"\n"), (sub, flags, ours.stdout, theirs.stdout)
    for sub in ("/sub/file", "/ln/file"):
        assert run("--store", s, "store", "cat", p + sub).stdout == nix("nix", "store", "cat", "--store", s,
                                                                      p + sub).stdout
    for sub in ("/nope", "/sub"):
        assert run("--store", s, "store", "cat", p + sub).returncode == 1
        assert nix("nix", "store", "cat", "--store", s, p + sub, check=False).returncode == 1


# --- items 3 and 4: serve's trust hints and absolute paths ------------------------------------

def _untrusted_info() -> object:
    from nartool.hashes import Hash
    from nartool.store.types import PathInfo

    h = Hash("sha256", bytes(32))
    return PathInfo(path="/nix/store/" + "a" * 32 + "-hello", nar_hash=h, nar_size=8, references=frozenset())


def test_refusal_names_the_fix() -> None:
    from nartool.remote.serve import Policy

    why = Policy(write=True, trusted=False, user="alice").refusal(_untrusted_info(), "/nix/store")  # type: ignore[arg-type]
    assert why is not None
    assert "lacks a valid signature" in why
    assert "'trusted-users = alice' to /etc/nartool/nartool.conf" in why
    assert "trusted-public-keys" in why
    assert Policy(write=True, trusted=True, user="root").refusal(_untrusted_info(), "/nix/store") is None  # type: ignore[arg-type]


def test_trust_summary() -> None:
    from nartool.cli.remote import trust_summary
    from nartool.config import Config, UserIdentity

    alice = UserIdentity("alice", 1000, 1000, "alice")
    cfg = Config.from_text("trusted-users = root\n", "/etc/nartool/nartool.conf")
    line = trust_summary(cfg, alice, write=True)
    assert line.startswith("nartool serve: user 'alice', allowed, not trusted, require-sigs = true, "
                           "0 trusted public keys, imports allowed (--write); configuration: /etc/nartool/nartool.conf")
    assert "add 'trusted-users = alice' to /etc/nartool/nartool.conf" in line
    line = trust_summary(Config.from_text("trusted-users = alice\n", "/etc/x.conf"), alice, write=False)
    assert ", trusted," in line and "read-only" in line and "add 'trusted-users" not in line
    assert "built-in defaults" in trust_summary(Config(), alice, write=True)


def test_serve_verbose_says_it_once(tmp_path: Path) -> None:
    r = run("serve", "-v", "--write", "--store", tmp_path / "s", input=b"")
    err = r.stderr.decode()
    assert err.count("nartool serve: user '") == 1, err
    assert r.stdout == b""


def test_serve_help_and_readme_agree() -> None:
    r = run("serve", "--help")
    text = " ".join(r.stdout.decode().split())
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for doc in (text, readme):
        assert 'command="/home/u/.local/bin/nartool' in doc
        assert "remote-program=/home/u/.local/bin/nartool-serve" in doc
        assert "trusted-users = " in doc and "/etc/nartool/nartool.conf" in doc
        assert "WRAPPER" not in doc
    serve = readme[readme.index("## Copying closures"):]
    assert serve.index("trusted-users = alice") < serve.index("nartool copy-closure --to|--from")


# --- item 9: JSON shaped like Nix's --------------------------------------------------------------

def test_query_json_matches_nix_path_info(tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(b"contents")
    a = nix("nix-store", "--store", root, "--add", tmp_path / "t").stdout.decode().strip()  # ultimate, ca
    (tmp_path / "u").write_bytes(b"other")
    b = run("--store", root, "store", "add", tmp_path / "u").stdout.decode().strip()
    sec = tmp_path / "k.sec"
    assert run("key", "generate", "k-1", "--secret-file", sec).returncode == 0
    assert run("--store", root, "store", "sign", "--key-file", sec, b).returncode == 0
    ours = json.loads(run("--store", root, "store", "query", "--json", a, b).stdout)
    theirs = json.loads(nix("nix", "path-info", "--json", "--store", root, a, b).stdout)
    assert ours == theirs
    assert [list(d) for d in ours] == [list(d) for d in theirs]  # Nix's key order, absent keys omitted
    added = json.loads(run("--store", root, "store", "add", "--json", tmp_path / "u").stdout)
    assert added == [theirs[1]]


def test_key_json_is_camel_case(tmp_path: Path) -> None:
    sec = tmp_path / "k.sec"
    r = run("key", "generate", "k-1", "--secret-file", sec, "--json")
    obj = json.loads(r.stdout)
    assert set(obj) == {"name", "publicKey", "secretFile"}
    assert set(json.loads(run("key", "public", sec, "--json").stdout)) == {"name", "publicKey"}
    assert set(json.loads(run("key", "generate", "k-2", "--json").stdout)) == {"name", "publicKey", "secretKey"}


# --- item 8: gc sizes, --tree, progress --------------------------------------------------------

def test_gc_max_freed_takes_nix_suffixes(tmp_path: Path) -> None:
    from nartool.cli.store import SizeType

    t = SizeType()
    assert t.convert("1G", None, None) == 1 << 30
    assert t.convert("10k", None, None) == 10 << 10
    assert t.convert("3T", None, None) == 3 << 40
    assert t.convert("512", None, None) == 512
    r = run("--store", tmp_path / "s", "store", "gc", "--max-freed", "1G", "--json")
    assert r.returncode == 0, r.stderr
    for bad in ("1X", "-1", "G", "1.5G"):
        r = run("--store", tmp_path / "s", "store", "gc", "--max-freed", bad)
        assert r.returncode == 2 and b"--max-freed" in r.stderr, (bad, r.stderr)


def test_tree_matches_nix(tmp_path: Path, nix) -> None:  # type: ignore[no-untyped-def]
    from nartool.store import LocalStore

    s = tmp_path / "s"
    st = LocalStore(s)
    a = st.add_text("a", b"a").path
    b = st.add_text("b", b"b", [a]).path
    c = st.add_text("c", b"c", [a, b]).path
    d = st.add_text("d", b"d", [c, b]).path
    x = st.add_text("x", b"x").path
    e = st.add_text("e", b"e", [d, a, x]).path
    f = st.add_text("f", b"f", [x]).path
    st.close()
    for args in ([e], [d], [e, f], [f, e], [a]):
        ours = run("--store", s, "store", "query", "--tree", *args)
        theirs = nix("nix-store", "--store", s, "-q", "--tree", *args)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs.stdout, (args, ours.stdout.decode(), theirs.stdout.decode())
    assert b" [...]\n" in run("--store", s, "store", "query", "--tree", e).stdout


def _stderr_on_tty(*args: str | os.PathLike[str]) -> tuple[int, bytes, bytes]:
    """Run the CLI with stderr on a pseudo-terminal: (status, stdout, what the terminal got)."""
    import pty
    import select

    master, slave = pty.openpty()
    p = subprocess.Popen(cli_argv(*args), stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                         env=cli_env())
    os.close(slave)
    got = bytearray()
    while True:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        elif p.poll() is not None:
            break
    out = p.stdout.read() if p.stdout else b""
    p.wait()
    os.close(master)
    return p.returncode, out, bytes(got)


def test_progress_with_totals_on_a_terminal(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "big").write_bytes(os.urandom(3 << 20))
    s = tmp_path / "s"
    code, out, tty = _stderr_on_tty("--store", s, "store", "add", d)
    assert code == 0, tty
    assert b"[adding: " in tty and b"of 3.0 MiB" in tty, tty
    path = out.decode().strip()
    code, _, tty = _stderr_on_tty("--store", s, "store", "verify", "--check-contents")
    assert code == 0 and b"[verifying: " in tty and b"of 3.0 MiB" in tty, tty
    code, _, tty = _stderr_on_tty("--store", s, "store", "export", path, "-o", tmp_path / "x.export")
    assert code == 0 and b"[exporting: " in tty and b"of 3.0 MiB" in tty, tty
    # not a terminal: nothing on stderr
    r = run("--store", s, "store", "export", path, "-o", tmp_path / "y.export")
    assert r.returncode == 0 and r.stderr == b""
    r = run("--store", s, "store", "verify", "--check-contents")
    assert r.returncode == 0 and r.stderr == b""


# --- item 12: the portable fallbacks --------------------------------------------------------------

def test_portable_switch_turns_off_linux_calls(tmp_path: Path) -> None:
    code = ("import os, sys\n"
            "from nartool.fs import osutil\n"
            "from nartool.nar.source import ByteSource, _kernel_copy\n"
            "from nartool.cli.progress import read_bytes_so_far\n"
            "o = osutil.FdOutput(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT))\n"
            "print(osutil.PORTABLE, osutil.LINUX, o._copy_range, o._sendfile, _kernel_copy(),\n"
            "      read_bytes_so_far() is None, osutil._libc_fn('renameat2') is None)\n")
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True,
                       env=dict(os.environ, NARTOOL_PORTABLE="1"))
    assert r.stdout.split() == ["True", "False", "False", "False", "False", "True", "True"], r.stderr
    if sys.platform.startswith("linux"):
        r = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "NARTOOL_PORTABLE"})
        assert r.stdout.split() == ["False", "True", "True", "True", "True", "False", "False"], r.stderr


def test_portable_fallbacks_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nartool.fs import osutil

    monkeypatch.setattr(osutil, "LINUX", False)
    monkeypatch.setattr(osutil, "DARWIN", False)
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        osutil.rename_noreplace(os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "b"))
    osutil.rename_noreplace(os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "c"))
    assert (tmp_path / "c").read_bytes() == b"a" and not (tmp_path / "a").exists()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        osutil.syncfs(fd)
    finally:
        os.close(fd)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 << 20))
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    sfd = os.open(src, os.O_RDONLY)
    try:
        o = osutil.FdOutput(dst)
        assert not o._copy_range and not o._sendfile
        o.copy_from(sfd, 3 << 20, b"src")
    finally:
        os.close(sfd)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()


def test_store_paths_through_a_result_link(tmp_path: Path) -> None:
    s, p, _ = _tree_store(tmp_path)
    (tmp_path / "result").symlink_to(p)
    assert run("--store", s, "store", "ls", "result/sub", cwd=tmp_path).stdout == b"./file\n"
    assert run("--store", s, "store", "cat", tmp_path / "result/ln/file").stdout == b"hello\n"
