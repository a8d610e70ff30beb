"""A bounded load test on loopback: concurrent gRPC ingest streams and HTTP chat clients for a fixed time.

    python -m bench.load --server-grpc 127.0.0.1:50051 --server-http http://127.0.0.1:8000 --seconds 60
    python -m bench.load --start [--model DIR] [--device cpu] --seconds 20
    python -m bench.load --start --answers 16          # concurrent answers only, vs one alone

Each of ``--ingest-streams`` workers owns one new session and feeds it its own slice of
tests/data/kjv_genesis_exodus.txt as a series of short Ingest streams (``--stream-bytes`` each, the
document kept open between them) until the time is up. Each of ``--chat-clients`` workers sends
POST /v1/chat/completions (``--max-tokens`` small) on those sessions, one request at a time (a closed loop:
each sends its next chat as soon as the last one ends, so a slower server is asked less often). With
``--chat-rate R`` the chats come instead at R per second (an open loop, Poisson arrivals, seeded; at most
``--chat-clients`` in flight): each chat's times count from when it was due, so one that had to wait for a
free client counts that wait too. Every request has a timeout, each worker stops at the deadline (or after
``--max-requests``), and only loopback addresses are accepted.

With ``--no-ingest`` the sessions read their warm bytes (below) and then only the chat clients run: how
much of the chats' wait is the device's time on ingest, and how much their own.

Chats are streamed: the time to the first token (TTFT) and to the end are both measured. Before the load
starts, each session reads the first ``--warm-bytes`` of its slice (so that it has a window and kept spans, as
the sessions under load have: an answer then reads up to the window plus the notes before its prompt), and
``--idle-chats`` chats one at a time on the idle server give the TTFT baseline of the same run; the ingest
workers go on from there.

At the end it prints the error count (client timeouts among them), whether every token the streams sent is
accounted for (sum of the streams' ``tokens_received`` == sum of the sessions' ``tokens_ingested +
pending_tokens``), ingest throughput, chat latency and TTFT p50/p99 next to the idle server's (of every chat,
and of each client's chats after its first: in a closed loop the first chats of all clients come at once, a
burst of prompts that the steady state does not have); the exit status is 1 on any error or unaccounted token.

``--answers N``: instead, N sessions each read a short text, then one chat alone and N chats at once (one
per session, ``--max-tokens`` each, nothing else running): aggregate decode tokens/s of the N vs the one.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import get_args
from urllib.parse import urlsplit

from server.metrics import PREFIX_FOUND  # ttt_answer_prefixes_total's labels
from server.settings import DtypeName

ERROR_BACKOFF = 0.2  # seconds a worker waits after a failed request
BOOK = Path(__file__).resolve().parent.parent / "tests" / "data" / "kjv_genesis_exodus.txt"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_grpc(addr: str) -> str:
    host = addr.rsplit(":", 1)[0]
    if not _is_loopback(host):
        raise SystemExit(f"--server-grpc {addr}: loopback addresses only")
    return addr


def _check_http(url: str) -> str:
    host = urlsplit(url).hostname or ""
    if not _is_loopback(host):
        raise SystemExit(f"--server-http {url}: loopback addresses only")
    return url.rstrip("/")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Tally:
    """Results shared by the workers (guarded by a lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.received: dict[str, int] = {}  # session -> tokens its streams' summaries report received
        self.streams = 0
        self.chat_latencies: list[float] = []
        self.chat_ttfts: list[float] = []
        self.later_ttfts: list[float] = []  # each client's chats after its first
        self.timeouts = 0

    def error(self, what: str) -> None:
        with self.lock:
            if len(self.errors) < 1000:
                self.errors.append(what)
            else:
                self.errors.append("...")


def ingest_worker(args, sid: str, data: bytes, deadline: float, tally: Tally, pos: int = 0) -> None:
    import grpc

    from server.proto.ttt.v1 import ttt_pb2 as pb
    from server.proto.ttt.v1 import ttt_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    count = 0
    with grpc.insecure_channel(args.server_grpc) as channel:
        stub = pb_grpc.SessionsStub(channel)
        while time.monotonic() < deadline and count < args.max_requests:
            count += 1
            piece = data[pos : pos + args.stream_bytes]
            pos += len(piece)
            if pos >= len(data):
                pos = 0  # the slice again, as the same open document
            start = pb.IngestStart(session_id=sid, create_if_missing=False, end_of_document=False)

            def requests(piece=piece, start=start):  # lazy: no new piece goes out after the deadline
                yield pb.IngestRequest(start=start)
                for i in range(0, len(piece), args.piece_bytes):
                    if i and time.monotonic() >= deadline:
                        return
                    yield pb.IngestRequest(utf8=piece[i : i + args.piece_bytes])

            try:
                responses = list(stub.Ingest(requests(), metadata=metadata, timeout=args.request_timeout))
            except grpc.RpcError as e:
                tally.error(f"ingest {sid}: {e.code().name}: {e.details()}")
                time.sleep(ERROR_BACKOFF)
                continue
            if not responses or responses[-1].WhichOneof("message") != "summary":
                tally.error(f"ingest {sid}: the stream ended without a summary")
                continue
            errors = [r.chunk.error for r in responses[:-1] if r.chunk.error]
            if errors:
                tally.error(f"ingest {sid}: chunk errors {errors[:3]}")
            with tally.lock:
                tally.received[sid] = tally.received.get(sid, 0) + responses[-1].summary.tokens_received
                tally.streams += 1


def http_headers(args) -> dict[str, str]:
    """The HTTP requests' headers: the API key, when there is one."""
    return {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def timed_chat(http, sid: str, content: str, max_tokens: int, due: float | None = None) -> tuple[float, float, int]:
    """One streamed chat: (seconds to the first content, seconds to the end, completion tokens), counted from
    ``due`` (a ``time.perf_counter`` time; default: now)."""
    body = {
        "model": sid,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter() if due is None else due
    first, tokens = None, None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"failed after the 200: {event['error']}")
            if first is None and any((c.get("delta") or {}).get("content") for c in event["choices"]):
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without its usage")
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, tokens


class Arrivals:
    """The open loop's schedule: chat due times (``time.perf_counter``) of a Poisson process of ``rate`` per
    second from ``start`` until ``deadline``, seeded; the workers take them in order."""

    def __init__(self, rate: float, start: float, deadline: float, seed: int = 0):
        self.rate, self.due, self.deadline = rate, start, deadline
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def take(self) -> float | None:
        """The next chat's due time; None once it would be past the deadline."""
        with self.lock:
            self.due += self.rng.expovariate(self.rate)
            return self.due if self.due < self.deadline else None


def chat_worker(
    args, index: int, sids: list[str], deadline: float, tally: Tally, arrivals: Arrivals | None = None
) -> None:
    """Closed loop: chats one after another until the deadline; open loop (``arrivals``): each due chat in turn,
    sent when due (or as soon as this worker is free)."""
    import httpx

    headers = http_headers(args)
    count = 0
    with httpx.Client(base_url=args.server_http, headers=headers, timeout=args.request_timeout) as http:
        while time.monotonic() < deadline and count < args.max_requests:
            due = None
            if arrivals is not None:
                due = arrivals.take()
                if due is None:
                    return
                time.sleep(max(0.0, due - time.perf_counter()))
            sid = sids[(index + count) % len(sids)]
            count += 1
            try:
                question = f"Who went out of Egypt? ({index}.{count})"
                ttft, latency, _ = timed_chat(http, sid, question, args.max_tokens, due)
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                if isinstance(e, httpx.TimeoutException):
                    with tally.lock:
                        tally.timeouts += 1
                tally.error(f"chat {sid}: {type(e).__name__}: {e}")
                time.sleep(ERROR_BACKOFF)
                continue
            with tally.lock:
                tally.chat_latencies.append(latency)
                tally.chat_ttfts.append(ttft)
                if count > 1:
                    tally.later_ttfts.append(ttft)


def idle_ttfts(args, sids: list[str]) -> list[float]:
    """TTFTs of ``--idle-chats`` chats one at a time on the idle server (after one warm-up chat per session: the
    window's keys/values are then cached, as they mostly are under load)."""
    import httpx

    headers = http_headers(args)
    with httpx.Client(base_url=args.server_http, headers=headers, timeout=args.request_timeout) as http:
        for sid in sids:
            timed_chat(http, sid, "Who went out of Egypt?", args.max_tokens)
        return [
            timed_chat(http, sids[i % len(sids)], f"Who went out of Egypt? ({i})", args.max_tokens)[0]
            for i in range(args.idle_chats)
        ]


SERVER_COUNTS = {  # the server's metrics bench.load reports (differences over the run): name -> (sample, labels)
    "ttft_sum": ("ttt_time_to_first_token_seconds_sum", {}),  # queued for the device to first token
    "ttft_count": ("ttt_time_to_first_token_seconds_count", {}),
    "queue_sum": ("ttt_answer_queue_seconds_sum", {}),  # queued for the device to joining the decode batch
    **{f"prefix_{found}": ("ttt_answer_prefixes_total", {"found": found}) for found in PREFIX_FOUND},
}


def server_counts(args) -> dict[str, float]:
    """The ``SERVER_COUNTS`` so far, from the server's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{args.server_http}/metrics", headers=http_headers(args), timeout=args.request_timeout).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {
        key: sum(s.value for s in samples if s.name == name and s.labels == labels)
        for key, (name, labels) in SERVER_COUNTS.items()
    }


def _ms(values: list[float], q: float) -> float | None:
    return round(_percentile(values, q) * 1000, 1) if values else None


def run(args) -> dict:
    from clients.client import TTTClient, TTTError

    book = BOOK.read_bytes()
    m = args.ingest_streams
    size = len(book) // m
    run_id = uuid.uuid4().hex[:8]
    sids = [f"load-{run_id}-{i}" for i in range(m)]
    settings = {"ingest": {"chunk_tokens": args.chunk_tokens}} if args.chunk_tokens else None
    tally = Tally()

    with TTTClient(args.server_grpc, args.api_key, timeout=args.request_timeout) as client:
        warm = min(args.warm_bytes, size)
        for i, sid in enumerate(sids):
            client.create_session(sid, settings)
            for _ in client.ingest(sid, [book[i * size : i * size + warm]], end_of_document=False):
                pass
        before = {sid: client.get_session(sid) for sid in sids}
        idle = idle_ttfts(args, sids)
        server_before = server_counts(args)

        started = time.monotonic()
        deadline = started + args.seconds
        now = time.perf_counter()
        arrivals = Arrivals(args.chat_rate, now, now + args.seconds, args.seed) if args.chat_rate else None
        threads = [
            threading.Thread(
                target=ingest_worker,
                args=(args, sid, book[i * size : (i + 1) * size], deadline, tally, warm),
                name=f"ingest-{i}",
                daemon=True,
            )
            for i, sid in enumerate(sids)
            if args.ingest
        ]
        threads += [
            threading.Thread(
                target=chat_worker,
                args=(args, k, sids, deadline, tally, arrivals),
                name=f"chat-{k}",
                daemon=True,
            )
            for k in range(args.chat_clients)
        ]
        for t in threads:
            t.start()
        # Every worker stops at the deadline; a request in flight then is bounded by its timeout.
        join_by = deadline + args.request_timeout + 5
        for t in threads:
            t.join(max(0.0, join_by - time.monotonic()))
        elapsed = time.monotonic() - started
        stuck = [t.name for t in threads if t.is_alive()]
        for name in stuck:
            tally.error(f"{name}: still running after the deadline plus the request timeout")

        server = {key: value - server_before[key] for key, value in server_counts(args).items()}
        after = {}
        for sid in sids:
            try:
                after[sid] = client.get_session(sid)
            except TTTError as e:
                tally.error(f"get {sid}: {e}")
        if args.cleanup:
            for sid in sids:
                try:
                    client.delete_session(sid)
                except TTTError as e:
                    tally.error(f"delete {sid}: {e}")

    held = sum(a["tokens_ingested"] + a["pending_tokens"] for a in after.values())
    held_before = sum(b["tokens_ingested"] + b["pending_tokens"] for b in before.values())
    trained = sum(a["tokens_ingested"] for a in after.values()) - sum(b["tokens_ingested"] for b in before.values())
    received = sum(tally.received.values())
    lat, ttft = tally.chat_latencies, tally.chat_ttfts
    result = {
        "seconds": round(elapsed, 2),
        "errors": len(tally.errors),
        "error_samples": tally.errors[:10],
        "ingest_streams": m if args.ingest else 0,
        "ingest_requests": tally.streams,
        "tokens_received": received,
        "tokens_held": held - held_before,
        "tokens_trained": trained,
        "tokens_accounted": received == held - held_before and len(after) == m,
        "ingest_tokens_per_s": round(trained / elapsed, 1) if elapsed > 0 else 0.0,
        "chat_clients": args.chat_clients,
        "chat_rate": args.chat_rate,
        "chat_count": len(lat),
        "chat_timeouts": tally.timeouts,
        "chat_p50_ms": _ms(lat, 0.50),
        "chat_p99_ms": _ms(lat, 0.99),
        "chat_mean_ms": round(statistics.fmean(lat) * 1000, 1) if lat else None,
        "ttft_p50_ms": _ms(ttft, 0.50),
        "ttft_p99_ms": _ms(ttft, 0.99),
        "ttft_mean_ms": round(statistics.fmean(ttft) * 1000, 1) if ttft else None,
        # the server's part: queued for the device to first token made (not the HTTP side, nor the client's wait)
        "server_ttft_mean_ms": round(server["ttft_sum"] / server["ttft_count"] * 1000, 1)
        if server["ttft_count"]
        else None,
        "server_queue_mean_ms": round(server["queue_sum"] / server["ttft_count"] * 1000, 1)
        if server["ttft_count"]
        else None,
        # how the answers found their window's keys/values: built = a prefill of the whole window in the wait
        **{f"answer_prefixes_{found}": int(server[f"prefix_{found}"]) for found in PREFIX_FOUND},
        "warm_bytes": warm,
        "idle_ttft_p50_ms": _ms(idle, 0.50),
        "idle_ttft_p99_ms": _ms(idle, 0.99),
    }
    if ttft and idle:
        result["ttft_p50_vs_idle"] = round(_percentile(ttft, 0.5) / _percentile(idle, 0.5), 2)
        result["ttft_p99_vs_idle"] = round(_percentile(ttft, 0.99) / _percentile(idle, 0.99), 2)
    later = tally.later_ttfts
    if later and idle:
        result["later_ttft_p50_ms"], result["later_ttft_p99_ms"] = _ms(later, 0.50), _ms(later, 0.99)
        result["later_ttft_p50_vs_idle"] = round(_percentile(later, 0.5) / _percentile(idle, 0.5), 2)
        result["later_ttft_p99_vs_idle"] = round(_percentile(later, 0.99) / _percentile(idle, 0.99), 2)
    return result


def answers_run(args) -> dict:
    """N sessions read a short text each; one chat alone, then N at once: aggregate decode tokens/s."""
    import httpx

    from clients.client import TTTClient

    book = BOOK.read_bytes()
    n, run_id = args.answers, uuid.uuid4().hex[:8]
    sids = [f"answers-{run_id}-{i}" for i in range(n)]
    headers = http_headers(args)
    question = "Retell what you have read."
    with (
        TTTClient(args.server_grpc, args.api_key, timeout=args.request_timeout) as client,
        httpx.Client(base_url=args.server_http, headers=headers, timeout=args.request_timeout) as http,
    ):
        for i, sid in enumerate(sids):
            for _ in client.ingest(sid, [book[i * 1500 : (i + 1) * 1500]]):
                pass
            timed_chat(http, sid, question, 4)  # warm: the window's keys/values are computed once per version
            client.save_session(sid)  # saved now: no autosave of these sessions runs while the chats are timed
        _, alone_s, alone_tokens = timed_chat(http, sids[0], question, args.max_tokens)
        results: list[tuple[float, float, int]] = [None] * n  # type: ignore[list-item]

        def one(i: int) -> None:
            with httpx.Client(base_url=args.server_http, headers=headers, timeout=args.request_timeout) as h:
                results[i] = timed_chat(h, sids[i], question, args.max_tokens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        if args.cleanup:
            for sid in sids:
                client.delete_session(sid)
    if any(r is None for r in results):
        raise SystemExit("a concurrent chat failed")
    tokens = sum(r[2] for r in results)
    alone_tps = alone_tokens / alone_s
    return {
        "answers": n,
        "max_tokens": args.max_tokens,
        "alone_tokens": alone_tokens,
        "alone_tokens_per_s": round(alone_tps, 2),
        "together_tokens": tokens,
        "together_seconds": round(wall, 2),
        "together_tokens_per_s": round(tokens / wall, 2),
        "together_vs_alone": round(tokens / wall / alone_tps, 2),
        "together_ttft_p50_ms": _ms([r[0] for r in results], 0.5),
        "together_ttft_max_ms": round(max(r[0] for r in results) * 1000, 1),
    }


def _print(result: dict) -> None:
    print(f"duration:          {result['seconds']} s")
    print(f"errors:            {result['errors']}")
    for e in result["error_samples"]:
        print(f"  {e}")
    print(
        f"tokens accounted:  {'yes' if result['tokens_accounted'] else 'NO'} "
        f"(streams received {result['tokens_received']}, sessions hold {result['tokens_held']} "
        f"= trained + pending)"
    )
    print(
        f"ingest:            {result['ingest_streams']} workers, {result['ingest_requests']} streams, "
        f"{result['tokens_trained']} tokens trained, {result['ingest_tokens_per_s']} tokens/s total"
    )
    loop = f"open loop, {result['chat_rate']} chats/s due" if result["chat_rate"] else "closed loop"
    print(
        f"chat:              {result['chat_clients']} clients ({loop}), {result['chat_count']} answers, "
        f"p50 {result['chat_p50_ms']} ms, p99 {result['chat_p99_ms']} ms, {result['chat_timeouts']} timeouts"
    )
    print(
        f"chat TTFT:         p50 {result['ttft_p50_ms']} ms, p99 {result['ttft_p99_ms']} ms; idle server "
        f"p50 {result['idle_ttft_p50_ms']} ms, p99 {result['idle_ttft_p99_ms']} ms "
        f"(x{result.get('ttft_p50_vs_idle')}, x{result.get('ttft_p99_vs_idle')}); mean {result['ttft_mean_ms']} ms, "
        f"of which queued for the device to first token {result['server_ttft_mean_ms']} ms, to joining the decode "
        f"batch {result['server_queue_mean_ms']} ms (the server's metrics)"
    )
    if "later_ttft_p50_ms" in result:
        print(
            f"  after the first:  p50 {result['later_ttft_p50_ms']} ms, p99 {result['later_ttft_p99_ms']} ms "
            f"(x{result['later_ttft_p50_vs_idle']}, x{result['later_ttft_p99_vs_idle']}): each client's chats after "
            f"its first (a closed loop's first chats all come at once)"
        )
    found = ", ".join(f"{how} {result[f'answer_prefixes_{how}']}" for how in PREFIX_FOUND)
    print(f"answers' window:   keys/values {found} (the server's metric)")
    print(json.dumps({k: v for k, v in result.items() if k != "error_samples"}), flush=True)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--server-grpc", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--server-http", default="http://127.0.0.1:8000", metavar="URL")
    p.add_argument("--api-key", metavar="KEY")
    p.add_argument("--start", action="store_true", help="start an in-process server on free loopback ports")
    p.add_argument("--model", help="with --start: model folder (default: the embedded default model)")
    p.add_argument("--device", help="with --start: cuda, cpu, ...")
    p.add_argument("--dtype", choices=get_args(DtypeName), help="with --start: the model's dtype")
    p.add_argument("--ingest-streams", type=int, default=8, metavar="M", help="sessions, each fed by its own worker")
    p.add_argument(
        "--no-ingest",
        dest="ingest",
        action="store_false",
        help="the sessions read their --warm-bytes, then only the chats run (what they alone cost the device)",
    )
    p.add_argument("--chat-clients", type=int, default=16, metavar="K", help="chats in flight at most")
    p.add_argument(
        "--chat-rate", type=float, metavar="R", help="chats due per second (open loop; default: a closed loop)"
    )
    p.add_argument("--seed", type=int, default=0, help="the open loop's arrival times")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=8, help="per chat answer")
    p.add_argument("--idle-chats", type=int, default=8, help="chats on the idle server before the load (TTFT baseline)")
    p.add_argument(
        "--warm-bytes", type=int, default=4096, help="bytes each session reads before the idle chats (0: none)"
    )
    p.add_argument("--answers", type=int, metavar="N", help="only N concurrent chats vs one alone (see above)")
    p.add_argument("--max-answer-rows", type=int, help="with --start: answers decoded together (1: batching off)")
    p.add_argument("--chunk-tokens", type=int, help="chunk size of the sessions created (default: the server's)")
    p.add_argument("--stream-bytes", type=int, default=1024, help="bytes per Ingest stream")
    p.add_argument("--piece-bytes", type=int, default=256, help="bytes per streamed message")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request or stream")
    p.add_argument("--max-requests", type=int, default=100_000, help="per worker")
    p.add_argument("--keep", dest="cleanup", action="store_false", help="keep the sessions afterwards")
    args = p.parse_args(argv)
    for name in ("ingest_streams", "chat_clients", "max_tokens", "stream_bytes", "piece_bytes", "max_requests"):
        if getattr(args, name) < (0 if name == "chat_clients" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    if args.seconds <= 0 or args.request_timeout <= 0:
        p.error("--seconds and --request-timeout must be positive")
    if args.chat_rate is not None and not (args.chat_rate > 0 and math.isfinite(args.chat_rate)):
        p.error("--chat-rate must be a positive number of chats per second")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the load test; print and return the result dict (``errors``, ``tokens_accounted``, ...)."""
    args = parse_args(argv)
    server = tmp = None
    if args.start:  # a subprocess: the clients here must not share the server's interpreter (its GIL)
        from .server_process import ServerProcess

        tmp = tempfile.TemporaryDirectory(prefix="ttt-load-")
        flags = [f"--{name}={value}" for name in ("model", "device", "dtype") if (value := getattr(args, name))]
        env = {"TTT_MAX_ANSWER_ROWS": str(args.max_answer_rows)} if args.max_answer_rows else {}
        server = ServerProcess([*flags, "--data-dir", tmp.name], env, Path(tmp.name) / "server.log")
        server.wait_ready(300)
        args.server_grpc, args.server_http, args.api_key = server.grpc, server.http, None
    _check_grpc(args.server_grpc)
    args.server_http = _check_http(args.server_http)
    try:
        result = answers_run(args) if args.answers else run(args)
    finally:
        if server is not None:
            server.stop()
            tmp.cleanup()
    if args.answers:
        print(json.dumps(result), flush=True)
    else:
        _print(result)
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res.get("errors", 0) == 0 and res.get("tokens_accounted", True) else 1)
