"""``s3://`` binary caches against a real S3 server (SeaweedFS ``weed mini``, tests/s3server.py):
round trips through the CLI, credentials (environment, ``~/.aws``, ``profile=``; a wrong secret
refused), multipart uploads (used above the threshold, aborted on failure), parallel uploads that
still write each narinfo after its NAR and its references, concurrent pushes of one closure, and
real Nix 2.8 substituting from the bucket over plain HTTP."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nartool.cache.s3 import (
    MAX_PARTS,
    MAX_SINGLE_PUT,
    MIN_PART,
    S3Backend,
    S3CacheStore,
    S3Error,
    parse_settings,
    part_size_at,
    part_size_for,
)
from nartool.errors import StoreError
from nartool.store.local import LocalStore
from nartool.store.ops import copy_paths
from nartool.store.uri import open_store

from .helpers import UNSET, cli_argv, cli_env, run_cli
from .s3server import REGION, WeedS3, s3server, weed_binary  # noqa: F401  (the fixture)

MiB = 1 << 20
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
            "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_counter = iter(range(1 << 30))


def unique(name: str) -> str:
    return f"{name}{os.getpid()}-{next(_counter)}"


def aws_env(tmp: Path, s3: WeedS3 | None = None, *, secret: str | None = None) -> dict[str, str]:
    """An environment with no AWS configuration of the host: ``~/.aws`` in ``tmp``, no
    instance-metadata lookups, and the admin's credentials when ``s3`` is given."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(home / ".aws" / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(home / ".aws" / "credentials")}
    if s3 is not None:
        env.update(s3.credentials_env(secret))
    return env


def cli(*args: str | os.PathLike[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, unset=(*UNSET, *AWS_VARS), text=True, timeout=120)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3server: WeedS3) -> dict[str, str]:  # noqa: F811
    """This process's environment set as :func:`aws_env` (for library calls)."""
    for v in AWS_VARS:
        monkeypatch.delenv(v, raising=False)
    env = aws_env(tmp_path, s3server)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def make_closure(root: Path, tmp: Path, *, big: int = 0) -> tuple[LocalStore, str, list[str]]:
    """A local store holding a small closure: leaf <- mid <- top, plus a tree (with ``big``
    random bytes) referenced by top. Returns the store, the top path and the whole closure."""
    store = LocalStore(root)
    leaf = store.add_text("leaf", "leaf\n").path
    mid = store.add_text("mid", f"mid uses {leaf}\n", [leaf]).path
    src = tmp / f"tree{next(_counter)}"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "hello").write_text("hello\n")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "run.sh", 0o755)
    os.symlink("sub/hello", src / "link")
    if big:
        (src / "blob").write_bytes(os.urandom(big))
    tree = store.add_path(src).path
    top = store.add_text("top", f"top uses {mid} and {tree}\n", [mid, tree]).path
    return store, top, store.closure([top])


def nar_sha(store: Any, path: str) -> str:
    h = hashlib.sha256()
    for c in store.nar_chunks(path):
        h.update(c)
    return h.hexdigest()


def keys(s3: WeedS3, bucket: str, prefix: str = "") -> list[str]:
    out: list[str] = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


# -- parameters and limits (no server) ---------------------------------------------------------


def test_parameters_parsed_as_nix_names_them() -> None:
    params = {"region": "eu-west-3", "endpoint": "minio.local:9000", "scheme": "http", "profile": "p",
              "narinfo-compression": "xz", "ls-compression": "zstd", "log-compression": "bzip2",
              "multipart-upload": "true", "buffer-size": str(8 * MiB), "compression": "zstd"}
    s = parse_settings("bucket/some/prefix/", params)
    assert (s.bucket, s.prefix, s.region, s.profile) == ("bucket", "some/prefix", "eu-west-3", "p")
    assert (s.narinfo_compression, s.ls_compression, s.log_compression) == ("xz", "zstd", "bzip2")
    assert s.multipart_upload and s.buffer_size == 8 * MiB
    assert params == {"compression": "zstd"}  # what is left is the binary cache's
    d = parse_settings("b", {})
    assert (d.region, d.multipart_upload, d.buffer_size, d.scheme) == ("us-east-1", False, 5 * MiB, "")
    b = S3Backend(parse_settings("b", {"endpoint": "127.0.0.1:9", "scheme": "http"}))
    assert b.endpoint_url() == "http://127.0.0.1:9" and b.describe() == "s3://b"
    assert S3Backend(parse_settings("b/p", {"endpoint": "s3.example"})).endpoint_url() == "https://s3.example"
    # multipart threshold: buffer-size with multipart-upload, else S3's single-PUT limit
    assert S3Backend(parse_settings("b", {"multipart-upload": "true"})).multipart_threshold == 5 * MiB
    assert S3Backend(parse_settings("b", {})).multipart_threshold == MAX_SINGLE_PUT


@pytest.mark.parametrize("location,params,rule", [
    ("", {}, "bad-store-uri"),
    ("b", {"buffer-size": "lots"}, "bad-parameter"),
    ("b", {"buffer-size": "0"}, "bad-parameter"),
    ("b", {"multipart-upload": "maybe"}, "bad-parameter"),
    ("b", {"scheme": "ftp"}, "bad-parameter"),
    ("b", {"narinfo-compression": "lz4"}, "bad-parameter"),
    ("b/../x", {}, "bad-key"),
])
def test_bad_parameters_refused(location: str, params: dict[str, str], rule: str) -> None:
    with pytest.raises(StoreError) as e:
        parse_settings(location, params)
    assert e.value.rule == rule


def test_part_sizes_respect_s3_limits() -> None:
    assert part_size_for(None, 1) == MIN_PART  # never below S3's minimum part
    assert part_size_for(12 * MiB, 5 * MiB) == 5 * MiB
    # a 200 GiB object needs parts of at least 200 GiB / 10 000, in whole MiB
    size = 200 << 30
    p = part_size_for(size, 5 * MiB)
    assert p % MiB == 0 and -(-size // p) <= MAX_PARTS and p < 2 * (size // MAX_PARTS)
    # unknown size: doubling every 900 parts reaches S3's 5 TiB object limit within 10 000 parts
    total = sum(part_size_at(MIN_PART, n, False) for n in range(1, MAX_PARTS + 1))
    assert total >= 5 << 40
    assert part_size_at(MIN_PART, 1, False) == MIN_PART and part_size_at(MIN_PART, 901, False) == 2 * MIN_PART
    assert max(part_size_at(MIN_PART, n, False) for n in range(1, MAX_PARTS + 1)) <= 5 << 30


def test_unknown_parameter_warns_like_nix(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="nartool"):
        open_store("s3://b?endpoint=127.0.0.1:1&scheme=http&frobnicate=1&buffer-size=6000000")
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.endswith("unknown setting 'frobnicate'") for m in msgs)
    assert not any("buffer-size" in m for m in msgs)  # S3's own parameters are known


# -- against the server -------------------------------------------------------------------------


def test_the_server_is_the_real_weed_on_loopback(s3server: WeedS3) -> None:  # noqa: F811
    assert s3server.proc is not None
    binary = weed_binary()
    assert binary is not None
    if os.path.exists(f"/proc/{s3server.proc.pid}/exe"):  # the pid we stop is the binary itself
        assert os.path.realpath(f"/proc/{s3server.proc.pid}/exe") == os.path.realpath(binary)
    argv = s3server.proc.args
    assert isinstance(argv, list) and "-master.telemetry=false" in argv and "-ip.bind=127.0.0.1" in argv


def test_round_trip_through_the_cli(s3server: WeedS3, tmp_path: Path) -> None:  # noqa: F811
    store, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("rt")
    uri = s3server.store_uri("cache", prefix, compression="zstd", **{"write-nar-listing": "1"})
    env = aws_env(tmp_path, s3server)
    r = cli("--store", store.root, "copy", "--to", uri, top, env=env)
    assert r.returncode == 0, r.stderr
    got = keys(s3server, "cache", prefix + "/")
    hashes = sorted(Path(p).name[:32] for p in closure)
    assert [k for k in got if k.endswith(".narinfo")] == [f"{prefix}/{h}.narinfo" for h in hashes]
    assert [k for k in got if k.endswith(".ls")] == [f"{prefix}/{h}.ls" for h in hashes]
    assert f"{prefix}/nix-cache-info" in got
    assert all(k.endswith(".nar.zst") for k in got if "/nar/" in k)
    # a second push moves nothing
    r = cli("--store", store.root, "copy", "--to", uri, top, env=env)
    assert r.returncode == 0 and keys(s3server, "cache", prefix + "/") == got
    # restore into an empty store
    dest = tmp_path / "dest"
    r = cli("--store", dest, "copy", "--no-check-sigs", "--from", uri, top, env=env)
    assert r.returncode == 0, r.stderr
    back = LocalStore(dest)
    assert sorted(back.closure([top])) == sorted(closure)
    for p in closure:
        assert nar_sha(back, p) == nar_sha(store, p)
        assert back.path_info(p).references == store.path_info(p).references
    # the store commands read it too
    r = cli("--store", uri, "store", "cat", top, env=env)
    assert r.returncode == 0 and r.stdout.startswith("top uses ")


def test_wrong_secret_is_refused_clearly(s3server: WeedS3, tmp_path: Path) -> None:  # noqa: F811
    store, top, _ = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("wrong")
    uri = s3server.store_uri("cache", prefix)
    r = cli("--store", store.root, "copy", "--to", uri, top, env=aws_env(tmp_path, s3server, secret="not-it"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "S3 refused the credentials" in r.stderr and "SignatureDoesNotMatch" in r.stderr
    assert keys(s3server, "cache", prefix + "/") == []
    # an unknown access key: same clear refusal
    env = aws_env(tmp_path, s3server)
    env["AWS_ACCESS_KEY_ID"] = "NOSUCHKEY"
    r = cli("--store", store.root, "copy", "--to", uri, top, env=env)
    assert r.returncode == 1 and "S3 refused the credentials" in r.stderr and "Traceback" not in r.stderr
    # and a missing profile
    r = cli("--store", store.root, "copy", "--to", uri + "&profile=nope", top, env=aws_env(tmp_path))
    assert r.returncode == 1 and "AWS profile 'nope' not found" in r.stderr


def test_credentials_from_aws_files_and_profile(s3server: WeedS3, tmp_path: Path) -> None:  # noqa: F811
    store, top, closure = make_closure(tmp_path / "src", tmp_path)
    env = aws_env(tmp_path)  # no credentials in the environment
    aws_dir = Path(env["HOME"]) / ".aws"
    aws_dir.mkdir()
    (aws_dir / "credentials").write_text(
        "[default]\naws_access_key_id = NOSUCHKEY\naws_secret_access_key = nothing\n\n"
        f"[cachebot]\naws_access_key_id = {s3server.access_key}\naws_secret_access_key = {s3server.secret_key}\n")
    prefix = unique("prof")
    uri = s3server.store_uri("cache", prefix)
    r = cli("--store", store.root, "copy", "--to", uri, top, env=env)  # [default] is wrong
    assert r.returncode == 1 and "S3 refused the credentials" in r.stderr
    r = cli("--store", store.root, "copy", "--to", uri + "&profile=cachebot", top, env=env)
    assert r.returncode == 0, r.stderr
    assert len([k for k in keys(s3server, "cache", prefix + "/") if k.endswith(".narinfo")]) == len(closure)
    # AWS_PROFILE names the profile too, and the environment's keys win over the files
    r = cli("--store", tmp_path / "d1", "copy", "--no-check-sigs", "--from", uri, top,
            env={**env, "AWS_PROFILE": "cachebot"})
    assert r.returncode == 0, r.stderr
    r = cli("--store", tmp_path / "d2", "copy", "--no-check-sigs", "--from", uri, top,
            env={**env, **s3server.credentials_env()})
    assert r.returncode == 0, r.stderr


def test_anonymous_read_of_a_public_bucket(s3server: WeedS3, tmp_path: Path) -> None:  # noqa: F811
    store, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("anon")
    uri = s3server.store_uri("pub", prefix)
    assert cli("--store", store.root, "copy", "--to", uri, top, env=aws_env(tmp_path, s3server)).returncode == 0
    r = cli("--store", tmp_path / "dest", "copy", "--no-check-sigs", "--from", uri, top, env=aws_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(LocalStore(tmp_path / "dest").closure([top])) == sorted(closure)
    # anonymous writes are refused
    r = cli("--store", store.root, "copy", "--to", s3server.store_uri("pub", unique("anonw")), top,
            env=aws_env(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "S3 denied access" in r.stderr and "no AWS credentials were found" in r.stderr


def test_narinfo_ls_and_log_compression(s3server: WeedS3, tmp_path: Path, aws: dict[str, str]) -> None:  # noqa: F811
    src, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("enc")
    uri = s3server.store_uri("cache", prefix, **{"narinfo-compression": "xz", "ls-compression": "gzip",
                                                 "log-compression": "zstd", "write-nar-listing": "1"})
    dst = open_store(uri)
    assert isinstance(dst, S3CacheStore)
    copy_paths(src, dst, [top])
    dst.add_build_log(closure[0], b"a build log\n")
    c = s3server.client()
    h = Path(top).name[:32]
    head = c.head_object(Bucket="cache", Key=f"{prefix}/{h}.narinfo")
    assert head["ContentEncoding"] == "xz" and head["ContentType"] == "text/x-nix-narinfo"
    raw = c.get_object(Bucket="cache", Key=f"{prefix}/{h}.narinfo")["Body"].read()
    assert raw.startswith(b"\xfd7zXZ\x00")
    assert c.head_object(Bucket="cache", Key=f"{prefix}/{h}.ls")["ContentEncoding"] == "gzip"
    logs = [k for k in keys(s3server, "cache", prefix + "/log/")]
    assert len(logs) == 1 and c.head_object(Bucket="cache", Key=logs[0])["ContentEncoding"] == "zstd"
    # read back through a fresh store: decoded transparently
    fresh = open_store(uri)
    assert fresh.get_build_log(closure[0]) == b"a build log\n"  # type: ignore[attr-defined]
    for p in closure:
        assert nar_sha(fresh, p) == nar_sha(src, p)


def test_multipart_upload_above_the_threshold(s3server: WeedS3, tmp_path: Path, aws: dict[str, str]) -> None:  # noqa: F811
    src, top, closure = make_closure(tmp_path / "src", tmp_path, big=12 * MiB)
    prefix = unique("mp")
    uri = s3server.store_uri("cache", prefix, compression="none", **{"multipart-upload": "true",
                                                                     "buffer-size": str(5 * MiB)})
    dst = open_store(uri)
    assert isinstance(dst, S3CacheStore)
    calls: list[str] = []
    dst.backend.client.meta.events.register("provide-client-params.s3.*",
                                            lambda params, model, **kw: calls.append(model.name))
    copy_paths(src, dst, [top])
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 3
    assert calls.count("CompleteMultipartUpload") == 1
    big = max(closure, key=lambda p: src.path_info(p).nar_size)
    ni = open_store(uri).narinfo(big)  # type: ignore[attr-defined]
    head = s3server.client().head_object(Bucket="cache", Key=f"{prefix}/{ni.url}")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a three-part object
    assert head["ContentLength"] == src.path_info(big).nar_size
    assert s3server.client().list_multipart_uploads(Bucket="cache").get("Uploads", []) == []
    back = LocalStore(tmp_path / "back")
    copy_paths(open_store(uri), back, [top])
    assert nar_sha(back, big) == nar_sha(src, big)
    # without multipart-upload (Nix's default) the same NAR is one PutObject
    calls.clear()
    prefix2 = unique("single")
    dst2 = open_store(s3server.store_uri("cache", prefix2, compression="none"))
    assert isinstance(dst2, S3CacheStore)
    dst2.backend.client.meta.events.register("provide-client-params.s3.*",
                                             lambda params, model, **kw: calls.append(model.name))
    copy_paths(src, dst2, [top])
    assert "CreateMultipartUpload" not in calls and calls.count("PutObject") == len(closure) * 2 + 1


def _failing(after: int, chunk: int = MiB) -> Iterator[bytes]:
    sent = 0
    while sent < after:
        yield os.urandom(chunk)
        sent += chunk
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where", ["source", "server"])
def test_failed_multipart_upload_is_aborted(s3server: WeedS3, aws: dict[str, str], where: str) -> None:  # noqa: F811
    bucket = unique("abort")
    s3server.create_bucket(bucket)
    b = S3Backend(parse_settings(bucket, {"endpoint": s3server.endpoint, "scheme": "http", "region": REGION,
                                          "multipart-upload": "true"}))
    calls: list[str] = []

    def watch(params: dict[str, Any], model: Any, **kw: Any) -> None:
        calls.append(model.name)
        if where == "server" and model.name == "UploadPart" and params["PartNumber"] == 3:
            raise RuntimeError("injected failure")

    b.client.meta.events.register("provide-client-params.s3.*", watch)
    data: Any = _failing(12 * MiB) if where == "source" else os.urandom(16 * MiB)
    with pytest.raises(RuntimeError, match="injected failure"):
        b.upsert_file("nar/x.nar", data, mime="application/x-nix-nar")
    assert "CreateMultipartUpload" in calls and calls.count("UploadPart") >= 2  # parts did go up
    assert "AbortMultipartUpload" in calls
    assert s3server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert keys(s3server, bucket) == []


def test_parallel_uploads_keep_narinfo_order(s3server: WeedS3, tmp_path: Path, aws: dict[str, str]) -> None:  # noqa: F811
    src = LocalStore(tmp_path / "src")
    # a chain of paths, each with a sizeable NAR: c0 <- c1 <- ... <- c5, plus leaves on c5
    prev: list[str] = []
    for i in range(6):
        prev = [src.add_text(f"c{i}", os.urandom(256 * 1024).hex() + " ".join(prev), prev).path]
    leaves = [src.add_text(f"leaf{i}", f"leaf {i} of {prev[0]}", prev).path for i in range(4)]
    top = src.add_text("top", " ".join(leaves), leaves).path
    prefix = unique("par")
    dst = open_store(s3server.store_uri("cache", prefix, compression="none"))
    assert isinstance(dst, S3CacheStore)
    done: list[str] = []
    lock = threading.Lock()
    inflight = [0, 0]  # now, max

    def before(params: dict[str, Any], model: Any, context: dict[str, Any], **kw: Any) -> None:
        context["nt_key"] = params.get("Key", "")
        if model.name == "PutObject" and "/nar/" in context["nt_key"]:
            with lock:
                inflight[0] += 1
                inflight[1] = max(inflight)
            time.sleep(0.15)  # a slow link: sequential uploads would never overlap

    def after(context: dict[str, Any], model: Any, http_response: Any, **kw: Any) -> None:
        key = context.get("nt_key", "")
        if model.name == "PutObject" and "/nar/" in key:
            with lock:
                inflight[0] -= 1
        if model.name == "PutObject" and http_response.status_code == 200:
            with lock:
                done.append(key[len(prefix) + 1:])

    ev = dst.backend.client.meta.events
    ev.register("provide-client-params.s3.PutObject", before)
    ev.register("after-call.s3.PutObject", after)
    t0 = time.monotonic()
    copy_paths(src, dst, [top])
    elapsed = time.monotonic() - t0
    closure = src.closure([top])
    assert inflight[1] >= 2, "NAR uploads never overlapped"
    assert elapsed < 0.15 * len(closure)  # less than one slow upload after another
    fresh = open_store(s3server.store_uri("cache", prefix))
    for p in closure:
        ni = fresh.narinfo(p)  # type: ignore[attr-defined]
        mine = done.index(Path(p).name[:32] + ".narinfo")
        assert done.index(ni.url) < mine, f"narinfo of {p} before its NAR"
        for r in src.path_info(p).references:
            if r != p:
                assert done.index(Path(r).name[:32] + ".narinfo") < mine, f"narinfo of {p} before {r}'s"


def test_failed_nar_upload_leaves_no_narinfo(s3server: WeedS3, tmp_path: Path, aws: dict[str, str]) -> None:  # noqa: F811
    src, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("fail")
    dst = open_store(s3server.store_uri("cache", prefix, compression="none"))
    assert isinstance(dst, S3CacheStore)
    victim = next(p for p in closure if "-mid" in p)
    victim_nar = src.path_info(victim).nar_hash.prefixed("nix32").split(":")[1]

    def fail_one(params: dict[str, Any], model: Any, **kw: Any) -> None:
        if model.name == "PutObject" and params["Key"].endswith(victim_nar + ".nar"):
            raise RuntimeError("injected upload failure")

    dst.backend.client.meta.events.register("provide-client-params.s3.PutObject", fail_one)
    with pytest.raises(RuntimeError, match="injected upload failure"):
        copy_paths(src, dst, [top])
    have = {Path(k).name[:32] for k in keys(s3server, "cache", prefix + "/") if k.endswith(".narinfo")}
    # nothing that depends on mid (nor mid) has a narinfo; what came before may
    assert Path(victim).name[:32] not in have and Path(top).name[:32] not in have
    fresh = open_store(s3server.store_uri("cache", prefix))
    for h in have:  # whatever is there is complete
        p = fresh.query_path_from_hash_part(h)
        assert p is not None and nar_sha(fresh, p) == nar_sha(src, p)


def test_concurrent_pushes_of_one_closure(s3server: WeedS3, tmp_path: Path, aws: dict[str, str]) -> None:  # noqa: F811
    store, top, closure = make_closure(tmp_path / "src", tmp_path, big=6 * MiB)
    prefix = unique("conc")
    uri = s3server.store_uri("cache", prefix, compression="zstd", **{"multipart-upload": "true"})
    env = cli_env({**aws_env(tmp_path, s3server)}, unset=(*UNSET, *AWS_VARS))
    procs = [subprocess.Popen(cli_argv("--store", store.root, "copy", "--to", uri, top), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    fresh = open_store(uri)
    assert sorted(fresh.all_paths()) == sorted(closure)
    for p in closure:
        assert nar_sha(fresh, p) == nar_sha(store, p)
    assert s3server.client().list_multipart_uploads(Bucket="cache", Prefix=prefix).get("Uploads", []) == []
    r = cli("--store", tmp_path / "dest", "copy", "--no-check-sigs", "--from", uri, top,
            env=aws_env(tmp_path, s3server))
    assert r.returncode == 0, r.stderr


def test_nix_substitutes_from_the_bucket(s3server: WeedS3, tmp_path: Path,  # noqa: F811
                                         nix: Callable[..., subprocess.CompletedProcess[bytes]]) -> None:
    from nartool.store.signing import SecretKey

    key = SecretKey.generate("s3-test-1")
    key_file = tmp_path / "cache.sec"
    key_file.write_text(key.to_text())
    store, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("nix")
    uri = s3server.store_uri("pub", prefix, **{"secret-key": str(key_file), "write-nar-listing": "1",
                                               "narinfo-compression": "xz"})
    r = cli("--store", store.root, "copy", "--to", uri, top, env=aws_env(tmp_path, s3server))
    assert r.returncode == 0, r.stderr
    nix_root = tmp_path / "nixstore"
    r2 = nix("nix-store", "--store", nix_root, "-r", top,
             "--option", "substituters", f"{s3server.url}/pub/{prefix}",
             "--option", "trusted-public-keys", key.public_key().to_text(), check=False,
             env={"XDG_CACHE_HOME": str(tmp_path / "xdg-cache")})
    assert r2.returncode == 0, r2.stderr.decode()
    for p in closure:
        dumped = nix("nix-store", "--dump", nix_root / p.lstrip("/")).stdout
        assert hashlib.sha256(dumped).hexdigest() == nar_sha(store, p)
        registered = nix("nix-store", "--store", nix_root, "-q", "--hash", p).stdout.decode().strip()
        assert registered == store.path_info(p).nar_hash.prefixed("nix32")
    # Nix registered the signatures of the (xz-encoded) narinfos it read from the bucket
    sigs = nix("nix", "path-info", "--store", nix_root, "--sigs", top).stdout.decode()
    assert "s3-test-1:" in sigs


def test_s3_errors_carry_structured_fields(s3server: WeedS3, aws: dict[str, str],  # noqa: F811
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    b = S3Backend(parse_settings(unique("nobucket"), {"endpoint": s3server.endpoint, "scheme": "http",
                                                     "region": REGION}))
    with pytest.raises(S3Error) as e0:
        b.get_file("x.narinfo")
    assert e0.value.rule == "s3-no-bucket" and e0.value.got == "NoSuchBucket"
    assert S3Backend(parse_settings("cache", {"endpoint": s3server.endpoint, "scheme": "http",
                                              "region": REGION})).get_file(unique("x") + ".narinfo") is None
    bad = S3Backend(parse_settings("cache", {"endpoint": s3server.endpoint, "scheme": "http", "region": REGION}))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(S3Error) as e:
        bad.file_exists("nix-cache-info")
    assert e.value.rule == "s3-credentials" and e.value.got == "SignatureDoesNotMatch"


def test_push_creates_a_missing_bucket(s3server: WeedS3, tmp_path: Path, aws: dict[str, str]) -> None:  # noqa: F811
    src, top, closure = make_closure(tmp_path / "src", tmp_path)
    bucket = unique("fresh")
    uri = s3server.store_uri(bucket)
    with pytest.raises(StoreError):  # reading a bucket that is not there is an error...
        copy_paths(open_store(uri), LocalStore(tmp_path / "x"), [top])
    copy_paths(src, open_store(uri), [top])  # ...writing creates it, as Nix does
    assert len([k for k in keys(s3server, bucket) if k.endswith(".narinfo")]) == len(closure)


def test_nar_already_in_the_bucket_is_not_uploaded_again(s3server: WeedS3, tmp_path: Path,  # noqa: F811
                                                         aws: dict[str, str]) -> None:
    src, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("again")
    uri = s3server.store_uri("cache", prefix, compression="xz")
    copy_paths(src, open_store(uri), [top])
    c = s3server.client()
    nars = [k for k in keys(s3server, "cache", prefix + "/nar/")]
    assert len(nars) == len(closure)
    for k in keys(s3server, "cache", prefix + "/"):  # an interrupted push: the NARs without narinfos
        if k.endswith(".narinfo"):
            c.delete_object(Bucket="cache", Key=k)
    dst = open_store(uri)
    assert isinstance(dst, S3CacheStore)
    calls: list[tuple[str, str]] = []
    dst.backend.client.meta.events.register("provide-client-params.s3.*",
                                            lambda params, model, **kw: calls.append((model.name, params.get("Key", ""))))
    copy_paths(src, dst, [top])
    puts = [k for op, k in calls if op == "PutObject"]
    assert len(puts) == len(closure) and all(k.endswith(".narinfo") for k in puts)
    assert sorted(k for op, k in calls if op == "HeadObject" and "/nar/" in k) == nars  # each checked once
    fresh = open_store(uri)
    for p in closure:
        assert nar_sha(fresh, p) == nar_sha(src, p)


def test_pull_downloads_nars_ahead(s3server: WeedS3, tmp_path: Path, aws: dict[str, str]) -> None:  # noqa: F811
    src = LocalStore(tmp_path / "src")
    paths = [src.add_text(f"p{i}", os.urandom(64 * 1024).hex()).path for i in range(8)]
    top = src.add_text("top", " ".join(paths), paths).path
    uri = s3server.store_uri("cache", unique("pull"), compression="none")
    copy_paths(src, open_store(uri), [top])
    cache = open_store(uri)
    assert isinstance(cache, S3CacheStore)
    lock = threading.Lock()
    inflight = [0, 0]

    def before(params: dict[str, Any], model: Any, context: dict[str, Any], **kw: Any) -> None:
        context["nt_nar"] = "/nar/" in params.get("Key", "")
        if context["nt_nar"]:
            with lock:
                inflight[0] += 1
                inflight[1] = max(inflight)
            time.sleep(0.1)

    def after(context: dict[str, Any], **kw: Any) -> None:
        if context.get("nt_nar"):
            with lock:
                inflight[0] -= 1

    cache.backend.client.meta.events.register("provide-client-params.s3.GetObject", before)
    cache.backend.client.meta.events.register("after-call.s3.GetObject", after)
    dest = LocalStore(tmp_path / "dest")
    copy_paths(cache, dest, [top])
    assert inflight[1] >= 2, "NAR downloads never overlapped"
    for p in [*paths, top]:
        assert nar_sha(dest, p) == nar_sha(src, p)


def test_without_boto3_a_clear_error(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['boto3'] = None; from nartool.cli.main import main; "
            "main(['--store', 's3://bucket', 'store', 'query', '--references', "
            "'/nix/store/00000000000000000000000000000000-x'])")
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=cli_env(aws_env(tmp_path), unset=(*UNSET, *AWS_VARS)), timeout=60)
    assert r.returncode == 1, r.stderr
    assert "need the Python package 'boto3'" in r.stderr and "pip install 'nartool[s3]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_keys_that_may_only_read_and_write_objects(s3server: WeedS3, tmp_path: Path) -> None:  # noqa: F811
    store, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("writer")
    uri = s3server.store_uri("cache", prefix, compression="zstd")
    env = {**aws_env(tmp_path), **s3server.credentials_env(writer=True)}
    r = cli("--store", store.root, "copy", "--to", uri, top, env=env)
    assert r.returncode == 0, r.stderr
    assert len([k for k in keys(s3server, "cache", prefix + "/") if k.endswith(".narinfo")]) == len(closure)
    r = cli("--store", tmp_path / "dest", "copy", "--no-check-sigs", "--from", uri, top, env=env)
    assert r.returncode == 0, r.stderr
    # but not another bucket
    other = unique("notwriter")
    s3server.create_bucket(other)
    r = cli("--store", store.root, "copy", "--to", s3server.store_uri(other), top, env=env)
    assert r.returncode == 1 and "S3 denied access" in r.stderr, r.stderr


def test_current_nix_substitutes_from_the_bucket(s3server: WeedS3, tmp_path: Path) -> None:  # noqa: F811
    """Nix 2.26 (``NARTOOL_MODERN_NIX``; Debian's build has no S3 either) reads the bucket over HTTP."""
    from nartool.store.signing import SecretKey

    from .conftest import require
    from .helpers import nix_env

    modern = os.environ.get("NARTOOL_MODERN_NIX")
    require("MODERN_NIX", bool(modern), "NARTOOL_MODERN_NIX is not set (a command running current Nix)")
    assert modern is not None
    key = SecretKey.generate("s3-test-2")
    key_file = tmp_path / "cache.sec"
    key_file.write_text(key.to_text())
    store, top, closure = make_closure(tmp_path / "src", tmp_path)
    prefix = unique("nix226")
    uri = s3server.store_uri("pub", prefix, compression="zstd", **{"secret-key": str(key_file),
                                                                    "narinfo-compression": "gzip"})
    r = cli("--store", store.root, "copy", "--to", uri, top, env=aws_env(tmp_path, s3server))
    assert r.returncode == 0, r.stderr
    nix_root = tmp_path / "nixstore"  # under /tmp, which current Nix's chroot shares
    r2 = subprocess.run([*modern.split(), "nix-store", "--store", str(nix_root), "-r", top,
                         "--option", "substituters", f"{s3server.url}/pub/{prefix}",
                         "--option", "trusted-public-keys", key.public_key().to_text()],
                        capture_output=True, text=True, env={**nix_env(), "XDG_CACHE_HOME": str(tmp_path / "xc")},
                        timeout=300)
    assert r2.returncode == 0, r2.stderr
    r3 = subprocess.run([*modern.split(), "nix-store", "--store", str(nix_root), "--verify", "--check-contents"],
                        capture_output=True, text=True, env=nix_env(), timeout=300)
    assert r3.returncode == 0 and "corrupt" not in r3.stderr, r3.stderr
    r4 = subprocess.run([*modern.split(), "nix-store", "--store", str(nix_root), "-qR", top],
                        capture_output=True, text=True, env=nix_env(), timeout=300)
    assert sorted(r4.stdout.split()) == sorted(closure)


@pytest.mark.parametrize("form", ["stream", "file", "file-single-put"])
def test_multipart_of_a_stream_or_file_in_bounded_memory(s3server: WeedS3, aws: dict[str, str], tmp_path: Path,  # noqa: F811
                                                         form: str) -> None:
    import tracemalloc

    size = 40 * MiB + 12345
    multipart = "false" if form == "file-single-put" else "true"
    b = S3Backend(parse_settings("cache", {"endpoint": s3server.endpoint, "scheme": "http", "region": REGION,
                                           "multipart-upload": multipart}), part_workers=2)
    seed = os.urandom(MiB)
    key = f"{unique('mem')}/nar/x.nar"

    def chunks() -> Iterator[bytes]:  # size unknown up front
        left = size
        while left:
            n = min(left, len(seed))
            yield seed[:n]
            left -= n

    data: Any
    if form.startswith("file"):
        path = tmp_path / "nar"
        with open(path, "wb") as f:
            for c in chunks():
                f.write(c)
        data = open(path, "rb")  # noqa: SIM115
    else:
        data = chunks()
    b.client  # noqa: B018  (created outside the measurement)
    tracemalloc.start()
    try:
        b.upsert_file(key, data, mime="application/x-nix-nar")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        if form.startswith("file"):
            data.close()
    # parts in flight, the part being read, the first part read to decide: a few parts, not the file
    # (measured: 27 MiB for the stream, 18 MiB for the file; one PutObject of the file streams it)
    assert peak < (4 * MiB if form == "file-single-put" else 32 * MiB), \
        f"peak {peak / MiB:.1f} MiB for a {size / MiB:.0f} MiB upload"
    head = s3server.client().head_object(Bucket="cache", Key=key)
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"').endswith("-9") == (form != "file-single-put")
    h1, h2 = hashlib.sha256(), hashlib.sha256()
    for c in chunks():
        h1.update(c)
    f2 = b.get_file(key)
    assert f2 is not None
    with f2:
        while True:
            c = f2.read(MiB)
            if not c:
                break
            h2.update(c)
    assert h1.digest() == h2.digest()


def test_interrupted_push_leaves_no_incomplete_upload(s3server: WeedS3, tmp_path: Path,  # noqa: F811
                                                      aws: dict[str, str]) -> None:
    import signal

    store, top, closure = make_closure(tmp_path / "src", tmp_path, big=64 * MiB)
    big = max(closure, key=lambda p: store.path_info(p).nar_size)
    prefix = unique("intr")
    uri = s3server.store_uri("cache", prefix, compression="none", **{"multipart-upload": "true"})
    env = cli_env(aws_env(tmp_path, s3server), unset=(*UNSET, *AWS_VARS))
    proc = subprocess.Popen(cli_argv("--debug", "--store", store.root, "copy", "--to", uri, top), env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # interrupt once the big NAR's multipart upload has begun
        seen.append(line)
        if "multipart upload of" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert any("multipart upload of" in line for line in seen), "".join(seen) + rest
    assert proc.returncode != 0
    assert s3server.client().list_multipart_uploads(Bucket="cache", Prefix=prefix).get("Uploads", []) == []
    have = keys(s3server, "cache", prefix + "/")
    assert f"{prefix}/{Path(big).name[:32]}.narinfo" not in have
    assert f"{prefix}/{Path(top).name[:32]}.narinfo" not in have
