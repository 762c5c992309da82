"""Decompression bombs: output is decoded on demand, so memory stays flat and time linear.

A few bytes of bzip2, or 64 KiB of zstd, can stand for gigabytes. Every reader of compressed
input (`nar cat/ls/restore`, `store import`, the zstd-compressed serve session) must decode
only what it is about to use: a read of n bytes decodes about n bytes, never the whole
expansion of the input it has, and never copies what it keeps for later again.

The zeros are always one compressed stream, as in a real bomb (a reader that handles one
stream at a time would not show the problem with many small ones). The zstd, gzip and bzip2
streams are built without compressing hundreds of MiB: they repeat one compressed unit inside
the stream (RLE blocks of a zstd frame, deflate after a full flush, identical bzip2 blocks);
the xz ones are compressed at the fastest preset.
"""

from __future__ import annotations

import bz2
import functools
import io
import lzma
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from nartool.compression import CompressionError, compressor, open_decompressed
from nartool.remote import wire as W

FORMATS = ["zstd", "xz", "bzip2", "gzip"]
MiB = 1 << 20
#: peak RSS allowed to a child decoding hundreds of MiB (an interpreter with nartool: ~40 MB)
RSS_LIMIT = 150 * MiB


# -- single streams of many zeros, built cheaply ---------------------------------------------

def _zstd_zeros(size: int) -> bytes:
    """One zstd frame of ``size`` zeros (a multiple of 128 KiB): RLE blocks, 4 bytes each."""
    block = 1 << 17
    n = size // block
    assert n * block == size and n
    header = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x38])  # no checksum; 128 KiB window
    rle = ((block << 3) | (1 << 1)).to_bytes(3, "little") + b"\0"
    last = ((block << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\0"
    return header + rle * (n - 1) + last


def _gzip_zeros(size: int) -> bytes:
    """One gzip member of ``size`` zeros (a multiple of 1 MiB): after a full flush deflate
    starts afresh, so one flushed MiB can be repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    unit = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    crc = 0
    z = bytes(MiB)
    for _ in range(size // MiB):
        crc = zlib.crc32(z, crc)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return head + unit * (size // MiB) + end + crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")


_BZ_UNIT = 32 * MiB  # fits one bzip2 block (runs of zeros shrink 50-fold before the block sort)


def _bzip2_zeros(size: int) -> bytes:
    """One bzip2 stream of ``size`` zeros (a multiple of 32 MiB): the block of 32 MiB of zeros
    repeated (blocks are bit-aligned; the stream CRC combines the block CRCs)."""
    one = bz2.compress(bytes(_BZ_UNIT), 9)
    nbits = len(one) * 8
    v = int.from_bytes(one, "big")

    def bits(at: int, n: int) -> int:
        return (v >> (nbits - at - n)) & ((1 << n) - 1)

    assert bits(32, 48) == 0x314159265359
    block_crc = bits(80, 32)
    for pad in range(8):  # the end-of-stream marker, the stream CRC, then up to 7 padding bits
        eos = nbits - pad - 80
        if bits(eos, 48) == 0x177245385090 and bits(eos + 48, 32) == block_crc:
            break
    else:
        raise AssertionError("unexpected bzip2 layout")
    block = bits(32, eos - 32)
    blen = eos - 32
    out, olen, crc = bits(0, 32), 32, 0
    for _ in range(size // _BZ_UNIT):
        out = (out << blen) | block
        olen += blen
        crc = (((crc << 1) | (crc >> 31)) & 0xFFFFFFFF) ^ block_crc
    out = (((out << 48) | 0x177245385090) << 32) | crc
    olen += 80
    out <<= -olen % 8
    return out.to_bytes((olen + 7) // 8, "big")


@functools.lru_cache(maxsize=4)
def _xz_zeros(size: int) -> bytes:
    return lzma.compress(bytes(size), preset=0)


ZEROS: dict[str, Callable[[int], bytes]] = {
    "zstd": _zstd_zeros, "xz": _xz_zeros, "bzip2": _bzip2_zeros, "gzip": _gzip_zeros,
}
#: the CLI runs of xz and bzip2 (slower decoders; a second or two each) are marked slow
CLI_FORMATS = ["zstd", "gzip", pytest.param("xz", marks=pytest.mark.slow),
               pytest.param("bzip2", marks=pytest.mark.slow)]


def _compress(method: str, data: bytes) -> bytes:
    return b"".join(bytes(c) for c in compressor([data], method))


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + bytes(-len(b) % 8)


def _nar_around(size: int) -> tuple[bytes, bytes]:
    """What comes before and after the contents of /big, a file of ``size`` bytes (a multiple
    of 8), in a NAR of a directory holding only it."""
    head = b"".join(map(_s, [b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name", b"big",
                             b"node", b"(", b"type", b"regular", b"contents"])) + size.to_bytes(8, "little")
    return head, b"".join(map(_s, [b")", b")", b")"]))


EXPORT_PATH = "/nix/store/" + "a" * 32 + "-zeros"


def compressed_nar(method: str, size: int, export: bool = False) -> bytes:
    """A NAR (or an export stream of it) whose big file's zeros are one compressed stream,
    between two small ones."""
    head, tail = _nar_around(size)
    if export:
        head = (1).to_bytes(8, "little") + head
        tail += (0x4558494E).to_bytes(8, "little") + _s(EXPORT_PATH.encode()) + bytes(8) + _s(b"") + bytes(16)
    return _compress(method, head) + ZEROS[method](size) + _compress(method, tail)


# -- a child process reporting its own peak RSS and CPU time ---------------------------------

# VmHWM of the child's own address space: wait4's ru_maxrss would carry the test runner's peak.
_WRAPPER = textwrap.dedent("""
    import atexit, resource, sys
    def cpu():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    def report():
        with open("/proc/self/status") as f:
            hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
        with open(report_path, "w") as out:
            out.write(f"{hwm} {cpu() - start}")
    report_path, sys.argv = sys.argv[1], ["nartool", *sys.argv[2:]]
    from nartool.cli.main import main
    start = cpu()
    atexit.register(report)
    main()
""")


def run_cli(args: list[str | os.PathLike[str]], timeout: float = 120) -> tuple[subprocess.CompletedProcess[bytes], int, float]:
    """(result, peak RSS in bytes, CPU seconds spent in the command)."""
    with tempfile.NamedTemporaryFile("r") as report:
        r = subprocess.run([sys.executable, "-c", _WRAPPER, report.name, *(str(a) for a in args)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, check=False)
        hwm, cpu = report.read().split()
    return r, int(hwm) * 1024, float(cpu)


# -- the bounded readers, in process ---------------------------------------------------------

def _read_all(read: Callable[[int], bytes], n: int = 1 << 16) -> bytes:
    out = []
    while b := read(n):
        assert len(b) <= n
        out.append(b)
    return b"".join(out)


@pytest.mark.parametrize("method", FORMATS)
def test_a_read_decodes_only_what_it_returns(method: str) -> None:
    """Reading the first 4 KiB of 64 MiB of zeros does not decode (or hold) the 64 MiB."""
    bomb = ZEROS[method](64 * MiB)
    tracemalloc.start()
    try:
        read, got = open_decompressed(io.BytesIO(bomb))
        assert got == method
        for _ in range(4):
            assert read(1024) == bytes(1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB"


@pytest.mark.parametrize("method", FORMATS)
def test_concatenated_streams_and_odd_read_sizes(method: str) -> None:
    data = bytes(range(256)) * 400 + b"tail"
    two = _compress(method, data) + _compress(method, b"second") + _compress(method, b"")
    read, _ = open_decompressed(io.BytesIO(two))
    assert _read_all(read, 777) == data + b"second"
    # fed a byte at a time (a slow pipe) and read in big pieces
    src = io.BytesIO(two)
    read, _ = open_decompressed(lambda n: src.read(1))
    assert _read_all(read, 1 << 20) == data + b"second"


def test_zstd_skippable_frames_are_skipped() -> None:
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    data = _compress("zstd", b"one") + skippable + _compress("zstd", b"two") + skippable
    read, _ = open_decompressed(io.BytesIO(data))
    assert _read_all(read) == b"onetwo"


@pytest.mark.parametrize("method", FORMATS)
@pytest.mark.parametrize("damage", ["truncated", "trailing-data", "corrupt"])
def test_damaged_input_is_a_compression_error(method: str, damage: str) -> None:
    """Truncation (zstd included: it used to end quietly), garbage after the last stream and
    corruption are errors naming the format and where."""
    good = _compress(method, bytes(range(256)) * 400)
    bad = {"truncated": good[:-3], "trailing-data": good + b"garbage!",
           "corrupt": good[:10] + bytes(40) + good[50:]}[damage]
    read, _ = open_decompressed(io.BytesIO(bad))
    with pytest.raises(CompressionError) as ei:
        _read_all(read)
    assert ei.value.rule == damage
    assert method in str(ei.value) and ei.value.offset is not None


# -- the CLI on bombs: flat memory, linear time ------------------------------------------------

@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bombs")


def _bomb_file(d: Path, method: str, size: int, export: bool = False) -> Path:
    p = d / f"{method}-{size >> 20}{'-export' if export else ''}"
    if not p.exists():
        p.write_bytes(compressed_nar(method, size, export))
    return p


def _cat_cpu(d: Path, method: str, size: int) -> float:
    r, rss, cpu = run_cli(["nar", "cat", _bomb_file(d, method, size), "/big"])
    assert r.returncode == 0, r.stderr
    assert rss < RSS_LIMIT, f"{method} {size >> 20} MiB: peak RSS {rss / MiB:.0f} MiB"
    return cpu


@pytest.mark.parametrize("method", CLI_FORMATS)
def test_nar_cat_of_a_bomb_is_flat_and_linear(bomb_dir: Path, method: str) -> None:
    """`nar cat` of 128 MiB and 256 MiB of zeros, each one compressed stream: flat memory, and
    twice the output takes about twice the time (it was quadratic)."""
    small = min(_cat_cpu(bomb_dir, method, 128 * MiB) for _ in range(2))
    big = _cat_cpu(bomb_dir, method, 256 * MiB)
    # (a little slack for the timer: zstd does 128 MiB of zeros in some 50 ms)
    assert big < 3.5 * small + 0.15, f"{method}: 128 MiB {small:.2f}s, 256 MiB {big:.2f}s"


@pytest.mark.parametrize("method", CLI_FORMATS)
def test_nar_restore_of_a_bomb_is_flat(bomb_dir: Path, tmp_path: Path, method: str) -> None:
    r, rss, _ = run_cli(["nar", "restore", tmp_path / "out", _bomb_file(bomb_dir, method, 128 * MiB)])
    assert r.returncode == 0, r.stderr
    assert rss < RSS_LIMIT, f"peak RSS {rss / MiB:.0f} MiB"
    assert (tmp_path / "out" / "big").stat().st_size == 128 * MiB


@pytest.mark.parametrize("method", CLI_FORMATS)
def test_store_import_of_a_bomb_is_flat(bomb_dir: Path, tmp_path: Path, method: str) -> None:
    exp = _bomb_file(bomb_dir, method, 128 * MiB, export=True)
    r, rss, _ = run_cli(["--store", tmp_path / "s", "store", "import", exp])
    assert r.returncode == 0, r.stderr
    assert rss < RSS_LIMIT, f"peak RSS {rss / MiB:.0f} MiB"
    assert (tmp_path / "s" / EXPORT_PATH.lstrip("/") / "big").stat().st_size == 128 * MiB


def test_tiny_bzip2_bomb_fails_at_once(tmp_path: Path) -> None:
    """A few hundred bytes of bzip2 standing for 512 MiB of zeros: not a NAR, and `nar ls`
    says so without decoding the rest."""
    bomb = tmp_path / "bomb.nar.bz2"
    bomb.write_bytes(_bzip2_zeros(16 * _BZ_UNIT))
    assert bomb.stat().st_size < 1024
    t = time.monotonic()
    r, rss, cpu = run_cli(["nar", "ls", bomb])
    wall = time.monotonic() - t
    assert r.returncode != 0
    assert b"nix-archive-1" in r.stderr or b"NAR" in r.stderr, r.stderr
    assert cpu < 1.0 and wall < 5, f"cpu {cpu:.2f}s, wall {wall:.2f}s"
    assert rss < 100 * MiB, f"peak RSS {rss / MiB:.0f} MiB"


# -- the zstd serve session ------------------------------------------------------------------

def test_session_reader_never_waits_with_output_pending() -> None:
    """A flushed zstd block bigger than one read: all of it is readable before the reader asks
    its input for more (the peer only sends more after it got an answer)."""
    data = (bytes(range(256)) * 4 + os.urandom(1000)) * 300
    c = zstandard.ZstdCompressor(level=3).compressobj()
    sent = [c.compress(data) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]

    def read(_n: int) -> bytes:
        if not sent:
            raise AssertionError("asked for more input while decoded output was pending")
        return sent.pop()

    r = W.zstd_reader(b"", read)
    got = b""
    while len(got) < len(data):
        got += r(1 << 16)
    assert got == data


_SESSION_CHILD = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # the old reader wanted 2 GiB more
    from nartool.remote.serve import serve_bytes
    from nartool.store.memory import MemoryStore
    data = sys.stdin.buffer.read()
    t = time.monotonic()
    code, out, err = serve_bytes(MemoryStore(), data, write=False, compress="zstd")
    wall = time.monotonic() - t
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print(code, hwm, wall)
    print(err)
""")


def test_session_bomb_is_refused_with_flat_memory() -> None:
    """64 KiB of zstd (2 GiB of zeros) from a read-only client after the handshake: the server
    decodes a command's worth, finds no such command, and stops, with flat memory."""
    hello = (W.SERVE_MAGIC_1).to_bytes(8, "little") + (W.PROTOCOL_VERSION | W.VERSION_FLAG_ZSTD).to_bytes(8, "little")
    bomb = _zstd_zeros(2048 * MiB)
    assert len(bomb) <= 64 * 1024 + 6
    r = subprocess.run([sys.executable, "-c", _SESSION_CHILD], input=hello + bomb, capture_output=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    first, err = r.stdout.decode().split("\n", 1)
    code, hwm, wall = first.split()
    assert int(code) != 0 and "error:" in err, err
    assert int(hwm) * 1024 < 100 * MiB, f"peak RSS {int(hwm) / 1024:.0f} MiB"
    assert float(wall) < 2, f"{wall}s"


def test_session_window_is_bounded() -> None:
    """A session peer cannot make the decoder reserve a huge window (a nartool peer uses 2 MiB)."""
    c = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(window_log=27))
    co = c.compressobj()  # no content size: the frame header asks for the whole window
    frame = co.compress(bytes(1000)) + co.flush()
    r = W.zstd_reader(frame, lambda n: b"")
    with pytest.raises(CompressionError, match="too much memory|window"):
        r(1 << 16)
