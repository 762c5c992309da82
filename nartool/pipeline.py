"""Run a chunk producer in a thread so that its Python work overlaps with the consumer's
GIL-free work (hashing, writing, compressing)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

_DONE = object()
#: how long an abandoned or failed pipeline waits for its producer to stop (seconds)
_ABANDON_WAIT = 0.5


def pipelined(items: Iterable[T], depth: int = 64) -> Iterator[T]:
    """Yield ``items``, produced ahead by a background thread (at most ``depth`` buffered).

    Exceptions of the producer are re-raised in the consumer; abandoning the iterator stops
    the producer, which then closes ``items`` itself.

    Signals stay effective: the consumer waits in ``Queue.get``, which a signal handler's
    exception (``KeyboardInterrupt`` from SIGINT, or SIGTERM/SIGHUP in the CLI) interrupts on
    POSIX; and after an exception or an abandonment it waits only briefly for the (daemon)
    producer, which may be stuck in a system call that never returns.
    """
    q: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()
    failure: list[BaseException] = []
    source = iter(items)

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            failure.append(e)
        finally:
            if stop.is_set():
                close = getattr(source, "close", None)
                if close is not None:  # release what it holds (descriptors) here, in its own thread
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - the consumer has gone: nobody to tell
                        pass
            while not stop.is_set():
                try:
                    q.put(_DONE, timeout=0.1)
                    break
                except queue.Full:
                    continue

    t = threading.Thread(target=produce, name="nartool-producer", daemon=True)
    t.start()
    finished = False
    try:
        while True:
            item = q.get()
            if item is _DONE:
                finished = True
                break
            yield item  # type: ignore[misc]
        if failure:
            raise failure[0]
    finally:
        stop.set()
        # after _DONE the producer is returning; otherwise it notices ``stop`` within a
        # put timeout, unless blocked in a system call: never wait for that indefinitely
        t.join(None if finished else _ABANDON_WAIT)
