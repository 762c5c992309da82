#!/usr/bin/env python3
"""atheris fuzz target over the strict NAR reader.

Invariants checked on every input: the reader raises nothing but ``NarError``, and any NAR it
accepts re-serialises to exactly the same bytes. The corpus is seeded with valid NARs, every
malformed case of the test suite and the golden fixtures.

    pip install atheris
    python3 scripts/fuzz_nar.py -atheris_runs=200000        # or -max_total_time=60
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def seed_corpus(dirpath: Path) -> None:
    from nartool.nar import nar_bytes
    from tests.narbuild import dir_, entry, link, nar, reg
    from tests.test_nar_malformed import CASES

    seeds = [
        nar(reg(b"hello")), nar(reg(b"", executable=True)), nar(link(b"target")), nar(dir_()),
        nar(dir_(entry(b"a", reg(b"x" * 9)), entry(b"b", link(b"a")), entry(b"c", dir_(entry(b"d", reg())))))
    ]
    seeds += [c[1][:4096] for c in CASES]
    seeds += [p.read_bytes() for p in (ROOT / "tests" / "fixtures" / "nar").glob("*.nar")]
    for i, s in enumerate(seeds):
        (dirpath / f"seed-{i:03d}").write_bytes(s)
    assert nar_bytes  # imported for the check below


def test_one(data: bytes) -> None:
    from nartool.errors import NarError
    from nartool.nar import File, NarReader, nar_bytes

    events = []
    try:
        for ev in NarReader(data):
            if isinstance(ev, File):
                ev.chunks = [b"".join(ev.chunks)]
            events.append(ev)
    except NarError:
        return
    again = nar_bytes(events)
    if again != data:
        raise AssertionError(f"accepted a non-canonical NAR: {data.hex()}")


def main() -> None:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        sys.exit(2)
    with atheris.instrument_imports():  # before anything else imports nartool
        import nartool.nar  # noqa: F401
        import nartool.nar.reader  # noqa: F401
        import nartool.nar.writer  # noqa: F401
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="nar-fuzz-corpus-"))
        seed_corpus(corpus)
        args.append(str(corpus))
    atheris.Setup(args, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
