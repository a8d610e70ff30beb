"""One document arriving in pieces into one session; shared by the gRPC stream and the HTTP upload.

Pieces are tokenized in the caller's thread (no device), checked against the per-document limit,
and every chunk they complete is trained on the scheduler's worker, one unit per chunk; chunks of
several sessions that reach the device together train in one batched step (``ttt.batch``). A session asked
while it reads has its answers' prefix brought up to date (under the new weights, with the tokens read since)
in a unit after each piece it reads (``Session.warm_prefix``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future

from server.errors import QueueFull, QuotaExceeded
from server.registry import SessionRegistry
from server.scheduler import Scheduler, result_for_client
from ttt import Session, SessionConfig
from ttt.config import PER_CHUNK, check_caps
from ttt.ingest import ChunkReport
from ttt.session import TokenLimit, train_sessions


class DocumentTooLarge(QuotaExceeded):
    """More tokens than one document (stream or upload) may add."""


def stream_settings(config: SessionConfig, requested: dict) -> dict:
    """The step settings a stream asks for; the others shape the session and must match it."""
    check_caps(requested)
    current = config.to_dict()
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    fixed = [
        f"{section}.{name}"
        for section, values in requested.items()
        if section != "memory"
        for name, value in values.items()
        if not (section == "ingest" and name in PER_CHUNK) and plain(current[section][name]) != plain(value)
    ]
    if requested.get("memory", config.memory) != config.memory:
        fixed.append("memory")
    if fixed:
        raise ValueError(f"{', '.join(sorted(fixed))} can only be set when the session is created")
    step = {k: v for k, v in requested.get("ingest", {}).items() if k in PER_CHUNK}
    dataclasses.replace(config.ingest, **step)  # validates them now, not at the first chunk
    return step


def chunk_progress(report: ChunkReport, session: Session) -> dict:
    """What both doors say of one trained chunk (gRPC's ChunkProgress; NaN and None where nothing was measured)."""
    return {
        "index": report.index,
        "tokens": report.tokens,
        "loss_before": report.loss_before,
        "loss_after": report.loss_after,
        "seconds": report.seconds,
        "tokens_per_second": report.tokens / report.seconds if report.seconds > 0 else 0.0,
        "tokens_ingested": session.stats.tokens_ingested,
        "pending_tokens": len(session.pending),
        "rolled_back": report.rolled_back,
        "error": report.error,
    }


def train_batch(items: Sequence[tuple[Session, dict]]) -> list[ChunkReport | None]:
    """The next chunk of each (session, step settings): compatible sessions train in one batched step."""
    sessions, settings = zip(*items, strict=True)
    return train_sessions(sessions, settings)


class DocumentFeed:
    """Feeds one document into ``session``; iterate ``add``/``end`` to train the chunks they complete."""

    def __init__(
        self,
        session: Session,
        user: str,
        scheduler: Scheduler,
        registry: SessionRegistry,
        *,
        max_tokens: int,
        max_pieces: int,
        autosave_every: int,
        step_settings: dict | None = None,
        is_active: Callable[[], bool] = lambda: True,
        time_left: Callable[[], float | None] = lambda: None,
        on_chunk: Callable[[ChunkReport], None] = lambda report: None,
    ):
        self.session, self.user, self.scheduler, self.registry = session, user, scheduler, registry
        self.key = (user, session.id)
        self.max_tokens, self.max_pieces, self.autosave_every = max_tokens, max_pieces, autosave_every
        self.pieces = 0
        self.step_settings = step_settings or {}
        self.is_active = is_active  # False once the client has gone: stop before the next chunk
        self.time_left = time_left  # seconds until the client gives up (its deadline; None: no deadline)
        self.on_chunk = on_chunk  # metrics
        self.received = 0  # tokens this document added
        self.trained = 0
        self.warming: Future | None = None  # the last warm_prefix unit submitted
        self.loss_sum = 0.0
        self.started = time.perf_counter()

    @classmethod
    def for_server(cls, state, session: Session, user: str, **options) -> DocumentFeed:
        """A feed under the running server's limits (``state``: ``server.main.ServerState``), counted in its
        metrics; ``options``: ``step_settings``, ``is_active``, ``time_left``."""
        s = state.settings
        return cls(
            session,
            user,
            state.scheduler,
            state.registry,
            max_tokens=s.max_document_tokens,
            max_pieces=s.max_pieces_per_stream,
            autosave_every=s.autosave_every_chunks,
            on_chunk=state.metrics.chunk,
            **options,
        )

    def add(self, piece: str | bytes | list[int]) -> Iterator[ChunkReport]:
        """Add text, UTF-8 bytes (may split a character) or token ids; train the chunks now complete.

        Over the document or piece limit nothing of the piece is kept (QuotaExceeded).
        """
        if not piece:
            raise ValueError("empty message: send text, UTF-8 bytes or token ids")
        if self.pieces >= self.max_pieces:
            raise QuotaExceeded(f"more than {self.max_pieces} pieces in one stream: send larger pieces")
        self.pieces += 1
        try:
            self.received += self.session.append(piece, limit=self.max_tokens - self.received)
        except TokenLimit:
            raise DocumentTooLarge(f"document over the limit of {self.max_tokens} tokens") from None
        yield from self._train_ready()

    def end(self) -> Iterator[ChunkReport]:
        """The document is complete: train what is left, the last partial chunk included."""
        self.received += self.session.end_document()
        yield from self._train_ready()

    def _train_ready(self) -> Iterator[ChunkReport]:
        while self.is_active() and self.session.chunks_ready:
            self.registry.check_held(*self.key, self.session)  # LeaseLost: another server took the session over
            item = (self.session, self.step_settings)
            # a client with a deadline has its chunk run before it gives up (``Scheduler``: due units)
            unit = self.scheduler.submit_batchable(self.key, train_batch, item, self.time_left())
            # a client gone before its chunk's turn: the chunk stays pending for its next stream
            report = result_for_client(unit, self.is_active)
            if report is None:
                return
            self.trained += 1
            self.on_chunk(report)
            if math.isfinite(report.loss_before):
                self.loss_sum += report.loss_before
            if self.registry.chunks_since_save(*self.key) >= self.autosave_every:
                self.scheduler.submit(self.key, self.registry.save, *self.key)
            yield report
        self._warm()

    def _warm(self) -> None:
        """A session asked while it reads: the next question's prefix brought up to date in a unit of its own
        (``Session.warm_prefix``), one at a time, next in line: behind other sessions' units it came too late
        for half of the questions under load (each then built the prefix itself, 0.6-1.1 s on a CPU)."""
        if self.session.talked_to and (self.warming is None or self.warming.done()):
            with contextlib.suppress(QueueFull):  # only a head start: the question builds it otherwise
                self.warming = self.scheduler.submit_next(self.key, self.session.warm_prefix)

    def summary(self) -> dict:
        return {
            "session_id": self.session.id,
            "tokens_received": self.received,
            "chunks_trained": self.trained,
            "tokens_ingested": self.session.stats.tokens_ingested,
            "pending_tokens": len(self.session.pending),
            "mean_loss_before": self.loss_sum / self.trained if self.trained else math.nan,
            "seconds": time.perf_counter() - self.started,
        }

    async def events(
        self, body: AsyncIterator[bytes], end_of_document: bool, gone: Callable[[], bool]
    ) -> AsyncIterator[dict]:
        """The HTTP upload: read ``body`` piece by piece and train what each piece completes, off the event loop;
        one ``document.chunk`` event per trained chunk (with how much of the body was read), then the summary.
        ``gone()`` is asked before each chunk: a client gone leaves the rest pending and the document not ended."""
        read = 0

        async def trained(reports: Iterator[ChunkReport]) -> AsyncIterator[dict]:
            while not gone() and (report := await asyncio.to_thread(next, reports, None)) is not None:
                yield {
                    "object": "document.chunk",
                    **chunk_progress(report, self.session),
                    "tokens_received": self.received,
                    "bytes_read": read,
                }

        async for piece in body:
            if piece:
                read += len(piece)
                async for event in trained(self.add(piece)):
                    yield event
        if end_of_document:
            async for event in trained(self.end()):
                yield event
        yield {"object": "document.summary", **self.summary(), "bytes_read": read}
