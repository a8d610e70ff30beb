"""`ttt eval` (bench/eval.py), its per-chunk scorers (bench/nll.py) and recall probe (bench/recall.py), `ttt sweep`.

Tiny random Llama (tests/conftest.py): the numbers are meaningless, the mechanics are checked; one slow test
runs the default model at tiny sizes.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import ttt
from bench.common import DEFAULT_DOC, document_tokens
from bench.nll import full_nll, ttt_nll, window_nll
from bench.recall import Fact, PrefixedLM, RecallConfig, ask, make_facts, plant
from clients import cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"ingest": {"chunk_tokens": 32, "context_tokens": 32}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, "cpu")


@pytest.fixture(scope="module")
def ids(engine):
    return document_tokens(engine, DEFAULT_DOC, 128, offset=1000)


def reference_nll(engine, ids, start, end, lo=0) -> float:
    """Mean NLL of tokens [max(start, 1), end), each from one plain forward over ids[lo:end] (logits from the LM)."""
    x = torch.tensor([ids[lo:end]])
    with torch.no_grad():
        logits = engine.base.model(x)[0]
    first = max(start, 1)
    return torch.nn.functional.cross_entropy(logits[first - lo - 1 : end - lo - 1], x[0, first - lo : end - lo]).item()


def test_full_nll_sees_the_prefix_up_to_max_context(engine, ids):
    whole = list(full_nll(engine, ids, 32))
    assert whole == pytest.approx([reference_nll(engine, ids, s, s + 32) for s in range(0, 128, 32)], abs=1e-4)
    capped = list(full_nll(engine, ids, 32, max_context=64))  # chunks 2, 3 see only the 64 tokens ending with them
    assert capped[:2] == pytest.approx(whole[:2], abs=1e-5)
    assert capped[2:] == pytest.approx([reference_nll(engine, ids, s, s + 32, s - 32) for s in (64, 96)], abs=1e-4)
    with pytest.raises(ValueError, match="at least one chunk"):
        next(full_nll(engine, ids, 32, max_context=16))


def test_the_three_memories_agree_where_they_see_the_same_tokens(engine, ids):
    window = list(window_nll(engine, ids, 32, 64, sink=4))
    full = list(full_nll(engine, ids, 32))
    scored = list(ttt_nll(engine, ids, SMALL))
    assert len(window) == len(full) == len(scored) == 4
    # Chunk 0 has no past, chunk 1's past fits the 64-token window: same tokens in view, same scores.
    assert window[:2] == pytest.approx(full[:2], abs=1e-4)
    # A fresh session's LoRA delta is exactly zero and chunk 0 is scored before any step.
    assert scored[0] == pytest.approx(window[0], abs=1e-4)
    assert scored[1] != pytest.approx(window[1], abs=1e-6)  # chunk 1 is scored after a step on chunk 0


def test_facts_are_planted_at_line_starts_at_their_depths(engine):
    tok = engine.base.tokenizer
    cfg = RecallConfig(lengths=(300,), depths=(0.2, 0.7), facts_per_depth=2, wrong_values=3)
    facts = make_facts(cfg, random.Random(0))
    assert len({f.key for f in facts}) == 4 and [f.depth for f in facts] == [0.2, 0.2, 0.7, 0.7]
    for f in facts:
        assert len(f.wrong) == 3 and f.value not in f.wrong and {len(v) for v in f.wrong} == {len(f.value)}
    filler = document_tokens(engine, DEFAULT_DOC, 400)
    doc = plant(tok, filler, facts, 300)
    assert len(doc) == 300
    positions = [f.position for f in facts]
    assert positions == sorted(positions) and 0.15 < positions[0] / 300 < 0.35 and 0.6 < positions[2] / 300 < 0.85
    for f in facts:
        assert tok.decode(doc[f.position :]).startswith(f.sentence() + "\n")
        assert tok.decode(doc[: f.position]).endswith("\n")
    with pytest.raises(ValueError, match="cannot hold"):
        plant(tok, filler[:50], make_facts(cfg, random.Random(0)), 300)


def test_prefixed_lm_equals_session_score_and_generate(engine, ids):
    session = engine.create_session(SMALL)
    session.append_tokens(ids)
    session.end_document()
    while session.train_next_chunk() is not None:
        pass
    lm = PrefixedLM(engine, session.recent_tokens(), session.fast)
    fact = Fact("the amber heron", "48213", ["11111"], 0.5)
    total, count = lm.nll(fact.sentence())
    assert total / count == pytest.approx(session.score(fact.sentence()), abs=1e-4)
    assert lm.nll(fact.sentence()) == pytest.approx((total, count))  # the cache rewinds between questions
    answer = session.generate(fact.question(), max_tokens=6)
    assert lm.greedy(fact.question(), 6) == answer.text
    # Reading the prefix in pieces gives the same cache as reading it at once.
    pieces = PrefixedLM(engine, [], session.fast, capacity=len(lm.prefix) + 128)
    for i in range(0, len(lm.prefix), 7):
        pieces.extend(lm.prefix[i : i + 7])
    assert pieces.nll(fact.sentence())[0] == pytest.approx(total, abs=1e-3)


class StubLM:
    """Knows ``value`` for every key: its sentence is likelier than any other, and it answers with it."""

    def __init__(self, value: str | None):
        self.value = value

    def nll(self, text: str) -> tuple[float, int]:
        return (1.0 if self.value and self.value in text else 2.0), 5

    def greedy(self, messages, max_tokens) -> str:
        return f"It is {self.value}." if self.value else "I do not know."


def test_a_planted_value_is_scored_against_the_wrong_ones():
    fact = Fact("the quiet otter", "48213", ["10101", "20202", "30303"], 0.5)
    cfg = RecallConfig(wrong_values=3)
    knows = ask(StubLM("48213"), fact, cfg)
    assert knows["score"] and knows["generate"] and knows["nll_right"] == 1.0 and knows["nll_wrong"] == [2.0] * 3
    wrong = ask(StubLM("20202"), fact, cfg)  # likes a wrong value best
    assert not wrong["score"] and not wrong["generate"]
    ties = ask(StubLM(None), fact, cfg)  # no preference: a tie is not recall
    assert not ties["score"] and not ties["generate"] and ties["answer"] == "I do not know."


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def test_ttt_eval_cli_writes_results_and_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", str(DEFAULT_DOC), "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out),
            "--seeds", "2", "--chunks", "3", "--chunk-tokens", "32", "--context-tokens", "32", "--skip", "1",
            "--recall-lengths", "128", "--recall-depths", "0.3", "0.8", "--facts-per-depth", "1",
            "--wrong-values", "2"]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["model"] == tiny_model_dir.name and "git_revision" in res["meta"]
    assert res["settings"]["chunks"] == 3 and res["session_config"]["ingest"]["chunk_tokens"] == 32
    assert res["positions"] == [32, 64, 96]
    assert [(r["seed"], len(r["nll"]["ttt"])) for r in res["runs"]] == [(0, 3), (1, 3)]
    assert res["runs"][0]["char_offset"] != res["runs"][1]["char_offset"]  # seeds pick different excerpts
    for name in ("window", "ttt", "full"):
        assert len(res["nll"][name]["mean"]) == len(res["nll"][name]["sem"]) == 3  # two runs: error bars
        assert res["summary"][name] > 0
    assert set(res["gain"]) == {"ttt", "full"} and res["gain"]["ttt"]["mean"][0] == pytest.approx(0, abs=1e-4)
    recall = res["recall"]
    assert recall["chance_score"] == pytest.approx(1 / 3)
    assert len(recall["records"]) == 2 * 2  # seeds x depths
    for memory in ("window", "ttt", "full"):
        for probe in ("score", "generate"):
            grid = recall["accuracy"][memory][probe]  # [depth][length]
            assert len(grid) == 2 and all(len(row) == 1 and 0 <= row[0] <= 1 for row in grid)
    assert all(r["in_full_context"] for r in recall["records"])
    for name in ("nll_vs_position.png", "gain.png", "recall.png"):
        check_png(out / name)
    printed = capsys.readouterr().out
    assert "gain of ttt" in printed and "recall accuracy" in printed


def test_ttt_sweep_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.json"
    assert cli.main(["sweep", "--model", str(tiny_model_dir), "--device", "cpu", "--chunks", "2", "--chunk", "32",
                     "--context", "32", "--skip", "0", "--configs", "lora-mlp-last8-lr3e-3", "--out", str(out)]) == 0
    nll = json.loads(out.read_text())["nll"]
    assert set(nll) == {"window-only (no TTT)", "full attention (whole prefix)", "lora-mlp-last8-lr3e-3"}


@pytest.mark.slow
def test_ttt_eval_default_model_tiny_sizes(default_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--device", "cpu", "--out", str(out), "--chunks", "3", "--chunk-tokens", "128",
                     "--context-tokens", "128", "--skip", "1", "--recall-lengths", "384", "--recall-depths", "0.5",
                     "--facts-per-depth", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    first = {name: s["mean"][0] for name, s in res["nll"].items()}
    # Chunk 0 is seen the same way by all three; real English-Bible text is far from a random model's ~10.8 nats.
    assert first["ttt"] == pytest.approx(first["window"], abs=1e-3) and first["full"] == pytest.approx(
        first["window"], abs=1e-3)
    assert all(1.0 < v < 6.0 for s in res["nll"].values() for v in s["mean"])
    assert res["meta"]["model"] == "SmolLM2-135M-Instruct"
