"""The scheduler owns the device: one worker thread runs every unit of model work.

A unit is a short call (train one chunk, answer one chat). Units of one session run in the order they
were submitted; sessions take turns unit by unit (round robin), so a long ingest yields the device at
every chunk boundary and another user's chat waits at most one chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable, Hashable


class QueueFull(Exception):
    """More units are waiting than the configured limit."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts work."""


class Scheduler:
    def __init__(self, max_queue: int = 1024):
        self.max_queue = max_queue
        self._queues: OrderedDict[Hashable, deque[tuple[Callable, tuple, Future]]] = OrderedDict()
        self._waiting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="ttt-device", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Units waiting (not counting the one running)."""
        return self._waiting

    def waiting(self, key: Hashable) -> bool:
        """Units of session ``key`` are queued."""
        with self._cond:
            return key in self._queues

    def submit(self, key: Hashable, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)`` behind the session ``key``'s earlier units; returns its Future."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} units are waiting for the device")
            self._queues.setdefault(key, deque()).append((fn, args, future))
            self._waiting += 1
            self._cond.notify()
        return future

    def run(self, key: Hashable, fn: Callable, *args) -> Any:
        """``submit`` and wait for the result (exceptions are re-raised in the caller's thread)."""
        return self.submit(key, fn, *args).result()

    def _next(self):
        with self._cond:
            while not self._queues:
                if self._closed:
                    return None
                self._cond.wait()
            key, queue = self._queues.popitem(last=False)  # the session that waited longest
            unit = queue.popleft()
            if queue:
                self._queues[key] = queue  # its next unit goes to the back of the line
            self._waiting -= 1
            return unit

    def _run(self) -> None:
        while (unit := self._next()) is not None:
            fn, args, future = unit
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # delivered to the waiting handler
                future.set_exception(e)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new units, finish the queued ones, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
