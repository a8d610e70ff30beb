"""`ttt bench`: what TTT costs next to full attention, on the same model and the same tokens, in one run.

    ttt bench                                  # default model, CPU: N = 1k, 2k, 4k tokens, 16-token answers
    ttt bench --device cuda --tokens 1024 4096 16384 65536 --model /models/Llama-3.2-1B-Instruct

For N growing, three memories read the first N tokens of the document and then answer one chat question:
  * TTT: a default session ingests the tokens (score + gradient step per chunk) and answers through
    Session.generate (its fast weights + the last context_tokens tokens, prefilled at every question);
  * full attention, prefill each time: Engine.answer with the N tokens before the question (no reuse);
  * full attention, reused KV cache: the N tokens were prefilled once (timed as plain prefill); each question
    runs on top of the cache.
Printed ratios: ingest throughput (TTT vs plain prefill), time to first token and decode tokens/s of a chat,
bytes held per session vs the KV cache (also computed for Llama-3-8B and 70B shapes at 128K and 1M tokens),
and the aggregate decode tokens/s of ``--together`` sessions' answers decoded in one batch vs one alone.
Writes DIR/bench.json and DIR/bench.png (latency, decode speed and memory vs N).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ttt
from ttt.decode import DecodeBatch
from ttt.model import ModelConfig
from ttt.pause import pausing

from .common import (
    DEFAULT_DOC,
    add_model_args,
    document_tokens,
    load_engine,
    run_metadata,
    settings_of,
    sync,
    write_json,
)
from .plots import bench_figure
from .recall import QUESTION_ROOM, PrefixedLM

QUESTION = [{"role": "user", "content": "Retell, in detail, what happens in the text you have read."}]
# ttt: the first chat after reading (the window is prefilled); ttt_again: the next one (its keys/values reused)
MEMORIES = ("ttt", "ttt_again", "full_prefill", "full_reuse")
TOGETHER_TOKENS = 64  # per answer when several sessions' answers are decoded together


@dataclass
class Shape:
    """What the KV cache and a LoRA session's size depend on."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shape:
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size)

    def kv_bytes(self, tokens: int, bytes_per_value: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * bytes_per_value

    def session_bytes(self, cfg: ttt.SessionConfig, bytes_per_value: int) -> int:
        """A LoRA session's resident bytes once its exact memory is full and its document trained (at most this,
        whatever it read): fp32 fast weights + AdamW's two moments + the window's K/V (the rolling context ingest
        attends to) + the answers' prefix cache (the window's K/V, after the exact spans' with exact_select
        "surprise"; spans a question names are the answer's own). The spans' token ids are not tensors."""
        fast = len(cfg.fast.layer_indices(self.layers))
        io = {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (self.hidden, self.kv_heads * self.head_dim),
            "v_proj": (self.hidden, self.kv_heads * self.head_dim),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        params = fast * sum(cfg.fast.rank * sum(io[t]) for t in cfg.fast.targets)
        # The rolling context caches context_tokens - 1 tokens: the last one is fed with the next chunk.
        rolling = self.kv_bytes(max(cfg.ingest.context_tokens - 1, 0), bytes_per_value)
        answers = self.kv_bytes(cfg.recall.tokens_before_window + cfg.ingest.context_tokens, bytes_per_value)
        return 3 * 4 * params + rolling + answers


KNOWN_SHAPES = {"Llama-3-8B": Shape(32, 8, 128, 4096, 14336), "Llama-3-70B": Shape(80, 8, 128, 8192, 28672)}
LONG_CONTEXTS = (131072, 1048576)


def timed_chat(start_answer: Callable[[], Iterator]) -> dict:
    """Time an answer from the call that starts it: first token, then the decode rate of the rest."""
    t0 = time.perf_counter()
    tokens = start_answer()
    got_first = next(tokens, None) is not None
    t1 = time.perf_counter()
    rest = sum(1 for _ in tokens)
    t2 = time.perf_counter()
    return {
        "ttft_s": t1 - t0,
        "decode_tokens_per_s": rest / (t2 - t1) if rest else None,
        "answer_tokens": got_first + rest,
    }


def token_ticks(stream: ttt.TokenStream) -> Iterator[int]:
    """One item per decoded token of a TokenStream (its text deltas can hold a token back)."""
    seen = 0
    for _ in stream:
        yield from range(seen + 1, stream.completion_tokens + 1)
        seen = stream.completion_tokens
    yield from range(seen + 1, stream.completion_tokens + 1)


def answers_together(engine: ttt.Engine, sessions: list[ttt.Session], max_tokens: int) -> dict:
    """The sessions' answers decoded together (ttt.decode.DecodeBatch: one forward per token for all) vs the first
    session's alone: aggregate decode tokens/s, prompt prefill included in both."""
    device = engine.base.device

    def decode(group: list[ttt.Session]) -> tuple[int, float]:
        rows = [s.generate(QUESTION, max_tokens=max_tokens, stream=True) for s in group]  # window K/V built here
        batch = DecodeBatch(engine.base.model, max_rows=len(rows))
        for row in rows:
            batch.join(row)
        sync(device)
        t = time.perf_counter()
        while len(batch):
            batch.step()
        sync(device)
        return sum(r.completion_tokens for r in rows), time.perf_counter() - t

    decode(sessions[:1])  # warm-up
    alone_tokens, alone_s = decode(sessions[:1])
    tokens, seconds = decode(sessions)
    return {
        "answers": len(sessions),
        "max_tokens": max_tokens,
        "alone_tokens_per_s": alone_tokens / alone_s,
        "together_tokens": tokens,
        "together_tokens_per_s": tokens / seconds,
        "together_vs_alone": (tokens / seconds) / (alone_tokens / alone_s),
    }


def chunk_pauses(engine: ttt.Engine, cfg: ttt.SessionConfig, ids: list[int], chunks: int = 3) -> dict:
    """How a chunk in training yields the device (``ttt.pause``; the server decodes answers there): its pause
    points per chunk and the stretches between them (from the chunk's start to its end, the device synchronised
    at each), and its seconds with a pause handler that does nothing vs without one, alternating chunk by chunk."""
    device, chunk = engine.base.device, cfg.ingest.chunk_tokens
    need = (chunks + 1) * chunk
    doc = (ids * (need // len(ids) + 1))[:need]  # the document, repeated if shorter
    plain, paused, marked = (engine.create_session(cfg) for _ in range(3))
    for s in (plain, paused, marked):
        s.append_tokens(doc)
        s.train_next_chunk()  # the first chunk has no window yet: not measured
    marks: list[float] = []

    def mark() -> None:
        sync(device)
        marks.append(time.perf_counter())

    def timed(session: ttt.Session, handler: Callable[[], None] | None) -> float:
        sync(device)
        t = time.perf_counter()
        with pausing(handler) if handler is not None else contextlib.nullcontext():
            session.train_next_chunk()
        sync(device)
        return time.perf_counter() - t

    seconds = {"plain": 0.0, "paused": 0.0}
    stretches: list[float] = []
    for _ in range(chunks):
        seconds["plain"] += timed(plain, None)
        seconds["paused"] += timed(paused, lambda: None)
        mark()
        timed(marked, mark)
        mark()
        stretches += [b - a for a, b in itertools.pairwise(marks)]
        marks.clear()
    return {
        "chunks": chunks,
        "pause_points_per_chunk": (len(stretches) - chunks) / chunks,
        "longest_stretch_s": max(stretches),
        "mean_stretch_s": sum(stretches) / len(stretches),
        "chunk_s": seconds["plain"] / chunks,
        "chunk_paused_s": seconds["paused"] / chunks,
        "paused_vs_plain": seconds["paused"] / seconds["plain"],
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="ttt bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096],
        metavar="N",
        help="document lengths at which a chat is timed (full attention only where N fits the context)",
    )
    ap.add_argument("--answer-tokens", type=int, default=16, help="greedy tokens per answer")
    ap.add_argument("--text", type=Path, default=DEFAULT_DOC, help="the document (repeated if shorter than N)")
    ap.add_argument(
        "--session-config",
        default="{}",
        metavar="JSON",
        help='partial session config of the TTT session, e.g. \'{"ingest": {"chunk_tokens": 1024}}\'',
    )
    ap.add_argument(
        "--together",
        type=int,
        default=16,
        metavar="S",
        help="sessions whose answers (64 tokens) are decoded in one batch, vs one alone",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), metavar="DIR")
    add_model_args(ap)
    args = ap.parse_args(argv)
    args.tokens = sorted(set(args.tokens))
    if args.tokens[0] < 2 or args.answer_tokens < 1 or args.together < 1:
        ap.error("--tokens must be >= 2, --answer-tokens and --together >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    engine = load_engine(args)
    base = engine.base
    device, max_context = base.device, base.cfg.max_position_embeddings
    ids = document_tokens(engine, args.text, args.tokens[-1])
    cfg = ttt.SessionConfig.from_dict(json.loads(args.session_config))
    chunk = cfg.ingest.chunk_tokens
    fits = [n for n in args.tokens if n + QUESTION_ROOM <= max_context]  # full attention's question needs room

    def ttt_answer():
        return token_ticks(session.generate(QUESTION, max_tokens=args.answer_tokens, stream=True))

    def full_answer(n: int):  # the N tokens, then the question, all prefilled now (Engine.answer: no reuse)
        return token_ticks(engine.answer(QUESTION, ttt.SamplingParams(args.answer_tokens), None, ids[:n], True))

    # Warm-up (allocator, kernels, thread pools): every path once on a short prefix.
    session = engine.create_session(cfg)
    session.append_tokens(ids[: 2 * chunk])
    while session.train_next_chunk() is not None:
        pass
    timed_chat(ttt_answer)
    timed_chat(lambda: full_answer(chunk))
    timed_chat(lambda: PrefixedLM(engine, ids[:chunk]).stream(QUESTION, args.answer_tokens))

    session = engine.create_session(cfg)  # the measured one
    full = PrefixedLM(engine, [], capacity=min(args.tokens[-1] + QUESTION_ROOM, max_context))
    rows, t_ingest, t_prefill, read = [], 0.0, 0.0, 0
    for n in args.tokens:
        print(f"N = {n}: reading ...", flush=True)
        session.append_tokens(ids[read:n])
        sync(device)
        t = time.perf_counter()
        while session.train_next_chunk() is not None:
            pass
        sync(device)
        t_ingest += time.perf_counter() - t
        if n in fits:
            t = time.perf_counter()
            for i in range(read, n, chunk):
                full.extend(ids[i : min(i + chunk, n)])
            sync(device)
            t_prefill += time.perf_counter() - t
        read = n
        row = {
            "tokens": n,
            "trained_tokens": session.stats.tokens_ingested,
            "ttt": timed_chat(ttt_answer),
            "ttt_again": timed_chat(ttt_answer),
        }
        if n in fits:
            row["full_prefill"] = timed_chat(lambda n=n: full_answer(n))
            row["full_reuse"] = timed_chat(lambda: full.stream(QUESTION, args.answer_tokens))
        row["bytes"] = {
            "ttt_session": session.resident_bytes(),  # fast weights + AdamW state + the window's keys/values
            "ttt_fast_weights": session.fast.num_bytes(),
            "kv_cache": Shape.of(base.cfg).kv_bytes(n, base.dtype.itemsize),
        }
        rows.append(row)

    trained = session.stats.tokens_ingested
    prefilled = fits[-1] if fits else 0
    ingest = {
        "ttt_tokens_per_s": trained / t_ingest if trained else None,
        "prefill_tokens_per_s": prefilled / t_prefill if prefilled else None,
    }
    readers = [session] + [engine.create_session(cfg) for _ in range(args.together - 1)]
    for i, reader in enumerate(readers[1:], 1):  # each reads its own first chunk of the document
        reader.append_tokens(ids[i * chunk % len(ids) :][:chunk])
        reader.end_document()
        while reader.train_next_chunk() is not None:
            pass
    together = answers_together(engine, readers, TOGETHER_TOKENS)
    pauses = chunk_pauses(engine, cfg, ids)
    shapes = {
        name: {
            "kv_cache_bf16": {n: s.kv_bytes(n, 2) for n in LONG_CONTEXTS},
            "ttt_session_bf16": s.session_bytes(cfg, 2),
        }
        for name, s in KNOWN_SHAPES.items()
    }
    results = {
        "meta": run_metadata(engine),
        "settings": settings_of(args),
        "session_config": cfg.to_dict(),
        "question": QUESTION[0]["content"],
        "ingest": ingest,
        "chats": rows,
        "answers_together": together,
        "chunk_pauses": pauses,
        "known_shapes": shapes,
    }
    write_json(args.out / "bench.json", results)
    png = plot(args.out / "bench.png", results)
    print_summary(results)
    print(f"wrote {args.out / 'bench.json'}, {png}")
    return results


def plot(path: Path, results: dict) -> Path:
    rows = results["chats"]
    tokens = [r["tokens"] for r in rows]
    labels = {
        "ttt": "TTT session, first chat",
        "ttt_again": "TTT session, next chat",
        "full_prefill": "full attention, prefill each time",
        "full_reuse": "full attention, reused KV cache",
    }

    def series(key):
        return {labels[m]: [r[m][key] if m in r else None for r in rows] for m in MEMORIES}

    mb = {
        "TTT session (resident)": [r["bytes"]["ttt_session"] for r in rows],
        "KV cache of full attention": [r["bytes"]["kv_cache"] for r in rows],
    }
    return bench_figure(
        path,
        tokens,
        {
            "time to first token (s)": series("ttft_s"),
            "decode tokens/s": series("decode_tokens_per_s"),
            "bytes held": mb,
        },
        f"{results['meta']['model']} on {results['meta']['device']}",
    )


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_summary(results: dict) -> None:
    meta, ingest = results["meta"], results["ingest"]
    print(
        f"\n{meta['model']} on {meta['device']} ({meta['dtype']}), {results['settings']['answer_tokens']}-token "
        f"greedy answers"
    )
    ttt_tps, prefill_tps = ingest["ttt_tokens_per_s"], ingest["prefill_tokens_per_s"]
    print(
        "ingest: TTT "
        + (f"{ttt_tps:.1f} tokens/s" if ttt_tps else "not measured (no full chunk)")
        + ", plain prefill "
        + (f"{prefill_tps:.1f} tokens/s" if prefill_tps else "not measured (no N fits)")
        + f" -> TTT at {_ratio(ttt_tps, prefill_tps)} of prefill"
    )
    t = results["answers_together"]
    print(
        f"answers together: {t['answers']} sessions' {t['max_tokens']}-token answers in one batch "
        f"{t['together_tokens_per_s']:.1f} tokens/s vs one alone {t['alone_tokens_per_s']:.1f} tokens/s "
        f"-> {t['together_vs_alone']:.2f}x"
    )
    p = results["chunk_pauses"]
    print(
        f"chunk pause points: {p['pause_points_per_chunk']:.0f} per chunk, at most {p['longest_stretch_s']:.3f} s"
        f" apart (mean {p['mean_stretch_s']:.3f} s); a chunk {p['chunk_s']:.2f} s without a pause handler,"
        f" {p['chunk_paused_s']:.2f} s with one -> {p['paused_vs_plain']:.2f}x"
    )
    head = (
        f"{'N':>7s} {'TTFT ttt':>9s} {'again':>9s} {'prefill':>9s} {'reuse':>9s} {'prefill/again':>14s}"
        f" {'reuse/again':>12s} {'tok/s ttt':>10s} {'prefill':>8s} {'reuse':>8s} {'session MB':>11s} {'KV MB':>9s}"
        f" {'KV/session':>11s}"
    )
    print(head)

    def get(r, m, k):
        return r[m][k] if m in r else None

    def fmt(x, width: int, digits: int) -> str:
        return f"{'-':>{width}s}" if x is None else f"{x:{width}.{digits}f}"

    for r in results["chats"]:
        t = [get(r, m, "ttft_s") for m in MEMORIES]
        d = [get(r, m, "decode_tokens_per_s") for m in MEMORIES]
        b = r["bytes"]
        print(
            f"{r['tokens']:7d} {fmt(t[0], 9, 3)} {fmt(t[1], 9, 3)} {fmt(t[2], 9, 3)} {fmt(t[3], 9, 3)} "
            f"{_ratio(t[2], t[1]):>14s} {_ratio(t[3], t[1]):>12s} {fmt(d[1], 10, 1)} {fmt(d[2], 8, 1)} "
            f"{fmt(d[3], 8, 1)} {b['ttt_session'] / 1e6:11.2f} {b['kv_cache'] / 1e6:9.2f} "
            f"{_ratio(b['kv_cache'], b['ttt_session']):>11s}"
        )
    print(
        "(TTFT in seconds; 'again' = the session's next chat, its window's keys/values reused; 'prefill/again' ="
        " full attention's TTFT / TTT's; '-' = beyond the model's context)"
    )
    for name, s in results["known_shapes"].items():
        sess = s["ttt_session_bf16"]
        kv = ", ".join(
            f"{v / 1e9:.1f} GB at {n // 1024}K tokens ({v / sess:.0f}x)" for n, v in s["kv_cache_bf16"].items()
        )
        print(f"{name} (bf16): a default TTT session holds {sess / 1e6:.0f} MB whatever it read; KV cache {kv}")


if __name__ == "__main__":
    main()
