"""The scheduler owns the device: one worker thread runs every unit of model work.

A unit is a short call (train one chunk, answer one chat). Units of one session run in the order they
were submitted; sessions take turns unit by unit (round robin), so a long ingest yields the device at
every chunk boundary and another user's chat waits at most one chunk.

A *batchable* unit (``submit_batchable``) names a function that runs several sessions' units of its
kind in one call (``ttt.batch.train_sessions``: one forward and backward for many sessions' chunks).
When such a unit reaches the front, the front units of up to ``max_batch - 1`` other sessions of the
same kind join it; each of those sessions then goes to the back of the line as if it had had its turn.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

BatchFn = Callable[[Sequence[Any]], Sequence[Any]]  # items -> one result per item, same order


class QueueFull(Exception):
    """More units are waiting than the configured limit."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts work."""


@dataclass(frozen=True)
class Unit:
    fn: Callable  # a BatchFn when batchable, called with the items of every unit in its batch
    args: tuple  # batchable: (item,)
    future: Future
    batchable: bool = False


def owner(key: Hashable) -> Hashable:
    """Whose work a key is: keys are (user, session) pairs; another key is its own owner."""
    return key[0] if isinstance(key, tuple) and key else key


class Scheduler:
    def __init__(self, max_queue: int = 1024, max_batch: int = 1, on_batch: Callable[[int], None] = lambda n: None,
                 max_queue_per_user: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_queue, self.max_batch = max_queue, max_batch
        self.max_queue_per_user = max_queue_per_user or max_queue  # one user cannot fill the whole queue
        self._per_owner: Counter[Hashable] = Counter()
        self.on_batch = on_batch  # told the number of units in each batchable call (metrics)
        self._queues: OrderedDict[Hashable, deque[Unit]] = OrderedDict()
        self._waiting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="ttt-device", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Units waiting (not counting the ones running)."""
        return self._waiting

    def waiting(self, key: Hashable) -> bool:
        """Units of session ``key`` are queued."""
        with self._cond:
            return key in self._queues

    def submit(self, key: Hashable, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)`` behind the session ``key``'s earlier units; returns its Future."""
        return self._queue(key, Unit(fn, args, Future()))

    def submit_batchable(self, key: Hashable, batch: BatchFn, item: Any) -> Future:
        """Queue ``batch([item, ...])[i]``: may run in one call with other sessions' items for ``batch``."""
        return self._queue(key, Unit(batch, (item,), Future(), batchable=True))

    def run(self, key: Hashable, fn: Callable, *args) -> Any:
        """``submit`` and wait for the result (exceptions are re-raised in the caller's thread)."""
        return self.submit(key, fn, *args).result()

    def run_batchable(self, key: Hashable, batch: BatchFn, item: Any) -> Any:
        return self.submit_batchable(key, batch, item).result()

    def _queue(self, key: Hashable, unit: Unit) -> Future:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} units are waiting for the device")
            if self._per_owner[owner(key)] >= self.max_queue_per_user:
                raise QueueFull(f"{self.max_queue_per_user} units of this user are already waiting for the device")
            self._queues.setdefault(key, deque()).append(unit)
            self._waiting += 1
            self._per_owner[owner(key)] += 1
            self._cond.notify()
        return unit.future

    def _pop_front(self, key: Hashable) -> Unit:
        """Take ``key``'s front unit and send ``key`` to the back of the line. Call with the lock held."""
        queue = self._queues.pop(key)
        unit = queue.popleft()
        if queue:
            self._queues[key] = queue
        self._waiting -= 1
        self._per_owner[owner(key)] -= 1
        if not self._per_owner[owner(key)]:
            del self._per_owner[owner(key)]
        return unit

    def _next(self) -> list[Unit] | None:
        with self._cond:
            while not self._queues:
                if self._closed:
                    return None
                self._cond.wait()
            first = next(iter(self._queues))  # the session that waited longest
            units = [self._pop_front(first)]
            if units[0].batchable:
                for key in list(self._queues):  # the others, in line order
                    if len(units) == self.max_batch:
                        break
                    front = self._queues[key][0]
                    if key != first and front.batchable and front.fn is units[0].fn:
                        units.append(self._pop_front(key))
            return units

    def _run(self) -> None:
        while (units := self._next()) is not None:
            units = [u for u in units if u.future.set_running_or_notify_cancel()]
            if not units:
                continue
            try:
                if units[0].batchable:
                    self.on_batch(len(units))
                    results = units[0].fn([u.args[0] for u in units])
                else:
                    results = [units[0].fn(*units[0].args)]
            except BaseException as e:  # delivered to the waiting handlers
                for u in units:
                    u.future.set_exception(e)
                continue
            for u, result in zip(units, results, strict=True):
                u.future.set_result(result)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new units, finish the queued ones, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
