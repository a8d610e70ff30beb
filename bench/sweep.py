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

import ttt

from .common import DEFAULT_DOC, add_model_args, document_tokens, load_engine, write_json
from .nll import full_nll, ttt_nll, window_nll

# name -> partial SessionConfig dict (chunk/context sizes are filled in from the command line)
CANDIDATES = {
    "lora-mlp-last8-lr1e-3": {"fast": {"layers": "last:8"}, "ingest": {"lr": 1e-3}},
    "lora-mlp-last8-lr3e-3": {"fast": {"layers": "last:8"}, "ingest": {"lr": 3e-3}},
    "lora-mlp-last8-lr1e-2": {"fast": {"layers": "last:8"}, "ingest": {"lr": 1e-2}},
    "lora-mlp-all-lr3e-3": {"fast": {"layers": "all"}, "ingest": {"lr": 3e-3}},
    "lora-attn+mlp-last8-lr3e-3": {
        "fast": {
            "layers": "last:8",
            "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "ingest": {"lr": 3e-3},
    },
    "lora-mlp-last8-r64-lr3e-3": {"fast": {"layers": "last:8", "rank": 64, "alpha": 128}, "ingest": {"lr": 3e-3}},
    "lora-mlp-last8-lr3e-3-2steps": {"fast": {"layers": "last:8"}, "ingest": {"lr": 3e-3, "steps_per_chunk": 2}},
    "extra-mlp-last8-lr3e-3": {"fast": {"kind": "mlp", "layers": "last:8"}, "ingest": {"lr": 3e-3}},
    "lora-mlp-last8-sgd-lr3e-1": {"fast": {"layers": "last:8"}, "ingest": {"optimizer": "sgd", "lr": 0.3}},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_DOC)
    ap.add_argument("--offsets", type=int, nargs="+", default=[150000], help="character offsets of the excerpts")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--skip", type=int, default=4, help="chunks left out of the mean (warm-up)")
    ap.add_argument("--configs", nargs="*", default=list(CANDIDATES), help=f"from {list(CANDIDATES)}")
    add_model_args(ap)
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention baseline")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep.json"))
    args = ap.parse_args(argv)

    engine = load_engine(args)
    results: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}

    excerpts = [document_tokens(engine, args.text, args.chunk * args.chunks, off) for off in args.offsets]
    sink = ttt.IngestConfig().sink_tokens

    def record(name: str, per_chunk_nll) -> None:
        """Run ``per_chunk_nll(ids)`` on every excerpt; keep each excerpt's mean NLL after the warm-up chunks."""
        t = time.perf_counter()
        results[name] = [statistics.mean(list(per_chunk_nll(ids))[args.skip :]) for ids in excerpts]
        seconds[name] = time.perf_counter() - t
        print(
            f"{name:34s} NLL {statistics.mean(results[name]):.4f}  "
            f"per excerpt {[round(x, 4) for x in results[name]]}  {seconds[name]:6.1f}s",
            flush=True,
        )

    record("window-only (no TTT)", lambda ids: window_nll(engine, ids, args.chunk, args.context, sink))
    if not args.no_full:
        record("full attention (whole prefix)", lambda ids: full_nll(engine, ids, args.chunk))
    for name in args.configs:
        cfg = json.loads(json.dumps(CANDIDATES[name]))
        cfg["ingest"].update(chunk_tokens=args.chunk, context_tokens=args.context, measure_loss_after=False)
        record(name, lambda ids, cfg=cfg: ttt_nll(engine, ids, cfg))

    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "nll": results, "seconds": seconds})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
