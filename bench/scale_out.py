"""Scale-out figures (docs/scale-out.md): sessions moved per second between two replicas, and the time to first
token of a session that must first be loaded from the store, next to the same session once in memory (same run).

    python -m bench.scale_out [--model DIR] [--sessions 8] [--tokens 512] [--store s3|local|URL]

1. Moves: two registries over one store (what two replicas hold; one process, one engine): ``--sessions`` sessions,
   each having read ``--tokens`` tokens, live on A. A move is ``A.park`` (save, drop, release the lease) then
   ``B.get`` (take the lease, load): exactly what a session crossing replicas costs, without Ray's routing. Each
   moved session's score of a probe text is compared with its score before the move (equal: the move is exact).
2. TTFT: a Ray Serve deployment (``server.ray_app``, 2 replicas) over the same store, the sessions only in the
   store: a streamed chat on each (loaded from the store on the way: cold), then again (in memory: warm).

``--store s3`` runs moto's S3 server on loopback; ``local`` a temporary folder. Prints one JSON object and writes
it under ``--out`` (results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

import ttt
from bench.common import DEFAULT_DOC, ROOT, portable, run_metadata
from bench.load import timed_chat
from server.auth import OPEN_USER
from server.registry import SessionRegistry
from server.settings import Settings

PROBE = "And the LORD spake unto Moses, saying,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_s3() -> tuple[str, subprocess.Popen]:
    """moto's S3 server on loopback, the AWS variables pointing at it (inherited by Ray's workers), a bucket."""
    import boto3

    endpoint = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    bucket = f"ttt-bench-{uuid.uuid4().hex[:8]}"
    for _ in range(300):
        try:
            boto3.client("s3").create_bucket(Bucket=bucket)
            return f"s3://{bucket}/sessions", proc
        except Exception:
            time.sleep(0.1)
    raise RuntimeError("moto's S3 server did not start")


def first_token_seconds(session: ttt.Session) -> float:
    t0 = time.perf_counter()
    next(iter(session.generate([{"role": "user", "content": "Who spake unto Moses?"}], max_tokens=2, stream=True)))
    return time.perf_counter() - t0


def moves(engine: ttt.Engine, store: str, args) -> dict:
    """Sessions moved A -> B, then B -> A: moves per second, and whether every move was exact."""
    settings = {"ingest": {"chunk_tokens": 256}}
    a = SessionRegistry(engine, Path("unused"), settings, store=store, owner="replica-a")
    b = SessionRegistry(engine, Path("unused"), settings, store=store, owner="replica-b")
    text = DEFAULT_DOC.read_text(encoding="utf-8")
    ids = engine.base.tokenizer(text, add_special_tokens=False).input_ids
    scores = {}
    for n in range(args.sessions):
        sid = f"moved-{n}"
        session = a.create(OPEN_USER, sid)
        session.append_tokens(ids[n * args.tokens : (n + 1) * args.tokens])
        session.end_document()
        while session.train_next_chunk():
            pass
        scores[sid] = session.score(PROBE)
        a.save(OPEN_USER, sid)  # as an autosave would have: a move then saves nothing new
    timings, exact = [], True
    for source, target in ((a, b), (b, a)):
        t0 = time.perf_counter()
        moved = []
        for sid in scores:
            source.park(OPEN_USER, sid)
            moved.append(target.get(OPEN_USER, sid))
        timings.append(time.perf_counter() - t0)
        exact &= all(session.score(PROBE) == scores[session.id] for session in moved)  # after the clock stops
    # Where a cold answer's time goes besides the load: the first answer of a session builds the keys/values of its
    # window (kept in memory, not in checkpoints); the second reuses them.
    loaded = [a.get(OPEN_USER, sid) for sid in scores]  # just moved back to a, nothing answered yet
    first = [first_token_seconds(session) for session in loaded]
    again = [first_token_seconds(session) for session in loaded]
    per_second = [round(args.sessions / t, 2) for t in timings]
    a.release_all()
    b.release_all()
    checkpoint = a.info(OPEN_USER, next(iter(scores)))["disk_bytes"]
    return {
        "moves_per_second": per_second,
        "moves_exact": exact,
        "checkpoint_bytes": checkpoint,
        "first_answer_after_load_ttft_p50_ms": round(statistics.median(first) * 1000, 1),
        "second_answer_ttft_p50_ms": round(statistics.median(again) * 1000, 1),
        "sessions": list(scores),
    }


def ttft(store: str, sessions: list[str], args) -> dict:
    """Streamed chats through the Ray front: first on sessions only in the store (cold), then again (warm)."""
    import ray
    from ray import serve

    from server.ray_app import deploy

    settings = Settings(
        model=args.model, device="cpu", http_port=free_port(), store=store, data_dir=Path(tempfile.mkdtemp())
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        deploy(settings, replicas=2)
        http = httpx.Client(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=300)
        base = http.get("/v1/models").json()["data"][0]["id"]
        timed_chat(http, base, "Hello", 4)  # warms both fronts' paths (the base model needs no session)
        cold = [timed_chat(http, sid, "Who spake unto Moses?", args.max_tokens)[0] for sid in sessions]
        warm = [timed_chat(http, sid, "Who spake unto Moses?", args.max_tokens)[0] for sid in sessions]
    finally:
        serve.shutdown()
        ray.shutdown()
    cold_ms, warm_ms = statistics.median(cold) * 1000, statistics.median(warm) * 1000
    return {
        "ttft_from_store_p50_ms": round(cold_ms, 1),
        "ttft_in_memory_p50_ms": round(warm_ms, 1),
        "ttft_from_store_vs_in_memory": round(cold_ms / warm_ms, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model folder (default: the embedded default model)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="tokens each session reads before it moves")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens of each timed answer")
    p.add_argument("--store", default="s3", help="s3 (moto on loopback), local (a temporary folder) or a URL")
    p.add_argument("--no-ray", action="store_true", help="moves only")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scale_out")
    args = p.parse_args(argv)
    moto = None
    if args.store == "s3":
        store, moto = loopback_s3()
    elif args.store == "local":
        store = tempfile.mkdtemp(prefix="ttt-store-")
    else:
        store = args.store
    try:
        engine = ttt.load_engine(args.model, "cpu")
        result = {"store": args.store, "sessions": args.sessions, "tokens_per_session": args.tokens}
        moved = moves(engine, store, args)
        result.update({k: v for k, v in moved.items() if k != "sessions"})
        if not args.no_ray:
            result.update(ttft(store, moved["sessions"], args))
        result["run"] = run_metadata(engine)
    finally:
        if moto is not None:
            moto.terminate()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {portable(args.out / 'results.json')}")
    return result


if __name__ == "__main__":
    main()
