"""Progress with a known total on stderr: ``[verifying: 1.2 GiB of 4.0 GiB (30%), 210.0 MiB/s,
ETA 13s]``, only when stderr is a terminal (nothing at all otherwise), cleared at the end.

The bytes come from the data passing through the command (:meth:`TotalProgress.chunks`), or,
where the work happens inside the store, from the bytes this process has read so far
(:meth:`TotalProgress.watch_reads`, polled from ``/proc/self/io`` where there is one; elsewhere
only the total and the elapsed time are shown)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO

from .common import fmt_bytes


def read_bytes_so_far() -> int | None:
    """Bytes this process has read (``rchar`` of ``/proc/self/io``), or None where unknown."""
    from ..fs.osutil import LINUX

    if not LINUX:
        return None
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class TotalProgress:
    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.total = max(total, 0)
        self.interval = interval
        try:
            self.enabled = self.total > 0 and self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.n = 0
        self.known = True  # whether ``n`` is measured (not just elapsed time)
        self.t0 = time.monotonic()
        self.last = 0.0
        self.shown = False
        self._lock = threading.Lock()
        if self.enabled:
            self._render(force=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        if not self.known:
            return f"[{self.label}: {fmt_bytes(self.total)}, {int(elapsed)}s]"
        n = min(self.n, self.total) if self.total else self.n
        pct = int(100 * n / self.total) if self.total else 100
        rate = self.n / elapsed
        text = f"[{self.label}: {fmt_bytes(n)} of {fmt_bytes(self.total)} ({pct}%), {fmt_bytes(rate)}/s"
        if rate > 0 and n < self.total and elapsed >= 1:
            text += f", ETA {int((self.total - n) / rate)}s"
        return text + "]"

    def _render(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        try:
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
            self.shown = True
        except (OSError, ValueError):
            self.enabled = False

    def add(self, n: int) -> None:
        with self._lock:
            self.n += n
            if self.enabled:
                self._render()

    def chunks(self, it: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes | bytearray | memoryview]:
        try:
            for c in it:
                self.add(len(c))
                yield c
        finally:
            self.done()

    @contextmanager
    def watch_reads(self) -> Iterator[None]:
        """While the block runs, count what this process reads (see the module docstring)."""
        if not self.enabled:
            yield
            return
        base = read_bytes_so_far()
        self.known = base is not None
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(self.interval):
                now = read_bytes_so_far()
                with self._lock:
                    if base is not None and now is not None:
                        self.n = now - base
                    self._render(force=True)

        t = threading.Thread(target=poll, name="nartool-progress", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            self.done()

    def done(self) -> None:
        with self._lock:
            if self.enabled and self.shown:
                try:
                    self.stream.write("\r\x1b[K")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass
                self.shown = False
            self.enabled = False
