"""`ttt recall` (bench/recall_cli.py) and its items (bench/items.py): needles, BABILong-style stories, book questions.

The tiny random model's answers are meaningless; what is checked is that the items are what they claim (planted
where recorded, answers in their evidence, wrong answers of the same kind) and that the command writes every
record, table and figure.
"""

from __future__ import annotations

import json
import random

import pytest

import ttt
from bench.items import (
    BOOK,
    BOOK_QUESTIONS,
    FIRST,
    KINDS,
    LOCATIONS,
    MAX_STORIES,
    PEOPLE,
    THINGS,
    Item,
    book_items,
    make_needles,
    make_stories,
    needle_document,
    plant,
    sentence_starts,
)
from bench.recall import EVIDENCE_AFTER, EVIDENCE_BEFORE, around, coverage
from bench.recall_cli import FILLER
from clients import cli
from ttt.memory import words

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, "cpu").base.tokenizer


def test_needles_of_every_kind_with_wrong_answers_of_the_same_kind():
    items = make_needles(random.Random(0), 2 * len(KINDS), wrong=5)
    assert {it.task for it in items} == {f"needle/{k}" for k in KINDS}
    assert len({it.question for it in items}) == len(items)  # distinct keys
    for it in items:
        assert len(it.wrong) == 5 and it.answer not in it.wrong and len(set(it.wrong)) == 5
        assert it.answer in it.facts[0] and it.answer not in it.question
        head, tail = it.statement(it.answer)
        assert it.answer not in head and tail.strip().startswith(it.answer)
        for w in it.wrong:  # the same kind: digits for digits, a hyphenated password for a password, ...
            assert w.replace("-", "").isdigit() == it.answer.replace("-", "").isdigit()
            assert w.count("-") == it.answer.count("-") and len(w.split()) == len(it.answer.split())


def test_stories_need_one_two_or_three_facts():
    qa1, qa2, qa3 = make_stories(random.Random(1), 3)
    assert (qa1.task, qa2.task, qa3.task) == ("qa1", "qa2", "qa3")
    person = qa1.question.split()[2].rstrip("?")
    assert qa1.facts[2].startswith(person) and qa1.facts[2].endswith(f"the {qa1.answer}.")  # the later move counts
    assert qa1.facts[0].startswith(person) and qa1.answer not in qa1.facts[0]  # the stale one is a wrong answer
    thing = qa2.question.split()[3].rstrip("?")
    assert f"picked up the {thing}" in qa2.facts[0] and qa2.facts[2].endswith(f"the {qa2.answer}.")
    assert len(qa3.facts) == 4 and qa3.facts[2].endswith(f"the {qa3.answer}.")
    for it in (qa1, qa2, qa3):
        assert sorted([it.answer, *it.wrong]) == sorted(LOCATIONS)


def test_stories_of_one_document_share_no_person_or_thing(capsys):
    stories = make_stories(random.Random(3), 10)
    named = [{w for fact in it.facts for w in fact.rstrip(".").split() if w in PEOPLE or w in THINGS} for it in stories]
    assert all(a.isdisjoint(b) for i, a in enumerate(named) for b in named[i + 1 :])
    novels = FILLER.read_text(encoding="utf-8") + BOOK.read_text(encoding="utf-8")
    assert set(PEOPLE).isdisjoint(FIRST) and not any(p in novels for p in PEOPLE)  # nobody else is called so
    assert len(stories) == MAX_STORIES
    with pytest.raises(ValueError, match="stories share a document"):
        make_stories(random.Random(3), MAX_STORIES + 1)
    with pytest.raises(SystemExit):
        cli.main(["recall", "--stories", str(MAX_STORIES + 1)])
    assert f"--stories: at most {MAX_STORIES} per document" in capsys.readouterr().err


def test_planted_sentences_start_at_sentence_starts_where_recorded(tok):
    filler = tok(FILLER.read_text()[20000:26000], add_special_tokens=False).input_ids[:600]
    starts = set(sentence_starts(tok, filler))
    facts = [(300, "The secret code of the amber heron is 48213."), (100, "Mary went to the kitchen.")]
    doc, positions = plant(tok, filler, facts)
    assert len(doc) > len(filler) and positions[1] < positions[0]
    for (_target, sentence), at in zip(facts, positions, strict=True):
        assert tok.decode(doc[at:]).startswith(" " + sentence)
        assert tok.decode(doc[at - 1 : at]).rstrip("\"'").endswith((".", "!", "?"))
    assert min(s for s in starts if s >= 100) == positions[1]  # the first sentence start at or after its target


def test_a_needle_document_puts_needles_at_their_depths(tok):
    filler = tok(FILLER.read_text()[10000:60000], add_special_tokens=False).input_ids
    doc, items = needle_document(tok, filler, 2048, [256, 1024, 4096], 2, 3, 512, random.Random(0))
    needles = [it for it in items if it.task.startswith("needle")]
    stories = [it for it in items if not it.task.startswith("needle")]
    assert len(doc) == pytest.approx(2048, abs=2) and len(needles) == 4 and len(stories) == 3
    for it in needles:  # 4096 does not fit a 2048-token document
        assert it.depth in (256, 1024) and abs(len(doc) - it.positions[0] - it.depth) < 200
        assert tok.decode(doc[it.positions[0] :]).startswith(" " + it.facts[0])
    for it in stories:
        assert it.positions == sorted(it.positions) and max(it.positions) < len(doc) - 512 + 100
        for at, fact in zip(it.positions, it.facts, strict=True):
            assert tok.decode(doc[at:]).startswith(" " + fact)


def test_book_questions_are_answered_by_their_evidence(tok):
    text = BOOK.read_text()
    questions = json.loads(BOOK_QUESTIONS.read_text())
    assert len(questions) >= 40
    for q in questions:
        assert q["evidence"] in text and q["answer"].lower() in q["evidence"].lower()
        assert len(q["wrong"]) == 5 and q["answer"] not in q["wrong"] and q["cloze"].count("{}") == 1
        assert all(w.lower() in text.lower() for w in q["wrong"])
    ids, asked = book_items(tok, 8192)
    assert len(ids) == 8192 and 0 < len(asked) < len(questions)
    for it in asked:  # the evidence starts at the recorded token and lies within what is read
        evidence = next(q["evidence"] for q in questions if q["question"] in it.question)
        assert evidence[:20] in tok.decode(ids[it.positions[0] : it.positions[0] + 40])


def test_the_evidence_memory_reads_the_passages_around_each_fact_merged_in_order():
    doc = list(range(1000))
    assert around(doc, [500]) == doc[500 - EVIDENCE_BEFORE : 500 + EVIDENCE_AFTER]
    assert around(doc, [900, 10]) == doc[: 10 + EVIDENCE_AFTER] + doc[900 - EVIDENCE_BEFORE :]  # clipped at the ends
    assert around(doc, [300, 400]) == doc[300 - EVIDENCE_BEFORE : 400 + EVIDENCE_AFTER]  # overlapping: merged


def test_coverage_says_whether_the_pool_kept_the_answer_and_the_question_read_it(tiny_model_dir):
    engine = ttt.load_engine(tiny_model_dir, "cpu")
    tok = engine.base.tokenizer
    doc = tok(FILLER.read_text(encoding="utf-8")[:3000], add_special_tokens=False).input_ids
    session = engine.create_session({"ingest": {"chunk_tokens": 64, "context_tokens": 64}})
    session.append_tokens(doc)
    session.end_document()
    while session.train_next_chunk() is not None:
        pass
    spans = [sp for sp in session.memory.spans if sp.position + len(sp.tokens) <= len(doc) - 64]  # left the window
    assert spans and all(doc[sp.position : sp.position + len(sp.tokens)] == sp.tokens for sp in spans)
    span = spans[0]
    word = sorted(words(tok.decode(span.tokens)))[0]

    def item(answer: str, at: int) -> Item:
        return Item("needle/x", [], f"What of {answer}?", answer, ["x"] * 5, "It was {}.", [at])

    asked = coverage(session, doc, item(word, span.position))
    assert asked["kept"] and asked["read_qa"]  # the question names the kept span's word: its notes hold it
    assert any(sp is span for sp in session.noted(f"What of {word}?"))
    assert asked["read_statement"] == any(sp is span for sp in session.noted("It was"))
    assert not any(coverage(session, doc, item("zebra quagga", span.position)).values())  # not stated there
    last = sorted(words(tok.decode(doc[-20:])))[0]
    in_window = coverage(session, doc, item(last, len(doc) - 20))
    assert in_window["read_qa"] and in_window["read_statement"]  # read in the window, kept or not


def test_ttt_recall_cli_writes_results_and_heat_maps(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "recall"
    small = json.dumps({"ingest": {"chunk_tokens": 64, "context_tokens": 64}, "recall": {"exact_tokens": 32}})
    argv = [
        "recall",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--presets",
        "fast",
        "--config",
        f"small={small}",
        "--lengths",
        "256",
        "384",
        "--depths",
        "128",
        "200",
        "--needles-per-depth",
        "1",
        "--stories",
        "1",
        "--book-tokens",
        "3000",
        "--answer-tokens",
        "2",
    ]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    memories = ["none", "window", "full", "evidence", "ttt/fast", "weights/fast", "ttt/small", "weights/small"]
    assert sorted(res["accuracy"]) == sorted(memories)
    for memory in memories:
        for probe in ("statement", "qa", "generate"):
            assert set(res["accuracy"][memory][probe]) == {"needle", "qa1", "qa2", "qa3", "book"}
    assert res["counts"]["needle"] == 4 and res["counts"]["qa1"] == 2 and res["counts"]["book"] >= 1
    assert res["needle_depths"] == [128, 200]
    grid = res["needles"]["statement"]["ttt/small"]  # [depth][length]
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)
    for record in res["records"]:
        assert all(m in record for m in memories) and record["from_end"] > 0
        assert isinstance(record["ttt/small"]["kept"], bool) and "read_qa" in record["ttt/fast"]
    assert sorted(res["coverage"]) == ["ttt/fast", "ttt/small"]
    assert set(res["coverage"]["ttt/fast"]) == {"kept", "read_statement", "read_qa"}
    assert res["session_configs"]["small"]["recall"]["exact_tokens"] == 32
    assert res["session_configs"]["fast"]["memory"] == "fast"
    cost = res["cost"]
    assert cost["prefill_tokens_per_s"] > 0 and cost["small"]["tokens_per_s"] > 0 and cost["fast"]["vs_prefill"] > 0
    for probe in ("statement", "qa", "generate"):
        assert (out / f"needles_{probe}.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "ingest cost" in printed and "weights/small" in printed
