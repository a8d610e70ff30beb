"""The scheduler alone (no model): per-session order, round robin between sessions, errors, limits, shutdown.

Every test makes the order deterministic with events: a unit that blocks the single worker until the
test has queued what it needs, then lets go.
"""

from __future__ import annotations

import threading

import pytest

from server.scheduler import QueueFull, Scheduler, ShuttingDown

TIMEOUT = 10.0  # seconds; only reached when something is broken


@pytest.fixture
def scheduler():
    s = Scheduler()
    yield s
    s.shutdown(TIMEOUT)


def blocker(started: threading.Event, release: threading.Event, result=None):
    """A unit that says it started, then holds the worker until released."""

    def unit():
        started.set()
        assert release.wait(TIMEOUT), "the test never released the worker"
        return result

    return unit


def test_units_of_one_key_run_in_submission_order(scheduler):
    order = []
    futures = [scheduler.submit("a", order.append, i) for i in range(20)]
    for f in futures:
        f.result(TIMEOUT)
    assert order == list(range(20))


def test_run_returns_the_result_in_the_callers_thread(scheduler):
    assert scheduler.run("a", lambda x, y: x * y, 6, 7) == 42
    worker = scheduler.run("a", lambda: threading.current_thread().name)
    assert worker == "ttt-device" and worker != threading.current_thread().name


def test_two_keys_take_turns(scheduler):
    order, started, release = [], threading.Event(), threading.Event()

    def first():
        order.append("a0")
        blocker(started, release)()

    futures = [scheduler.submit("A", first)]
    futures += [scheduler.submit("A", order.append, f"a{i}") for i in range(1, 5)]
    assert started.wait(TIMEOUT)  # A's first unit is running, its 4 others are queued
    futures.append(scheduler.submit("B", order.append, "b0"))
    release.set()
    for f in futures:
        f.result(TIMEOUT)

    assert sorted(order) == ["a0", "a1", "a2", "a3", "a4", "b0"]
    assert [u for u in order if u.startswith("a")] == ["a0", "a1", "a2", "a3", "a4"]  # A's own order kept
    # B does not wait for A's queue to drain: it gets the device within one unit of A's.
    assert order.index("b0") <= 2, order


def test_three_keys_round_robin(scheduler):
    order, started, release = [], threading.Event(), threading.Event()
    gate = scheduler.submit("gate", blocker(started, release))
    assert started.wait(TIMEOUT)
    futures = [scheduler.submit(key, order.append, f"{key}{i}") for key in "ABC" for i in range(3)]
    assert scheduler.depth == 9
    release.set()
    gate.result(TIMEOUT)
    for f in futures:
        f.result(TIMEOUT)
    assert order == ["A0", "B0", "C0", "A1", "B1", "C1", "A2", "B2", "C2"]
    assert scheduler.depth == 0


def test_exceptions_reach_the_caller_and_the_worker_survives(scheduler):
    def boom(msg):
        raise ValueError(msg)

    with pytest.raises(ValueError, match="bad chunk"):
        scheduler.run("a", boom, "bad chunk")
    future = scheduler.submit("a", boom, "queued")
    with pytest.raises(ValueError, match="queued"):
        future.result(TIMEOUT)
    assert isinstance(future.exception(), ValueError)
    assert scheduler.run("a", lambda: "still working") == "still working"
    assert scheduler.run("b", lambda: "other keys too") == "other keys too"


def test_queue_full():
    s = Scheduler(max_queue=2)
    started, release = threading.Event(), threading.Event()
    try:
        running = s.submit("a", blocker(started, release, "done"))
        assert started.wait(TIMEOUT)  # the running unit does not count as waiting
        queued = [s.submit("a", lambda: 1), s.submit("b", lambda: 2)]
        assert s.depth == 2
        with pytest.raises(QueueFull, match="2 units are waiting"):
            s.submit("c", lambda: 3)
        with pytest.raises(QueueFull):
            s.run("a", lambda: 4)
        release.set()
        assert running.result(TIMEOUT) == "done"
        assert [f.result(TIMEOUT) for f in queued] == [1, 2]
        assert s.run("c", lambda: 3) == 3  # room again
    finally:
        release.set()
        s.shutdown(TIMEOUT)


def test_one_user_cannot_fill_the_queue():
    """Keys are (user, session): a user's units on all their sessions (and base-model answers) share one limit."""
    s = Scheduler(max_queue=10, max_queue_per_user=2)
    started, release = threading.Event(), threading.Event()
    try:
        running = s.submit(("alice", "s1"), blocker(started, release, "done"))
        assert started.wait(TIMEOUT)
        queued = [s.submit(("alice", "s1"), lambda: 1), s.submit(("alice", None), lambda: 2)]
        with pytest.raises(QueueFull, match="this user"):
            s.submit(("alice", "s2"), lambda: 3)
        queued += [s.submit(("bob", "s1"), lambda: 4), s.submit(("bob", "s2"), lambda: 5)]  # others still get in
        release.set()
        assert running.result(TIMEOUT) == "done"
        assert [f.result(TIMEOUT) for f in queued] == [1, 2, 4, 5]
        assert s.run(("alice", "s2"), lambda: 3) == 3  # room again
    finally:
        release.set()
        s.shutdown(TIMEOUT)


def test_shutting_down_refuses_new_units():
    s = Scheduler()
    assert s.run("a", lambda: 1) == 1
    s.shutdown(TIMEOUT)
    with pytest.raises(ShuttingDown, match="shutting down"):
        s.submit("a", lambda: 2)
    with pytest.raises(ShuttingDown):
        s.run("b", lambda: 2)


def test_shutdown_finishes_queued_units():
    s = Scheduler()
    order, started, release = [], threading.Event(), threading.Event()
    first = s.submit("a", blocker(started, release))
    assert started.wait(TIMEOUT)
    queued = [s.submit(key, lambda k=key, i=i: order.append((k, i)) or (k, i)) for i in range(3) for key in "ab"]

    stopper = threading.Thread(target=s.shutdown)
    stopper.start()
    for _ in range(1000):  # until the stopper thread has closed the door (at once, barring a stalled machine)
        try:
            queued.append(s.submit("c", lambda: ("c", 0)))
        except ShuttingDown:
            break
        stopper.join(0.01)
    else:
        pytest.fail("shutdown() never refused new units")
    assert stopper.is_alive()  # it waits for the work already accepted
    release.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()

    first.result(0)
    assert all(f.done() for f in queued)
    assert [f.result(0) for f in queued[:6]] == [(k, i) for i in range(3) for k in "ab"]
    assert sorted(order) == sorted((k, i) for i in range(3) for k in "ab")
    assert s.depth == 0


def test_batchable_units_of_different_keys_run_in_one_call():
    sizes = []
    s = Scheduler(max_batch=3, on_batch=sizes.append)
    calls, started, release = [], threading.Event(), threading.Event()

    def double_all(items):
        calls.append(list(items))
        return [2 * x for x in items]

    try:
        gate = s.submit("gate", blocker(started, release))
        assert started.wait(TIMEOUT)
        futures = {
            (key, i): s.submit_batchable(key, double_all, 10 * n + i) for i in range(2) for n, key in enumerate("ABCD")
        }
        plain = s.submit("E", lambda: "plain")
        release.set()
        gate.result(TIMEOUT)
        results = {k: f.result(TIMEOUT) for k, f in futures.items()}
        assert plain.result(TIMEOUT) == "plain"
    finally:
        release.set()
        s.shutdown(TIMEOUT)

    assert results == {(key, i): 2 * (10 * n + i) for i in range(2) for n, key in enumerate("ABCD")}
    # At most max_batch items per call, each key's items in order, a key at most once per call, and the
    # sessions left behind by a full batch lead the next one.
    assert calls[0] == [0, 10, 20]
    assert calls[1] == [30, 1, 11]
    assert calls[2] == [21, 31]
    assert sizes == [3, 3, 2]
    assert s.depth == 0


def test_a_failing_batch_fails_each_of_its_units_and_the_worker_survives():
    s = Scheduler(max_batch=4)
    started, release = threading.Event(), threading.Event()

    def fail(items):
        raise RuntimeError(f"batch of {len(items)}")

    try:
        gate = s.submit("gate", blocker(started, release))
        assert started.wait(TIMEOUT)
        futures = [s.submit_batchable(key, fail, key) for key in "AB"]
        release.set()
        gate.result(TIMEOUT)
        for f in futures:
            with pytest.raises(RuntimeError, match="batch of 2"):
                f.result(TIMEOUT)
        assert s.run_batchable("A", lambda items: [x + "!" for x in items], "ok") == "ok!"
    finally:
        release.set()
        s.shutdown(TIMEOUT)
