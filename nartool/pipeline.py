"""Run a chunk producer in a thread so that its Python work overlaps with the consumer's
GIL-free work (hashing, writing, compressing)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def pipelined(items: Iterable[T], depth: int = 64) -> Iterator[T]:
    """Yield ``items``, produced ahead by a background thread (at most ``depth`` buffered).

    Exceptions of the producer are re-raised in the consumer; abandoning the iterator stops
    the producer.
    """
    q: queue.Queue[object] = queue.Queue(depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for item in items:
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
            while not stop.is_set():
                try:
                    q.put(_DONE, timeout=0.1)
                    break
                except queue.Full:
                    continue

    t = threading.Thread(target=produce, name="nartool-producer", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            yield item  # type: ignore[misc]
        if failure:
            raise failure[0]
    finally:
        stop.set()
        t.join()
