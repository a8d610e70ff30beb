"""Session = fast weights + optimizer state + a bounded window of recent tokens + stats.

Memory per session does not grow with the document: the fast weights and optimizer state have a
fixed size, the window holds at most ``context_tokens`` tokens, and untrained tokens are at most a chunk
(plus whatever a single append brought, until it is trained).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .answers import Answering, HeldPrefix
from .batch import ChunkItem, train_chunks
from .cache import RollingContext
from .config import PER_CHUNK, IngestConfig, SessionConfig
from .fast_weights import build_fast_weights, fast_weight_kind
from .ingest import ChunkReport, forward_hidden, make_optimizer
from .memory import SpanMemory, rehearse, select_spans, token_marks
from .pause import changing
from .study import questions, teacher
from .tokenize import IncrementalTokenizer

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)


@dataclass
class SessionStats:
    tokens_ingested: int = 0  # tokens trained on (scored, then stepped on)
    chunks: int = 0
    rolled_back_chunks: int = 0  # chunks whose update was not applied (non-finite)
    rehearsals_rolled_back: int = 0  # chunks whose spans' rehearsal was undone (memory.py)
    last_loss_before: float | None = None
    last_loss_after: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class SessionInfo:
    """What a session has read and holds: the same fields for a session in memory (``Session.info``) and for one
    only on disk (``store.saved_info``, without loading its weights). The server adds where it is (``residency``,
    ``disk_bytes``); both doors show these fields, gRPC under its own names for two of them."""

    id: str
    tokens_ingested: int
    pending_tokens: int
    document_bytes: int  # of the unfinished document, received so far: a resumed stream sends the rest from here
    chunks: int
    rolled_back_chunks: int
    last_loss_before: float | None
    last_loss_after: float | None
    fast_weight_bytes: int  # 0 while the session is only on disk
    memory: str  # the preset its settings started from
    memory_spans: int  # surprising spans kept (memory.py)
    exact_tokens_read: int  # of their tokens, about as many as an answer reads now (exact_select)
    resident_bytes: int
    restored_from: str | None  # set when loading had to skip a damaged newest checkpoint (store.load_session)
    warnings: list[str]
    created_at: float
    updated_at: float

    @classmethod
    def describe(cls, session_id: str, stats: SessionStats, **held) -> dict:
        """The info of a session with ``stats``; ``held``: the fields that are not statistics."""
        counted = {f.name: getattr(stats, f.name) for f in dataclasses.fields(cls) if hasattr(stats, f.name)}
        return dataclasses.asdict(cls(id=session_id, **counted, **held))


def priced_bytes(config: SessionConfig, model) -> int:
    """The most a session of ``config`` on ``model`` holds, computed before anything is allocated: fp32 fast
    weights with their gradients and two optimizer moments, and the keys/values of every layer for the rolling
    context (sinks + window) and for the answers' prefix (the exact spans read before the window, and the window:
    the trained one and, until the next chunk trains, up to as many tokens read since). Spans read for a question
    are an answer's own keys/values (the answer pool's budget)."""
    weights = 4 * 4 * fast_weight_kind(config.fast).count_parameters(config.fast, model)
    m, ingest = model.cfg, config.ingest
    per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * model.embed_tokens.weight.element_size()
    tokens = ingest.sink_tokens + 3 * ingest.context_tokens + config.recall.tokens_before_window
    return weights + per_token * tokens


class TokenLimit(ValueError):
    """A piece of a document with more tokens than the caller allows (``Session.append``): nothing was kept."""


class Session(Answering):
    """One user's memory of their documents. Create with ``Engine.create_session``."""

    def __init__(self, engine: Engine, config: SessionConfig | None = None, session_id: str | None = None):
        self.engine = engine
        self.id = session_id or uuid.uuid4().hex
        self.config = config or SessionConfig()
        self.lock = threading.RLock()  # one piece of work at a time on a session
        self.text_stream = IncrementalTokenizer(engine.base.tokenizer)
        self.version = 0  # bumped by every change of state: a saver compares it with the saved one
        self.weights_version = 0  # bumped by every change of the fast weights (a trained chunk, a reset)
        self.restored_from: str | None = None  # the checkpoint loaded, when it was not the newest
        self.damaged_checkpoints: list[str] = []  # those the load skipped: the next save removes them
        self.warnings: list[str] = []  # why newer checkpoints were skipped at load
        self.reset()

    def reset(self) -> None:
        """Forget everything learned and pending: fresh fast weights (same config and seed), new stats."""
        with self.lock:
            self.fast = build_fast_weights(self.config.fast, self.engine.base.model)
            self.optimizer = make_optimizer(self.fast.parameters(), self.config.ingest)
            self.window: list[int] = []  # the most recent trained tokens, at most context_tokens (>= 1)
            self._rolling: RollingContext | None = None  # their keys/values; transient, rebuilt from window
            self._answer_prefix: HeldPrefix | None = None  # the window's K/V for answers
            self.weights_version += 1
            self.pending: list[int] = []  # tokens received but not yet trained on
            self.memory = SpanMemory(self.config.recall)  # the most surprising spans read (memory.py)
            self.text_stream.reset()
            self.document_ended = True  # pending tokens may be trained as a partial chunk
            self.stats = SessionStats()
            self.version += 1

    # ---- ingest -------------------------------------------------------------------------------

    def ingest(self, text: str | bytes) -> list[ChunkReport]:
        """Learn a whole document (or its next part): returns one report per chunk trained.

        Tokens are scored before they are trained on; the document's last partial chunk is trained too.
        For streaming, use ``append_text`` + ``train_next_chunk`` + ``end_document``.
        """
        with self.lock:
            self.append_text(text)
            self.end_document()
            reports = []
            while (report := self.train_next_chunk()) is not None:
                reports.append(report)
            return reports

    def append(self, piece: str | bytes | list[int], limit: int | None = None) -> int:
        """Add a piece of a document: text, UTF-8 bytes (may split a character) or token ids (these end the text
        before them: its held-back tail goes first). Returns the tokens it added. All or nothing: ids out of the
        vocabulary (ValueError) or more than ``limit`` tokens (TokenLimit) leave the session as it was."""
        with self.lock:
            pending, text, ended, version = (
                len(self.pending),
                self.text_stream.state(),
                self.document_ended,
                self.version,
            )
            try:
                if isinstance(piece, list):
                    self.append_tokens(self.text_stream.flush() + piece)
                else:
                    self.append_text(piece)
                added = len(self.pending) - pending
                if limit is not None and added > limit:
                    raise TokenLimit(f"{added} tokens, more than the {limit} allowed")
            except BaseException:  # whatever failed, the session is as it was (and not marked changed)
                del self.pending[pending:]
                self.text_stream.load_state(text)
                self.document_ended, self.version = ended, version
                raise
            return added

    def append_text(self, piece: str | bytes) -> int:
        """Add a piece of a document (any size; bytes may split a UTF-8 character). Returns chunks ready."""
        with self.lock:
            ids = self.text_stream.feed(piece)
            self.version += 1  # the tokenizer's pending text changed even when no token came out
            return self.append_tokens(ids)

    def append_tokens(self, ids: list[int]) -> int:
        """Add token ids of a document. Returns how many full chunks are ready to train."""
        vocab = self.engine.base.cfg.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        with self.lock:
            self.pending.extend(ids)
            if ids:
                self.document_ended = False
                self.version += 1
            return self.chunks_ready

    def end_document(self) -> int:
        """The document is complete: flush the tokenizer and let the last partial chunk be trained. Returns the
        tokens the tokenizer still held."""
        with self.lock:
            tail = self.text_stream.flush()
            self.pending.extend(tail)
            self.document_ended = True
            self.version += 1
            return len(tail)

    @property
    def chunks_ready(self) -> int:
        n, c = len(self.pending), self.config.ingest.chunk_tokens
        return n // c + (1 if self.document_ended and n % c else 0)

    def train_next_chunk(self, **overrides) -> ChunkReport | None:
        """Score and train on the next ready chunk; None when no chunk is ready.

        ``overrides`` change step settings for this chunk only: ``lr``, ``steps_per_chunk``, ``max_grad_norm``.
        Several sessions at once, in shared batches: ``train_sessions`` (this is its case of one).
        """
        return train_sessions([self], [overrides])[0]

    def take_chunk(self, **overrides) -> ChunkItem | None:
        """The next ready chunk and what trains on it (``train_next_chunk``'s overrides); None when none is ready.

        The chunk stays pending until ``record_chunk``: hold ``self.lock`` from one to the other.
        """
        if set(overrides) - PER_CHUNK:
            raise ValueError(f"only {sorted(PER_CHUNK)} can change per chunk, not {sorted(set(overrides) - PER_CHUNK)}")
        with self.lock:
            if not self.chunks_ready:
                return None
            cfg = dataclasses.replace(self.config.ingest, **overrides) if overrides else self.config.ingest
            chunk_ids = self.pending[: cfg.chunk_tokens]
            carry = self.window[-1:]  # the previous token predicts the chunk's first token
            device = self.engine.base.device
            return ChunkItem(
                self.fast,
                self.optimizer,
                self._context(),
                torch.tensor(carry, dtype=torch.long, device=device),
                torch.tensor(chunk_ids, dtype=torch.long, device=device),
                cfg,
                self.stats.chunks,
            )

    def record_chunk(self, item: ChunkItem, report: ChunkReport) -> ChunkReport:
        """After ``item`` (from ``take_chunk``) trained: its tokens join the window, the stats count it, and its
        surprising spans are kept and rehearsed (``_remember``; its time counts in ``report.seconds``)."""
        changing()  # the session's window and memory (ttt.pause: not to be read at pause points from here on)
        with self.lock:
            chunk_ids = self.pending[: item.chunk.numel()]
            position = self.stats.tokens_ingested  # the stream index of the chunk's first token
            del self.pending[: len(chunk_ids)]
            self.window = (self.window + chunk_ids)[-max(item.cfg.context_tokens, 1) :]
            s = self.stats
            s.tokens_ingested += len(chunk_ids)
            s.chunks += 1
            s.rolled_back_chunks += report.rolled_back
            s.last_loss_before, s.last_loss_after = report.loss_before, report.loss_after
            self.version += 1
            self.weights_version += 1
            t0 = time.perf_counter()
            try:
                s.rehearsals_rolled_back += not self._remember(chunk_ids, position, report, item.cfg)
            except Exception:  # the chunk itself is learned and recorded; its spans are an extra
                log.exception("session %s: keeping or rehearsing chunk %d's spans failed", self.id, report.index)
                s.rehearsals_rolled_back += 1
            report.seconds += time.perf_counter() - t0
            s.updated_at = time.time()
            return report

    def _remember(self, chunk_ids: list[int], position: int, report: ChunkReport, ingest: IngestConfig) -> bool:
        """Keep the chunk's most surprising spans (memory.py), then rehearse them with older ones and study
        questions about them while the chunk is still in the window (study.py). False: the rehearsal was undone."""
        recall = self.config.recall
        if not recall.pool_tokens or report.surprise is None or not torch.isfinite(report.surprise).all():
            return True
        base = self.engine.base
        marks = token_marks(base.tokenizer, base.cfg.vocab_size)
        spans = select_spans(chunk_ids, report.surprise, marks, recall, position)
        kept = self.memory.add(spans)
        if not recall.replay_steps or report.rolled_back:  # a chunk whose update was undone is not rehearsed on
            return True
        batch = self.memory.replay_batch(kept, seed=self.config.fast.seed * 1_000_003 + self.stats.chunks)
        study = None
        if recall.study_spans and spans:
            pairs = questions(base.tokenizer, [sp.tokens for sp in spans[: recall.study_spans]])
            study = teacher(base.model, self._context(), pairs, recall.study_top_k, base.device)
        if not batch and study is None:
            return True
        return rehearse(base.model, self.fast, self.optimizer, batch, study, ingest, recall) is not None

    def _context(self) -> RollingContext | None:
        """The cached keys/values of the window before its last token; rebuilt from the window when absent."""
        cfg = self.config.ingest
        if cfg.context_tokens <= 1:
            return None
        if self._rolling is None:
            model = self.engine.base.model
            sink = min(cfg.sink_tokens, cfg.context_tokens // 2)
            # sink + recent + the carried last token = context_tokens
            self._rolling = RollingContext(model.cfg.num_layers, cfg.context_tokens - 1 - sink, sink)
            if len(self.window) > 1:
                tokens = torch.tensor([self.window], device=self.engine.base.device)
                with torch.no_grad():
                    forward_hidden(model, self.fast, tokens, self._rolling)
                self._rolling.commit(drop_last=1)
        return self._rolling

    # ---- residency ----------------------------------------------------------------------------

    def to(self, device: str | torch.device) -> Session:
        """Move every tensor the session holds (fast weights, optimizer state, cached keys/values) to ``device``.

        Training and answering need the engine's device; a server parks idle sessions in host memory.
        AdamW's ``step`` counters stay on the CPU, where torch keeps them.
        """
        device = torch.device(device)
        with self.lock:
            self.fast.to(device)  # in place: the optimizer's parameter references stay valid
            for state in self.optimizer.state.values():
                for name, value in state.items():
                    if isinstance(value, torch.Tensor) and name != "step":
                        state[name] = value.to(device)
            if self._rolling is not None:
                r = self._rolling
                r.k = [None if t is None else t.to(device) for t in r.k]
                r.v = [None if t is None else t.to(device) for t in r.v]
            self._answer_prefix = None  # a cache: the next answer rebuilds it where the session is
        return self

    @property
    def device(self) -> torch.device:
        return next(self.fast.parameters()).device

    def resident_bytes(self) -> int:
        """Bytes of tensors held now: fast weights, optimizer state and the cached keys/values of the window."""
        with self.lock:
            tensors = [*self.fast.parameters()]
            for state in self.optimizer.state.values():
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
            if self._rolling is not None:
                tensors += [t for t in (*self._rolling.k, *self._rolling.v) if t is not None]
            if self._answer_prefix is not None:
                tensors += [*self._answer_prefix.cache.k, *self._answer_prefix.cache.v]
            return sum(t.numel() * t.element_size() for t in tensors)

    # ---- persistence --------------------------------------------------------------------------

    def save(self, path, fence: int | None = None) -> None:
        """Checkpoint to folder ``path`` (or an fsspec URL) atomically (see ``store.py``); the previous save survives
        a crash. ``fence``: the lease's fencing number of the writer (``lease.py``)."""
        from .store import save_session

        with self.lock:
            save_session(self, path, fence)

    def info(self) -> dict:
        """``SessionInfo`` as a dict."""
        return SessionInfo.describe(
            self.id,
            self.stats,
            pending_tokens=len(self.pending),
            document_bytes=self.text_stream.bytes_received,
            fast_weight_bytes=self.fast.num_bytes(),
            memory=self.config.memory,
            memory_spans=len(self.memory.spans),
            exact_tokens_read=len(self.exact_tokens()),
            resident_bytes=self.resident_bytes(),
            restored_from=self.restored_from,
            warnings=list(self.warnings),
        )


def train_sessions(sessions: Sequence[Session], overrides: Sequence[dict] | None = None) -> list[ChunkReport | None]:
    """The next chunk of each session, the ready ones trained in shared batches (``ttt.batch.train_chunks``).

    Returns one report per session, None where no chunk was ready. ``overrides[i]`` are session i's
    step settings for this chunk (as ``train_next_chunk``'s keyword arguments). The sessions must be
    distinct and share one engine; their locks are held throughout.
    """
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session can train only one chunk per batch")
    overrides = overrides or [{}] * len(sessions)
    with ExitStack() as stack:
        for s in sorted(sessions, key=id):  # one global order: two batches never wait on each other
            stack.enter_context(s.lock)
        items = [s.take_chunk(**o) for s, o in zip(sessions, overrides, strict=True)]
        ready = [i for i, item in enumerate(items) if item is not None]
        reports = train_chunks(sessions[0].engine.base.model, [items[i] for i in ready]) if ready else []
        out: list[ChunkReport | None] = [None] * len(sessions)
        for i, report in zip(ready, reports, strict=True):
            out[i] = sessions[i].record_chunk(items[i], report)
        return out
