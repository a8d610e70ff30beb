"""The scheduler alone (no model): per-session order, round robin between sessions, errors, limits, shutdown.

Every test makes the order deterministic with events: a unit that blocks the single worker until the
test has queued what it needs, then lets go.
"""

from __future__ import annotations

import threading
import time

import pytest

from server.scheduler import QueueFull, Scheduler, ShuttingDown
from ttt.pause import changing, pause_point

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


# ---- answers: iteration-level scheduling (a stand-in batch; tests/test_decode.py decodes for real) ----


class Row:
    """An answer that ends after ``steps`` tokens."""

    def __init__(self, name: str, steps: int):
        self.name, self.left, self.finish_reason = name, steps, None


class FakeBatch:
    """``ttt.decode.DecodeBatch``'s interface: rows advance one token per decode, at most ``max_rows`` at once;
    ``log`` records the rows of every step and ``clock`` advances one second per step."""

    def __init__(self, max_rows: int, clock=None):
        self.rows, self.max_rows, self.log, self.clock = [], max_rows, [], clock

    def __len__(self):
        return len(self.rows)

    def fits(self, rows):
        return len(self.rows) + len(rows) <= self.max_rows

    def fits_alone(self, rows):
        return len(rows) <= self.max_rows

    def join(self, row):
        self.rows.append(row)

    def drop(self, row):
        self.rows.remove(row)

    def clear(self):
        self.rows = []

    def prefill(self):  # its rows have no prompt: each token comes from a decode
        return []

    def decode(self):
        self.log.append(sorted(r.name for r in self.rows))
        if self.clock is not None:
            self.clock.tick()
        for r in self.rows:
            r.left -= 1
            if not r.left:
                r.finish_reason = "length"
        changed = list(self.rows)
        self.rows = [r for r in self.rows if r.finish_reason is None]
        return changed


class Clock:
    def __init__(self):
        self.now = 0.0

    def tick(self):
        self.now += 1.0

    def __call__(self):
        return self.now


def shared_device() -> tuple[Scheduler, Clock]:
    """A scheduler whose decode batch (4 rows) and units share the device at 0.25 for units, timed by a fake
    clock that moves only when a test's unit or an answer step (1 s each) moves it."""
    clock = Clock()
    return Scheduler(answers=FakeBatch(max_rows=4, clock=clock), unit_share=0.25, clock=clock), clock


def gated(s: Scheduler):
    """Hold the worker with a unit until the returned release() is called (to queue work deterministically)."""
    started, release = threading.Event(), threading.Event()
    s.submit("gate", blocker(started, release))
    assert started.wait(TIMEOUT)
    return release.set


def test_answers_of_several_requests_advance_together_and_leave_when_done():
    batch = FakeBatch(max_rows=8)
    s = Scheduler(answers=batch)
    try:
        release = gated(s)
        steps: dict[str, list[int]] = {}
        requests = [
            s.submit_answers(
                ("u", name),
                [lambda n=name, k=k: Row(n, k)],
                lambda i, row: steps.setdefault(row.name, []).append(row.left),
            )
            for name, k in (("a", 2), ("b", 4), ("c", 3))
        ]
        assert s.depth == 3
        release()
        rows = [r.future.result(TIMEOUT) for r in requests]
    finally:
        s.shutdown(TIMEOUT)
    assert [r[0].finish_reason for r in rows] == ["length"] * 3
    # one step per token of the longest answer, not per answer; finished rows leave at once
    assert batch.log == [["a", "b", "c"], ["a", "b", "c"], ["b", "c"], ["b"]]
    assert steps == {"a": [1, 0], "b": [3, 2, 1, 0], "c": [2, 1, 0]}
    assert s.depth == 0 and len(batch) == 0


def test_a_rows_first_token_goes_out_before_the_decode_forward():
    """A step prefills, hands out the first tokens, then decodes: the client of a row whose prompt is done does
    not wait for the other rows' next token to get its first."""
    order = []

    class PromptBatch(FakeBatch):  # a row's prefill gives it its first token (the row reports; its count stays)
        def __init__(self):
            super().__init__(max_rows=4)
            self.new = []

        def join(self, row):
            super().join(row)
            self.new = [row]

        def prefill(self):
            order.append("prefill")
            new, self.new = self.new, []
            return new

        def decode(self):
            order.append("decode")
            return super().decode()

    s = Scheduler(answers=PromptBatch())
    try:
        answer = s.submit_answers(
            ("u", "s"), [lambda: Row("a", 2)], lambda i, row: order.append(f"a{row.left}"), lambda: order.append("join")
        )
        answer.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert order == ["join", "prefill", "a2", "decode", "a1", "prefill", "decode", "a0"]


def test_an_answer_finished_in_the_prefill_is_not_failed_by_the_decode_after_it():
    """A row whose only token came from its prefill (max_tokens 1, a stop string) ends its request at once: its
    client has the whole answer, and a decode that fails in the same step fails only the rows still decoding."""

    class OneTokenBatch(FakeBatch):
        def prefill(self):
            for row in self.rows:
                row.left, row.finish_reason = 0, "length"
            done, self.rows = self.rows, []
            return done

        def decode(self):
            raise RuntimeError("device lost")

    s = Scheduler(answers=OneTokenBatch(max_rows=4))
    try:
        answer = s.submit_answers(("u", "s"), [lambda: Row("a", 1)], lambda i, row: None)
        assert answer.future.result(TIMEOUT)[0].finish_reason == "length"
    finally:
        s.shutdown(TIMEOUT)


def test_a_full_batch_admits_in_turn_between_users_as_rows_leave():
    batch = FakeBatch(max_rows=2)
    s = Scheduler(answers=batch)
    try:
        release = gated(s)
        names = ["alice1", "alice2", "alice3", "bob1", "bob2"]
        requests = [s.submit_answers((n[:-1], "s"), [lambda n=n: Row(n, 2)], lambda i, row: None) for n in names]
        release()
        for r in requests:
            r.future.result(TIMEOUT)
        too_big = s.submit_answers(("carol", "s"), [lambda: Row("x", 1)] * 3, lambda i, row: None)
        with pytest.raises(ValueError, match="TTT_ANSWER_KV_BYTES"):
            too_big.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    # users take turns for the free rows: alice, bob, alice, bob, alice
    assert batch.log == [
        ["alice1", "bob1"],
        ["alice1", "bob1"],
        ["alice2", "bob2"],
        ["alice2", "bob2"],
        ["alice3"],
        ["alice3"],
    ]


def test_a_cancelled_request_never_starts_and_an_active_one_leaves_at_the_next_step():
    batch = FakeBatch(max_rows=4)
    s = Scheduler(answers=batch)
    made = []
    try:
        release = gated(s)
        waiting = s.submit_answers(("u", "a"), [lambda: made.append("a") or Row("a", 5)], lambda i, row: None)
        long = s.submit_answers(
            ("u", "b"), [lambda: made.append("b") or Row("b", 1000)], lambda i, row: row.left == 990 and long.cancel()
        )
        waiting.cancel()
        release()
        rows = long.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert waiting.future.cancelled() and made == ["b"]  # never made: its session was never read
    assert rows[0].finish_reason is None and rows[0].left == 990 and len(batch.log) == 10 and len(batch) == 0


def test_ingest_gets_its_share_while_answers_decode():
    """Units (1 s each) and answer steps (1 s each) alternate by the device time each kind used: a unit starts
    when units' time with its own (expected: the last units', none at first) stays within 0.25 of the device's:
    at once, then after 6 steps, then three steps per unit; the rest run once the answers are done."""
    clock = Clock()
    batch = FakeBatch(max_rows=4, clock=clock)
    s = Scheduler(answers=batch, unit_share=0.25, clock=clock)
    order = []
    try:
        release = gated(s)

        def unit(i):
            order.append(f"U{i}")
            clock.tick()

        units = [s.submit(("ingest", "doc"), unit, i) for i in range(6)]
        answer = s.submit_answers(("chat", "s"), [lambda: Row("a", 9)], lambda i, row: order.append("A"))
        release()
        answer.future.result(TIMEOUT)
        for u in units:
            u.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(o[0] for o in order) == "UAAAAAAUAAAUUUU"


def test_users_take_turns_before_their_sessions_do(scheduler):
    order = []
    release = gated(scheduler)
    futures = [
        scheduler.submit(("alice", "s1"), order.append, "a1"),
        scheduler.submit(("alice", "s1"), order.append, "a1"),
        scheduler.submit(("alice", "s2"), order.append, "a2"),
        scheduler.submit(("alice", "s2"), order.append, "a2"),
        scheduler.submit(("bob", "s1"), order.append, "b1"),
        scheduler.submit(("bob", "s1"), order.append, "b1"),
    ]
    release()
    for f in futures:
        f.result(TIMEOUT)
    assert order == ["a1", "b1", "a2", "b1", "a1", "a2"]


def test_a_unit_submitted_next_runs_before_every_waiting_unit(scheduler):
    order = []
    release = gated(scheduler)
    futures = [
        scheduler.submit(("alice", "s1"), order.append, "a1"),
        scheduler.submit(("bob", "s1"), order.append, "b1"),
        scheduler.submit(("carol", "s1"), order.append, "c1"),
        scheduler.submit(("carol", "s1"), order.append, "c1 again"),
        scheduler.submit(("carol", "s2"), order.append, "c2"),
    ]
    futures.append(scheduler.submit_next(("carol", "s1"), order.append, "c1 next"))
    release()
    for f in futures:
        f.result(TIMEOUT)
    # then the line as it was, carol and her s1 having had their turns
    assert order == ["c1 next", "a1", "b1", "c2", "c1", "c1 again"], order


def test_answer_requests_count_against_the_users_queue_limit():
    s = Scheduler(max_queue_per_user=2, answers=FakeBatch(max_rows=4))
    try:
        release = gated(s)
        s.submit(("alice", "s"), lambda: None)
        s.submit_answers(("alice", "s"), [lambda: Row("a", 1)], lambda i, row: None)
        with pytest.raises(QueueFull, match="this user"):
            s.submit_answers(("alice", "t"), [lambda: Row("b", 1)], lambda i, row: None)
        bob = s.submit_answers(("bob", "s"), [lambda: Row("c", 1)], lambda i, row: None)
        release()
        assert bob.future.result(TIMEOUT)[0].finish_reason == "length"
    finally:
        s.shutdown(TIMEOUT)


def test_ingest_batches_shrink_while_answers_decode():
    """Batchable units take up to max_batch sessions, but max_batch_answering while answers wait or decode."""
    clock = Clock()  # units take no time, steps one second: units run as soon as they are queued
    s = Scheduler(max_batch=4, max_batch_answering=2, answers=FakeBatch(max_rows=4, clock=clock), clock=clock)
    calls = []

    def train(items):
        calls.append(list(items))
        return items

    try:
        release = gated(s)
        first = [s.submit_batchable(key, train, key) for key in "ABCD"]
        release()
        for f in first:
            f.result(TIMEOUT)
        release = gated(s)
        answer = s.submit_answers(("chat", "s"), [lambda: Row("a", 50)], lambda i, row: None)
        second = [s.submit_batchable(key, train, key + "2") for key in "ABCD"]
        release()
        for f in second:
            f.result(TIMEOUT)
        answer.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert calls == [["A", "B", "C", "D"], ["A2", "B2"], ["C2", "D2"]]


def test_a_failed_step_fails_the_answers_in_it_and_the_worker_survives():
    batch = FakeBatch(max_rows=4)
    s = Scheduler(answers=batch)
    real_decode = batch.decode

    def failing_decode():
        raise RuntimeError("device lost")

    try:
        batch.decode = failing_decode
        doomed = s.submit_answers(("u", "s"), [lambda: Row("a", 5)], lambda i, row: None)
        with pytest.raises(RuntimeError, match="device lost"):
            doomed.future.result(TIMEOUT)
        assert len(batch) == 0
        batch.decode = real_decode
        fine = s.submit_answers(("u", "s"), [lambda: Row("b", 2)], lambda i, row: None)
        assert fine.future.result(TIMEOUT)[0].finish_reason == "length"
        assert s.run("u", lambda: "units too") == "units too"
    finally:
        s.shutdown(TIMEOUT)


def test_one_long_unit_keeps_units_out_for_a_while_not_for_three_times_its_length():
    s, clock = shared_device()
    order = []
    try:
        release = gated(s)

        def unit(seconds):
            order.append("U")
            clock.now += seconds

        units = [s.submit(("ingest", "doc"), unit, 30), s.submit(("ingest", "doc"), unit, 1)]
        answer = s.submit_answers(("chat", "s"), [lambda: Row("a", 100)], lambda i, row: order.append("A"))
        release()
        for u in units:
            u.result(TIMEOUT)
        answer.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    # 180 steps if all 30 s counted, spent and expected next (3 x 60); each counted at most 5 s: 3 x (5 + 5)
    assert "".join(order).index("U", 1) - 1 == 30, "".join(order)


def test_a_feeder_that_queues_its_next_chunk_after_the_last_one_still_gets_only_its_share():
    """A document feeder submits chunk i + 1 only once chunk i is done, so at that moment no unit waits; the
    shares must not start afresh then (or every chunk would run at once: a half or more of the device)."""
    s, clock = shared_device()
    order, queued = [], []

    def chunk():
        order.append("U")
        clock.tick()
        queued.clear()

    def feed(i, row):  # the feeder's next chunk arrives while the worker is already on an answer step
        order.append("A")
        if not queued and order.count("U") < 4:
            queued.append(s.submit(("ingest", "doc"), chunk))

    try:
        release = gated(s)
        first = s.submit(("ingest", "doc"), chunk)
        answer = s.submit_answers(("chat", "s"), [lambda: Row("a", 14)], feed)
        release()
        first.result(TIMEOUT)
        answer.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(order).startswith("UAAAAAAUAAAUAAAU"), "".join(order)  # as in the share test above


@pytest.mark.parametrize("loaded", [False, True])
def test_an_answer_that_meets_waiting_units_goes_first(loaded):
    """On an idle device, an answer and units (1 s each, as the last unit took) queued at once: the answer's
    steps come first, until a unit fits the share with its expected second (before, the unit went first). The
    same after the model took a minute to load on the device thread (``run_setup``): set-up is neither units'
    time nor a sample of their seconds (as a unit it put the answer's nine steps all before the units)."""
    s, clock = shared_device()
    order = []

    def unit():
        order.append("U")
        clock.tick()

    def load():
        clock.now += 60
        return "model"

    try:
        if loaded:
            assert s.run_setup(load) == "model"
        s.run(("ingest", "doc"), clock.tick)  # the device learns that a unit takes 1 s, then idles
        with s._cond:  # queued together: the worker sees both at its next look
            units = [s.submit(("ingest", "doc"), unit) for _ in range(3)]
            answer = s.submit_answers(("chat", "s"), [lambda: Row("a", 9)], lambda i, row: order.append("A"))
        answer.future.result(TIMEOUT)
        for u in units:
            u.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(order) == "AAAUAAAUAAAU"


@pytest.mark.parametrize(
    ("time_left", "before_b", "expected"),
    [(None, [], "AAAaAAAbAAA"), (4.0, [], "AAbAAAAAaAA"), (None, ["c"], "AAAaAAAcAAAb"), (4.0, ["c"], "AAcAbAAAAAAa")],
)
def test_a_unit_whose_client_has_waited_half_its_time_left_goes_next(time_left, before_b, expected):
    """Chunks ``a`` and ``b`` (1 s each) queued with an answer of 9 steps: in turn by their share (a, then b); but
    ``b``'s client gives up 4 s after it was queued (a gRPC deadline), so 2 s on ``b`` is due: it goes ahead of
    ``a``, and units may take half the device instead of a quarter, so it runs at once; then the quarter again
    (from then on: answers' time before ``b`` went due counts only as far as it let ``b`` run). A unit ``c`` of
    b's session queued before it (an autosave) goes first, then, after an answer step (half the device), ``b``: a
    session's units run in order."""
    s, clock = shared_device()
    order = []

    def train(items):
        order.extend(items)
        clock.tick()
        return items

    try:
        s.run(("ingest", "learn"), clock.tick)  # the device learns that a unit takes 1 s; the clock is at 1
        with s._cond:  # queued together: the worker sees them all at its next look
            units = [s.submit_batchable(("ingest", "a"), train, "a")]
            units += [s.submit(("ingest", "b"), train, [name]) for name in before_b]
            units.append(s.submit_batchable(("ingest", "b"), train, "b", time_left))  # due at 1 + 4 / 2 = 3
            answer = s.submit_answers(("chat", "s"), [lambda: Row("x", 9)], lambda i, row: order.append("A"))
        answer.future.result(TIMEOUT)
        for u in units:
            u.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(order) == expected


def test_a_batch_is_cut_to_what_fits_max_unit_seconds():
    """The first batch has no estimate (4 sessions); at 1 s per session, 2.5 s then allow two per call."""
    clock = Clock()
    s = Scheduler(max_batch=4, max_unit_seconds=2.5, clock=clock)
    calls = []

    def train(items):
        calls.append(list(items))
        clock.now += len(items)
        return items

    try:
        for round_ in ("", "2"):
            release = gated(s)
            futures = [s.submit_batchable(key, train, key + round_) for key in "ABCD"]
            release()
            for f in futures:
                f.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert calls == [["A", "B", "C", "D"], ["A2", "B2"], ["C2", "D2"]]


def test_cancelled_requests_stop_counting_while_a_large_one_waits_in_front():
    s = Scheduler(max_queue_per_user=3, answers=FakeBatch(max_rows=2))
    try:
        release = gated(s)
        long = s.submit_answers(("alice", "s"), [lambda: Row("a", 10**9)] * 2, lambda i, row: None)  # fills the batch
        big = s.submit_answers(("bob", "s"), [lambda: Row("b", 1)] * 2, lambda i, row: None)  # waits in front
        gone = [s.submit_answers(("carol", "s"), [lambda: Row("c", 1)], lambda i, row: None) for _ in range(3)]
        for g in gone:
            g.cancel()
        release()
        deadline = time.monotonic() + TIMEOUT
        while s.depth > 1 and time.monotonic() < deadline:  # bob's request alone still waits
            time.sleep(0.01)
        assert s.depth == 1
        carol = s.submit_answers(("carol", "s"), [lambda: Row("c", 1)], lambda i, row: None)  # not a 429
        long.cancel()
        assert big.future.result(TIMEOUT) and carol.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)


def test_a_join_that_fails_fails_its_request_instead_of_stranding_it():
    batch = FakeBatch(max_rows=4)

    def broken_join(row):
        raise RuntimeError("out of memory")

    batch.join = broken_join
    s = Scheduler(answers=batch)
    try:
        request = s.submit_answers(("u", "s"), [lambda: Row("a", 3)], lambda i, row: None)
        with pytest.raises(RuntimeError, match="out of memory"):
            request.future.result(TIMEOUT)
        assert s.depth == 0 and s.decoding == 0
    finally:
        s.shutdown(TIMEOUT)


@pytest.mark.parametrize("other_user", ["chat", "ingest"])
def test_answers_decode_at_the_pause_points_of_a_chunk_in_training(other_user):
    """A batchable unit (chunks in training) reaches a pause point after each of its 8 "layers" (1 s each): an
    answer of another session that arrives meanwhile decodes there while answers are owed their share (three
    steps after two layers: 3 x 0.25 <= 2 x 0.75), before the unit ends; one of the unit's own session, queued
    ahead of it after the unit has begun to change its session (``changing``), is passed over and waits for the
    unit's end. The unit's session counts as busy throughout. The other session may be another user's or the
    same user's: the busy session's request ahead of it in that user's line does not hold it up."""
    s, clock = shared_device()
    order, busy, requests = [], [], []

    def on_step(i, row):
        order.append(row.name)

    def train(items):
        changing()
        for layer in range(8):
            order.append("L")
            clock.tick()
            if layer == 1:
                for key, name in ((("ingest", "doc"), "o"), ((other_user, "s"), "a")):
                    requests.append(s.submit_answers(key, [lambda n=name: Row(n, 3 if n == "a" else 2)], on_step))
            busy.append(s.waiting(("ingest", "doc")))
            pause_point()
        return items

    try:
        assert s.run_batchable(("ingest", "doc"), train, "chunk") == "chunk"
        for r in requests:
            r.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(order) == "LLaaaLLLLLLoo"
    assert all(busy) and not s.waiting(("ingest", "doc"))


@pytest.mark.parametrize(("time_left", "expected"), [(None, "LLaaaLLLLLLU"), (0.0, "LLaaLaLLLLLU")])
def test_answers_get_half_the_device_at_pause_points_while_a_unit_is_due(time_left, expected):
    """A chunk of 8 "layers" (1 s each, a pause point after each); after its second layer an answer (3 steps) and
    another session's unit ``U`` arrive. Owed their share (3/4 of the device), the answer's three steps come at
    the next pause point and ``U`` after the chunk; but while a ``U`` whose client has no time left is due,
    answers are owed only half of the device: two steps there, the third after one more layer (a due unit must
    not be stretched to four times its length by answers at every pause point)."""
    s, clock = shared_device()
    order, requests = [], []

    def other(items):
        order.extend(items)
        clock.tick()
        return items

    def train(items):
        for layer in range(8):
            order.append("L")
            clock.tick()
            if layer == 1:
                requests.append(s.submit_batchable(("ingest", "other"), other, "U", time_left))
                answer = s.submit_answers(("chat", "s"), [lambda: Row("a", 3)], lambda i, row: order.append("a"))
                requests.append(answer.future)
            pause_point()
        return items

    try:
        s.run_batchable(("ingest", "doc"), train, "chunk")
        for r in requests:
            r.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(order) == expected


def test_the_units_own_session_answers_at_its_pause_points_until_it_changes_the_session():
    """Before the unit's first change to its sessions (a chunk's optimizer step), an answer of its own session
    decodes at its pause points like any other (it sees the session as before the unit); one that arrives after
    the change waits for the unit's end."""
    s, clock = shared_device()
    order, requests = [], []

    def on_step(i, row):
        order.append(row.name)

    def train(items):
        for layer in range(8):
            order.append("L")
            clock.tick()
            if layer in (1, 4):
                name = "o" if layer == 1 else "p"
                requests.append(s.submit_answers(("ingest", "doc"), [lambda n=name: Row(n, 2)], on_step))
            if layer == 3:
                changing()
            pause_point()
        return items

    try:
        s.run_batchable(("ingest", "doc"), train, "chunk")
        for r in requests:
            r.future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(order) == "LLooLLLLLLpp"


def test_a_unit_that_is_not_batchable_does_not_pause():
    """Loads, saves and the like run whole: their pause points (if any code they call has some) do nothing."""
    s, clock = shared_device()
    order, requests = [], []

    def load():
        order.append("U")
        clock.tick()
        requests.append(s.submit_answers(("chat", "s"), [lambda: Row("a", 2)], lambda i, row: order.append("a")))
        pause_point()
        order.append("U")

    try:
        s.run(("ingest", "doc"), load)
        requests[0].future.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    assert "".join(order) == "UUaa"


def test_a_unit_that_goes_due_after_a_long_share_leaves_answers_half_the_device():
    """Answers have had 3/4 of the device for a while (units and steps 1 s each); then a chunk of 10 "layers" whose
    client has no time left arrives. From then on units are owed half of the device, not half of all the time
    before: they catch up for a moment, then answers step at every other pause point of the chunk. (Before, the
    units' lead was bounded at the old quarter: at a half they were owed the chunk whole, and every chunk due
    after it, while every answer waited.)"""
    s, clock = shared_device()
    order, due = [], []

    def unit():
        order.append("U")
        clock.tick()

    def train(items):
        for _ in range(10):
            order.append("L")
            clock.tick()
            pause_point()
        return items

    def step(i, row):
        order.append("a")
        if order.count("a") == 24:
            due.append(s.submit_batchable(("ingest", "other"), train, "chunk", 0.0))

    try:
        release = gated(s)
        units = [s.submit(("ingest", "doc"), unit) for _ in range(20)]
        answer = s.submit_answers(("chat", "s"), [lambda: Row("a", 40)], step)
        release()
        answer.future.result(TIMEOUT)
        for f in [*units, *due]:
            f.result(TIMEOUT)
    finally:
        s.shutdown(TIMEOUT)
    trace = "".join(order)
    assert trace[trace.index("L") : trace.rindex("L") + 1] == "LLaLaLaLaLaLaLaLaL", trace
