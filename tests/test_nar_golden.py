"""Golden NARs and hash vectors verified with Nix 2.8 (see docs/nar-format.md, Worked examples and NAR hashes),
plus golden files made by real Nix in tests/fixtures/nar/, checked offline byte for byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from nartool.hashes import Hash, nix32_decode, nix32_encode
from nartool.nar import File, NarReader, nar_bytes
from nartool.nar.events import Event

from .narbuild import dir_, entry, link, nar, reg

FIX = Path(__file__).parent / "fixtures" / "nar"


def materialise(events: list[Event] | NarReader) -> list[Event]:
    out = []
    for e in events:
        if isinstance(e, File):
            e.chunks = [b"".join(bytes(c) for c in e.chunks)]
        out.append(e)
    return out


GOLDEN = [
    (nar(reg(b"hi\n")), "1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h", 120),
    (nar(link(b"target")), "0x67g3311ihxwarw846p2jc8wbxmv9bd8ryh7qjpp6d8yb56536b", 120),
    (nar(dir_(entry(b"e", reg(b"", executable=True)))), "0lh22jcvds2i3fwp63ba80ydcp86ciaclm6rhj5zysdhj2zil30z", 312),
    (nar(dir_()), "0sjjj9z1dhilhpc8pq4154czrb79z9cm044jvn75kxcjv6v5l2m5", 96),
]


@pytest.mark.parametrize("data,nix32,size", GOLDEN)
def test_spec_examples(data: bytes, nix32: str, size: int) -> None:
    assert len(data) == size
    assert nix32_encode(hashlib.sha256(data).digest()) == nix32
    assert nar_bytes(materialise(NarReader(data))) == data


def test_hi_file_layout() -> None:
    data = GOLDEN[0][0]
    assert data[0x60:0x63] == b"hi\n"
    (ev,) = list(NarReader(data))
    assert isinstance(ev, File) and ev.offset == 96 and ev.size == 3


VECTORS = [
    ("md5", b"", "3y8bwfr609h3lh9ch0izcqq7fl", "md5-1B2M2Y8AsgTpgAmY7PhCfg=="),
    ("md5", b"abc", "3jgzhjhz9zjvbb0kyj7jc500ch", "md5-kAFQmDzST7DWlj99KOF/cg=="),
    ("sha1", b"", "143xibwh31h9bvxzalr0sjvbbvpa6ffs", "sha1-2jmj7l5rSw0yVb/vlWAYkK/YBwk="),
    ("sha1", b"abc", "kpcd173cq987hw957sx6m0868wv3x6d9", "sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0="),
    ("sha256", b"", "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
     "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="),
    ("sha256", b"abc", "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
     "sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="),
    ("sha512", b"abc",
     "2gs8k559z4rlahfx0y688s49m2vvszylcikrfinm30ly9rak69236nkam5ydvly1ai7xac99vxfc4ii84hawjbk876blyk1jfhkbbyx",
     "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="),
]


@pytest.mark.parametrize("algo,data,nix32,sri", VECTORS)
def test_hash_vectors(algo: str, data: bytes, nix32: str, sri: str) -> None:
    h = Hash(algo, hashlib.new(algo, data).digest())
    assert h.nix32 == nix32 and h.sri == sri
    assert Hash.parse(f"{algo}:{nix32}") == h
    assert Hash.parse(sri) == h
    assert Hash.parse(f"{algo}:{h.base16}") == h
    assert nix32_decode(nix32, len(h.digest)) == h.digest


def test_nix32_rejects_spare_bits_and_bad_chars() -> None:
    from nartool.errors import HashFormatError

    good = VECTORS[5][2]
    with pytest.raises(HashFormatError):
        nix32_decode("2" + good[1:], 32)
    with pytest.raises(HashFormatError):
        nix32_decode("e" + good[1:], 32)
    with pytest.raises(HashFormatError):
        nix32_decode(good.upper(), 32)


def _fixtures() -> list[Path]:
    return sorted(FIX.glob("*.nar"))


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: p.name)
def test_fixture_roundtrip_and_hash(path: Path) -> None:
    """Golden NARs made by `nix-store --dump` re-serialise identically and keep their hash."""
    data = path.read_bytes()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert nar_bytes(materialise(NarReader(data))) == data
    assert Hash("sha256", hashlib.sha256(data).digest()).nix32 == meta["nix32"]
    # the .ls listing Nix 2.8 printed for it
    from nartool.nar.listing import json_listing

    if meta["ls"] is None:  # non-UTF-8 names: Nix 2.8 wrote invalid JSON; ours is \udcXX (docs/names.md)
        text = "".join(json_listing(NarReader(data)))
        text.encode("utf-8")  # no unpaired surrogates left raw: writable as UTF-8
        assert "\\udc" in text and json.loads(text)
    else:
        assert json.loads("".join(json_listing(NarReader(data)))) == meta["ls"]


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: p.name)
def test_fixture_restore_redump(path: Path, tmp_path: Path) -> None:
    import nartool

    data = path.read_bytes()
    nartool.restore(tmp_path / "r", data)
    out = tmp_path / "out.nar"
    nartool.dump(tmp_path / "r", out)
    assert out.read_bytes() == data
