"""`ttt recall`: does a session answer about what it read, long after it left its window?

    ttt recall                                          # default model, CPU: presets off, fast, balanced, deep
    ttt recall --lengths 2048 8192 32768 --seeds 3 --book-tokens 0 --device cuda --out runs/recall
    ttt recall --config mine='{"recall": {"exact_tokens": 256}}' --presets balanced

Three tasks (bench/items.py), every item asked by likelihood (right answer vs 5 wrong ones, as a fact statement
and as the reply to a question) and by a greedy chat answer (bench/recall.py):
  * needles of seven kinds (numbers, names, places, years, objects, passwords, sums; two sentence shapes each)
    planted ``--depths`` tokens before the end of novel text of each ``--lengths``;
  * BABILong-style stories (bAbI qa1-qa3: one, two or three facts needed) scattered through the same documents;
  * questions about Jane Austen's *Persuasion*, read from its start (``--book-tokens``; 0: the whole book).
Each document is read by one session per setting (a named ``--presets`` or a ``--config``) and asked under
every memory: ``none`` (nothing read), ``window`` (the last context_tokens tokens, base model), ``full`` (the
whole document as far as the model's context allows), and per setting ``ttt/<setting>`` (fast weights + the
session's answer prefix) and ``weights/<setting>`` (fast weights alone). Ingest tokens/s of each setting is
timed against plain prefill of the same document in the same run.

Writes DIR/results.json (every answer, settings, model, git revision), DIR/needles_<probe>.png (depth x
length heat maps, one panel per memory) and prints the summary tables.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

import ttt
from ttt.config import PRESETS

from .common import add_model_args, load_engine, run_metadata, settings_of, sync, write_json
from .items import BOOK, MAX_STORIES, book_items, needle_document
from .plots import recall_heatmap
from .recall import PROBES, PrefixedLM, accuracy, around, ask, coverage, memories

FILLER = BOOK.with_name("northanger_abbey.txt")  # the needles' haystack: another Austen novel
SHARED = ("none", "window", "full", "evidence")  # memories that do not depend on the session's settings
TASKS = ("needle", "qa1", "qa2", "qa3", "book")
COVERAGE = ("kept", "read_statement", "read_qa")  # of the ttt memories' records (``recall.coverage``)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="ttt recall", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("runs/recall"), metavar="DIR")
    add_model_args(ap)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="NAME=JSON",
        help="more settings to compare, each a partial session config",
    )
    ap.add_argument("--seeds", type=int, default=1, help="documents (filler, needles, stories) per length")
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192, 16384], metavar="N")
    ap.add_argument(
        "--depths",
        type=int,
        nargs="*",
        default=[1024, 2048, 4096, 8192, 16384, 32768],
        metavar="D",
        help="needle depths: tokens between a needle and the document's end",
    )
    ap.add_argument("--needles-per-depth", type=int, default=2)
    ap.add_argument("--stories", type=int, default=3, help="qa1-qa3 stories per document")
    ap.add_argument("--book-tokens", type=int, default=32768, help="how much of the book to read (0: all of it)")
    ap.add_argument("--no-book", action="store_true", help="skip the book questions")
    ap.add_argument("--answer-tokens", type=int, default=24, help="greedy tokens per chat answer")
    ap.add_argument(
        "--export-lm-eval",
        type=Path,
        metavar="DIR",
        help="write each needle document (.txt, to ingest) and its needles as an lm-evaluation-harness "
        "multiple-choice task (.jsonl + .yaml) into DIR, then exit",
    )
    ap.add_argument(
        "--memories",
        nargs="*",
        default=["none", "window", "full", "evidence", "ttt", "weights"],
        choices=["none", "window", "full", "evidence", "ttt", "weights"],
    )
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.needles_per_depth < 0 or args.stories < 0 or args.book_tokens < 0:
        ap.error("--seeds must be >= 1; --needles-per-depth, --stories and --book-tokens >= 0")
    if args.stories > MAX_STORIES:
        ap.error(f"--stories: at most {MAX_STORIES} per document (each story has its own people and thing)")
    return args


def settings(args) -> dict[str, dict]:
    """Setting name -> partial session config: the presets, then the ``--config`` ones."""
    out = {name: {"memory": name} for name in args.presets}
    for spec in args.config:
        name, _, text = spec.partition("=")
        out[name] = json.loads(text)
        ttt.SessionConfig.from_dict(out[name])  # refuse a bad one before hours of work
    return out


def read(engine: ttt.Engine, config: dict, doc: list[int]) -> tuple[ttt.Session, float]:
    """A new session with ``config`` reads ``doc``; the seconds it took."""
    session = engine.create_session(config)
    session.append_tokens(doc)
    session.end_document()
    sync(engine.base.device)
    t = time.perf_counter()
    while session.train_next_chunk() is not None:
        pass
    sync(engine.base.device)
    return session, time.perf_counter() - t


def prefill_seconds(engine: ttt.Engine, doc: list[int], chunk: int) -> tuple[int, float]:
    """Plain prefill of as much of ``doc`` as the context holds, ``chunk`` tokens at a time: (tokens, seconds)."""
    n = min(len(doc), engine.base.cfg.max_position_embeddings - 1)
    lm = PrefixedLM(engine, [], capacity=n + 1)
    sync(engine.base.device)
    t = time.perf_counter()
    for i in range(0, n, chunk):
        lm.extend(doc[i : min(i + chunk, n)])
    sync(engine.base.device)
    return n, time.perf_counter() - t


def needle_documents(
    engine: ttt.Engine, lengths, depths, per_depth: int, stories: int, seeds: int, wrong: int = 5
) -> list[tuple[dict, list[int], list]]:
    """(info, tokens, items) of a needle document per seed and length, on a seeded excerpt of the filler novel.

    ``depths`` are tokens between a needle and the end; values below 1 are fractions of the document (0.9:
    near its start). Stories stay out of the default window."""
    tok = engine.base.tokenizer
    text = FILLER.read_text(encoding="utf-8")
    docs = []
    for seed in range(seeds):
        rng = random.Random(seed)
        for length in lengths:
            offset = text.find("\n", rng.randrange(len(text) // 2)) + 1
            filler = tok(text[offset : offset + 8 * length], add_special_tokens=False).input_ids
            at = [d if d >= 1 else round(d * length) for d in depths]
            doc, items = needle_document(
                tok, filler, length, at, per_depth, stories, ttt.IngestConfig().context_tokens, rng, wrong
            )
            docs.append(({"doc": "needles", "seed": seed, "length": length}, doc, items))
    return docs


def probe_documents(
    engine: ttt.Engine, docs, configs: dict[str, dict], names, answer_tokens: int, on_answer=lambda: None
) -> tuple[list[dict], dict]:
    """Every item of every document under every memory in ``names`` (``ttt`` and ``weights`` once per setting
    of ``configs``, named "ttt/<setting>"); and (tokens, seconds) of reading, per setting and by plain prefill."""
    records, timing = [], {"prefill": [0, 0.0], **{name: [0, 0.0] for name in configs}}
    for info, doc, items in docs:
        recs = [
            {
                **info,
                "task": it.task.split("/")[0],
                "kind": it.task,
                "depth": it.depth,
                "from_end": len(doc) - min(it.positions),
                "question": it.question,
                "answer": it.answer,
            }
            for it in items
        ]

        def ask_all(name, lm, recs=recs, items=items):
            for rec, item in zip(recs, items, strict=True):
                rec[name] = ask(lm, item, answer_tokens)
                on_answer()

        n, seconds = prefill_seconds(engine, doc, ttt.IngestConfig().chunk_tokens)
        timing["prefill"][0] += n
        timing["prefill"][1] += seconds
        shared = [m for m in SHARED if m in names and m != "evidence"]
        for name, lm in memories(engine, doc, shared).items():
            ask_all(name, lm)
        if "evidence" in names:  # each item reads its own passages
            for rec, item in zip(recs, items, strict=True):
                rec["evidence"] = ask(PrefixedLM(engine, around(doc, item.positions)), item, answer_tokens)
                on_answer()
        for setting, config in configs.items():
            session, seconds = read(engine, config, doc)
            timing[setting][0] += len(doc)
            timing[setting][1] += seconds
            own = [m for m in ("ttt", "weights") if m in names]
            for name, lm in memories(engine, doc, own, session).items():
                ask_all(f"{name}/{setting}", lm)
            if "ttt" in names:  # kept and read: was a miss the memory's or the model's?
                for rec, item in zip(recs, items, strict=True):
                    rec[f"ttt/{setting}"].update(coverage(session, doc, item))
        records += recs
    return records, {k: tuple(v) for k, v in timing.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    engine = load_engine(args)
    configs = settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    docs = needle_documents(engine, args.lengths, args.depths, args.needles_per_depth, args.stories, args.seeds)
    if args.export_lm_eval is not None:
        for info, tokens, items in docs:
            export_lm_eval(
                args.export_lm_eval,
                f"{info['seed']}_{info['length']}",
                engine.base.tokenizer.decode(tokens),
                [it for it in items if it.cloze],
            )
        print(f"wrote {len(docs)} documents and lm-eval tasks to {args.export_lm_eval}")
        return {}
    if not args.no_book:
        ids, questions = book_items(engine.base.tokenizer, args.book_tokens or None)
        docs.append(({"doc": "book", "seed": 0, "length": len(ids)}, ids, questions))
    per_doc = len([m for m in args.memories if m in SHARED]) + len(configs) * len(
        [m for m in args.memories if m not in SHARED]
    )
    bar = tqdm(
        total=sum(len(items) for _, _, items in docs) * per_doc,
        desc="recall",
        unit="answer",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    records, timing = probe_documents(engine, docs, configs, args.memories, args.answer_tokens, bar.update)
    bar.close()
    results = summarize(args, engine, configs, records, timing)
    write_json(args.out / "results.json", results)
    has_needles = bool(results["needle_depths"]) and bool(args.lengths)  # a stories- or book-only run has none
    pngs = [
        recall_heatmap(
            args.out / f"needles_{probe}.png",
            results["needles"][probe],
            args.lengths,
            results["needle_depths"],
            f"needles recalled, by {probe} (likelihood chance 1/6)",
        )
        for probe in PROBES
        if has_needles
    ]
    print_summary(results)
    print(f"wrote {args.out / 'results.json'}, {', '.join(p.name for p in pngs)}")
    return results


def export_lm_eval(folder: Path, name: str, document: str, items: list) -> None:
    """``folder``/recall_``name``.txt (the document) and an lm-eval multiple-choice task over its needles: the
    statement up to the value is the context; the true value and the wrong ones, with the rest of the sentence,
    are the choices (as the benchmark's likelihood probe). Ingest the text into a session, then evaluate it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"recall_{name}.txt").write_text(document, encoding="utf-8")
    with open(folder / f"recall_{name}.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            head = it.statement(it.answer)[0]
            choices = [it.statement(value)[1] for value in [it.answer, *it.wrong]]
            f.write(json.dumps({"context": head, "choices": choices, "answer": 0, "task": it.task}) + "\n")
    (folder / f"recall_{name}.yaml").write_text(
        f"task: recall_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {(folder / f'recall_{name}.jsonl').resolve()}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n',
        encoding="utf-8",
    )


def memory_names(records: list[dict]) -> list[str]:
    names = [m for m in SHARED if any(m in r for r in records)]
    return names + sorted({k for r in records for k in r if "/" in k}, key=lambda k: (k.split("/")[1], k))


def summarize(args, engine, configs, records, timing) -> dict:
    names = memory_names(records)
    by_task = {m: {p: {t: accuracy(records, m, p, task=t) for t in TASKS} for p in PROBES} for m in names}
    depths = sorted({r["depth"] for r in records if r["task"] == "needle"})
    needles = {
        p: {
            m: [[accuracy(records, m, p, task="needle", depth=d, length=n) for n in args.lengths] for d in depths]
            for m in names
        }
        for p in PROBES
    }
    counts = {t: sum(r["task"] == t for r in records) for t in TASKS}
    # the target range: needles 2K-16K tokens before the end
    far = [r for r in records if r["task"] == "needle" and 2048 <= r["depth"] <= 16384]
    seeds = sorted({r["seed"] for r in records})
    prefill_tps = timing["prefill"][0] / max(timing["prefill"][1], 1e-9)
    cost = {}
    for setting in configs:
        tokens, seconds = timing[setting]
        cost[setting] = {"tokens_per_s": tokens / seconds, "vs_prefill": tokens / seconds / prefill_tps}
    return {
        "meta": run_metadata(engine),
        "settings": settings_of(args),
        "session_configs": {name: ttt.SessionConfig.from_dict(c).to_dict() for name, c in configs.items()},
        "chance": 1 / 6,
        "accuracy": by_task,
        # standard error of each accuracy (binomial, over its items), and the accuracy of each seed's documents
        "stderr": {
            m: {
                p: {t: None if a is None else math.sqrt(a * (1 - a) / counts[t]) for t, a in row.items()}
                for p, row in by_probe.items()
            }
            for m, by_probe in by_task.items()
        },
        "by_seed": {
            m: {p: {t: [accuracy(records, m, p, task=t, seed=seed) for seed in seeds] for t in TASKS} for p in PROBES}
            for m in names
        },
        # the fraction of items whose answer the session's pool kept / whose statement or question read it
        "coverage": {
            m: {c: {t: accuracy(records, m, c, task=t) for t in TASKS} for c in COVERAGE}
            for m in names
            if m.startswith("ttt/")
        },
        "needles_2k_16k": {m: {p: accuracy(far, m, p) for p in PROBES} for m in names},
        "needle_depths": depths,
        "needles": needles,
        "cost": {"prefill_tokens_per_s": prefill_tps, **cost},
        "counts": counts,
        "records": records,
    }


def print_summary(results: dict) -> None:
    acc = results["accuracy"]
    counts = results["counts"]
    print(
        f"\n{results['meta']['model']} on {results['meta']['device']}: accuracy by task "
        f"(likelihood chance {results['chance']:.2f}); items: " + ", ".join(f"{t} {n}" for t, n in counts.items())
    )
    for probe in PROBES:
        print(f"\n{probe:>22s}" + "".join(f"{t:>8s}" for t in TASKS))
        for memory, row in acc.items():
            print(
                f"{memory:>22s}"
                + "".join("       -" if row[probe][t] is None else f"{row[probe][t]:8.2f}" for t in TASKS)
            )
    for memory, row in results["coverage"].items():
        print(f"\n{memory + ': answer':>22s}" + "".join(f"{t:>8s}" for t in TASKS))
        for what, by_task in row.items():
            print(f"{what:>22s}" + "".join("       -" if v is None else f"{v:8.2f}" for v in by_task.values()))
    far = results["needles_2k_16k"]
    print(
        "\nneedles 2K-16K tokens back: "
        + "; ".join(f"{m} " + "/".join("-" if far[m][p] is None else f"{far[m][p]:.2f}" for p in PROBES) for m in far)
        + f" ({'/'.join(PROBES)})"
    )
    cost = results["cost"]
    print(
        f"\ningest cost: plain prefill {cost['prefill_tokens_per_s']:.1f} tokens/s; "
        + "; ".join(
            f"{k} {v['tokens_per_s']:.1f} tokens/s ({v['vs_prefill']:.2f}x)"
            for k, v in cost.items()
            if k != "prefill_tokens_per_s"
        )
    )


if __name__ == "__main__":
    main()
