"""`ttt eval`: how much of a long document does a session remember, and where?

    ttt eval                                   # the default public-domain document, default model, CPU
    ttt eval book.txt notes.txt --seeds 3 --out runs/eval --device cuda --chunks 64 --recall-lengths 4096 16384

1. NLL by position: for each document and seed, ``--chunks`` chunks of ``--chunk-tokens`` tokens from a random
   line of the document (the seed picks it), each chunk scored BEFORE it is trained on, under
   (a) the base model with only the recent window, (b) TTT: a session's fast weights plus the same window,
   (c) full attention over the whole prefix (as far as the model's context, or ``--full-context``, allows).
   Several seeds or documents give error bars (standard error of the mean over runs).
2. Recall probe: needles planted at several depths (fractions of the document, 0.9 near its start) of documents
   of several lengths, asked back by likelihood (right vs wrong values) and by a greedy chat answer, under
   (a), (b) and (c): the needle task of ``ttt recall`` (bench/recall_cli.py), which also has multi-fact stories
   and book questions, more memories and the presets; ``--recall-only`` skips the NLL curves.

Writes DIR/results.json (every point, the settings, the model, the git revision), nll_vs_position.png,
gain.png, recall.png, and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

import ttt
from ttt.config import PRESETS

from .common import DEFAULT_DOC, add_model_args, document_tokens, load_engine, run_metadata, settings_of, write_json
from .nll import full_nll, ttt_nll, window_nll
from .plots import nll_figures, recall_heatmap
from .recall import PROBES, accuracy
from .recall_cli import needle_documents, probe_documents

RECALL_MEMORIES = ("window", "ttt", "full")


def mean_sem(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def by_position(runs: list[list[float]]) -> dict:
    """{"mean": [...], "sem": [...] or None} across runs, one entry per chunk."""
    stats = [mean_sem(list(col)) for col in zip(*runs, strict=True)]
    sems = [s for _, s in stats]
    return {"mean": [m for m, _ in stats], "sem": None if sems[0] is None else sems}


def line_offset(text: str, seed: int, chars_needed: int) -> int:
    """A random line start (seeded) with about ``chars_needed`` characters after it when the text allows."""
    off = random.Random(seed).randrange(max(1, len(text) - chars_needed))
    return text.find("\n", off) + 1 if off else 0


def session_config(args, seed: int, preset: str | None = None) -> ttt.SessionConfig:
    given = json.loads(args.session_config)
    cfg = ttt.SessionConfig.from_dict({**given, "memory": preset} if preset else given)
    cfg.ingest.chunk_tokens, cfg.ingest.context_tokens = args.chunk_tokens, args.context_tokens
    cfg.ingest.measure_loss_after = False  # not part of the score; one forward less per chunk
    cfg.fast.seed = seed
    return cfg


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="ttt eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "docs",
        nargs="*",
        type=Path,
        default=[DEFAULT_DOC],
        metavar="DOC",
        help="UTF-8 text files (default: the KJV Genesis and Exodus shipped in bench/data)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/eval"), metavar="DIR")
    add_model_args(ap)
    ap.add_argument("--seeds", type=int, default=1, help="runs per document (excerpt and fast-weight seed)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--context-tokens", type=int, default=512, help="the window of (a) and (b)")
    ap.add_argument("--full-context", type=int, help="most tokens (c) attends to (default: the model's context)")
    ap.add_argument("--no-full", action="store_true", help="skip (c) in the NLL curves")
    ap.add_argument("--skip", type=int, default=2, help="warm-up chunks left out of the summary means")
    ap.add_argument(
        "--session-config",
        default="{}",
        metavar="JSON",
        help='partial session config for (b), e.g. \'{"ingest": {"lr": 1e-3}}\'',
    )
    ap.add_argument(
        "--presets",
        nargs="*",
        default=[],
        choices=list(PRESETS),
        help="the NLL curves' (b) once per memory preset (over --session-config), e.g. --presets off "
        "balanced deep; the recall probe uses --session-config alone (ttt recall compares presets)",
    )
    ap.add_argument("--recall-lengths", type=int, nargs="+", default=[1024, 2048], metavar="N")
    ap.add_argument(
        "--recall-depths",
        type=float,
        nargs="+",
        default=[0.9, 0.5, 0.1],
        metavar="F",
        help="needle depths: the share of the document after the needle (0.9: near its start)",
    )
    ap.add_argument("--facts-per-depth", type=int, default=2)
    ap.add_argument("--wrong-values", type=int, default=5, help="likelihood probe: wrong answers per needle")
    ap.add_argument("--answer-tokens", type=int, default=24, help="greedy tokens per chat answer")
    ap.add_argument("--no-recall", action="store_true")
    ap.add_argument("--recall-only", action="store_true", help="only the recall probe, no NLL curves")
    args = ap.parse_args(argv)
    if args.chunks < 1 or args.seeds < 1 or not 0 <= args.skip < args.chunks:
        ap.error("--chunks and --seeds must be >= 1, --skip in [0, --chunks)")
    if args.recall_only and args.no_recall:
        ap.error("--recall-only and --no-recall exclude each other")
    if not all(0 < d < 1 for d in args.recall_depths):
        ap.error("--recall-depths are fractions of the document in (0, 1)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    engine = load_engine(args)
    args.out.mkdir(parents=True, exist_ok=True)
    n_tokens = args.chunks * args.chunk_tokens
    sessions = {f"ttt/{p}": p for p in args.presets} if args.presets else {"ttt": None}  # NLL method -> preset
    methods = [] if args.recall_only else ["window", *sessions] + ([] if args.no_full else ["full"])
    n_facts = len(args.recall_depths) * args.facts_per_depth * len(args.recall_lengths)
    total = len(args.docs) * args.seeds * args.chunks * len(methods)
    total += 0 if args.no_recall else args.seeds * n_facts * len(RECALL_MEMORIES)
    bar = tqdm(total=total, desc="eval", unit="step", file=sys.stderr, dynamic_ncols=True)

    runs, seconds = [], dict.fromkeys([*methods, "recall"], 0.0)
    texts = {doc: doc.read_text(encoding="utf-8") for doc in args.docs} if methods else {}
    for doc, text in texts.items():
        for seed in range(args.seeds):
            offset = line_offset(text, seed, 6 * n_tokens)  # ~4-5 characters per token in English prose
            ids = document_tokens(engine, doc, n_tokens, offset)
            scorers = {
                "window": lambda ids=ids: window_nll(
                    engine, ids, args.chunk_tokens, args.context_tokens, ttt.IngestConfig().sink_tokens
                ),
                "full": lambda ids=ids: full_nll(engine, ids, args.chunk_tokens, args.full_context),
                **{
                    m: lambda ids=ids, seed=seed, p=p: ttt_nll(engine, ids, session_config(args, seed, p))
                    for m, p in sessions.items()
                },
            }
            run = {"doc": doc.name, "seed": seed, "char_offset": offset, "nll": {}}
            for name in methods:
                bar.set_postfix_str(f"{doc.name} seed {seed}: {name}")
                t = time.perf_counter()
                run["nll"][name] = []
                for x in scorers[name]():
                    run["nll"][name].append(x)
                    bar.update()
                seconds[name] += time.perf_counter() - t
            runs.append(run)

    records = []
    if not args.no_recall:
        t = time.perf_counter()
        docs = needle_documents(
            engine, args.recall_lengths, args.recall_depths, args.facts_per_depth, 0, args.seeds, args.wrong_values
        )
        for seed in range(args.seeds):
            bar.set_postfix_str(f"recall seed {seed}")
            mine = [d for d in docs if d[0]["seed"] == seed]
            recs, _ = probe_documents(
                engine, mine, {"session": session_config(args, seed)}, RECALL_MEMORIES, args.answer_tokens, bar.update
            )
            records += [{k.removesuffix("/session"): v for k, v in r.items()} for r in recs]
        seconds["recall"] = time.perf_counter() - t
    bar.close()

    results = summarize(args, engine, runs, methods, records, seconds)
    write_json(args.out / "results.json", results)
    pngs = (
        []
        if not runs
        else nll_figures(
            args.out,
            results["positions"],
            results["nll"],
            results["gain"],
            f"{engine.base.name}, {len(runs)} run(s) of {n_tokens} tokens",
        )
    )
    if records:
        r = results["recall"]
        grids = {f"{m}: {p}": r["accuracy"][m][p] for p in PROBES for m in RECALL_MEMORIES}
        pngs.append(
            recall_heatmap(
                args.out / "recall.png",
                grids,
                args.recall_lengths,
                [round(d * max(args.recall_lengths)) for d in args.recall_depths],
                f"needles recalled (likelihood chance {r['chance_score']:.2f}); rows: share of the document after them",
            )
        )
    print_summary(results)
    print(f"wrote {args.out / 'results.json'}, {', '.join(p.name for p in pngs)}")
    return results


def summarize(args, engine, runs, methods, records, seconds) -> dict:
    skip = args.skip
    chunk = args.chunk_tokens
    n_tokens = args.chunks * chunk
    per_method = {m: [r["nll"][m] for r in runs] for m in methods}
    gains = {
        m: [[w - x for w, x in zip(r["nll"]["window"], r["nll"][m], strict=True)] for r in runs]
        for m in methods
        if m != "window"
    }
    summary = {m: mean_sem([statistics.fmean(r[skip:]) for r in per_method[m]])[0] for m in methods}
    if "full" in summary and summary["window"] != summary["full"]:
        gap = summary["window"] - summary["full"]
        summary |= {
            f"gap_recovered{m.removeprefix('ttt')}": (summary["window"] - summary[m]) / gap
            for m in methods
            if m.startswith("ttt")
        }
    settings = settings_of(args)
    results = {
        "meta": run_metadata(engine),
        "settings": settings,
        "session_config": session_config(args, 0).to_dict(),
        "positions": [min((i + 1) * chunk, n_tokens) for i in range(args.chunks)],
        "runs": runs,
        "nll": {m: by_position(per_method[m]) for m in methods},
        "gain": {m: by_position(g) for m, g in gains.items()},
        "summary": {"chunks": f"{skip}-{args.chunks - 1}", **summary},
        "seconds": seconds,
    }
    if records:
        results["recall"] = {
            "lengths": args.recall_lengths,
            "depths": args.recall_depths,
            "chance_score": 1 / (args.wrong_values + 1),
            # accuracy[memory][probe][depth index][length index]; None where no needle was asked
            "accuracy": {
                m: {
                    p: [
                        [accuracy(records, m, p, length=n, depth=round(d * n)) for n in args.recall_lengths]
                        for d in args.recall_depths
                    ]
                    for p in PROBES
                }
                for m in RECALL_MEMORIES
            },
            "records": records,
        }
    return results


def print_summary(results: dict) -> None:
    if results["nll"]:
        print_nll(results)
    if "recall" in results:
        print_recall(results["recall"])


def print_nll(results: dict) -> None:
    nll, gain = results["nll"], results["gain"]
    methods = list(nll)

    def cell(s, i):
        return f"{s['mean'][i]:.3f}" + (f"±{s['sem'][i]:.3f}" if s["sem"] is not None else "")

    print(
        f"\n{results['meta']['model']} on {results['meta']['device']}: NLL (nats/token) of each chunk, "
        f"scored before training on it"
    )
    ttts = [m for m in methods if m.startswith("ttt")]
    print(f"{'tokens':>8s}" + "".join(f"{m:>16s}" for m in methods) + "".join(f"{'gain ' + m:>18s}" for m in ttts))
    for i, pos in enumerate(results["positions"]):
        print(
            f"{pos:8d}"
            + "".join(f"{cell(nll[m], i):>16s}" for m in methods)
            + "".join(f"{cell(gain[m], i):>18s}" for m in ttts)
        )
    s = results["summary"]
    gaps = [
        f"{m} recovers {100 * s['gap_recovered' + m.removeprefix('ttt')]:.0f}%"
        for m in ttts
        if "gap_recovered" + m.removeprefix("ttt") in s
    ]
    print(
        f"mean of chunks {s['chunks']}: "
        + ", ".join(f"{m} {s[m]:.4f}" for m in methods)
        + (f"; of the window-to-full gap, {', '.join(gaps)}" if gaps else "")
    )


def print_recall(r: dict) -> None:
    print(
        f"\nrecall accuracy by share of the document after the needle (rows) and document tokens (columns), "
        f"{len(r['records'])} needles; likelihood chance {r['chance_score']:.2f}"
    )
    width = 7 * len(r["lengths"])
    for probe in PROBES:
        print(f"{probe + ' probe':>16s}" + "".join(f" | {m:<{width}s}" for m in RECALL_MEMORIES))
        print(f"{'depth':>16s}" + "".join(" | " + "".join(f"{n:>7d}" for n in r["lengths"]) for _ in RECALL_MEMORIES))
        for d, depth in enumerate(r["depths"]):
            rows = [r["accuracy"][m][probe][d] for m in RECALL_MEMORIES]
            print(
                f"{depth:>16g}"
                + "".join(" | " + "".join("      -" if v is None else f"{v:7.2f}" for v in row) for row in rows)
            )


if __name__ == "__main__":
    main()
