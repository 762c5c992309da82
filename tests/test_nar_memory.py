"""Peak memory stays flat: generated NAR streams (never stored) piped into the CLI.

A 4 GiB file and a million directory entries go through `nar ls`/`nar cat`/`nar restore`
in a child process whose peak RSS (from wait4) must stay under 100 MB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nartool.nar import END, Directory, File, write_nar
from nartool.nar.events import Event

LIMIT = 100 * 1024 * 1024
ZEROS = bytes(1 << 20)


def big_file_events(size: int) -> Iterator[Event]:
    def chunks() -> Iterator[bytes]:
        left = size
        while left:
            n = min(left, len(ZEROS))
            yield ZEROS if n == len(ZEROS) else ZEROS[:n]
            left -= n

    yield Directory(b"")
    yield File(b"big", False, size, chunks())
    yield File(b"tail", False, 4, [b"tail"])
    yield END


def many_entries_events(n: int) -> Iterator[Event]:
    yield Directory(b"")
    for i in range(n):
        yield File(b"f%07d" % i, False, 0, ())
    yield END


# The child reports its own peak (VmHWM of its address space). wait4's ru_maxrss would not do:
# Linux carries the parent's peak over fork and exec into it, so a big test runner would fail
# the check whatever the child did.
_WRAPPER = """
import atexit, sys
def report():
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
    with open(report_path, "w") as out:
        out.write(hwm)
atexit.register(report)
report_path, sys.argv = sys.argv[1], ["nartool", *sys.argv[2:]]
from nartool.cli.main import main
main()
"""


def run_fed(args: list[str], events: Iterator[Event] | None, stdout: int = subprocess.DEVNULL) -> tuple[int, int]:
    """Run the CLI with the NAR of ``events`` on stdin; return (exit status, peak RSS bytes)."""
    with tempfile.NamedTemporaryFile("r") as report:
        p = subprocess.Popen([sys.executable, "-c", _WRAPPER, report.name, *args], stdin=subprocess.PIPE,
                             stdout=stdout, stderr=subprocess.PIPE)
        assert p.stdin is not None
        try:
            for chunk in write_nar(events) if events is not None else ():
                p.stdin.write(chunk)
        except BrokenPipeError:
            pass
        finally:
            p.stdin.close()
        err = p.stderr.read() if p.stderr else b""
        p.wait()
        assert p.returncode == 0, err
        return p.returncode, int(report.read()) * 1024


@pytest.mark.slow
def test_ls_of_4gib_file_is_flat() -> None:
    _, rss = run_fed(["nar", "ls", "-lR", "-"], big_file_events(4 << 30))
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.1f} MiB"


@pytest.mark.slow
def test_cat_of_4gib_file_is_flat() -> None:
    _, rss = run_fed(["nar", "cat", "-", "/big"], big_file_events(4 << 30))
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.1f} MiB"


@pytest.mark.slow
def test_restore_of_1gib_file_is_flat(tmp_path: Path) -> None:
    _, rss = run_fed(["nar", "restore", str(tmp_path / "r"), "-"], big_file_events(1 << 30))
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.1f} MiB"
    assert (tmp_path / "r" / "big").stat().st_size == 1 << 30


@pytest.mark.slow
@pytest.mark.parametrize("args", [["nar", "ls", "-R", "-"], ["nar", "ls", "--json", "-R", "-"]])
def test_million_entries_listing_is_flat(args: list[str]) -> None:
    _, rss = run_fed(args, many_entries_events(1_000_000))
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def million_entry_dir() -> Iterator[Path]:
    """One directory with a million empty files (on tmpfs when there is one: quicker)."""
    import shutil

    base = Path(tempfile.mkdtemp(prefix="nartool-million-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    d = base / "d"
    d.mkdir()
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(1_000_000):
            os.close(os.open(b"entry-%07d" % i, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)
    yield d
    shutil.rmtree(base)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["nar", "hash"], ["nar", "dump", "-o", "/dev/null"]], ids=["hash", "dump"])
def test_million_entry_directory_dump_is_lean(million_entry_dir: Path, args: list[str]) -> None:
    """Dumping and hashing sort one directory's names in memory (as Nix does), but nothing more:
    no per-entry objects beyond the names, no copy of the listing for the case-hack probe."""
    _, rss = run_fed([*args, str(million_entry_dir)], None)
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.1f} MiB"
