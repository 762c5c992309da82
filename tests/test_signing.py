"""Keys, fingerprints and signatures (docs/store.md, Signatures), the `nartool key` commands, and
differential tests against real Nix 2.8 (marked ``nix``)."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from nartool.cli.key import key as key_group
from nartool.errors import NartoolError, SignatureError
from nartool.hashes import Hash
from nartool.store.signing import (
    PublicKey,
    SecretKey,
    count_valid_signatures,
    fingerprint,
    load_public_keys,
    load_secret_key,
    parse_key_list,
    parse_signature,
    sign_path_info,
    verify_path_info,
)
from nartool.store.types import PathInfo

Nix = Callable[..., subprocess.CompletedProcess[bytes]]

HELLO = "/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"
HELLO_HASH = Hash.parse("sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h")
HELLO_FP = (b"1;/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello;"
            b"sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h;120;")

# Golden vector made with Nix 2.8.0: `nix-store --generate-binary-cache-key golden-1 …`, then
# `nix store sign` of a chroot store's `nix-store --add` of a file holding "hi\n".
GOLDEN_SECRET = ("golden-1:etEZqLKel6cnP2nAFJU3rlFyp5l5++Bh5ACxbBmkC/b31jtJrfswIEFVN13++IIEMZJbRFjsTK97J"
                 "IEt33O4bw==")
GOLDEN_PUBLIC = "golden-1:99Y7Sa37MCBBVTdd/viCBDGSW0RY7EyveySBLd9zuG8="
GOLDEN_PATH = "/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f"
GOLDEN_SIG = ("golden-1:xNbA/BS0mPbkdfulUmGtLa6n0o5xC3wSc8REXcygfIMCzMmbEw+5qE0hnU33HlQw6QxRUuikllG8w21ky8/"
              "BCA==")

# RFC 8032 §7.1, test 1 (empty message)
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUB = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
                        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hello_info(**kw: object) -> PathInfo:
    args: dict[str, object] = {"path": HELLO, "nar_hash": HELLO_HASH, "nar_size": 120}
    args.update(kw)
    return PathInfo(**args)  # type: ignore[arg-type]


def rule_of(exc: pytest.ExceptionInfo[BaseException]) -> str | None:
    assert isinstance(exc.value, NartoolError)
    return exc.value.rule


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_of_spec_example() -> None:
    assert fingerprint(HELLO, HELLO_HASH, 120, []) == HELLO_FP


def test_fingerprint_sorts_and_joins_references() -> None:
    refs = ["/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-z", "/nix/store/00000000000000000000000000000000-a", HELLO]
    fp = fingerprint(HELLO, HELLO_HASH, 120, iter(refs))
    assert fp == HELLO_FP + b",".join(r.encode() for r in sorted(refs))
    assert fp.endswith(b";/nix/store/0000" + b"0" * 28 + b"-a," + HELLO.encode() + b",/nix/store/" + b"z" * 32 + b"-z")


def test_fingerprint_uses_nix32_whatever_the_input_encoding() -> None:
    sri = Hash.parse(HELLO_HASH.sri)
    assert fingerprint(HELLO, sri, 120, []) == HELLO_FP


@pytest.mark.parametrize(("size", "hash_", "refs", "rule"), [
    (0, HELLO_HASH, [], "unknown-nar-size"),
    (120, Hash("sha512", bytes(64)), [], "not-sha256"),
    (120, Hash("sha1", bytes(20)), [], "not-sha256"),
    (120, HELLO_HASH, ["mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"], "bad-store-path"),
])
def test_fingerprint_refusals(size: int, hash_: Hash, refs: list[str], rule: str) -> None:
    with pytest.raises(SignatureError) as e:
        fingerprint(HELLO, hash_, size, refs)
    assert rule_of(e) == rule


# ---------------------------------------------------------------- keys


def test_rfc8032_vector() -> None:
    sk = SecretKey("rfc", RFC_SEED + RFC_PUB)
    assert sk.public_key() == PublicKey("rfc", RFC_PUB)
    assert sk.sign(b"") == "rfc:" + b64(RFC_SIG)
    assert sk.public_key().verify(b"", "rfc:" + b64(RFC_SIG))


def test_golden_nix_key_and_signature() -> None:
    sk = SecretKey.parse(GOLDEN_SECRET)
    assert sk.public_key().to_text() == GOLDEN_PUBLIC
    info = PathInfo(GOLDEN_PATH, HELLO_HASH, 120)
    assert sign_path_info(info, sk) == GOLDEN_SIG
    assert verify_path_info(PathInfo(GOLDEN_PATH, HELLO_HASH, 120, sigs=frozenset({GOLDEN_SIG})),
                            [PublicKey.parse(GOLDEN_PUBLIC)])


def test_generate_round_trip() -> None:
    sk = SecretKey.generate("cache.example.org-1")
    text = sk.to_text()
    assert text.startswith("cache.example.org-1:") and not text.endswith("\n")
    assert SecretKey.parse(text) == sk
    assert SecretKey.parse(text + "\n") == sk
    pub = sk.public_key()
    assert PublicKey.parse(pub.to_text()) == pub
    assert PublicKey.parse(pub.to_text() + "\n") == pub
    assert len(base64.b64decode(text.split(":", 1)[1])) == 64
    assert sk.key[32:] == pub.key
    assert SecretKey.generate("x").key != SecretKey.generate("x").key


def test_secret_key_repr_hides_the_key() -> None:
    sk = SecretKey.parse(GOLDEN_SECRET)
    assert "etEZ" not in repr(sk) and sk.key.hex() not in repr(sk)


def test_sign_verify() -> None:
    sk = SecretKey.generate("k")
    pub = sk.public_key()
    sig = sk.sign(b"message")
    assert sig.startswith("k:") and len(parse_signature(sig)[1]) == 64
    assert sk.sign(b"message") == sig  # deterministic
    assert pub.verify(b"message", sig)
    assert not pub.verify(b"messagE", sig)
    assert not PublicKey("other", pub.key).verify(b"message", sig)
    assert not SecretKey.generate("k").public_key().verify(b"message", sig)
    raw = bytearray(parse_signature(sig)[1])
    raw[10] ^= 1
    assert not pub.verify(b"message", "k:" + b64(bytes(raw)))


@pytest.mark.parametrize(("text", "rule"), [
    ("", "bad-key"),
    ("no-colon", "bad-key"),
    (":" + b64(bytes(64)), "bad-key"),
    ("name:", "bad-key"),
    ("name:not base64!", "bad-base64"),
    ("name:" + b64(bytes(64))[:-2], "bad-base64"),  # missing padding
    ("name:" + b64(bytes(64)) + "\r", "bad-base64"),
    ("name:" + b64(bytes(63)), "bad-key-size"),
    ("name:" + b64(bytes(32)), "bad-key-size"),  # a public key is not a secret key
    ("name:" + b64(RFC_SEED + bytes(32)), "key-mismatch"),
    ("name:" + b64(RFC_SEED + SecretKey.generate("o").key[32:]), "key-mismatch"),
])
def test_malformed_secret_keys(text: str, rule: str) -> None:
    with pytest.raises(SignatureError) as e:
        SecretKey.parse(text)
    assert rule_of(e) == rule
    assert b64(RFC_SEED) not in str(e.value)


@pytest.mark.parametrize(("text", "rule"), [
    ("nocolon", "bad-key"),
    (":" + b64(bytes(32)), "bad-key"),
    ("k:", "bad-key"),
    ("k:%%%%", "bad-base64"),
    ("k:" + b64(bytes(31)), "bad-key-size"),
    ("k:" + b64(bytes(64)), "bad-key-size"),  # a secret key is not a public key
])
def test_malformed_public_keys(text: str, rule: str) -> None:
    with pytest.raises(SignatureError) as e:
        PublicKey.parse(text)
    assert rule_of(e) == rule


@pytest.mark.parametrize(("sig", "rule"), [
    ("nocolon", "bad-signature"),
    (":" + b64(bytes(64)), "bad-signature"),
    ("k:", "bad-signature"),
    ("k:***", "bad-base64"),
    ("k:" + b64(bytes(63)), "bad-signature-size"),
    ("other:" + b64(bytes(65)), "bad-signature-size"),
])
def test_malformed_signatures(sig: str, rule: str) -> None:
    pub = SecretKey.generate("k").public_key()
    with pytest.raises(SignatureError) as e:
        pub.verify(b"m", sig)
    assert rule_of(e) == rule


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a\tb", "a\nb"])
def test_generate_refuses_bad_names(name: str) -> None:
    with pytest.raises(SignatureError) as e:
        SecretKey.generate(name)
    assert rule_of(e) == "bad-key-name"


def test_load_secret_key_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text(GOLDEN_SECRET + "\n")
    assert load_secret_key(good).name == "golden-1"
    bad = tmp_path / "bad"
    bad.write_text("golden-1:")
    with pytest.raises(SignatureError) as e:
        load_secret_key(bad)
    assert e.value.path == str(bad) and rule_of(e) == "bad-key"
    with pytest.raises(FileNotFoundError):
        load_secret_key(tmp_path / "missing")


def test_key_lists() -> None:
    a, b = SecretKey.generate("a").public_key(), SecretKey.generate("b").public_key()
    a2 = SecretKey.generate("a").public_key()
    keys = parse_key_list(f"  {a.to_text()}\t{b.to_text()}\n{a2.to_text()}  ")
    assert keys == {"a": a, "b": b}  # the first key of a name wins, as in Nix
    assert load_public_keys([b.to_text()]) == {"b": b}
    assert parse_key_list(" \t\n") == {}
    with pytest.raises(SignatureError):
        parse_key_list("a:xyz")


# ---------------------------------------------------------------- path infos


def test_verify_path_info() -> None:
    sk, other = SecretKey.generate("k1"), SecretKey.generate("k2")
    info = hello_info(references=frozenset({HELLO}))
    sig = sign_path_info(info, sk)
    assert info.sigs == frozenset()  # not modified
    signed = hello_info(references=frozenset({HELLO}), sigs=frozenset({sig, sign_path_info(info, other)}))
    assert verify_path_info(signed, [sk.public_key()])
    assert verify_path_info(signed, {"k1": sk.public_key()})
    assert count_valid_signatures(signed, [sk.public_key(), other.public_key()]) == 2
    assert not verify_path_info(signed, [])
    assert not verify_path_info(signed, [SecretKey.generate("k3").public_key()])
    assert not verify_path_info(hello_info(references=frozenset({HELLO})), [sk.public_key()])
    # everything in the fingerprint is covered
    for changed in (hello_info(sigs=signed.sigs),
                    hello_info(nar_size=121, references=frozenset({HELLO}), sigs=signed.sigs),
                    hello_info(path=HELLO + "x", references=frozenset({HELLO}), sigs=signed.sigs),
                    hello_info(nar_hash=Hash("sha256", bytes(32)), references=frozenset({HELLO}), sigs=signed.sigs)):
        assert not verify_path_info(changed, [sk.public_key()])
    # not covered: deriver, ca, registration time, ultimate
    assert verify_path_info(hello_info(references=frozenset({HELLO}), sigs=signed.sigs, deriver="/nix/store/x.drv",
                                       ca="fixed:r:sha256:x", registration_time=5, ultimate=True), [sk.public_key()])


def test_malformed_signature_only_matters_under_a_trusted_name() -> None:
    sk = SecretKey.generate("k1")
    good = sign_path_info(hello_info(), sk)
    junk = {"unknown:" + b64(bytes(3)), "no-colon-at-all", ":" + b64(bytes(64))}
    assert verify_path_info(hello_info(sigs=frozenset({good, *junk})), [sk.public_key()])
    with pytest.raises(SignatureError) as e:
        verify_path_info(hello_info(sigs=frozenset({good, "k1:" + b64(bytes(3))})), [sk.public_key()])
    assert rule_of(e) == "bad-signature-size"


# ---------------------------------------------------------------- CLI


def _cli() -> click.Group:
    @click.group()
    def cli() -> None:
        pass

    cli.add_command(key_group)
    return cli


def test_cli_generate_files(tmp_path: Path) -> None:
    sec, pub = tmp_path / "k.sec", tmp_path / "k.pub"
    r = CliRunner().invoke(_cli(), ["key", "generate", "test-1", "--secret-file", str(sec), "--public-file", str(pub)])
    assert r.exit_code == 0, r.output
    assert r.output == ""
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    sk = SecretKey.parse(sec.read_text())
    assert not sec.read_text().endswith("\n") and not pub.read_text().endswith("\n")
    assert pub.read_text() == sk.public_key().to_text()
    # never overwrites, and writes nothing when refusing
    pub2 = tmp_path / "k2.pub"
    r = CliRunner().invoke(_cli(), ["key", "generate", "t", "--secret-file", str(sec), "--public-file", str(pub2)])
    assert isinstance(r.exception, NartoolError) and r.exception.rule == "file-exists"
    assert SecretKey.parse(sec.read_text()) == sk and not pub2.exists()


def test_cli_generate_stdout_and_json(tmp_path: Path) -> None:
    r = CliRunner().invoke(_cli(), ["key", "generate", "test-1"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert len(lines) == 2
    assert SecretKey.parse(lines[0]).public_key().to_text() == lines[1]
    r = CliRunner().invoke(_cli(), ["key", "generate", "test-1", "--json"])
    obj = json.loads(r.output)
    assert SecretKey.parse(obj["secretKey"]).public_key().to_text() == obj["publicKey"]
    assert obj["name"] == "test-1"
    sec = tmp_path / "s"
    r = CliRunner().invoke(_cli(), ["key", "generate", "test-1", "--secret-file", str(sec), "--json"])
    obj = json.loads(r.output)
    assert "secretKey" not in obj and obj["secretFile"] == str(sec)
    assert load_secret_key(sec).public_key().to_text() == obj["publicKey"]
    r = CliRunner().invoke(_cli(), ["key", "generate", "x:y"])
    assert isinstance(r.exception, SignatureError) and r.exception.rule == "bad-key-name"


def test_cli_public(tmp_path: Path) -> None:
    sec = tmp_path / "s"
    sec.write_text(GOLDEN_SECRET)
    r = CliRunner().invoke(_cli(), ["key", "public", str(sec)])
    assert r.exit_code == 0 and r.output == GOLDEN_PUBLIC + "\n"
    r = CliRunner().invoke(_cli(), ["key", "public", "-", "--json"], input=GOLDEN_SECRET + "\n")
    assert json.loads(r.output) == {"name": "golden-1", "publicKey": GOLDEN_PUBLIC}
    r = CliRunner().invoke(_cli(), ["key", "public", "-"], input=GOLDEN_PUBLIC)
    assert isinstance(r.exception, SignatureError) and r.exception.rule == "bad-key-size"


@pytest.mark.parametrize("args", [["key"], ["key", "generate"], ["key", "public"]])
def test_cli_help(args: list[str]) -> None:
    r = CliRunner().invoke(_cli(), [*args, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output and len(r.output.splitlines()) > 4


# ---------------------------------------------------------------- differential tests against Nix 2.8


def add_to_chroot(nix: Nix, store: Path, file: Path) -> str:
    return nix("nix-store", "--store", store, "--add", file).stdout.decode().strip()


def nix_path_info(nix: Nix, store: Path, path: str) -> dict[str, Any]:
    out = nix("nix", "--store", store, "path-info", "--json", "--sigs", path).stdout
    [info] = json.loads(out)
    assert isinstance(info, dict)
    return info


def info_from_json(j: dict[str, Any]) -> PathInfo:
    """The signed fields of ``nix path-info --json`` output, as our PathInfo."""
    return PathInfo(j["path"], Hash.parse(j["narHash"]), j["narSize"], frozenset(j["references"]))


def db(store: Path) -> sqlite3.Connection:
    return sqlite3.connect(store / "nix" / "var" / "nix" / "db" / "db.sqlite")


def set_row(store: Path, path: str, *, sigs: str | None, ca: str | None) -> None:
    with db(store) as c:
        n = c.execute("update ValidPaths set sigs = ?, ca = ? where path = ?", (sigs, ca, path)).rowcount
    assert n == 1


@pytest.fixture
def chroot(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.mark.nix
def test_nix_generated_key_signs_like_nix(nix: Nix, tmp_path: Path, chroot: Path) -> None:
    sec, pub = tmp_path / "nix.sec", tmp_path / "nix.pub"
    nix("nix-store", "--generate-binary-cache-key", "nixgen-1", sec, pub)
    sk = load_secret_key(sec)
    assert sk.public_key() == PublicKey.parse(pub.read_text())
    assert sk.to_text() == sec.read_text()
    (tmp_path / "f").write_bytes(os.urandom(1000))
    path = add_to_chroot(nix, chroot, tmp_path / "f")
    nix("nix", "--store", chroot, "store", "sign", "--key-file", sec, path)
    j = nix_path_info(nix, chroot, path)
    assert j["signatures"] == [sign_path_info(info_from_json(j), sk)]
    signed = info_from_json(j)
    signed.sigs = frozenset(j["signatures"])
    assert verify_path_info(signed, load_public_keys([pub.read_text()]))


@pytest.mark.nix
def test_our_keys_work_in_nix(nix: Nix, tmp_path: Path, chroot: Path) -> None:
    sec, pub = tmp_path / "our.sec", tmp_path / "our.pub"
    r = CliRunner().invoke(_cli(), ["key", "generate", "ours-1", "--secret-file", str(sec), "--public-file", str(pub)])
    assert r.exit_code == 0, r.output
    assert nix("nix", "key", "convert-secret-to-public", input=sec.read_bytes()).stdout.decode() == pub.read_text()
    (tmp_path / "f").write_bytes(b"our key\n")
    path = add_to_chroot(nix, chroot, tmp_path / "f")
    nix("nix", "--store", chroot, "store", "sign", "--key-file", sec, path)
    j = nix_path_info(nix, chroot, path)
    assert j["signatures"] == [sign_path_info(info_from_json(j), load_secret_key(sec))]


@pytest.mark.nix
def test_signature_over_references_matches_nix(nix: Nix, tmp_path: Path, chroot: Path) -> None:
    """References are part of the fingerprint: give a path some (self reference included)
    directly in the chroot store's database, then compare signatures."""
    paths = []
    for name in ("zeta", "alpha", "mid"):
        (tmp_path / name).write_text(name)
        paths.append(add_to_chroot(nix, chroot, tmp_path / name))
    top = paths[2]
    with db(chroot) as c:
        ids = {p: c.execute("select id from ValidPaths where path = ?", (p,)).fetchone()[0] for p in paths}
        for ref in (paths[0], paths[2], paths[1]):
            c.execute("insert into Refs (referrer, reference) values (?, ?)", (ids[top], ids[ref]))
    sk = SecretKey.generate("refs-1")
    (tmp_path / "sec").write_text(sk.to_text())
    nix("nix", "--store", chroot, "store", "sign", "--key-file", tmp_path / "sec", top)
    j = nix_path_info(nix, chroot, top)
    assert sorted(j["references"]) == sorted(paths)
    info = info_from_json(j)
    assert j["signatures"] == [sign_path_info(info, sk)]
    assert fingerprint(info.path, info.nar_hash, info.nar_size, info.references).endswith(
        (";" + ",".join(sorted(paths))).encode())


@pytest.mark.nix
def test_nix_verifies_our_signature(nix: Nix, tmp_path: Path, chroot: Path) -> None:
    """Put our signature into the chroot store's db (with `ca` cleared, so the path is not
    exempt as content-addressed) and let `nix store verify` judge it."""
    (tmp_path / "f").write_bytes(b"verify me\n")
    path = add_to_chroot(nix, chroot, tmp_path / "f")
    info = info_from_json(nix_path_info(nix, chroot, path))
    sk = SecretKey.generate("ours-1")
    sig = sign_path_info(info, sk)
    name, raw = parse_signature(sig)
    tampered = f"{name}:{b64(bytes([raw[0] ^ 0x80]) + raw[1:])}"
    pub = sk.public_key().to_text()

    def verify(sigs: str | None, trusted: str = pub) -> subprocess.CompletedProcess[bytes]:
        set_row(chroot, path, sigs=sigs, ca=None)
        return nix("nix", "--store", chroot, "store", "verify", "--trusted-public-keys", trusted,
                   "--sigs-needed", "1", path, check=False)

    ok = verify(sig)
    assert ok.returncode == 0, ok.stderr.decode()
    assert nix_path_info(nix, chroot, path)["signatures"] == [sig]
    for sigs, trusted in ((tampered, pub), (None, pub), (sig, SecretKey.generate("ours-1").public_key().to_text()),
                          (sig, SecretKey.generate("other-1").public_key().to_text())):
        bad = verify(sigs, trusted)
        assert bad.returncode == 2, bad.stderr.decode()  # 2 = untrusted
        assert b"is untrusted" in bad.stderr
    # and the Nix-side verdicts agree with ours
    assert verify_path_info(PathInfo(info.path, info.nar_hash, info.nar_size, info.references, sigs=frozenset({sig})),
                            [sk.public_key()])
    assert not verify_path_info(PathInfo(info.path, info.nar_hash, info.nar_size, info.references,
                                         sigs=frozenset({tampered})), [sk.public_key()])
