"""Ingest benchmark: TTT ingest vs plain prefill on the same tokens, and session bytes vs a KV cache.

    python -m bench.ingest                    # default model, CPU, 4096 tokens
    python -m bench.ingest --tokens 16384 --device cuda

Every figure is a ratio against a baseline measured in the same run, on the same tokens:
  * prefill: a forward over the document in chunk-sized pieces with a growing KV cache (what a
    full-attention server does to read a document), no gradients;
  * TTT ingest: score + gradient step(s) per chunk with the default session config.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ttt
from ttt.model import KVCache

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "kjv_genesis_exodus.txt"

# (layers, kv_heads, head_dim) of well-known shapes, for the KV-cache comparison at long lengths
KNOWN_SHAPES = {"Llama-3-8B": (32, 8, 128), "Llama-3-70B": (80, 8, 128)}


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per_value: int) -> int:
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_value


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_seconds(engine, ids: list[int], chunk: int) -> float:
    base = engine.base
    cache = KVCache(base.cfg, 1, len(ids), base.device, base.dtype)
    sync(base.device)
    t = time.perf_counter()
    for i in range(0, len(ids), chunk):
        base.model(torch.tensor([ids[i : i + chunk]], device=base.device), None, cache)
    sync(base.device)
    return time.perf_counter() - t


def ingest_seconds(engine, ids: list[int], config: dict) -> tuple[float, ttt.Session]:
    session = engine.create_session(config)
    session.append_tokens(ids)
    session.end_document()
    sync(engine.base.device)
    t = time.perf_counter()
    while session.train_next_chunk() is not None:
        pass
    sync(engine.base.device)
    return time.perf_counter() - t, session


def session_bytes(session: ttt.Session) -> dict[str, int]:
    opt = sum(v.numel() * v.element_size() for s in session.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    rolling = session._context()
    return {
        "fast_weights": session.fast.num_bytes(),
        "optimizer_state": opt,
        "window_tokens": 8 * (len(session.window) + len(session.pending)),
        "rolling_context_kv": rolling.num_bytes() if rolling is not None else 0,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_ingest.json"))
    args = ap.parse_args(argv)

    engine = ttt.load_engine(args.model, args.device)
    base = engine.base
    ids = base.tokenizer(args.text.read_text(), add_special_tokens=False).input_ids
    ids = (ids * (args.tokens // len(ids) + 1))[: args.tokens]
    cfg = ttt.SessionConfig()
    chunk = cfg.ingest.chunk_tokens
    if args.tokens > base.cfg.max_position_embeddings:
        raise SystemExit(f"--tokens must be <= {base.cfg.max_position_embeddings} (the prefill baseline's context)")

    prefill_seconds(engine, ids[: 2 * chunk], chunk)  # warm-up
    t_prefill = prefill_seconds(engine, ids, chunk)
    t_ingest, session = ingest_seconds(engine, ids, {})
    t_ingest_nomeasure, _ = ingest_seconds(engine, ids, {"ingest": {"measure_loss_after": False}})
    n = len(ids)
    rows = {
        "prefill (KV cache, full attention)": n / t_prefill,
        "TTT ingest (default config)": n / t_ingest,
        "TTT ingest, no loss_after forward": n / t_ingest_nomeasure,
    }
    print(f"\n{base.name} on {base.device} ({base.dtype}), {n} tokens, chunk {chunk}, context {cfg.ingest.context_tokens}, "
          f"fast layers {cfg.fast.layers}, {cfg.fast.kind} r{cfg.fast.rank}")
    print(f"{'':40s} {'tokens/s':>10s} {'vs prefill':>10s}")
    for name, tps in rows.items():
        print(f"{name:40s} {tps:10.1f} {tps / rows['prefill (KV cache, full attention)']:10.2f}x")

    parts = session_bytes(session)
    held = parts["fast_weights"] + parts["optimizer_state"] + parts["window_tokens"]
    bpv = torch.finfo(base.dtype).bits // 8
    kv_here = kv_cache_bytes(base.cfg.num_layers, base.cfg.num_kv_heads, base.cfg.head_dim, n, bpv)
    print(f"\nbytes per session (persisted): {held / 1e6:.2f} MB = {', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in parts.items() if k != 'rolling_context_kv')}")
    print(f"  + transient rolling context while ingesting: {parts['rolling_context_kv'] / 1e6:.2f} MB (fixed size)")
    print(f"KV cache of full attention for the same {n} tokens: {kv_here / 1e6:.2f} MB -> ratio {kv_here / held:.2f}x")
    for name, (layers, kvh, hd) in KNOWN_SHAPES.items():
        for tokens in (131072, 1048576):
            print(f"  {name} KV cache at {tokens:>8d} tokens (bf16): {kv_cache_bytes(layers, kvh, hd, tokens, 2) / 1e9:8.1f} GB")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": base.name, "device": str(base.device), "tokens": n, "tokens_per_s": rows,
        "session_bytes": parts, "kv_cache_bytes": kv_here, "config": cfg.to_dict(),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
