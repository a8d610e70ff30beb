"""Does the rolling context (or its attention sinks) cost memory? A passage read once, far back, by twin sessions.

    python -m bench.passage                       # default model, CPU: 10K tokens of a novel, 4 passages
    python -m bench.passage --tokens 4096 --passages 2 --memory balanced

Two sessions read the same novel excerpt, one with a random 120-word passage planted ``--depth`` tokens before
the end and one with another; the gain is how much lower (nats/token) the passage scores in the session that
read it. Context variants for each chunk: ``rolling`` (the cached keys/values of the previous context_tokens,
the document's first tokens kept as attention sinks: what sessions do), ``rolling-no-sinks``, and ``recompute``
(the window re-run under the current weights before every chunk: a plain re-implementation, each chunk after
its preceding context_tokens). A window rebuilt from its tokens holds no sinks, so ``recompute-no-sinks``
measures the same as ``recompute`` (docs/results/passage): it is kept for the record of that run.
Prints the mean gain per variant and ingest tokens/s; writes DIR/passage.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import ttt

from .common import add_model_args, load_engine, run_metadata, settings_of, write_json
from .items import plant
from .recall_cli import FILLER

VARIANTS = {  # name -> (sink_tokens, recompute the window before each chunk)
    "rolling": (4, False),
    "rolling-no-sinks": (0, False),
    "recompute": (4, True),
    "recompute-no-sinks": (0, True),
}
WORDS = (
    "amber",
    "lantern",
    "orchard",
    "quiet",
    "ribbon",
    "silver",
    "thistle",
    "velvet",
    "harbour",
    "meadow",
    "copper",
    "ember",
    "glacier",
    "hollow",
    "ivory",
    "juniper",
    "kettle",
    "linen",
    "marble",
    "nutmeg",
    "oyster",
    "pepper",
    "quartz",
    "saffron",
    "timber",
    "umber",
    "willow",
    "yarrow",
    "zephyr",
    "basket",
    "candle",
    "dapple",
)


def passage(rng: random.Random, words: int = 120) -> str:
    """Random words in sentences: no model can know it without reading it."""
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randrange(6, 12):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    return " ".join(out + ([" ".join(sentence).capitalize() + "."] if sentence else []))


def read(engine, doc: list[int], config: dict, recompute: bool) -> tuple[ttt.Session, float]:
    session = engine.create_session(config)
    session.append_tokens(doc)
    session.end_document()
    t = time.perf_counter()
    while session.chunks_ready:
        if recompute:
            session._rolling = None  # rebuilt from the window under the current weights (Session._context)
        session.train_next_chunk()
    return session, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m bench.passage", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("runs/passage"), metavar="DIR")
    add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=10240, help="document length")
    ap.add_argument("--depth", type=int, default=9216, help="tokens between the passage and the end")
    ap.add_argument("--passages", type=int, default=4, help="passage pairs (each pair: two twin sessions)")
    ap.add_argument(
        "--memory", default="off", help="the sessions' memory preset (default: next-token prediction alone)"
    )
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    engine = load_engine(args)
    tok = engine.base.tokenizer
    filler = tok(FILLER.read_text(encoding="utf-8")[50000:], add_special_tokens=False).input_ids[: args.tokens]
    rng = random.Random(0)
    pairs = [(passage(rng), passage(rng)) for _ in range(args.passages)]
    results = {"meta": run_metadata(engine), "settings": settings_of(args), "variants": {}}
    for name in args.variants:
        sink, recompute = VARIANTS[name]
        config = {"memory": args.memory, "ingest": {"sink_tokens": sink, "measure_loss_after": False}}
        gains, tokens, seconds = [], 0, 0.0
        for a, b in pairs:
            scores = {}
            for read_text, other in ((a, b), (b, a)):
                doc, _ = plant(tok, filler, [(args.tokens - args.depth, read_text)])
                session, s = read(engine, doc, config, recompute)
                tokens, seconds = tokens + len(doc), seconds + s
                scores[read_text] = (session.score(read_text), session.score(other))
            # each passage: its NLL in the session that did not read it minus in the one that did
            gains += [scores[b][1] - scores[a][0], scores[a][1] - scores[b][0]]
        results["variants"][name] = {
            "gains": gains,
            "mean_gain": statistics.fmean(gains),
            "sem": statistics.stdev(gains) / len(gains) ** 0.5,
            "tokens_per_s": tokens / seconds,
        }
        v = results["variants"][name]
        print(
            f"{name:>20s}: gain {v['mean_gain']:.3f} +- {v['sem']:.3f} nats/token, {v['tokens_per_s']:.0f} tok/s",
            flush=True,
        )
    write_json(args.out / "passage.json", results)
    return results


if __name__ == "__main__":
    main()
