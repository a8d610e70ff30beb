"""Answers decoded in the scheduler's batch, bridged to the event loop: what chat and completions share."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from server.http.common import failure_event, server_state, sse
from ttt.engine import check_session_id
from ttt.generate import TokenStream

MAX_TOKENS_DEFAULT = 512


@dataclass
class Event:
    """One step of an answer, for the event loop: a text delta (and its tokens' logprobs), the echoed prompt
    (``echo``: its logprobs), or the end (``done``: the finished stream; the logprobs not sent yet)."""

    index: int
    text: str | None = None
    logprobs: list = field(default_factory=list)
    done: TokenStream | None = None
    echo: bool = False


def usage(streams: list[TokenStream]) -> dict:
    prompt, completion = sum(s.prompt_tokens for s in streams), sum(s.completion_tokens for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def model_session(state, model: str) -> str | None:
    """The session a request's ``model`` names; None for the base model."""
    return None if model == state.engine.base.name else check_session_id(model)


async def answerer(state, user: str, sid: str | None, method: str) -> Callable[..., TokenStream]:
    """``Session.generate``/``complete`` of the user's session (404 now if unknown), or the engine's."""
    if sid is None:
        return getattr(state.engine, method)
    # not a device unit: it would wait behind the session's chunks, which the answer does not (chat ahead of
    # ingest); the session is loaded, if it must be, when the answer is admitted
    await asyncio.to_thread(state.sessions.check_exists, user, sid)

    def on_worker(*args, **kwargs):  # the session, brought back if it was moved meanwhile
        return getattr(state.registry.get(user, sid), method)(*args, **kwargs)

    return on_worker


class Answers:
    """A request's answers, decoded in the scheduler's batch (each row on one view of its session's weights);
    their deltas and logprobs reach the event loop as Events; a client that leaves drops its rows."""

    def __init__(self, request: Request, key, makers: list[Callable[[], TokenStream]]):
        self.metrics = server_state(request).metrics
        # Events pass from the device thread to the event loop without a thread of their own waiting on them
        # (a waiting thread per stream would cap the concurrent streams at the thread pool's size).
        self.request, self.loop, self.events = request, asyncio.get_running_loop(), asyncio.Queue()
        self.sent = [0] * len(makers)  # logprobs handed out, per row
        self.seen: set[int] = set()  # rows that have reported (the first report ends the prompt's prefill)
        self.queued = time.perf_counter()
        self.joined: float | None = None  # when its rows joined the decode batch
        self.started: float | None = None  # when the first row reported: its prompt prefilled, its first token made
        # key (user, None): base-model answers count against the user's queue limit like the rest
        self.run = server_state(request).scheduler.submit_answers(key, makers, self._on_step, self._on_join)
        self.future = self.run.future
        self.future.add_done_callback(self._measure)
        self.future.add_done_callback(lambda future: self._put(None))  # after every Event of the request

    def _put(self, event: Event | None) -> None:
        """From the device thread: ``event`` into the loop's queue (None: the end)."""
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _on_join(self) -> None:
        """On the worker, when the rows join the decode batch."""
        self.joined = time.perf_counter()

    def _on_step(self, index: int, row: TokenStream) -> None:
        """On the worker, after a step that changed ``row``: its news as Events."""
        if self.started is None:
            self.started = time.perf_counter()
            self.metrics.first_token(self.started - self.queued, self.joined - self.queued)
        if index not in self.seen and row.echo:
            self._put(Event(index, echo=True, logprobs=row.echo_logprobs))
        self.seen.add(index)
        for delta in row.take():
            self._put(Event(index, delta, row.logprobs[self.sent[index] :]))
            self.sent[index] = len(row.logprobs)
        if row.finish_reason is not None:
            self._put(Event(index, logprobs=row.logprobs[self.sent[index] :], done=row))

    def _measure(self, future) -> None:
        if self.started is not None and not future.cancelled() and future.exception() is None:
            tokens = sum(row.completion_tokens for row in future.result())
            self.metrics.answer(tokens, time.perf_counter() - self.started)

    async def result(self) -> list[TokenStream]:
        """Every answer, finished; a client that disconnects first stops them (or keeps them from starting)."""
        result = asyncio.wrap_future(self.future)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(result), 0.5)
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                if await self.request.is_disconnected():
                    self.run.cancel()
                    raise ClientDisconnect() from None

    def stream(self, events: Callable[[Event], list[dict]], first: list[dict], usage_chunk: dict | None):
        """A server-sent events response: ``first``, ``events(event)`` for each Event, then (when asked) the
        usage, then [DONE]. A failure after the 200 is said in the stream, logged and counted."""

        async def body():
            try:
                for payload in first:
                    yield sse(payload)
                while (event := await self.events.get()) is not None:
                    for payload in events(event):
                        yield sse(payload)
                try:
                    streams = self.future.result()
                except Exception as e:
                    yield sse(failure_event(self.request, e))
                    return
                if usage_chunk is not None:
                    yield sse({**usage_chunk, "usage": usage(streams)})
                yield "data: [DONE]\n\n"
            finally:
                self.run.cancel()  # a client that left: its rows leave the batch (or never join it)

        return StreamingResponse(body(), media_type="text/event-stream")
