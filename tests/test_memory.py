"""What a session keeps to recall what left its window: surprising spans (ttt/memory.py), their rehearsal, and
study (ttt/study.py). Tiny random Llama for the mechanics; one slow test shows the effect on the default model
with two sessions that read the same text but for one planted fact.
"""

from __future__ import annotations

import pytest
import torch

import ttt
from ttt.cache import RollingContext
from ttt.config import RecallConfig
from ttt.ingest import forward_hidden
from ttt.memory import Span, SpanMemory, TokenMarks, rehearse, select_spans, span_batch
from ttt.study import StudyBatch, questions, student_loss, teacher

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"ingest": {"chunk_tokens": 32, "context_tokens": 32}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, "cpu")


def encode(engine, text: str) -> list[int]:
    return engine.base.tokenizer(text, add_special_tokens=False).input_ids


def marks(ends: torch.Tensor, joins: list[int] = ()) -> TokenMarks:
    """``ends`` and no token that goes on with a word, but ``joins``."""
    word = torch.zeros_like(ends)
    word[list(joins)] = True
    return TokenMarks(ends, word)


def test_spans_are_the_most_surprising_sentences_cut_around_their_peak():
    # sentences [0, 4), [4, 10), [10, 22), [22, 24) (ends[t] marks a sentence end; the last one is too short)
    tokens = list(range(24))
    ends = torch.zeros(32, dtype=torch.bool)
    ends[[3, 9, 21]] = True
    surprise = torch.zeros(24)
    surprise[6], surprise[14], surprise[20], surprise[23] = 5.0, 9.0, 4.0, 50.0
    cfg = RecallConfig(spans_per_chunk=3, span_tokens=5, peak_tokens=2)
    spans = select_spans(tokens, surprise, marks(ends), cfg, position=100)
    # [10, 22): peak 14, 5 tokens ending AFTER_PEAK = 3 after it: [13, 18), scored by its own 2 best tokens only
    # (the 4.0 at 20 is cut off); [4, 10): peak 6 -> [5, 10) cut by the sentence end; [0, 4) scores 0: not kept
    assert [(sp.position, sp.tokens, sp.score) for sp in spans] == [
        (113, [13, 14, 15, 16, 17], 9.0),
        (105, [5, 6, 7, 8, 9], 5.0),
    ]


def test_a_long_sentence_gives_a_span_around_each_peak_and_a_span_ends_with_its_word():
    # one 40-token sentence stating two facts far apart: peaks at 5 and 30; tokens 34 and 35 go on with a word
    tokens, ends = list(range(40)), torch.zeros(48, dtype=torch.bool)
    ends[39] = True
    surprise = torch.zeros(40)
    surprise[5], surprise[30] = 9.0, 8.0
    cfg = RecallConfig(spans_per_chunk=4, dense_spans_per_chunk=0, span_tokens=8, peak_tokens=1)
    spans = select_spans(tokens, surprise, marks(ends, joins=[34, 35]), cfg, position=0)
    # [1, 9): 5 and AFTER_PEAK = 3 after it; [28, 36): 30, 3 after it, then on to the word's end (34, 35); the
    # rest of the sentence ([9, 28), [36, 40)) holds no surprise: no span (once cut around 5 only: [1, 9) alone)
    assert [(sp.position, sp.tokens, sp.score) for sp in spans] == [
        (1, list(range(1, 9)), 9.0),
        (28, list(range(28, 36)), 8.0),
    ]
    # by density only a sentence's first span (the one around its highest peak): the rest of a long sentence is
    # not a short fact
    one_each = RecallConfig(spans_per_chunk=1, dense_spans_per_chunk=1, span_tokens=8, peak_tokens=1)
    assert [sp.position for sp in select_spans(tokens, surprise, marks(ends, [34, 35]), one_each, 0)] == [1]


def test_the_memory_keeps_the_best_within_its_budget_and_reads_them_in_document_order():
    memory = SpanMemory(RecallConfig(exact_tokens=5, pool_tokens=7))
    a, b, c = Span([1, 2, 3], 3.0, 50), Span([4, 5], 9.0, 10), Span([6, 7, 8], 5.0, 30)
    assert memory.add([a, b]) == [a, b]
    assert memory.add([c]) == [c] and memory.spans == [b, c]  # a (lowest score) is out: 7 tokens at most
    assert memory.exact_tokens(before=100) == [4, 5, 6, 7, 8]  # b at 10 before c at 30
    assert memory.exact_tokens(before=32) == [4, 5]  # c (30-33) reaches into the window, which starts at 32
    assert memory.add([Span([9, 9, 9], 1.0, 60)]) == []  # ranks last and does not fit any more
    batch = memory.replay_batch([c], seed=0)
    assert batch[0] is c and batch[1:] == [b]  # the new span, then older ones
    restored = SpanMemory(memory.cfg)
    restored.load_tensors(memory.tensors())
    assert restored.spans == memory.spans
    inputs, targets = span_batch([b, c], "cpu")
    assert inputs.tolist() == [[4, 5, 0], [6, 7, 8]] and targets.tolist() == [[5, -100, -100], [7, 8, -100]]


def test_notes_are_the_kept_spans_that_share_the_rarest_words_with_the_question():
    texts = {
        1: "The code of the violet crane is 4821.",
        2: "The crane flew over the river at dawn.",
        3: "The river was cold and the crane was grey.",
        4: "Mr. Tilney walked to the river with the crane.",
    }
    memory = SpanMemory(RecallConfig(exact_tokens=16, pool_tokens=64))
    scores = {1: 1.0, 2: 1.0, 3: 3.0, 4: 2.0}
    memory.add([Span([i] * 4, scores[i], 10 * i) for i in texts])  # token i stands for sentence i (decode below)
    decode = lambda tokens: texts[tokens[0]]
    # "violet" and "code" are in one span, "crane" in all four: those sharing only "crane" are less than half as
    # related as the violet one, so it is read alone
    asked = "What is the code of the violet crane?"
    assert memory.notes(asked, 100, 4, decode) == [1] * 4
    assert memory.notes(asked, 100, 16, decode) == [1] * 4
    # "river" in 2, 3 and 4 (each also "crane"), 1 only "crane": as related, the most surprising first, as the
    # budget allows; read in document order
    river = "Why was the crane at the river?"
    assert memory.notes(river, 100, 4, decode) == [3] * 4
    assert memory.notes(river, 100, 8, decode) == [3] * 4 + [4] * 4
    assert memory.notes(river, 100, 16, decode) == [2] * 4 + [3] * 4 + [4] * 4
    # Tilney's span, then one hop further: the spans sharing its other words ("river" and "crane": 2 and 3; 1
    # shares only "crane", less than half as related)
    assert memory.notes("Who walked with Mr. Tilney?", 100, 16, decode) == [2] * 4 + [3] * 4 + [4] * 4
    assert memory.notes("Who walked with Mr. Tilney?", 100, 4, decode) == [4] * 4  # the question's own first
    assert memory.notes("What is it that was there?", 100, 16, decode) == []  # common words name nothing
    assert memory.notes("Who walked with Mr. Tilney?", 43, 16, decode) == []  # still in the window: read there
    assert memory.notes("the violet crane", 100, 0, decode) == []
    # each span's words are read once and forgotten with the span (the cache stays as flat as the pool)
    texts[5] = "A violet heron."
    memory.add([Span([5] * 60, 9.0, 60)])  # the best: with it only 3 (the next best) fits the 64 tokens
    assert sorted(set(memory.notes(asked, 200, 64, decode))) == [3, 5]
    assert sorted(memory._words) == [30, 60]


def test_notes_follow_one_hop_from_the_question_to_the_fact_it_needs():
    texts = {
        1: "Mary picked up the milk.",
        2: "John went to the kitchen.",
        3: "The milk of human kindness was in short supply.",
        4: "Mary went to the garden.",
        5: "Anne went to the garden with a book.",
    }
    memory = SpanMemory(RecallConfig(exact_tokens=64, pool_tokens=64))
    memory.add([Span([i] * 4, 1.0, 10 * i) for i in texts])
    decode = lambda tokens: texts[tokens[0]]
    # "milk": 1 and 3; the most related (1: ties by surprise, then the first kept) leads to "mary" and "picked":
    # 4 ("mary"); 5 shares no word with 1, 2 neither
    notes = memory.notes("Where is the milk?", 100, 64, decode)
    assert sorted(set(notes)) == [1, 3, 4] and notes == sorted(notes)


def test_spans_are_taken_by_their_peaks_then_by_their_density():
    # sentences [0, 6) (a short fact: four surprising tokens of six), [6, 30) and [30, 54) (long: five peaks each
    # among dull tokens, higher in the second)
    tokens, ends = list(range(54)), torch.zeros(64, dtype=torch.bool)
    ends[[5, 29, 53]] = True
    surprise = torch.full((54,), 1.0)
    surprise[1:5] = 6.0
    surprise[[10, 14, 18, 22, 26]] = 8.0
    surprise[[34, 38, 42, 46, 50]] = 9.0
    by_peaks = RecallConfig(spans_per_chunk=1, dense_spans_per_chunk=0, span_tokens=24)
    assert [sp.position for sp in select_spans(tokens, surprise, marks(ends), by_peaks, position=0)] == [30]
    both = RecallConfig(spans_per_chunk=1, dense_spans_per_chunk=1, span_tokens=24)
    spans = select_spans(tokens, surprise, marks(ends), both, position=0)
    # the long one by peaks (5 x 9 = 45); then by density the fact (mean of its 3 best = 6, x 5 = 30) rather
    # than the other long one (mean of its 12 best = (5 x 8 + 7) / 12, x 5 = 19.6)
    assert [(sp.position, sp.score) for sp in spans] == [(30, 45.0), (0, 30.0)]


def test_rehearsal_learns_the_spans_and_rolls_back_a_nonfinite_step(engine):
    model = engine.base.model
    session = engine.create_session(SMALL)
    span = Span(encode(engine, "The secret code of the amber heron is 48213."), 40.0, 0)
    inputs, targets = span_batch([span], "cpu")

    def span_loss():
        with torch.no_grad():
            h = forward_hidden(model, session.fast, inputs)
            return ttt.ingest.token_nll(model, h, targets).sum().item()

    before = span_loss()
    recall = RecallConfig(replay_steps=3, replay_lr=1e-2)
    assert rehearse(model, session.fast, session.optimizer, [span], None, session.config.ingest, recall) is not None
    assert span_loss() < before - 1.0
    assert all(group["lr"] == session.config.ingest.lr for group in session.optimizer.param_groups)
    state = {k: v.clone() for k, v in session.fast.state_dict().items()}
    huge = RecallConfig(replay_steps=2, replay_lr=1e30)
    sgd = engine.create_session({**SMALL, "ingest": {**SMALL["ingest"], "optimizer": "sgd"}})
    sgd.fast.load_state_dict(state)
    assert rehearse(model, sgd.fast, sgd.optimizer, [span], None, sgd.config.ingest, huge) is None
    for k, v in sgd.fast.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)  # every step undone


def test_the_teacher_sees_the_window_without_changing_it(engine):
    model = engine.base.model
    window = encode(engine, "Elspeth Lanyon kept a jade ring under the floor. The mill was built in 1703.")
    context = RollingContext(model.cfg.num_layers, 64, 4)
    with torch.no_grad():
        forward_hidden(model, None, torch.tensor([window]), context)
    context.commit()
    k_before = [t.clone() for t in context.k]
    pairs = questions(engine.base.tokenizer, [window[:8], window[10:]])
    assert all(engine.base.tokenizer.decode(p).count("What does the text say about") == 1 for p, _ in pairs)
    batch = teacher(model, context, pairs, top_k=5, device="cpu")
    assert [torch.equal(a, b) for a, b in zip(k_before, context.k, strict=True)] == [True] * len(
        k_before
    ) and not context._new
    # row 1's teacher = one plain forward over window + prompt + answer
    prompt, answer = pairs[1]
    logits = model(torch.tensor([window + prompt + answer]))[0]
    rows = batch.positions[:, 0] == 1
    where = batch.positions[rows, 1] + len(window)
    want = torch.topk(logits[where], 5, dim=-1)
    torch.testing.assert_close(batch.top_ids[rows], want.indices)
    torch.testing.assert_close(batch.top_logp[rows], torch.log_softmax(want.values, -1), atol=1e-4, rtol=0)
    assert batch.positions.shape[0] == sum(len(a) for _, a in pairs)


def test_the_student_loss_is_least_when_it_matches_the_teacher(engine):
    model = engine.base.model
    pairs = questions(engine.base.tokenizer, [encode(engine, "The ferryman was called Oswin Tarrant.")])
    no_context = teacher(model, None, pairs, top_k=8, device="cpu")
    h = model.run_layers(model.embed(no_context.inputs), 0, model.cfg.num_layers)
    # a student equal to the teacher pays only for the teacher's mass outside its top 8: -log(top-8 mass)
    logp = torch.log_softmax(model.logits(h[no_context.positions[:, 0], no_context.positions[:, 1]]), -1)
    outside = -torch.logsumexp(logp.gather(1, no_context.top_ids), dim=1).mean()
    assert student_loss(model, h, no_context).item() == pytest.approx(outside.item(), abs=1e-4)
    shifted = StudyBatch(
        no_context.inputs, no_context.positions, no_context.top_ids.roll(1, dims=1), no_context.top_logp
    )
    assert student_loss(model, h, shifted).item() > outside.item() + 0.01


def test_sessions_keep_spans_study_and_save_them(engine, tmp_path, monkeypatch):
    ids = encode(
        engine,
        "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own "
        "amusement, never took up any book but the Baronetage. " * 6,
    )
    studied = []
    real_teacher = ttt.session.teacher
    monkeypatch.setattr(ttt.session, "teacher", lambda *a, **k: studied.append(1) or real_teacher(*a, **k))
    for memory in ("off", "fast", "balanced", "deep"):
        study = {"study_spans": 2} if memory in ("balanced", "deep") else {}  # study learns in the rehearsal
        session = engine.create_session({**SMALL, "memory": memory, "recall": study})
        session.append_tokens(ids)
        session.end_document()
        reports = []
        while (report := session.train_next_chunk()) is not None:
            reports.append(report)
        recall = session.config.recall
        assert (memory == "off") == (not session.memory.spans)
        assert sum(len(sp.tokens) for sp in session.memory.spans) <= recall.pool_tokens
        exact = session.exact_tokens()
        assert len(exact) <= recall.exact_tokens and session.answer_prefix() == session.recent_tokens()  # not asked
        asked = "Who was Sir Walter Elliot of Kellynch Hall?"
        notes = session.notes(asked)
        assert (memory == "off") == (not notes) and len(notes) <= recall.exact_tokens
        # the default reads them alone, with the base model; the rehearsed presets after the window, as measured
        alone = memory == "fast"
        assert session.reading(asked) == ((notes, None) if alone else (session.recent_tokens() + notes, session.fast))
        assert session.info()["exact_tokens_read"] == len(exact) and session.info()["memory"] == memory
        assert session.stats.rehearsals_rolled_back == 0 and all(r.seconds > 0 for r in reports)
        session.save(tmp_path / memory)
        on_disk = ttt.store.saved_info(tmp_path / memory)  # what a server says of it without loading it
        assert (on_disk["memory"], on_disk["memory_spans"], on_disk["exact_tokens_read"]) == (
            memory,
            len(session.memory.spans),
            len(exact),
        )
        loaded = engine.load_session(tmp_path / memory)
        assert loaded.memory.spans == session.memory.spans and loaded.config == session.config
        assert loaded.score("Anne Elliot") == pytest.approx(session.score("Anne Elliot"), abs=1e-5)
    assert len(studied) == 2 * len(reports)  # balanced and deep: a teacher per chunk


def test_presets_and_their_overrides():
    cfg = ttt.SessionConfig.from_dict({"memory": "fast", "recall": {"exact_tokens": 64}})
    assert cfg.memory == "fast" and cfg.recall.exact_tokens == 64 and cfg.recall.replay_steps == 0
    assert ttt.SessionConfig.from_dict({}) == ttt.SessionConfig()  # no settings: DEFAULT_MEMORY, "fast"
    default = ttt.SessionConfig().recall  # keeps spans and reads those a question asks about; no rehearsal
    assert default.exact_tokens > 0 and default.exact_select == "question" and default.replay_steps == 0
    assert ttt.SessionConfig.from_dict({"memory": "balanced"}).recall.replay_steps > 0
    off = ttt.SessionConfig.from_dict({"memory": "off"}).recall
    assert (off.exact_tokens, off.pool_tokens, off.replay_steps) == (0, 0, 0)
    with pytest.raises(ValueError, match="unknown memory preset"):
        ttt.SessionConfig.from_dict({"memory": "huge"})
    with pytest.raises(ValueError, match="replay_lr"):
        ttt.SessionConfig.from_dict({"recall": {"replay_lr": float("nan")}})
    with pytest.raises(ValueError, match="alpha"):
        ttt.SessionConfig.from_dict({"fast": {"alpha": float("nan")}})


@pytest.mark.slow
def test_a_fact_read_once_is_recalled_after_it_left_the_window(default_model_dir):
    """Two default sessions read the same 1.5K tokens of a novel but for one planted fact, 1K tokens before the
    end: only the one that read it ranks the true value first, by a wide margin, and the question reads it back."""
    import random

    from bench.items import make_needles, plant
    from bench.recall import SessionLM, ask
    from bench.recall_cli import FILLER

    engine = ttt.load_engine(default_model_dir, "cpu")
    tok = engine.base.tokenizer
    filler = tok(FILLER.read_text()[30000:40000], add_special_tokens=False).input_ids[:1500]
    item = make_needles(random.Random(3), 1, kinds=["code"])[0]
    other = make_needles(random.Random(4), 1, kinds=["place"])[0]
    margins, notes = [], []
    for fact in (item.facts[0], other.facts[0]):
        doc, _ = plant(tok, filler, [(500, fact)])
        session = engine.create_session()
        session.append_tokens(doc)
        session.end_document()
        while session.train_next_chunk() is not None:
            pass
        result = ask(SessionLM(engine, session, room=4096), item, answer_tokens=4)
        nll = result["statement_nll"]
        margins.append(min(nll[1:]) - nll[0])  # > 0: the true value is the likeliest
        # what every answer to the question reads right before it (HTTP chat and `ttt chat` too)
        notes.append(tok.decode(session.notes(item.question)))
    read, not_read = margins
    assert read > 2.0 and not_read < 1.0
    assert item.answer in notes[0] and item.answer not in notes[1], notes
