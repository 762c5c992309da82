"""Time and peak memory of decoding highly compressed input through the CLI.

Builds a NAR holding one file of SIZE MiB of zeros (and an export stream of it), compressed
the way `nartool nar dump --compress` / `store export --compress` write them, then runs
`nar cat`, `nar restore` and `store import` on each in a child process and prints its wall
time, CPU time and peak RSS (the child's own VmHWM).

    python scripts/bench_bombs.py --size 256 --formats none,zstd,xz,bzip2,gzip
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from nartool.compression import compressor

MiB = 1 << 20
PATH = "/nix/store/" + "b" * 32 + "-zeros"

_WRAPPER = textwrap.dedent("""
    import atexit, resource, sys
    def report():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        with open("/proc/self/status") as f:
            hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
        with open(report_path, "w") as out:
            out.write(f"{hwm} {ru.ru_utime + ru.ru_stime}")
    report_path, sys.argv = sys.argv[1], ["nartool", *sys.argv[2:]]
    atexit.register(report)
    from nartool.cli.main import main
    main()
""")


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b + bytes(-len(b) % 8)


def stream(size: int, export: bool) -> Iterator[bytes]:
    head = b"".join(map(_s, [b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name", b"big",
                             b"node", b"(", b"type", b"regular", b"contents"])) + size.to_bytes(8, "little")
    tail = b"".join(map(_s, [b")", b")", b")"]))
    if export:
        head = (1).to_bytes(8, "little") + head
        tail += (0x4558494E).to_bytes(8, "little") + _s(PATH.encode()) + bytes(8) + _s(b"") + bytes(16)
    yield head
    z = bytes(MiB)
    for _ in range(size // MiB):
        yield z
    yield tail


def write(path: Path, method: str, size: int, export: bool) -> None:
    with open(path, "wb") as f:
        for c in compressor(stream(size, export), method):
            f.write(c)


def run(args: list[str]) -> tuple[int, float, float, int]:
    with tempfile.NamedTemporaryFile("r") as report:
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-c", _WRAPPER, report.name, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, check=False)
        wall = time.monotonic() - t
        hwm, cpu = report.read().split()
    if r.returncode:
        print(r.stderr.decode(errors="replace").strip(), file=sys.stderr)
    return r.returncode, wall, float(cpu), int(hwm) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="MiB of zeros (a multiple of 1)")
    ap.add_argument("--formats", default="none,zstd,xz,bzip2,gzip")
    ap.add_argument("--commands", default="cat,restore,import")
    a = ap.parse_args()
    size = a.size * MiB
    with tempfile.TemporaryDirectory(prefix="nartool-bench-bombs-") as tmp:
        d = Path(tmp)
        print(f"{'format':6} {'command':8} {'compressed':>11} {'wall':>7} {'cpu':>7} {'peak RSS':>9}")
        for method in a.formats.split(","):
            nar, exp = d / f"{method}.nar", d / f"{method}.export"
            write(nar, method, size, False)
            for cmd in a.commands.split(","):
                src = exp if cmd == "import" else nar
                if cmd == "import" and not exp.exists():
                    write(exp, method, size, True)
                args = {"cat": ["nar", "cat", str(nar), "/big"],
                        "restore": ["nar", "restore", str(d / "out"), str(nar)],
                        "import": ["--store", str(d / "store"), "store", "import", str(exp)]}[cmd]
                rc, wall, cpu, rss = run(args)
                print(f"{method:6} {cmd:8} {src.stat().st_size:11} {wall:6.2f}s {cpu:6.2f}s {rss / MiB:6.0f} MiB"
                      + ("" if rc == 0 else f"  (exit {rc})"), flush=True)
                for leftover in (d / "out", d / "store"):
                    if leftover.exists():
                        subprocess.run(["chmod", "-R", "u+w", str(leftover)], check=False)
                        subprocess.run(["rm", "-rf", str(leftover)], check=False)


if __name__ == "__main__":
    os.environ.pop("NARTOOL_STORE", None)
    main()
