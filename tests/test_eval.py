"""`ttt eval` (bench/eval.py), its per-chunk scorers (bench/nll.py) and recall probe (bench/recall.py), `ttt sweep`.

Tiny random Llama (tests/conftest.py): the numbers are meaningless, the mechanics are checked; one slow test
runs the default model at tiny sizes.
"""

from __future__ import annotations

import json

import pytest
import torch

import ttt
from bench.common import DEFAULT_DOC, document_tokens
from bench.items import Item
from bench.nll import full_nll, ttt_nll, window_nll
from bench.recall import PrefixedLM, ask, contains, memories
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


@pytest.mark.parametrize(("select", "alone"), [("surprise", True), ("question", False), ("question", True)])
def test_prefixed_lm_equals_session_answers(engine, ids, select, alone):
    # a session that keeps exact spans: the memory "ttt" reads its answer prefix as answers do: the window after
    # the most surprising spans, or followed by the spans related to what is asked, or those alone
    recall = {"exact_tokens": 24, "span_tokens": 8, "exact_select": select, "notes_alone": alone}
    session = engine.create_session({**SMALL, "recall": recall})
    session.append_tokens(ids)
    session.end_document()
    while session.train_next_chunk() is not None:
        pass
    assert session.exact_tokens()  # something kept beside the window
    asked = engine.base.tokenizer.decode(session.exact_tokens()[:8])  # a query sharing words with a kept span
    notes = session.notes(asked)
    assert bool(notes) == (select == "question") and len(notes) <= 24
    reading = memories(engine, ids, ["ttt"], session)["ttt"]
    lm = reading(asked)
    if select == "surprise":
        assert lm.prefix == session.answer_prefix() == session.exact_tokens() + session.recent_tokens()
    else:
        read = notes if alone else session.recent_tokens() + notes
        assert lm.prefix == session.answer_prefix(asked) == read
        assert (lm.adapters is None) == alone  # the notes alone are read by the base model
        assert session.reading("zzzz qqqq") == (session.recent_tokens(), session.fast)  # nothing related
    item = Item(
        "needle/code",
        ["The secret code of the amber heron is 48213."],
        "What is the code?",
        "48213",
        ["11111"],
        "The secret code of the amber heron is {}.",
    )
    sentence = asked + item.facts[0]
    lm = reading(sentence)
    total, count = lm.nll(sentence)
    echoed = session.complete(sentence, max_tokens=0, echo=True, top_logprobs=0).echo_logprobs
    assert total == pytest.approx(-sum(t.logprob for t in echoed), abs=1e-3) and count == len(echoed)
    assert total / count == pytest.approx(session.score(sentence), abs=1e-4)
    assert lm.nll(sentence) == pytest.approx((total, count))  # the cache rewinds between questions
    question = [{"role": "user", "content": asked + " " + item.question}]
    assert reading(question[0]["content"]).greedy(question, 6) == session.generate(question, max_tokens=6).text
    # Reading the prefix in pieces gives the same cache as reading it at once.
    pieces = PrefixedLM(engine, [], session.reading(sentence)[1], capacity=len(lm.prefix) + 128)
    for i in range(0, len(lm.prefix), 7):
        pieces.extend(lm.prefix[i : i + 7])
    assert pieces.nll(sentence)[0] == pytest.approx(total, abs=1e-3)
    # the statement probe is the same sentence cut at the answer
    head, tail = item.statement("48213")
    both = lm.nll_after(lm.encode(head), [lm.encode(tail), lm.encode(" 11111.")])
    fact = lm.nll(item.facts[0])[0]
    assert both[0] == pytest.approx(fact - lm.nll(head)[0], abs=1e-3)  # the head read once for both
    assert both[1] == pytest.approx(lm.nll(head + " 11111.")[0] - lm.nll(head)[0], abs=1e-3)


class StubLM:
    """Knows ``value``: its statement and reply are likelier than any other answer, and it answers with it."""

    def __init__(self, value: str | None, tokenizer):
        self.value, self.tokenizer = value, tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def nll_after(self, context: list[int], targets: list[list[int]]) -> list[float]:
        return [1.0 if self.value and self.value in self.tokenizer.decode(t) else 2.0 for t in targets]

    def greedy(self, messages, max_tokens) -> str:
        return f"It is {self.value}." if self.value else "I do not know."


def test_an_answer_is_scored_against_the_wrong_ones(engine):
    item = Item(
        "needle/code",
        ["The code of the quiet otter is 48213."],
        "What is the code of the quiet otter?",
        "48213",
        ["10101", "20202", "30303"],
        "The code of the quiet otter is {}.",
    )
    tok = engine.base.tokenizer
    knows = ask(StubLM("48213", tok), item)
    assert knows["statement"] and knows["qa"] and knows["generate"]
    assert knows["statement_nll"] == [1.0, 2.0, 2.0, 2.0]
    wrong = ask(StubLM("20202", tok), item)  # likes a wrong value best
    assert not wrong["statement"] and not wrong["qa"] and not wrong["generate"]
    ties = ask(StubLM(None, tok), item)  # no preference: a tie is not recall
    assert not ties["statement"] and not ties["qa"] and not ties["generate"] and ties["answer"] == "I do not know."
    assert contains("The code is 48,213!", "48213") is False and contains("It is 48213.", "48213")
    assert contains("Oswin  TARRANT, surely", "Oswin Tarrant") and not contains("Oswinx Tarrant", "Oswin Tarrant")


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def test_ttt_eval_cli_writes_results_and_plots(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "eval",
        str(DEFAULT_DOC),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--seeds",
        "2",
        "--chunks",
        "3",
        "--chunk-tokens",
        "32",
        "--context-tokens",
        "32",
        "--skip",
        "1",
        "--recall-lengths",
        "128",
        "--recall-depths",
        "0.3",
        "0.8",
        "--facts-per-depth",
        "1",
        "--wrong-values",
        "2",
    ]
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
        for probe in ("statement", "qa", "generate"):
            grid = recall["accuracy"][memory][probe]  # [depth][length]
            assert len(grid) == 2 and all(len(row) == 1 and 0 <= row[0] <= 1 for row in grid)
    for r in recall["records"]:
        assert len(r["window"]["statement_nll"]) == 3  # the answer and 2 wrong ones
        assert 0 < r["from_end"] < 128 + 40
    for name in ("nll_vs_position.png", "gain.png", "recall.png"):
        check_png(out / name)
    printed = capsys.readouterr().out
    assert "gain ttt" in printed and "recall accuracy" in printed


def test_ttt_sweep_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "sweep.json"
    assert (
        cli.main(
            [
                "sweep",
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--chunks",
                "2",
                "--chunk",
                "32",
                "--context",
                "32",
                "--skip",
                "0",
                "--configs",
                "lora-mlp-last8-lr3e-3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    nll = json.loads(out.read_text())["nll"]
    assert set(nll) == {"window-only (no TTT)", "full attention (whole prefix)", "lora-mlp-last8-lr3e-3"}


@pytest.mark.slow
def test_ttt_eval_default_model_tiny_sizes(default_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert (
        cli.main(
            [
                "eval",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--chunks",
                "3",
                "--chunk-tokens",
                "128",
                "--context-tokens",
                "128",
                "--skip",
                "1",
                "--recall-lengths",
                "384",
                "--recall-depths",
                "0.5",
                "--facts-per-depth",
                "1",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    first = {name: s["mean"][0] for name, s in res["nll"].items()}
    # Chunk 0 is seen the same way by all three; real English-Bible text is far from a random model's ~10.8 nats.
    assert first["ttt"] == pytest.approx(first["window"], abs=1e-3) and first["full"] == pytest.approx(
        first["window"], abs=1e-3
    )
    assert all(1.0 < v < 6.0 for s in res["nll"].values() for v in s["mean"])
    assert res["meta"]["model"] == "SmolLM2-135M-Instruct"
