"""Choose fast-weight defaults by measurement: honest (score-before-train) NLL of a long text.

For each candidate session config, ingest ``--chunks`` chunks of a public-domain text and report the
mean loss_before of chunks [--skip, end) next to two baselines measured on the same tokens:
the base model with only the recent window (no TTT) and full attention over the whole prefix.

    python -m bench.sweep --chunks 16 --chunk 512 --offsets 150000 250000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ttt
from ttt.ingest import forward_hidden, next_token_nll
from ttt.model import RollingContext

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "kjv_genesis_exodus.txt"

# name -> partial SessionConfig dict (chunk/context sizes are filled in from the command line)
CANDIDATES = {
    "lora-mlp-last8-lr1e-3": {"fast": {"layers": "last:8"}, "ingest": {"lr": 1e-3}},
    "lora-mlp-last8-lr3e-3": {"fast": {"layers": "last:8"}, "ingest": {"lr": 3e-3}},
    "lora-mlp-last8-lr1e-2": {"fast": {"layers": "last:8"}, "ingest": {"lr": 1e-2}},
    "lora-mlp-all-lr3e-3": {"fast": {"layers": "all"}, "ingest": {"lr": 3e-3}},
    "lora-attn+mlp-last8-lr3e-3": {
        "fast": {"layers": "last:8", "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "ingest": {"lr": 3e-3},
    },
    "lora-mlp-last8-r64-lr3e-3": {"fast": {"layers": "last:8", "rank": 64, "alpha": 128}, "ingest": {"lr": 3e-3}},
    "lora-mlp-last8-lr3e-3-2steps": {"fast": {"layers": "last:8"}, "ingest": {"lr": 3e-3, "steps_per_chunk": 2}},
    "extra-mlp-last8-lr3e-3": {"fast": {"kind": "mlp", "layers": "last:8"}, "ingest": {"lr": 3e-3}},
    "lora-mlp-last8-sgd-lr3e-1": {"fast": {"layers": "last:8"}, "ingest": {"optimizer": "sgd", "lr": 0.3}},
}


@torch.no_grad()
def window_baseline(engine, ids, chunk, context, sink) -> list[float]:
    """Per-chunk NLL with the base model and the same rolling window, no fast weights."""
    model = engine.base.model
    ctx = RollingContext(model.cfg.num_layers, context - 1 - sink, sink)
    out, carry = [], []
    for i in range(0, len(ids), chunk):
        inputs = torch.tensor([carry + ids[i : i + chunk]], device=engine.base.device)
        out.append(next_token_nll(model, forward_hidden(model, None, inputs, ctx), inputs).mean().item())
        ctx.commit(drop_last=1)
        carry = ids[i + chunk - 1 : i + chunk]
    return out


@torch.no_grad()
def full_attention(engine, ids, chunk) -> list[float]:
    """Per-chunk NLL with the base model attending to the whole prefix (one forward)."""
    model = engine.base.model
    x = torch.tensor([ids], device=engine.base.device)
    nll = next_token_nll(model, forward_hidden(model, None, x), x)[0]  # predicts ids[1:]
    return [nll[max(i - 1, 0) : i + chunk - 1].mean().item() for i in range(0, len(ids), chunk)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--offsets", type=int, nargs="+", default=[150000], help="character offsets of the excerpts")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--skip", type=int, default=4, help="chunks left out of the mean (warm-up)")
    ap.add_argument("--configs", nargs="*", default=list(CANDIDATES), help=f"from {list(CANDIDATES)}")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention baseline")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep.json"))
    args = ap.parse_args(argv)

    engine = ttt.load_engine(args.model, args.device)
    text = args.text.read_text()
    results: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}

    def record(name, per_excerpt_losses, dt):
        results[name] = [statistics.mean(losses[args.skip :]) for losses in per_excerpt_losses]
        seconds[name] = dt
        print(f"{name:34s} NLL {statistics.mean(results[name]):.4f}  per excerpt {[round(x, 4) for x in results[name]]}  {dt:6.1f}s", flush=True)

    excerpts = []
    for off in args.offsets:
        ids = engine.base.tokenizer(text[off:], add_special_tokens=False).input_ids[: args.chunk * args.chunks]
        excerpts.append(ids)
    sink = ttt.IngestConfig().sink_tokens

    t = time.perf_counter()
    record("window-only (no TTT)", [window_baseline(engine, ids, args.chunk, args.context, sink) for ids in excerpts], time.perf_counter() - t)
    if not args.no_full:
        t = time.perf_counter()
        record("full attention (whole prefix)", [full_attention(engine, ids, args.chunk) for ids in excerpts], time.perf_counter() - t)
    for name in args.configs:
        cfg = json.loads(json.dumps(CANDIDATES[name]))
        cfg["ingest"].update(chunk_tokens=args.chunk, context_tokens=args.context, measure_loss_after=False)
        per_excerpt = []
        t = time.perf_counter()
        for ids in excerpts:
            session = engine.create_session(cfg)
            session.append_tokens(ids)
            session.end_document()
            losses = []
            while (report := session.train_next_chunk()) is not None:
                losses.append(report.loss_before)
            per_excerpt.append(losses)
        record(name, per_excerpt, time.perf_counter() - t)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "nll": results, "seconds": seconds}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
