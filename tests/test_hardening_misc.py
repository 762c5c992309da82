"""Hardening: temp roots talk to a collector over one connection, several stores in one process
share their temp roots, concatenated export streams, and names that are not valid UTF-8 in
listings."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nartool.store import LocalStore
from nartool.store.locks import read_temp_roots

from .helpers import run_cli

Nix = Callable[..., "subprocess.CompletedProcess[bytes]"]


def cli(*args: str | os.PathLike[str], input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*args, input=input, env=env, timeout=120)


# -- temp roots: one collector connection per process (issue 16 item 5) ------------------------


class FakeCollector:
    """Holds gc.lock and serves gc-socket/socket, counting connections and roots."""

    def __init__(self, state: Path) -> None:
        (state / "gc-socket").mkdir(parents=True, exist_ok=True)
        self.lock = os.open(state / "gc.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.path = os.fspath(state / "gc-socket" / "socket")
        self.connections = 0
        self.roots: list[str] = []
        self.conns: list[socket.socket] = []
        self.start()

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(16)
        self.thread = threading.Thread(target=self._serve, args=(self.server,), daemon=True)
        self.thread.start()

    def _stop_serving(self) -> None:
        # (closing alone does not wake a thread blocked in accept(); shutting down does, and
        # then no thread of this test outlives it: later tests fork only without threads)
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        self.thread.join(10)

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self.connections += 1
            self.conns.append(conn)
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.roots.append(line.decode())
                conn.sendall(b"1")

    def restart(self, *, keep_old_connections: bool) -> None:
        """A new collection: a new socket file (the old connections may linger, as in a
        long-lived process whose earlier collection ended)."""
        self._stop_serving()
        if not keep_old_connections:
            for c in self.conns:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
        self.roots = []
        self.start()

    def close(self) -> None:
        self._stop_serving()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        os.close(self.lock)


def _path(i: int) -> str:
    return f"/nix/store/{i:032d}-root"


def test_temp_roots_use_one_connection_to_a_running_collector(tmp_path: Path) -> None:
    """Old code opened a connection per root (which makes Nix 2.8's collector abort)."""
    from nartool.store.locks import TempRoots

    state = tmp_path / "state"
    gc = FakeCollector(state)
    roots = TempRoots(os.fspath(state))
    try:
        for i in range(50):
            roots.add(_path(i))
        assert gc.roots == [_path(i) for i in range(50)]
        assert gc.connections == 1
        # the collection ends and another starts, while the old connection still answers:
        # the new collector must hear of new roots (the socket file was replaced)
        gc.restart(keep_old_connections=True)
        roots.add(_path(100))
        assert gc.roots == [_path(100)] and gc.connections == 2
        # a collector that went away entirely (connection closed): reconnect to the next one
        gc.restart(keep_old_connections=False)
        roots.add(_path(101))
        roots.add(_path(102))
        assert gc.roots == [_path(101), _path(102)] and gc.connections == 3
    finally:
        roots.close()
        gc.close()


@pytest.mark.parametrize("attempt", range(3))
def test_nix_gc_survives_many_temp_roots(nix: Nix, tmp_path: Path, attempt: int) -> None:
    """Real Nix 2.8 collects while this process adds many temp roots: with a connection per root
    its collector aborted (SIGABRT) in most runs; it must finish and keep what was rooted."""
    root = tmp_path / "store"
    n = 3000
    with LocalStore(root) as st, st.batch():
        paths = [st.add_text(f"p{i}", b"x%d" % i).path for i in range(n)]
    st = LocalStore(root)
    try:
        p = subprocess.Popen(["nix-store", "--store", os.fspath(root), "--gc"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        lock = os.open(os.path.join(st.state_dir, "gc.lock"), os.O_RDWR | os.O_CREAT)
        try:  # wait until the collection holds its lock
            deadline = time.time() + 60
            while time.time() < deadline and p.poll() is None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    time.sleep(0.001)
                except BlockingIOError:
                    break
        finally:
            os.close(lock)
        kept = []
        for x in reversed(paths[::2]):
            st.temp_root(x)
            if st.is_valid(x):  # rooted while still there: must survive
                kept.append(x)
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-2000:].decode(errors="replace")
        assert kept
        lost = [x for x in kept if not st.is_valid(x) or not (root / x.lstrip("/")).exists()]
        assert lost == []
    finally:
        st.close()


# -- several stores on one state dir in one process (issue 16 item 13) -------------------------


def _in_thread(fn: Callable[[], Any], timeout: float = 60) -> Any:
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "deadlocked"
    if errors:
        raise errors[0]
    return out[0]


def _own_file(root: Path) -> Path:
    return root / "nix/var/nix/temproots" / str(os.getpid())


def test_two_stores_on_one_root_share_temp_roots(tmp_path: Path) -> None:
    """Old code: each store opened temproots/<pid> itself; the second flock blocked forever."""
    root = tmp_path / "store"

    def work() -> tuple[str, str, str]:
        a = LocalStore(root)
        b = LocalStore(os.fspath(tmp_path / "." / "store"))
        pa = a.add_text("a", b"a").path
        pb = b.add_text("b", b"b", [pa]).path
        a.temp_root(pb)
        imported = b.import_paths(b"".join(bytes(c) for c in a.export_paths([pa, pb])))
        assert imported == [pa, pb]
        a.close()
        # the file stays while b is open: its roots (and a's) are still held
        on_file, _ = read_temp_roots(os.fspath(root / "nix/var/nix"))
        assert pb in on_file and _own_file(root).exists()
        pc = b.add_text("c", b"c").path
        assert pc in read_temp_roots(os.fspath(root / "nix/var/nix"))[0]
        b.close()
        assert not _own_file(root).exists()
        return pa, pb, pc

    _in_thread(work)
    # reopening after everything closed starts a fresh file
    with LocalStore(root) as st:
        st.temp_root("/nix/store/" + "1" * 32 + "-x")
        assert _own_file(root).read_bytes() == b"/nix/store/" + b"1" * 32 + b"-x\0"
    assert not _own_file(root).exists()


def test_symlinked_root_shares_temp_roots(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")

    def work() -> None:
        with LocalStore(tmp_path / "real") as a, LocalStore(tmp_path / "link") as b:
            a.add_text("a", b"a")
            b.add_text("b", b"b")

    _in_thread(work)


def test_forked_child_has_its_own_temp_roots(tmp_path: Path) -> None:
    root = tmp_path / "store"
    st = LocalStore(root)
    st.temp_root("/nix/store/" + "2" * 32 + "-parent")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a second store too, then its own file; never the parent's
        code = 1
        try:
            signal.alarm(30)  # a deadlock kills the child (and fails the test) instead of hanging
            other = LocalStore(root)
            other.temp_root("/nix/store/" + "3" * 32 + "-child")
            st.temp_root("/nix/store/" + "4" * 32 + "-child")
            mine = root / "nix/var/nix/temproots" / str(os.getpid())
            ok = mine.read_bytes().split(b"\0")[:2] == [b"/nix/store/" + b"3" * 32 + b"-child",
                                                         b"/nix/store/" + b"4" * 32 + b"-child"]
            other.close()
            st.close()
            ok = ok and not mine.exists()
            os.write(w, b"1" if ok else b"0")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    got = os.read(r, 1)
    os.close(r)
    assert status == 0 and got == b"1"
    # the parent's file was left alone by the child
    assert _own_file(root).read_bytes() == b"/nix/store/" + b"2" * 32 + b"-parent\0"
    st.close()
    assert not _own_file(root).exists()


# -- concatenated export streams (issue 16 item 11) --------------------------------------------


def _two_exports(tmp_path: Path) -> tuple[bytes, list[str], bytes, list[str]]:
    src = LocalStore(tmp_path / "src")
    a = src.add_text("a", b"a").path
    b = src.add_text("b", b"b", [a]).path
    c = src.add_text("c", b"c").path
    ex1 = b"".join(bytes(x) for x in src.export_paths([a, b]))
    ex2 = b"".join(bytes(x) for x in src.export_paths([c]))
    src.close()
    return ex1, [a, b], ex2, [c]


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("form", ["plain", "zstd", "zstd-each"])
def test_import_concatenated_streams(tmp_path: Path, form: str) -> None:
    """Old code imported the first stream and silently dropped the rest (exit 0)."""
    ex1, p1, ex2, p2 = _two_exports(tmp_path)
    data = {"plain": ex1 + ex2, "zstd": _zstd(ex1 + ex2), "zstd-each": _zstd(ex1) + _zstd(ex2)}[form]
    dst = tmp_path / "dst"
    r = cli("--store", dst, "store", "import", "--json", input=data)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == p1 + p2
    with LocalStore(dst) as st:
        assert sorted(st.all_paths()) == sorted(p1 + p2)
    # an empty stream (just the end marker) in between is fine too
    r = cli("--store", tmp_path / "dst2", "store", "import", input=ex1 + (0).to_bytes(8, "little") + ex2)
    assert r.returncode == 0 and r.stdout.decode().split() == p1 + p2


@pytest.mark.parametrize("form", ["plain", "zstd"])
@pytest.mark.parametrize("tail", [b"\n", b"garbage!", (1).to_bytes(8, "little") + b"x" * 40, b"\0" * 7])
def test_import_refuses_trailing_bytes(tmp_path: Path, form: str, tail: bytes) -> None:
    """Old code: exit 0 with the first stream imported, the trailing bytes ignored."""
    ex1, _, ex2, _ = _two_exports(tmp_path)
    for raw in (ex1 + tail, ex1 + ex2 + tail):
        data = raw if form == "plain" else _zstd(raw)
        dst = tmp_path / "dst"
        r = cli("--store", dst, "store", "import", input=data)
        assert r.returncode != 0 and r.stdout == b""
        assert b"error" in r.stderr
        with LocalStore(dst) as st:
            assert st.all_paths() == []  # nothing imported, not even the complete streams
    r = cli("--store", tmp_path / "dst", "store", "import", input=ex1 + tail)
    assert b"after export stream 1" in r.stderr or b"export stream 2" in r.stderr


def test_serve_style_import_still_stops_at_the_end_marker(tmp_path: Path) -> None:
    """LocalStore.import_paths itself reads one stream (the serve protocol's next command follows)."""
    from nartool.nar.source import as_source

    ex1, p1, _, _ = _two_exports(tmp_path)
    src = as_source(ex1 + b"NEXT", "stream")
    with LocalStore(tmp_path / "dst") as st:
        assert st.import_paths(src) == p1
    assert src.read_exact(4) == b"NEXT"


# -- names in listings (issue 16 item 15) -----------------------------------------------------


def _tree(tmp_path: Path, names: list[bytes], target: bytes = b"t\xff\n") -> Path:
    t = tmp_path / "tree"
    t.mkdir()
    for n in names:
        with open(os.path.join(os.fsencode(t), n), "wb") as f:
            f.write(b"x")
    os.symlink(target, os.path.join(os.fsencode(t), b"link"))
    return t


def _nar(tmp_path: Path, tree: Path) -> Path:
    from nartool import api

    nar = tmp_path / "t.nar"
    api.dump(tree, nar)
    return nar


def _from_json_name(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


ODD = [b"bad\xff", b"sur\xed\xa0\x80", b"nl\nx", b"u\xc3\xbc", b"back\\slash", b"q\"", b"c1\xc2\x85"]


def test_nar_ls_json_keeps_non_utf8_names_losslessly(tmp_path: Path) -> None:
    """Old code printed half a document, then failed on the first non-UTF-8 name."""
    nar = _nar(tmp_path, _tree(tmp_path, ODD))
    r = cli("nar", "ls", "--json", "-R", nar, "/")
    assert r.returncode == 0, r.stderr
    r.stdout.decode("utf-8")  # valid UTF-8 text
    doc = json.loads(r.stdout)
    names = {_from_json_name(k): v for k, v in doc["entries"].items()}
    assert set(names) == {*ODD, b"link"}
    assert _from_json_name(names[b"link"]["target"]) == b"t\xff\n"
    assert b'"bad\\udcff"' in r.stdout and b'"sur\\udced\\udca0\\udc80"' in r.stdout
    # not recursive, and the listing of one leaf
    r = cli("nar", "ls", "--json", nar, "/")
    assert r.returncode == 0 and {_from_json_name(k) for k in json.loads(r.stdout)["entries"]} == {*ODD, b"link"}
    r = cli("nar", "ls", "--json", nar, "/link")
    assert r.returncode == 0 and json.loads(r.stdout) == {"type": "symlink", "target": "t\udcff\n"}


def test_store_ls_json_keeps_non_utf8_names_losslessly(tmp_path: Path) -> None:
    tree = _tree(tmp_path, ODD)
    st = tmp_path / "st"
    p = cli("--store", st, "store", "add", tree).stdout.decode().strip()
    r = cli("--store", st, "store", "ls", "--json", "-R", p)
    assert r.returncode == 0, r.stderr
    assert {_from_json_name(k) for k in json.loads(r.stdout)["entries"]} == {*ODD, b"link"}
    r = cli("--store", st, "store", "ls", p)
    assert r.returncode == 0 and b"./bad\xff\n" in r.stdout  # text: the bytes, as nix store ls


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_nar_ls_prints_nothing_on_a_damaged_nar(tmp_path: Path, json_flag: list[str]) -> None:
    """Old code streamed the listing and failed half-way (half a JSON document on stdout)."""
    nar = _nar(tmp_path, _tree(tmp_path, [b"a", b"b", b"c" * 200]))
    data = nar.read_bytes()
    bad = tmp_path / "bad.nar"
    bad.write_bytes(data[: len(data) - 200])
    r = cli("nar", "ls", *json_flag, "-R", bad, "/")
    assert r.returncode != 0 and r.stdout == b"" and b"error" in r.stderr


def test_nar_check_text_escapes_names(tmp_path: Path) -> None:
    """Old code printed a raw newline inside a name (one finding over two lines)."""
    nar = _nar(tmp_path, _tree(tmp_path, [b"A\nb\\", b"a\nb\\", b"X\xff", b"x\xff", b'Q"', b'q"']))
    r = cli("nar", "check", nar)
    assert r.returncode == 1
    lines = r.stdout.decode("utf-8").splitlines()
    assert sorted(lines) == sorted([
        'collision in "/": "A\\nb\\\\", "a\\nb\\\\"',
        'collision in "/": "X\\xff", "x\\xff"',
        'collision in "/": "Q\\"", "q\\""',
    ])


def test_nar_check_json_keeps_bytes(tmp_path: Path) -> None:
    """Old code turned the non-UTF-8 bytes into U+FFFD: two different names looked alike."""
    nar = _nar(tmp_path, _tree(tmp_path, [b"X\xff", b"x\xff", b"n\n", b"N\n"]))
    r = cli("nar", "check", "--json", nar)
    assert r.returncode == 1
    r.stdout.decode("utf-8")
    doc = json.loads(r.stdout)
    got = sorted(sorted(_from_json_name(n) for n in c["names"]) for c in doc["collisions"])
    assert got == [[b"N\n", b"n\n"], [b"X\xff", b"x\xff"]]
    assert "\ufffd" not in r.stdout.decode()


def test_text_and_json_name_encodings() -> None:
    from nartool.nar.listing import json_name, quoted_name, text_name

    for b in [b"", b"plain", *ODD, bytes(range(256)), b"\xc3", b"\xed\xa0\x80\xed\xb0\x80"]:
        assert _from_json_name(json.loads(json_name(b))) == b
        json_name(b).encode("ascii" if b.isascii() else "utf-8")
    assert json_name(b"\x08\x0c\x1f\x7f") == '"\\u0008\\u000c\\u001f\x7f"'  # as Nix 2.8
    assert text_name(b"a\\b\n\t\r\x01\x7f\xc2\x85\xff\xc3\xbc") == "a\\\\b\\n\\t\\r\\x01\\x7f\\xc2\\x85\\xff\xfc"
    assert quoted_name(b'say "hi"') == '"say \\"hi\\""'


def test_nar_ls_json_identical_to_nix_for_utf8_names(nix: Nix, tmp_path: Path) -> None:
    """Valid UTF-8 names come out byte for byte as `nix nar ls --json` writes them (old code
    wrote \\b and \\f where Nix writes \\u0008 and \\u000c)."""
    names = [b"u\xc3\xbc", b"a\nb", b"tab\t", b"back\\slash", b'q"', b"del\x7f", b"esc\x1b", b"bs\x08", b"ff\x0c",
             b"cr\r", b"c1\xc2\x85", b"ls\xe2\x80\xa8", b"\xf0\x9f\x98\x80"]
    tree = _tree(tmp_path, names, target=b'to\n"\\')
    nar = tmp_path / "n.nar"
    nar.write_bytes(nix("nix-store", "--dump", tree).stdout)
    for args in (["-R", "/"], ["/"], ["/link"]):
        theirs = nix("nix", "nar", "ls", "--json", *args[:-1], nar, args[-1]).stdout
        ours = cli("nar", "ls", "--json", nar, *args).stdout
        assert ours == theirs + b"\n"


def test_gc_socket_close_ends_open_connections(tmp_path: Path) -> None:
    """A client keeps one connection for many roots: when our collection ends, that connection
    must end too (before, accepted connections went on acknowledging roots for a finished
    collection)."""
    import socket

    from nartool.store.gc import _GCSocket

    heard: list[str] = []
    srv = _GCSocket(os.fspath(tmp_path), heard.append)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.settimeout(10)
        c.connect(srv.path)
        c.sendall(b"/nix/store/a\n")
        assert c.recv(1) == b"1"
        srv.close()
        try:
            c.sendall(b"/nix/store/b\n")
            answer = c.recv(1)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        assert answer == b""  # the connection ended: no acknowledgement
        assert heard == ["/nix/store/a"]
    finally:
        c.close()
