"""``https://`` binary caches: tests/cache_http_server.py serving TLS with a certificate made
at test time by a throwaway CA (``cryptography``), trusted through ``NIX_SSL_CERT_FILE`` as
Nix does; real Nix 2.8 substitutes from the same server as the oracle."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nartool.cache.http import HttpBackend, HttpError, HttpUnavailableError
from nartool.config import Config
from nartool.store.local import LocalStore
from nartool.store.ops import copy_paths
from nartool.store.uri import open_store

from .cachekit import run_nix
from .helpers import run_cli
from .test_cache_http import HERE, Closure, Static, check_range_resume, make_conf, make_key, valid_paths

# -- a throwaway PKI --------------------------------------------------------------------------


class CA:
    """A self-signed certificate authority that issues server certificates."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(ski, critical=False)
                     .sign(self.key, hashes.SHA256()))

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, directory: Path, names: list[str], *, expired: bool = False) -> tuple[Path, Path]:
        """A server certificate for ``names`` (IP addresses or DNS names): (cert file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            now -= datetime.timedelta(days=3)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        cf, kf = directory / "server.pem", directory / "server.key"
        cf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        kf.chmod(0o600)
        return cf, kf


class TLSStatic(Static):
    """tests/cache_http_server.py serving ``www`` over HTTPS with the given certificate."""

    def __init__(self, www: Path, tmp: Path, cert: tuple[Path, Path], *extra: str) -> None:
        self.www = www
        self.cache = www / "prefix"
        self.log = tmp / "requests.log"
        port_file = tmp / "port"
        self.proc = subprocess.Popen([
            sys.executable, str(HERE / "cache_http_server.py"), str(www), str(port_file), str(self.log),
            "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]), *extra])
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert self.proc.poll() is None, "static server died"
            assert time.monotonic() < deadline, "static server did not start"
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.url = f"https://127.0.0.1:{self.port}/prefix"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    return make_key(tmp_path)


@pytest.fixture
def closure(tmp_path: Path) -> Closure:
    return Closure(tmp_path / "src", tmp_path / "work")


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA("nartool test CA")


@pytest.fixture
def conf(tmp_path: Path, key: tuple[Path, str], ca: CA, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The user's configuration, with the test CA trusted through ``NIX_SSL_CERT_FILE``."""
    env = make_conf(tmp_path, key, monkeypatch)
    env["NIX_SSL_CERT_FILE"] = str(ca.write(tmp_path / "ca.pem"))
    monkeypatch.setenv("NIX_SSL_CERT_FILE", env["NIX_SSL_CERT_FILE"])
    return env


def _www(tmp_path: Path, closure: Closure, key: tuple[Path, str]) -> Path:
    www = tmp_path / "www"
    if not www.exists():
        www.mkdir()
        uri = f"file://{www}/prefix?compression=zstd&secret-key={key[0]}"
        with LocalStore(closure.root) as src, open_store(uri) as dst:
            copy_paths(src, dst, closure.paths)
    return www


def serve(tmp_path: Path, closure: Closure, key: tuple[Path, str], cert: tuple[Path, Path],
          *extra: str) -> TLSStatic:
    return TLSStatic(_www(tmp_path, closure, key), tmp_path, cert, *extra)


@pytest.fixture
def https(tmp_path: Path, closure: Closure, key: tuple[Path, str], ca: CA, conf: dict[str, str]) -> Iterator[TLSStatic]:
    s = serve(tmp_path, closure, key, ca.issue(tmp_path / "tls", ["127.0.0.1", "localhost"]))
    yield s
    s.stop()


# -- restoring a closure over HTTPS ------------------------------------------------------------


def test_copy_from_https_restores_closure(https: TLSStatic, closure: Closure, tmp_path: Path,
                                          conf: dict[str, str]) -> None:
    dst = tmp_path / "dst"
    r = run_cli("--store", dst, "copy", "--from", https.url, closure.top, env=conf)
    assert r.returncode == 0, r.stderr
    assert valid_paths(dst) == set(closure.paths)
    assert (dst / closure.tree.lstrip("/") / "hello").read_text() == "hello\n"
    assert https.requests() and all(r["tls"] for r in https.requests())


def test_python_api_over_https_by_host_name(https: TLSStatic, closure: Closure, tmp_path: Path) -> None:
    """``localhost`` is in the certificate as a DNS name: verified as such."""
    store = open_store(f"https://localhost:{https.port}/prefix")
    try:
        dst = tmp_path / "dst"
        with LocalStore(dst) as d:
            copy_paths(store, d, [closure.top], check_sigs=True, trusted_keys=Config.load().trusted_keys())
        assert valid_paths(dst) == set(closure.paths)
        with LocalStore(dst) as d, LocalStore(closure.root) as src:
            for p in closure.paths:
                assert d.path_info(p).nar_hash == src.path_info(p).nar_hash
    finally:
        store.close()


def test_keep_alive_over_tls(https: TLSStatic, closure: Closure) -> None:
    b = HttpBackend(https.url, tries=1)
    try:
        for p in closure.paths:
            assert b.get_bytes(closure.hash_part(p) + ".narinfo") is not None
        with b.get_file(closure.hash_part(closure.tree) + ".narinfo") as f:
            assert f.read()
    finally:
        b.close()
    reqs = [r for r in https.requests() if r["path"].endswith(".narinfo")]
    assert len(reqs) == 4
    assert len({r["client-port"] for r in reqs}) == 1  # one TLS connection served all


def test_idle_tls_connection_closed_by_server_is_replaced(tmp_path: Path, closure: Closure, key: tuple[Path, str],
                                                         ca: CA, conf: dict[str, str]) -> None:
    """The server drops a kept-alive TLS connection after 0.3 s idle: the next request goes out
    on a new connection at once — no error, no retry needed (one attempt allowed)."""
    s = serve(tmp_path, closure, key, ca.issue(tmp_path / "tls", ["127.0.0.1"]), "--idle-timeout", "0.3")
    b = HttpBackend(s.url, tries=1)
    try:
        for p in closure.paths:
            assert b.get_bytes(closure.hash_part(p) + ".narinfo") is not None
            time.sleep(0.6)
    finally:
        b.close()
        s.stop()
    ports = [r["client-port"] for r in s.requests() if r["path"].endswith(".narinfo")]
    assert len(ports) == 3 and len(set(ports)) == 3


def test_cut_off_nar_over_tls_resumes_with_range(https: TLSStatic, closure: Closure, tmp_path: Path,
                                                 conf: dict[str, str]) -> None:
    """The test server's faults and Range support work over TLS too: a NAR cut off midway
    continues with a Range request on a new TLS connection."""
    nar_reqs = check_range_resume(https, closure, tmp_path, conf)
    assert nar_reqs[0]["client-port"] != nar_reqs[1]["client-port"]


# -- refusals ---------------------------------------------------------------------------------


def _refused(server: TLSStatic, closure: Closure, tmp_path: Path, conf: dict[str, str], url: str,
             pattern: str) -> None:
    """Both the Python API and the CLI refuse ``url`` with a ``tls`` error; nothing registered,
    no request reached the server."""
    b = HttpBackend(url, tries=3, retry_base=0.01)
    try:
        with pytest.raises(HttpError, match=pattern) as ei:
            b.get_bytes("nix-cache-info")
        assert ei.value.rule == "tls"
    finally:
        b.close()
    dst = tmp_path / "dst"
    r = run_cli("--store", dst, "copy", "--from", url, closure.top, env=conf, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "TLS error" in err and "Traceback" not in err
    assert valid_paths(dst) == set()
    assert server.requests() == []


def _refused_with(tmp_path: Path, closure: Closure, key: tuple[Path, str], conf: dict[str, str],
                  cert: tuple[Path, Path], pattern: str) -> None:
    """A cache served with ``cert`` is refused with an error matching ``pattern``."""
    s = serve(tmp_path, closure, key, cert)
    try:
        _refused(s, closure, tmp_path, conf, s.url, pattern)
    finally:
        s.stop()


def test_untrusted_certificate_refused(tmp_path: Path, closure: Closure, key: tuple[Path, str],
                                       conf: dict[str, str]) -> None:
    """A certificate from a CA nobody trusts (NIX_SSL_CERT_FILE names another one)."""
    other = CA("some other CA")
    _refused_with(tmp_path, closure, key, conf, other.issue(tmp_path / "tls", ["127.0.0.1", "localhost"]),
                  "certificate verify failed")


def test_hostname_mismatch_refused(tmp_path: Path, closure: Closure, key: tuple[Path, str], ca: CA,
                                   conf: dict[str, str]) -> None:
    """A certificate from the trusted CA, but for another host."""
    _refused_with(tmp_path, closure, key, conf, ca.issue(tmp_path / "tls", ["cache.example.org"]),
                  "certificate verify failed.*(mismatch|match)")


def test_expired_certificate_refused(tmp_path: Path, closure: Closure, key: tuple[Path, str], ca: CA,
                                     conf: dict[str, str]) -> None:
    _refused_with(tmp_path, closure, key, conf, ca.issue(tmp_path / "tls", ["127.0.0.1"], expired=True),
                  "certificate verify failed.*expired")


def test_ca_must_be_trusted_and_bundle_readable(https: TLSStatic, closure: Closure, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NIX_SSL_CERT_FILE the test CA is unknown (the system's bundle does not hold it);
    a NIX_SSL_CERT_FILE that cannot be read is a clear ``tls`` error, not a traceback."""
    monkeypatch.delenv("NIX_SSL_CERT_FILE")
    b = HttpBackend(https.url, tries=1)
    with pytest.raises(HttpError, match="certificate verify failed") as ei:
        b.get_bytes("nix-cache-info")
    assert ei.value.rule == "tls"
    b.close()
    monkeypatch.setenv("NIX_SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    b = HttpBackend(https.url, tries=1)
    with pytest.raises(HttpError, match="missing.pem") as ei:
        b.get_bytes("nix-cache-info")
    assert ei.value.rule == "tls"
    b.close()


def test_ssl_cert_file_setting_wins_over_environment(https: TLSStatic, closure: Closure, tmp_path: Path,
                                                     conf: dict[str, str]) -> None:
    """``ssl-cert-file`` in the configuration is used before NIX_SSL_CERT_FILE (as in Nix, where
    the variable only sets the setting's default); SSL_CERT_FILE is the last fallback."""
    ca_file = conf["NIX_SSL_CERT_FILE"]
    wrong = str(CA("unrelated").write(tmp_path / "wrong-ca.pem"))
    conf_file = Path(conf["NARTOOL_CONFIG"])
    base = conf_file.read_text()
    conf_file.write_text(base + f"ssl-cert-file = {ca_file}\n")
    r = run_cli("--store", tmp_path / "d1", "copy", "--from", https.url, closure.top,
                env={**conf, "NIX_SSL_CERT_FILE": wrong})
    assert r.returncode == 0, r.stderr
    assert valid_paths(tmp_path / "d1") == set(closure.paths)
    conf_file.write_text(base + f"ssl-cert-file = {wrong}\n")  # the setting is used, not the variable
    r = run_cli("--store", tmp_path / "d2", "copy", "--from", https.url, closure.top, env=conf)
    assert r.returncode == 1 and b"certificate verify failed" in r.stderr, r.stderr
    assert valid_paths(tmp_path / "d2") == set()
    conf_file.write_text(base)  # neither setting nor NIX_SSL_CERT_FILE: SSL_CERT_FILE
    r = run_cli("--store", tmp_path / "d3", "copy", "--from", https.url, closure.top,
                env={**conf, "SSL_CERT_FILE": ca_file}, unset=["NARTOOL_STORE", "NIX_SSL_CERT_FILE"])
    assert r.returncode == 0, r.stderr
    assert valid_paths(tmp_path / "d3") == set(closure.paths)


def test_substituter_with_bad_certificate_is_skipped(https: TLSStatic, closure: Closure, tmp_path: Path,
                                                     key: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    """A substituter whose certificate does not verify is warned about and skipped; the next
    one (the same cache, trusted) supplies the closure."""
    from nartool.cache.substitute import substitute_paths

    other = tmp_path / "other"
    other.mkdir()
    bad = serve(other, closure, key, CA("unrelated").issue(other / "tls", ["127.0.0.1"]))
    try:
        dst = tmp_path / "dst"
        with LocalStore(dst) as st, caplog.at_level("WARNING"):
            got = substitute_paths(st, [closure.top], Config.load(),
                                   substituters=[bad.url + "?priority=10", https.url + "?priority=20"])
        assert got == set(closure.paths)
        assert valid_paths(dst) == set(closure.paths)
        assert bad.url in caplog.text and "certificate verify failed" in caplog.text
        assert bad.requests() == []
    finally:
        bad.stop()


def test_dead_https_server_costs_one_attempt(tmp_path: Path, conf: dict[str, str]) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    b = HttpBackend(f"https://127.0.0.1:{port}", tries=5, retry_base=0.5)
    t0 = time.monotonic()
    with pytest.raises(HttpUnavailableError, match="cannot reach binary cache .*cannot connect"):
        b.get_file("nix-cache-info")
    assert time.monotonic() - t0 < 0.4  # no back-off: one attempt
    t1 = time.monotonic()
    with pytest.raises(HttpUnavailableError):
        b.get_file("x.narinfo")
    assert time.monotonic() - t1 < 0.05


def test_silent_tls_handshake_times_out(tmp_path: Path) -> None:
    """A server that accepts the TCP connection but never answers the TLS hello: the
    stalled-download timeout ends the wait, and the cache is dead afterwards."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except (TimeoutError, OSError):
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        b = HttpBackend(f"https://127.0.0.1:{srv.getsockname()[1]}", tries=2, retry_base=0.01,
                        connect_timeout=1, read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises((HttpError, HttpUnavailableError)):
            b.get_bytes("nix-cache-info")
        assert time.monotonic() - t0 < 3
        t1 = time.monotonic()
        with pytest.raises(HttpUnavailableError):
            b.get_bytes("x.narinfo")
        assert time.monotonic() - t1 < 0.05
    finally:
        stop.set()
        t.join()
        srv.close()
        for c in held:
            c.close()


# -- the oracle: real Nix 2.8 over the same HTTPS server --------------------------------------


def test_nix_substitutes_over_https_from_same_server(https: TLSStatic, closure: Closure, tmp_path: Path,
                                                     key: tuple[Path, str], conf: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    opts = ["--option", "substituters", https.url, "--option", "trusted-public-keys", key[1]]
    r = run_nix("nix-store", "--store", tmp_path / "nix", "-r", closure.top, *opts)
    assert closure.top in r.stdout
    run_nix("nix-store", "--store", tmp_path / "nix", "--verify", "--check-contents")
    with LocalStore(closure.root) as a, LocalStore(tmp_path / "nix") as b:
        for p in closure.paths:
            assert b"".join(a.nar_chunks(p)) == b"".join(b.nar_chunks(p))
    # and Nix refuses the same server when it does not trust the CA, as nartool does
    monkeypatch.setenv("NIX_SSL_CERT_FILE", str(CA("unrelated").write(tmp_path / "other-ca.pem")))
    r = run_nix("nix-store", "--store", tmp_path / "nix2", "-r", closure.top, *opts, check=False)
    assert r.returncode != 0
    assert not (tmp_path / "nix2" / closure.top.lstrip("/")).exists()
    # without NIX_SSL_CERT_FILE, Nix falls back to SSL_CERT_FILE — the order nartool follows
    monkeypatch.delenv("NIX_SSL_CERT_FILE")
    monkeypatch.setenv("SSL_CERT_FILE", conf["NIX_SSL_CERT_FILE"])
    r = run_nix("nix-store", "--store", tmp_path / "nix3", "-r", closure.top, *opts)
    assert closure.top in r.stdout
