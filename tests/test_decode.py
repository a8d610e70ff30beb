"""Continuous batching of answers (ttt/decode.py) on the tiny random Llama: rows of different sessions (LoRA of
different ranks, targets and layers, extra-MLP, the base model) decoded in one forward per step give the same
tokens as each answer decoded alone; rows join and leave at any step; the key/value pool keeps its budget.

Greedy equality is exact token for token (fp32, one thread); the logits of a batched step match a row's own
forward within 1e-5 (the same weights, different matmul shapes).
"""

from __future__ import annotations

import pytest
import torch

import ttt
from ttt.cache import KVCache, RaggedCache
from ttt.decode import AnswerPool, DecodeBatch

pytestmark = pytest.mark.usefixtures("one_thread")

MSGS = [{"role": "user", "content": "What did you read?"}]
PATTERN = [1000, 2000, 3000, 4000, 5000] * 12
SESSIONS = [  # (fast weights, memory preset)
    ({"kind": "lora", "rank": 4, "layers": "all", "targets": ["q_proj", "v_proj"]}, "off"),
    ({"kind": "lora", "rank": 8, "layers": "last:2", "targets": ["gate_proj", "up_proj", "down_proj"]}, "off"),
    ({"kind": "mlp", "mlp_hidden": 16, "layers": "all"}, "off"),
    ({"kind": "lora", "rank": 2, "layers": "all"}, "balanced"),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def sessions(engine):
    return trained_sessions(engine)


def trained_sessions(engine) -> list:
    """A session of each of SESSIONS' kinds, each trained on PATTERN rotated by its index."""
    out = []
    for i, (fast, memory) in enumerate(SESSIONS):
        s = engine.create_session(
            {
                "fast": {**fast, "seed": i},
                "memory": memory,
                "ingest": {"chunk_tokens": 16, "context_tokens": 24, "sink_tokens": 4, "lr": 3e-2},
            }
        )
        s.append_tokens(PATTERN[i:] + PATTERN[:i])
        s.end_document()
        while s.train_next_chunk() is not None:
            pass
        out.append(s)
    return out


def streams(engine, sessions, **sampling):
    """One fresh answer per session plus one from the base model, none started."""
    made = [s.generate(MSGS, stream=True, **sampling) for s in sessions]
    return [*made, engine.generate(MSGS, stream=True, **sampling)]


def record_forwards(model, monkeypatch) -> list[tuple[int, int]]:
    """The [B, T] of every forward the model runs from now on (the list fills as they run)."""
    forwards, run_layers = [], model.run_layers
    monkeypatch.setattr(
        model, "run_layers", lambda h, *a, **k: forwards.append(tuple(h.shape[:2])) or run_layers(h, *a, **k)
    )
    return forwards


def run_batch(batch: DecodeBatch, rows, join_at: list[int]) -> None:
    """Join row i before step ``join_at[i]``; step until every row has finished."""
    step = 0
    while any(r.finish_reason is None for r in rows):
        for row, at in zip(rows, join_at, strict=True):
            if at == step:
                batch.join(row)
        batch.step()
        step += 1
    assert len(batch) == 0 and batch.pool.num_bytes() == 0  # every row left; the pool was freed


@pytest.mark.parametrize(
    "sampling",
    [
        dict(max_tokens=12),
        dict(max_tokens=10, temperature=0.9, top_p=0.9, seed=3),
        dict(max_tokens=10, top_logprobs=2, frequency_penalty=1.0),
    ],
)
def test_batched_answers_equal_answers_alone(engine, sessions, sampling):
    alone = streams(engine, sessions, **sampling)
    texts = ["".join(s) for s in alone]
    rows = streams(engine, sessions, **sampling)
    # joins at different steps: rows decode while others prefill; a small prefill piece splits prompts
    run_batch(DecodeBatch(engine.base.model, prefill_chunk=7), rows, join_at=[0, 0, 2, 5, 9])
    assert [r.text for r in rows] == texts
    for a, b in zip(alone, rows, strict=True):
        assert (a.finish_reason, a.completion_tokens, a.prompt_tokens) == (
            b.finish_reason,
            b.completion_tokens,
            b.prompt_tokens,
        )
        assert [lp.token for lp in a.logprobs] == [lp.token for lp in b.logprobs]
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    assert len({r.text for r in rows}) == len(rows)  # the sessions really answer differently


def test_rows_in_line_prefill_together_in_one_forward(engine, sessions, monkeypatch):
    """Rows that join at once (LoRA of ranks 4, 8 and 2, extra-MLP, the base model; questions of different
    lengths) prefill in ONE forward padded to the longest piece, then decode; an echoed completion, which scores
    every prompt token, is prefilled in a forward of its own. Each answers as it does alone."""
    long = "Who is there, and what do they want from us now, so late at night, in the rain, with every lamp out?"
    asked = ["Why?", "What did you read today?", "Hi", "And?", long]  # the long one to the base model: no window
    prompt = "Once upon a time there was a"

    def fresh(stream: bool):
        chats = [
            who.generate([{"role": "user", "content": q}], max_tokens=8, stream=stream)
            for who, q in zip([*sessions, engine], asked, strict=True)
        ]
        return [*chats, sessions[1].complete(prompt, echo=True, top_logprobs=1, stream=stream)]

    alone, rows = fresh(stream=False), fresh(stream=True)
    pieces = [len(r.prompt) - r.filled for r in rows[:-1]]
    assert len(set(pieces)) > 1  # pieces of different lengths: the shorter ones padded
    # a row with a window's keys/values (filled) and a short question: its pads run past its slot's last column
    assert max(r.filled + max(pieces) for r in rows[:-1]) > max(len(r.prompt) + 8 for r in rows[:-1])
    model = engine.base.model
    forwards = record_forwards(model, monkeypatch)
    batch = DecodeBatch(model, prefill_chunk=4096)
    for row in rows:
        batch.join(row)
    batch.step()
    assert forwards == [(len(pieces), max(pieces)), (len(pieces), 1)]  # prefilled together, then one decode step
    run_batch(batch, rows, join_at=[-1] * len(rows))
    assert [r.text for r in rows] == [a.text for a in alone]
    assert len({r.text for r in rows[:-1]}) > 1
    assert [lp.token for lp in rows[-1].echo_logprobs] == [lp.token for lp in alone[-1].echo_logprobs]
    for x, y in zip(alone[-1].echo_logprobs, rows[-1].echo_logprobs, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_a_forward_of_prompts_holds_prefill_chunk_tokens_pads_included(engine, monkeypatch):
    """A long prompt shares a forward with as many short ones as its length times the rows fits the budget."""
    asked = ["Who is there, and what do they want from us now, so late at night, in the rain?", "Hi", "Why?", "And?"]
    rows = [engine.generate([{"role": "user", "content": q}], max_tokens=2, stream=True) for q in asked]
    longest = len(rows[0].prompt)
    model = engine.base.model
    forwards = record_forwards(model, monkeypatch)
    batch = DecodeBatch(model, prefill_chunk=3 * longest - 1)  # the real tokens of all four would fit
    assert sum(len(r.prompt) for r in rows) <= batch.prefill_chunk
    for row in rows:
        batch.join(row)
    batch.step()
    assert forwards[0] == (2, longest)  # not (4, longest): 4 x longest tokens, over a quarter of them pads


def test_deltas_of_a_batched_row_are_its_text(engine, sessions):
    row = sessions[0].generate(MSGS, stream=True, max_tokens=12, stop=["e"])
    other = sessions[1].generate(MSGS, stream=True, max_tokens=12)
    batch, pieces = DecodeBatch(engine.base.model), []
    batch.join(row)
    batch.join(other)
    while row.finish_reason is None:
        batch.step()
        pieces += row.take()
    alone = sessions[0].generate(MSGS, max_tokens=12, stop=["e"])
    assert "".join(pieces) == row.text == alone.text and row.finish_reason == alone.finish_reason


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_an_echoed_prompt_scored_in_small_prefill_pieces_equals_one_piece(engine, sessions, max_tokens):
    prompt = "Once upon a time there was a"
    alone = sessions[0].complete(prompt, echo=True, top_logprobs=2, max_tokens=max_tokens)
    row = sessions[0].complete(prompt, echo=True, top_logprobs=2, max_tokens=max_tokens, stream=True)
    run_batch(DecodeBatch(engine.base.model, prefill_chunk=3), [row], join_at=[0])
    assert [lp.token for lp in row.echo_logprobs] == [lp.token for lp in alone.echo_logprobs]
    assert len(row.echo_logprobs) == len(engine.text_ids(prompt))
    for x, y in zip(alone.echo_logprobs, row.echo_logprobs, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4) and [t for t, _ in x.top] == [t for t, _ in y.top]
    assert row.text == alone.text and row.finish_reason == alone.finish_reason


def test_a_dropped_row_leaves_at_once_and_the_others_go_on(engine, sessions):
    alone = [sessions[i].generate(MSGS, max_tokens=10).text for i in (0, 2)]
    rows = [sessions[i].generate(MSGS, stream=True, max_tokens=10) for i in range(3)]
    batch = DecodeBatch(engine.base.model)
    for r in rows:
        batch.join(r)
    for _ in range(4):
        batch.step()
    batch.drop(rows[1])  # its client has gone
    assert rows[1] not in batch.rows and len(batch) == 2
    while len(batch):
        batch.step()
    assert [rows[0].text, rows[2].text] == alone


def test_the_pool_refuses_what_its_budget_cannot_hold(engine, sessions):
    model = engine.base.model
    one = sessions[0].generate(MSGS, stream=True, max_tokens=8)
    need = (len(one.prompt) + 8) * AnswerPool(model.cfg, "cpu", torch.float32).token_bytes
    batch = DecodeBatch(model, kv_budget=2 * need, max_rows=8)
    rows = [sessions[0].generate(MSGS, stream=True, max_tokens=8) for _ in range(3)]
    assert batch.fits(rows[:2]) and not batch.fits(rows) and batch.fits_alone(rows[:2])
    batch.join(rows[0])
    batch.join(rows[1])
    batch.step()
    assert not batch.fits(rows[2:]) and batch.pool.num_bytes() <= 2 * need
    while len(batch):
        batch.step()
    assert batch.fits(rows[2:])
    assert not DecodeBatch(model, kv_budget=need - 1).fits_alone([one])


@torch.no_grad()
def test_ragged_cache_equals_one_kv_cache_per_row(engine):
    """Two rows of different lengths in one forward: each row's logits as its own cached forward."""
    model, cfg = engine.base.model, engine.base.cfg
    lengths, cap = [5, 11], 16
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n + 1,), generator=gen) for n in lengths]
    pool = AnswerPool(cfg, "cpu", torch.float32)
    pool.reserve(2, cap)
    expect = []
    for row, p in enumerate(prompts):
        model(p[None, :-1], cache=pool.view(row, row + 1, [0]))
        cache = KVCache(cfg, 1, cap, "cpu", torch.float32)
        expect.append(model(p[None], cache=cache)[0, -1])
    got = model(torch.stack([p[-1:] for p in prompts]), cache=pool.view(0, 2, lengths))[:, 0]
    torch.testing.assert_close(got, torch.stack(expect), atol=1e-5, rtol=1e-5)
    assert isinstance(pool.view(0, 2, lengths), RaggedCache)


def test_the_pool_grows_within_its_budget_as_rows_of_longer_answers_join(engine):
    """Rows that join together take their slots at once (one growth of the pool, not one per doubling); a row that
    takes a freed slot grows nothing; a longer row then leaves room for fewer slots, and the rows held keep their
    keys/values (their answers are those they give alone)."""
    model = engine.base.model
    rows = [engine.generate(MSGS, stream=True, max_tokens=4) for _ in range(5)]
    longer = engine.generate(MSGS, stream=True, max_tokens=14)
    tb = AnswerPool(model.cfg, "cpu", torch.float32).token_bytes
    short, long = len(rows[0].prompt) + 4, len(longer.prompt) + 14
    budget = 6 * long * tb  # room for 7 short slots, then for only 6 long ones
    assert 7 * short * tb <= budget < 7 * long * tb
    batch = DecodeBatch(model, kv_budget=budget, max_rows=7)
    for row in rows:
        batch.join(row)
    batch.step()  # the five prefill and take their first token
    assert batch.pool.slots == 5 and batch.pool.capacity == short  # room for the five at the first one's start
    batch.drop(rows[4])
    rows[4] = engine.generate(MSGS, stream=True, max_tokens=4)
    batch.join(rows[4])
    batch.step()
    assert batch.pool.slots == 5  # a row that takes a freed slot: no growth
    assert batch.fits([longer])
    batch.join(longer)
    batch.step()  # its prefill takes a slot
    assert batch.pool.slots == 6 and batch.pool.capacity == long and batch.pool.num_bytes() <= budget
    while len(batch):
        batch.step()
    alone = engine.generate(MSGS, max_tokens=4).text
    assert [r.text for r in rows] == [alone] * 5 and longer.text == engine.generate(MSGS, max_tokens=14).text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefill_chunk", [7, 4096])
def test_batched_answers_equal_answers_alone_on_cuda(tiny_model_dir, prefill_chunk):
    """The same check on a GPU (fp32): LoRA rows through the compiled Triton multi-LoRA kernel, SDPA with a mask;
    prompts in pieces of 7 tokens, or whole and those in line in one forward."""
    from ttt.model import load_base_model

    engine = ttt.Engine(load_base_model(tiny_model_dir, "cuda", torch.float32))
    sessions = trained_sessions(engine)
    texts = ["".join(s) for s in streams(engine, sessions, max_tokens=12)]
    rows = streams(engine, sessions, max_tokens=12)
    run_batch(DecodeBatch(engine.base.model, prefill_chunk=prefill_chunk), rows, join_at=[0, 0, 2, 5, 9])
    assert [r.text for r in rows] == texts


def test_a_tiny_temperature_is_greedy_not_a_crash(engine):
    from ttt.generate import SamplingParams, sample_next

    logits = torch.randn(engine.base.cfg.vocab_size, generator=torch.Generator().manual_seed(0))
    assert sample_next(logits, SamplingParams(temperature=1e-40), torch.Generator().manual_seed(1)) == int(
        logits.argmax()
    )


def test_whether_rows_could_ever_fit_does_not_depend_on_the_rows_held(engine):
    model = engine.base.model
    short = [engine.generate(MSGS, stream=True, max_tokens=2) for _ in range(3)]
    long = engine.generate(MSGS, stream=True, max_tokens=60)
    tb = AnswerPool(model.cfg, "cpu", torch.float32).token_bytes
    batch = DecodeBatch(model, kv_budget=3 * (len(short[0].prompt) + 2) * tb)
    assert batch.fits([long])
    batch.join(long)
    batch.step()
    assert not batch.fits(short) and batch.fits_alone(short)  # it waits for the long row, never a 400


def test_rows_start_their_prefill_in_the_order_they_joined(engine, sessions):
    """A row that leaves never lets the newest row jump the line: the rows that joined earlier prefill first."""
    first = [sessions[i].generate(MSGS, stream=True, max_tokens=40) for i in (0, 1)]
    batch = DecodeBatch(engine.base.model, prefill_chunk=8)
    for row in first:
        batch.join(row)
    for _ in range(100):
        if batch.decoding == 2:
            break
        batch.step()
    assert batch.decoding == 2
    late = [sessions[i].generate(MSGS, stream=True, max_tokens=2) for i in (2, 3, 0)]
    for row in late:
        batch.join(row)
    batch.step()  # the first late row starts its prefill (8 tokens a step)
    batch.drop(first[0])  # its client has gone
    started = []
    for _ in range(200):
        if not len(batch):
            break
        batch.step()
        started += [r for r in late if (r in batch.rows[: batch.decoding] or r.finish_reason) and r not in started]
    assert started == late and not len(batch)
