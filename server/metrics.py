"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TOKENS_PER_SECOND_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class ResidencyCollector:
    """Sessions and bytes per residency tier, read from the registry at each scrape."""

    def __init__(self, residency):
        self.residency = residency  # () -> {tier: (sessions, bytes)}

    def collect(self):
        sessions = GaugeMetricFamily("ttt_sessions", "Sessions by residency tier", labels=["tier"])
        nbytes = GaugeMetricFamily(
            "ttt_session_bytes", "Session bytes by residency tier (disk: checkpoints)", labels=["tier"]
        )
        for tier, (n, b) in self.residency().items():
            sessions.add_metric([tier], n)
            nbytes.add_metric([tier], b)
        yield from (sessions, nbytes)


PREFIX_FOUND = ("ready", "extended", "built", "notes_alone")


class AnswerPrefixCollector:
    """How answers found their window's keys/values (``ttt.Engine.answer_prefixes``), read at each scrape."""

    def __init__(self, counts):
        self.counts = counts  # {PREFIX_FOUND's kind: answers}, kept up to date by the engine

    def collect(self):
        family = CounterMetricFamily(
            "ttt_answer_prefixes",
            "Answers by how they found their window's keys/values: ready (kept up to date ahead of the question), "
            "extended (by tokens read since), built (the weights changed: a prefill of the whole window) or "
            "notes_alone (no window read: the question's notes alone, with the base model)",
            labels=["found"],
        )
        for found in PREFIX_FOUND:
            family.add_metric([found], self.counts.get(found, 0))
        yield family


class Metrics:
    def __init__(self, queue_depth=lambda: 0, residency=lambda: {}):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ttt_requests", "Requests by front door, method and status", ["api", "method", "status"], registry=r
        )
        self.errors = Counter("ttt_errors", "Failed requests by status", ["api", "status"], registry=r)
        self.tokens_ingested = Counter("ttt_tokens_ingested", "Tokens trained on", registry=r)
        self.chunks = Counter("ttt_chunks", "Chunks trained", ["outcome"], registry=r)
        self.tokens_generated = Counter("ttt_tokens_generated", "Completion tokens", registry=r)
        self.ingest_tps = Histogram(
            "ttt_ingest_tokens_per_second", "Ingest speed per chunk", buckets=TOKENS_PER_SECOND_BUCKETS, registry=r
        )
        self.decode_tps = Histogram(
            "ttt_decode_tokens_per_second", "Decode speed per answer", buckets=TOKENS_PER_SECOND_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "ttt_time_to_first_token_seconds",
            "Seconds from a chat or completion queued for the device to its first token made (the HTTP side and the "
            "client's own wait are not in it)",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.answer_queue = Histogram(
            "ttt_answer_queue_seconds",
            "Seconds from a chat or completion queued for the device to its rows joining the decode batch (the rest "
            "of its time to first token: the prompts in line before it and its own prefill)",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.answer_rows = Histogram(
            "ttt_answer_step_rows", "Answers advanced by one decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_sessions = Histogram(
            "ttt_batch_sessions", "Sessions whose chunks trained in one device step", buckets=BATCH_BUCKETS, registry=r
        )
        Gauge("ttt_queue_depth", "Units of work waiting for the device", registry=r).set_function(queue_depth)
        self.moves = Counter(
            "ttt_session_moves", "Sessions moved between residency tiers", ["source", "target"], registry=r
        )
        self.fallbacks = Counter(
            "ttt_checkpoint_fallbacks", "Loads that skipped a damaged newest checkpoint", registry=r
        )
        r.register(ResidencyCollector(residency))

    def watch_answers(self, batch) -> None:
        """Gauges of the decode batch (``ttt.decode.DecodeBatch``), read at each scrape."""
        r = self.registry
        Gauge("ttt_answer_rows", "Answers being decoded", registry=r).set_function(lambda: len(batch))
        Gauge("ttt_answer_pool_bytes", "Keys/values held for the answers being decoded", registry=r).set_function(
            batch.pool.num_bytes
        )
        Gauge("ttt_answer_pool_budget_bytes", "The answer pool's budget (TTT_ANSWER_KV_BYTES)", registry=r).set(
            batch.pool.budget or 0
        )

    def watch_prefixes(self, counts) -> None:
        """Serve ``counts`` (``ttt.Engine.answer_prefixes``) as ttt_answer_prefixes_total."""
        self.registry.register(AnswerPrefixCollector(counts))

    def move(self, source: str, target: str) -> None:
        self.moves.labels(source, target).inc()

    def fallback(self) -> None:
        self.fallbacks.inc()

    def chunk(self, report) -> None:
        self.chunks.labels("rolled_back" if report.rolled_back else "applied").inc()
        self.tokens_ingested.inc(report.tokens)
        if report.seconds > 0:
            self.ingest_tps.observe(report.tokens / report.seconds)

    def answer(self, completion_tokens: int, seconds: float) -> None:
        self.tokens_generated.inc(completion_tokens)
        if seconds > 0 and completion_tokens:
            self.decode_tps.observe(completion_tokens / seconds)

    def first_token(self, seconds: float, queued: float) -> None:
        """An answer's first token came ``seconds`` after it was queued, ``queued`` of them before it joined the
        decode batch."""
        self.time_to_first_token.observe(seconds)
        self.answer_queue.observe(queued)

    def request(self, api: str, method: str, status: str) -> None:
        self.requests.labels(api, method, status).inc()
        if status not in ("OK", "200", "201", "204"):
            self.errors.labels(api, status).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
