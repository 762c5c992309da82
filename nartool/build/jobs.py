"""Background threads that take jobs off the build scheduler's critical path (the finished builds'
clean-up, their registration).

A thread stays for the next job instead of ending (starting a thread costs its starter a wait for
the new thread, ~0.1-1 ms on busy cores, between every two builds of a chain); a new one is
started only when every thread is busy and the limit allows it. With one thread the jobs run
strictly in the order they were handed in.
"""

from __future__ import annotations

import collections
import threading

from .._log import get_logger

log = get_logger(__name__)


class JobThreads:
    """Jobs handed in with :meth:`_put` for :meth:`_handle` (subclasses type both), run on up to
    ``max_threads`` threads named ``name`` (None: as many as are busy at once). An exception of
    a job is logged as ``failure``; the thread goes on."""

    def __init__(self, name: str, failure: str, max_threads: int | None = None) -> None:
        self._name = name
        self._failure = failure
        self._max = max_threads
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)   # a job came, or the threads are to stop
        self._done = threading.Condition(self._lock)   # a job finished, or a thread ended
        self._jobs: collections.deque[object] = collections.deque()
        self._busy = 0
        self._idle = 0
        self._threads: list[threading.Thread] = []  # started and not ended
        self._stop = False

    def _handle(self, job: object) -> None:
        raise NotImplementedError

    def _put(self, job: object) -> None:
        with self._lock:
            self._jobs.append(job)
            self._stop = False
            if self._idle:
                self._work.notify()
                return
            if self._max is not None and len(self._threads) >= self._max:
                return  # (a busy thread takes it next)
            t = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._threads.append(t)
            t.start()  # (under the lock: started before anyone can join it)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs:
                    if self._stop:
                        self._threads.remove(threading.current_thread())
                        self._done.notify_all()
                        return
                    self._idle += 1
                    self._work.wait()
                    self._idle -= 1
                job = self._jobs.popleft()
                self._busy += 1
            try:
                self._handle(job)
            except Exception as e:  # noqa: BLE001 (logged; the thread must go on: others wait for it)
                log.warning("%s: %s", self._failure, e)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._done.notify_all()

    def pending(self) -> bool:
        with self._lock:
            return bool(self._jobs) or self._busy > 0

    def drain(self, *, stop: bool = False) -> None:
        """Wait until every job handed in so far has run; with ``stop`` the threads then end,
        and are waited for (a later job starts one again)."""
        with self._lock:
            while self._jobs or self._busy:
                self._done.wait()
            if not stop:
                return
            self._stop = True
            self._work.notify_all()
            ending = [t for t in self._threads if t is not threading.current_thread()]
            # (until they leave, or a job handed in meanwhile keeps them: not waited for then)
            while self._stop and any(t in self._threads for t in ending):
                self._done.wait()
            ended = [t for t in ending if t not in self._threads]
        for t in ended:
            t.join()  # (out of the list: on its way out; so no thread of ours outlives this)

    def close(self) -> None:
        """Drain, and wait until the threads have ended."""
        self.drain(stop=True)
