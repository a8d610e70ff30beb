"""The scheduler owns the device: one worker thread runs every piece of model work, one step at a time.

Two kinds of work:
* A *unit* is a short call (train one chunk, load or save a session). Units of one session run in the
  order they were submitted (but for ``submit_next``'s, which go before every waiting unit). Users take
  turns unit by unit (round robin), and so do each user's sessions, so a long ingest yields the device at
  every chunk boundary and one user's many sessions weigh no more than another user's one.
* An *answer* is one chat or completion request: one or more rows (``ttt.generate.TokenStream``) made on the
  worker when the request is admitted (so each sees one version of its session's weights) and decoded in
  the ``ttt.decode.DecodeBatch``: every step advances every admitted row by one token in one forward.
  Requests join at the next step while the batch has room (rows and key/value bytes), in round robin
  between users; finished rows and those whose client has gone leave at once.

Chat ahead of ingest: while answers are being decoded and units wait, a unit starts only if, with what the
next unit is expected to take (the running mean of the last units'), units' share of the device time (since
both kinds last started to compete; what one long unit took beyond its share counts at most
SHARE_DEBT_SECONDS, and answers' time beyond theirs at most what lets units run their next unit and
UNITS_CATCH_UP_SECONDS more) stays within ``unit_share``. So an answer that arrives while only units ran goes
first, answers then wait at most one unit between their tokens, and ingest never starves. While answers wait or
decode, batchable units batch at most ``max_batch_answering`` sessions; a batch is also no longer than
``max_unit_seconds`` is expected to allow (by the running mean of its function's seconds per item; at least one
item), whether answers run or not.

Pause points: a batchable unit (chunks in training) reaches one before each layer's forward and backward
(``ttt.pause``). There the worker runs answer steps while answers are owed their share, so an answer that
arrives meanwhile waits for a layer, not for the chunks. Requests of the unit's own sessions are admitted there
too until its first optimizer step (``ttt.pause.changed``: they see the session as it was before the unit, the
chunk's tokens read but not yet learned, as if they had come a moment earlier); from that step to the unit's end
they wait for its end (the weights are changing).

A unit whose client has a deadline (``time_left``: a gRPC stream's, for each chunk) is due once it has waited
half the time its client had left: from then on its session goes ahead of the other sessions (the earliest due
first; the session's units before it, an autosave or a prefix warming, run first, as they must), and units' share
of the device is ``DUE_SHARE`` (a half) instead of ``unit_share`` while any unit is due, at picks and at pause
points alike, so that it still has the other half of its time to run. A client's deadline is a promise to wait
that long and no longer: under a full device the share alone let a stream wait past it (8 streams sharing a
quarter of a CPU wait about a minute each for their chunk, against the load test's 120-s deadline, and answers at
every pause point stretch a chunk to four times its length). Strict priority met the deadlines too, but chains of
due chunks then kept every answer out for up to 24 s.

A *batchable* unit (``submit_batchable``) names a function that runs several sessions' units of its
kind in one call (``ttt.session.train_sessions``: one forward and backward for many sessions' chunks).
When such a unit reaches the front, the front units of up to ``max_batch - 1`` other sessions of the
same kind join it; each of those sessions then goes to the back of the line as if it had had its turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.errors import QueueFull, ShuttingDown
from ttt.pause import changed, pausing

log = logging.getLogger("ttt.server.scheduler")
SHARE_DEBT_SECONDS = 5.0  # units' device time past their share counts at most this much
# units owed more than their next unit run at most this much more in a row (about a pause point's distance): the
# rest of what they are owed is forgotten, not run while every answer waits
UNITS_CATCH_UP_SECONDS = 0.25
RECENT_WEIGHT = 0.3  # weight of the latest unit in the running means of units' durations
ANSWER_GRACE_SECONDS = 1.0  # each kind counts as present this long after it last ran (its next piece of work comes)
DUE_AFTER = 0.5  # of the time its client had left when a unit was submitted: then it is due
DUE_SHARE = 0.5  # units' share of the device while one is due (answers still get the other half)
CLIENT_CHECK_SECONDS = 0.25  # how often a handler waiting for a unit asks whether its client is still there
BatchFn = Callable[[Sequence[Any]], Sequence[Any]]  # items -> one result per item, same order


@dataclass(frozen=True)
class Unit:
    fn: Callable  # a BatchFn when batchable, called with the items of every unit in its batch
    args: tuple  # batchable: (item,)
    future: Future
    batchable: bool = False
    due: float | None = None  # clock time from which it goes next (its client's deadline nears); None: never
    setup: bool = False  # loading the model: neither units' share of the device nor a sample of their seconds


class Rows(Protocol):
    """What the scheduler needs of ``ttt.decode.DecodeBatch`` (rows are ``TokenStream``s)."""

    def __len__(self) -> int: ...

    def fits(self, rows: list) -> bool: ...

    def fits_alone(self, rows: list) -> bool: ...

    def join(self, row) -> None: ...

    def drop(self, row) -> None: ...

    def clear(self) -> None: ...

    def prefill(self) -> list: ...

    def decode(self) -> list: ...


@dataclass(eq=False)
class AnswerRequest:
    """One request's rows: ``makers`` build them on the worker; ``on_join()`` is called on the worker when they
    join the decode batch, ``on_step(index, row)`` after each phase of a step (prefill, decode) that changed row
    ``index``; ``future`` ends with the rows once all have finished."""

    key: Hashable
    makers: list[Callable[[], Any]]
    on_step: Callable[[int, Any], None]
    on_join: Callable[[], None] = lambda: None
    future: Future = field(default_factory=Future)
    rows: list = field(default_factory=list)
    gone: bool = False

    def cancel(self) -> None:
        """The client has gone: not started, it never starts; decoding, its rows leave at the next step."""
        self.gone = True
        self.future.cancel()


def running_mean(mean: float, value: float) -> float:
    """The running mean after ``value`` (the first value, when ``mean`` is 0)."""
    return value if not mean else (1 - RECENT_WEIGHT) * mean + RECENT_WEIGHT * value


def result_for_client(future: Future, is_active: Callable[[], bool]) -> Any:
    """``future``'s result while the client that waits for it is there; None once ``is_active()`` says it has
    gone: a unit not started yet is cancelled (it never runs), one running ends unseen. So a handler never holds
    its client's resources (a stream slot, the session's feed) for a unit nobody waits for."""
    while True:
        try:
            return future.result(timeout=CLIENT_CHECK_SECONDS)
        except TimeoutError:
            if not is_active():
                future.cancel()
                return None


def owner(key: Hashable) -> Hashable:
    """Whose work a key is: keys are (user, session) pairs; another key is its own owner."""
    return key[0] if isinstance(key, tuple) and key else key


class Scheduler:
    def __init__(
        self,
        max_queue: int = 1024,
        max_batch: int = 1,
        on_batch: Callable[[int], None] = lambda n: None,
        max_queue_per_user: int | None = None,
        answers: Rows | None = None,
        unit_share: float = 0.25,
        on_answer_step: Callable[[int], None] = lambda rows: None,
        clock: Callable[[], float] = time.perf_counter,
        max_batch_answering: int = 1,
        max_unit_seconds: float | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 0 < unit_share < 1:
            raise ValueError("unit_share must be in (0, 1): 1 would keep answers out while any unit waits")
        self.max_queue, self.max_batch, self.unit_share = max_queue, max_batch, unit_share
        self.max_batch_answering = max_batch_answering  # max_batch while answers wait or decode
        self.max_unit_seconds = max_unit_seconds  # a batch's expected seconds at most (None: no bound)
        self._unit_seconds = 0.0  # running mean of a unit call's seconds: the next one's expected duration
        # batch function (few, module-level: train_batch) -> running mean of its seconds per item
        self._item_seconds: dict[Callable, float] = {}
        self.max_queue_per_user = max_queue_per_user or max_queue  # one user cannot fill the whole queue
        self._per_owner: Counter[Hashable] = Counter()
        self.on_batch = on_batch  # told the number of units in each batchable call (metrics)
        self.on_answer_step = on_answer_step  # told the number of rows after each answer step (metrics)
        self._users: OrderedDict[Hashable, OrderedDict[Hashable, deque[Unit]]] = OrderedDict()  # user -> key -> units
        self.answers = answers  # the decode batch; None: answers are plain units
        self._requests: OrderedDict[Hashable, deque[AnswerRequest]] = OrderedDict()  # user -> requests waiting
        self._active: list[AnswerRequest] = []  # admitted: their rows are in the batch
        self._spent = {"units": 0.0, "answers": 0.0}  # device seconds of each kind since both started to compete
        self.clock = clock
        self._answered = -ANSWER_GRACE_SECONDS  # when the last answer step ran
        self._units_done = -ANSWER_GRACE_SECONDS  # when the last unit ended
        self._waiting = 0
        self._in_flight: set[Hashable] = set()  # the keys of the unit(s) running
        self._due_in_flight: float | None = None  # when the unit(s) running became or become due (None: never)
        self._mark = 0.0  # since when the device's time counts for the kind of work running
        self._unit_own = 0.0  # the running unit's seconds so far, without the answer steps at its pause points
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="ttt-device", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Units and answer requests waiting (not counting the ones running)."""
        return self._waiting

    @property
    def answers_waiting(self) -> int:
        """Answer requests waiting to join the decode batch."""
        with self._cond:
            return sum(len(line) for line in self._requests.values())

    @property
    def decoding(self) -> int:
        """Answer requests admitted to the decode batch."""
        return len(self._active)

    def waiting(self, key: Hashable) -> bool:
        """Units of session ``key`` are queued or running (it must stay where it is)."""
        with self._cond:
            return key in self._users.get(owner(key), ()) or key in self._in_flight

    def submit(self, key: Hashable, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)`` behind the session ``key``'s earlier units; returns its Future."""
        return self._queue(key, Unit(fn, args, Future()))

    def _due(self, time_left: float | None) -> float | None:
        """When a unit whose client gives up in ``time_left`` seconds (None: never) goes next: once it has waited
        ``DUE_AFTER`` of them."""
        return None if time_left is None else self.clock() + DUE_AFTER * max(time_left, 0.0)

    def submit_next(self, key: Hashable, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)`` as the next unit to run, ahead of every waiting unit, session ``key``'s own included
        (answers still go first; ``key`` then has had its turn). Only for short units whose order against the
        session's others does not matter: those that prepare for a question that may come soon (``warm_prefix``)
        and those a client waits for before it can send anything (opening a stream's feed: behind the other
        sessions' chunks, under a full device it waited a minute)."""
        return self._queue(key, Unit(fn, args, Future()), first=True)

    def submit_batchable(self, key: Hashable, batch: BatchFn, item: Any, time_left: float | None = None) -> Future:
        """Queue ``batch([item, ...])[i]``: may run in one call with other sessions' items for ``batch``.
        ``time_left``: seconds until the client waiting for it gives up (the module's docstring)."""
        return self._queue(key, Unit(batch, (item,), Future(), batchable=True, due=self._due(time_left)))

    def run(self, key: Hashable, fn: Callable, *args) -> Any:
        """``submit`` and wait for the result (exceptions are re-raised in the caller's thread)."""
        return self.submit(key, fn, *args).result()

    def run_setup(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the device thread and wait: set-up before serving (loading the model, so that the
        thread that runs every forward made its tensors: a CPU's bf16 kernels keep state per thread)."""
        return self._queue("setup", Unit(fn, args, Future(), setup=True)).result()

    def run_batchable(self, key: Hashable, batch: BatchFn, item: Any) -> Any:
        return self.submit_batchable(key, batch, item).result()

    def submit_answers(
        self,
        key: Hashable,
        makers: list[Callable[[], Any]],
        on_step: Callable[[int, Any], None],
        on_join: Callable[[], None] = lambda: None,
    ) -> AnswerRequest:
        """Queue one request's answers (see ``AnswerRequest``) for the decode batch."""
        if self.answers is None:
            raise RuntimeError("this scheduler has no decode batch")
        request = AnswerRequest(key, makers, on_step, on_join)
        with self._cond:
            self._admit_check(key)
            self._requests.setdefault(owner(key), deque()).append(request)
            self._count(key, +1)
            self._cond.notify()
        return request

    def _admit_check(self, key: Hashable) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._waiting >= self.max_queue:
            raise QueueFull(f"{self._waiting} units are waiting for the device")
        if self._per_owner[owner(key)] >= self.max_queue_per_user:
            raise QueueFull(f"{self.max_queue_per_user} units of this user are already waiting for the device")

    def _count(self, key: Hashable, n: int) -> None:
        """One more (+1) or one fewer (-1) unit or request of ``key``'s user waiting. Call with the lock held."""
        self._waiting += n
        self._per_owner[owner(key)] += n
        if not self._per_owner[owner(key)]:
            del self._per_owner[owner(key)]

    def _queue(self, key: Hashable, unit: Unit, first: bool = False) -> Future:
        with self._cond:
            self._admit_check(key)
            keys = self._users.setdefault(owner(key), OrderedDict())
            queue = keys.setdefault(key, deque())
            if first:
                queue.appendleft(unit)
                self._users.move_to_end(owner(key), last=False)
                keys.move_to_end(key, last=False)
            else:
                queue.append(unit)
            self._count(key, +1)
            self._cond.notify()
        return unit.future

    def _pop_front(self, key: Hashable) -> Unit:
        """Take ``key``'s front unit; ``key`` goes to the back of its user's line and the user to the back of
        the users'. Call with the lock held."""
        user = owner(key)
        keys = self._users.pop(user)
        queue = keys.pop(key)
        unit = queue.popleft()
        if queue:
            keys[key] = queue
        if keys:
            self._users[user] = keys
        self._count(key, -1)
        return unit

    def _line(self) -> list[Hashable]:
        """Keys with units waiting, in turn order: users in turn, each user's sessions in turn."""
        return [key for keys in self._users.values() for key in keys]

    def _most_due(self) -> Hashable | None:
        """The key with the unit due longest (its client's deadline nears; the units before it in the key's line
        run first, as they must), None while none is due. Call with the lock held."""
        now, found = self.clock(), None
        for keys in self._users.values():
            for key, queue in keys.items():
                due = min((u.due for u in queue if u.due is not None), default=None)
                if due is not None and due <= now and (found is None or due < found[0]):
                    found = due, key
        return found and found[1]

    def _take_units(self) -> list[Unit]:
        """The next unit (and the batchable units that join it). Call with the lock held."""
        first = self._most_due()
        if first is None:
            first = next(iter(next(iter(self._users.values()))))  # the user, then their session, that waited longest
        units = [self._pop_front(first)]
        self._in_flight = {first}
        # while answers wait or decode (or did a moment ago: their clients ask again), a batch is as long as its
        # slowest part times its size: keep it short
        answering = self._active or self._requests or self.clock() - self._answered < ANSWER_GRACE_SECONDS
        most = self.max_batch_answering if answering else self.max_batch
        per_item = self._item_seconds.get(units[0].fn)
        if per_item and self.max_unit_seconds is not None:
            most = max(1, min(most, int(self.max_unit_seconds / per_item)))
        if units[0].batchable:
            for key in self._line():  # the others, in line order
                if len(units) >= most:
                    break
                if key == first or key not in self._users.get(owner(key), ()):
                    continue
                front = self._users[owner(key)][key][0]
                if front.batchable and front.fn is units[0].fn:
                    units.append(self._pop_front(key))
                    self._in_flight.add(key)
        self._due_in_flight = min((u.due for u in units if u.due is not None), default=None)
        return units

    def _pick(self) -> str | None:
        """What the worker does next: "units", "answers" or None (wait). Call with the lock held."""
        answers, units = bool(self._active or self._requests), bool(self._users)
        if not (answers and units):
            # no contention: the shares start afresh, unless units were here a moment ago (a document feeder
            # queues its next chunk only once the last one is done)
            if not answers or self.clock() - self._units_done > ANSWER_GRACE_SECONDS:
                self._spent = {"units": 0.0, "answers": 0.0}
            return "units" if units else "answers" if answers else None
        # units' share after the next unit, d (expected; counted at most SHARE_DEBT_SECONDS, as a long unit is):
        # (u + d) / (u + a + d) <= share. So when both start to compete, answers go first.
        units_after = self._spent["units"] + min(self._unit_seconds, SHARE_DEBT_SECONDS)
        share = self._share()
        return "units" if (1 - share) * units_after <= share * self._spent["answers"] else "answers"

    def _share(self) -> float:
        """Units' share of the device now: ``unit_share``, or ``DUE_SHARE`` while a unit is due (the one in flight
        or one waiting). Call with the lock held."""
        flight = self._due_in_flight is not None and self._due_in_flight <= self.clock()
        return max(self.unit_share, DUE_SHARE) if flight or self._most_due() is not None else self.unit_share

    def _run(self) -> None:
        while True:
            with self._cond:
                while (kind := self._pick()) is None:
                    if self._closed:
                        return
                    self._cond.wait()
                units = self._take_units() if kind == "units" else []
                self._mark, self._unit_own = self.clock(), 0.0
            if kind == "units":
                units = self._run_units(units)
            else:
                self._answer_step()
            with self._cond:
                setup = bool(units) and units[0].setup
                if setup:
                    self._mark = self.clock()
                else:
                    self._charge(kind)
                self._in_flight, self._due_in_flight = set(), None
                if kind == "units":
                    self._units_done = self.clock()
                    if units and not setup:
                        self._learn(units, self._unit_own)

    def _charge(self, kind: str) -> float:
        """The device's time since ``_mark`` goes to ``kind``; returns units' share now (``_share``, which scans
        the waiting units: once per charge). Call with the lock held."""
        now = self.clock()
        seconds, self._mark = now - self._mark, now
        spent = self._spent
        spent[kind] += seconds
        if kind == "units":
            self._unit_own += seconds
        # each kind's lead over its share (the share now: it rises while a unit is due) is bounded. Units': one
        # long unit keeps units out for a while, not for (1 - share) / share times its length. Answers': when the
        # share rises, units are owed it from then on, not on all the time before (a run of units as long as
        # that while every answer waits); they may run their next unit and UNITS_CATCH_UP_SECONDS more.
        share = self._share()
        spent["units"] = min(spent["units"], spent["answers"] * share / (1 - share) + SHARE_DEBT_SECONDS)
        units_owed = min(self._unit_seconds, SHARE_DEBT_SECONDS) + UNITS_CATCH_UP_SECONDS
        spent["answers"] = min(spent["answers"], (spent["units"] + units_owed) * (1 - share) / share)
        return share

    def _pause(self) -> None:
        """At a pause point of the batchable unit in flight (``ttt.pause``): answer steps while answers are owed
        their share of the device (half of it while a unit is due: ``_share``). Requests of the unit's own sessions
        are admitted only while it has not changed them yet (the module's docstring)."""
        while True:
            with self._cond:
                share = self._charge("units")
                owed = (
                    bool(self._active or self._requests)
                    and (1 - share) * self._spent["units"] > share * self._spent["answers"]
                )
            if not owed:
                return
            stepped = self._answer_step(busy=self._in_flight if changed() else frozenset())
            with self._cond:
                self._charge("answers")
            if not stepped:
                return

    def _run_units(self, units: list[Unit]) -> list[Unit]:
        """Run ``units`` (one call for a batch), settle their futures; returns those that ran (not cancelled)."""
        units = [u for u in units if u.future.set_running_or_notify_cancel()]
        if not units:
            return units
        try:
            if units[0].batchable:
                self.on_batch(len(units))
                # answers decode at the batch's pause points (the chunks' layers): they wait for a layer, not a chunk
                with pausing(self._pause) if self.answers is not None else nullcontext():
                    results = units[0].fn([u.args[0] for u in units])
            else:
                results = [units[0].fn(*units[0].args)]
        except BaseException as e:  # delivered to the waiting handlers
            for u in units:
                u.future.set_exception(e)
            return units
        for u, result in zip(units, results, strict=True):
            u.future.set_result(result)
        return units

    def _learn(self, units: list[Unit], seconds: float) -> None:
        """Update the expected durations with ``units``' call, which took ``seconds``. Call with the lock held."""
        self._unit_seconds = running_mean(self._unit_seconds, seconds)
        if units[0].batchable:
            fn = units[0].fn
            self._item_seconds[fn] = running_mean(self._item_seconds.get(fn, 0.0), seconds / len(units))

    # ---- answers ----

    def _answer_step(self, busy: set[Hashable] = frozenset()) -> bool:
        """Admit what fits (not requests of the ``busy`` sessions), advance every row by one token, hand out what
        changed, end what finished. False: there was no row to advance. A failed step fails every answer in
        the batch; the batch starts empty."""
        try:
            return self._try_answer_step(busy)
        except Exception as e:
            log.exception("decode step failed")
            self._fail_answers(e)
            return True

    def _try_answer_step(self, busy: set[Hashable]) -> bool:
        batch = self.answers
        for request in [r for r in self._active if r.gone]:
            self._end(request)
        self._admit(busy)
        stepped = len(batch) > 0
        if stepped:
            # the first tokens go out before the decode forward: a client's first token does not wait for every
            # other row's next one
            self._hand_out(batch.prefill())
            self._hand_out(batch.decode())
        self.on_answer_step(len(batch))
        self._answered = self.clock()
        return stepped

    def _hand_out(self, changed: list) -> None:
        """Tell each request the rows of its that ``changed``; a request whose listener breaks ends with the
        error (the others go on), one whose rows have all finished ends with them (a decode that fails after
        does not fail an answer its client has whole)."""
        rows = {id(row): (request, i) for request in self._active for i, row in enumerate(request.rows)}
        failed: dict[int, tuple[AnswerRequest, Exception]] = {}
        for row in changed:
            request, index = rows[id(row)]
            try:
                request.on_step(index, row)
            except Exception as e:
                failed[id(request)] = request, e
        for request, error in failed.values():
            self._end(request, error)
        for request in [r for r in self._active if all(row.finish_reason is not None for row in r.rows)]:
            self._end(request)

    def _fail_answers(self, error: Exception) -> None:
        """Every admitted request ends with ``error``; the batch is emptied (its state is not trusted)."""
        self.answers.clear()
        for request in self._active:
            request.future.set_exception(error)
        self._active.clear()

    def _end(self, request: AnswerRequest, error: BaseException | None = None) -> None:
        """Take a request's rows out of the batch and settle its future."""
        self._active.remove(request)
        for row in request.rows:
            if row.finish_reason is None:
                self.answers.drop(row)
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(request.rows)

    def _admit(self, busy: set[Hashable]) -> None:
        """Requests join in turn between users while the batch has room. A request's rows are made once, when
        it first reaches the front (each then sees one version of its session); one that does not fit yet
        waits there, with every request behind it, so that a large request is not overtaken forever. Requests
        of ``busy`` sessions are passed over and keep their places: a user's turn goes to its first request for
        a session that is not busy (one session in training does not hold up the user's others)."""
        self._forget_cancelled()
        while True:
            with self._cond:
                found = next(((u, r) for u, line in self._requests.items() for r in line if r.key not in busy), None)
                if found is None:
                    return
                user, request = found
            if request.future.cancelled():  # its client left while it waited
                self._unqueue(user, request)
                continue
            if not request.rows:
                try:
                    request.rows = [make() for make in request.makers]
                    if not self.answers.fits_alone(request.rows):
                        raise ValueError(
                            "the answer needs more keys/values than the server's answer pool holds "
                            "(TTT_ANSWER_KV_BYTES, TTT_MAX_ANSWER_ROWS): ask for fewer max_tokens"
                        )
                except Exception as e:
                    self._unqueue(user, request)
                    if request.future.set_running_or_notify_cancel():
                        request.future.set_exception(e)
                    continue
            if not self.answers.fits(request.rows):
                return
            self._unqueue(user, request)
            if request.future.set_running_or_notify_cancel():
                self._active.append(request)  # first: a join that fails fails it with the batch, never strands it
                request.on_join()
                for row in request.rows:
                    self.answers.join(row)

    def _forget_cancelled(self) -> None:
        """Requests whose clients left while they waited stop counting against their users' limits."""
        with self._cond:
            for user in list(self._requests):
                line = self._requests[user]
                for request in [r for r in line if r.future.cancelled()]:
                    line.remove(request)
                    self._count(request.key, -1)
                if not line:
                    del self._requests[user]

    def _unqueue(self, user: Hashable, request: AnswerRequest) -> None:
        """Remove ``user``'s ``request``; the user goes to the back of the line."""
        with self._cond:
            line = self._requests.pop(user)
            line.remove(request)
            if line:
                self._requests[user] = line
            self._count(request.key, -1)

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what was accepted, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
