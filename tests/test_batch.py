"""Several sessions' chunks in one batch (ttt/batch.py) against training them one by one.

Twin sessions (same config, seed and tokens) are trained with ``Session.train_next_chunk`` one after
another, and with ``ttt.session.train_sessions``: the reports, weights, optimizer states, windows and
stats must agree. Tolerances (fp32, CPU): losses and gradient norms within 1e-5 relative: the batched
forward computes the same sums, only with other matmul shapes; weights and optimizer moments within
1e-5 absolute, a thousandth of a step (lr 1e-2): AdamW's first steps divide a gradient by its own
magnitude, so rounding-level gradient differences move a weight by up to ~3e-6 over 4 chunks.
With the Triton kernel (interpreted) the LoRA sums run in another order: 1e-4 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels.multi_lora
import ttt
import ttt.batch
import ttt.ingest
import ttt.pause
from ttt.session import train_sessions

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 49152
FAST = {"layers": "last:2", "rank": 4, "mlp_hidden": 16}
INGEST = {"chunk_tokens": 16, "context_tokens": 24, "sink_tokens": 4, "lr": 1e-2}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, device="cpu")


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def config(seed: int = 0, fast: dict | None = None, memory: str = "off", **ingest) -> dict:
    """The bare batched step by default: without the recall memory's rehearsal, which runs per session after it
    (``test_recall_memory_batched_as_sequential`` checks it too)."""
    return {"fast": {**FAST, "seed": seed, **(fast or {})}, "ingest": {**INGEST, **ingest}, "memory": memory}


def twins(engine, configs: list[dict], lengths: list[int]):
    """Two identical sets of sessions, each fed its own document of ``lengths[i]`` tokens (0: nothing)."""
    pairs = []
    for i, (cfg, n) in enumerate(zip(configs, lengths, strict=True)):
        pair = [engine.create_session(cfg) for _ in range(2)]
        for s in pair:
            if n:
                s.append_tokens(rand_ids(n, seed=i))
                s.end_document()
        pairs.append(pair)
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture
def batch_sizes(monkeypatch) -> list[int]:
    """The size of every batch ``ttt.batch`` trains (to check that batching did happen)."""
    sizes = []
    real = ttt.batch.train_group

    def spy(model, items):
        if len(items) > 1:  # batches of one are the single-session path
            sizes.append(len(items))
        return real(model, items)

    monkeypatch.setattr(ttt.batch, "train_group", spy)
    return sizes


def close(a: float | None, b: float | None, rel: float) -> bool:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None and b is None) or (a is not None and b is not None and math.isnan(a) and math.isnan(b))
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel)


def assert_same_reports(got, want, rel: float):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert (g.index, g.tokens, g.rolled_back) == (w.index, w.tokens, w.rolled_back)
        assert (g.error is None) == (w.error is None)
        for field in ("loss_before", "loss_after", "grad_norm"):
            assert close(getattr(g, field), getattr(w, field), rel), (field, g, w)


def assert_same_sessions(batched, sequential, atol: float):
    for b, s in zip(batched, sequential, strict=True):
        for (name, p), (_, q) in zip(b.fast.named_parameters(), s.fast.named_parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)
        for pb, ps in zip(b.optimizer.state.values(), s.optimizer.state.values(), strict=True):
            for key in ps:
                torch.testing.assert_close(pb[key], ps[key], atol=atol, rtol=0)
        assert (b.window, b.pending, b.version) == (s.window, s.pending, s.version)
        counts = [(x.stats.tokens_ingested, x.stats.chunks, x.stats.rolled_back_chunks) for x in (b, s)]
        assert counts[0] == counts[1]
        assert all(p.grad is None for p in b.fast.parameters())


def run_rounds(sequential, batched, rounds: int, rel: float, overrides=None):
    for _ in range(rounds):
        want = [s.train_next_chunk(**o) for s, o in zip(sequential, overrides or [{}] * len(sequential), strict=True)]
        got = train_sessions(batched, overrides)
        assert_same_reports(got, want, rel)


@pytest.mark.parametrize("triton, rounds, rel", [(False, 4, 1e-5), (True, 2, 1e-4)])
def test_batch_matches_sequential(engine, batch_sizes, monkeypatch, triton, rounds, rel):
    if triton:  # the multi-LoRA kernel only (interpreted): the other kernels are not under test here
        pytest.importorskip("triton")
        monkeypatch.setattr(kernels.multi_lora, "use_triton", lambda *tensors: True)
    # different seeds, learning rates and steps per chunk; 50 tokens = chunks of 16, 16, 16, 2
    fast = {"layers": "last:1"} if triton else None  # the interpreter is slow: one fast layer
    configs = [config(0, fast), config(1, fast, lr=3e-2), config(2, fast, steps_per_chunk=2)]
    sequential, batched = twins(engine, configs, [50, 50, 50])
    run_rounds(sequential, batched, rounds, rel)
    assert_same_sessions(batched, sequential, 1e-5)
    # every round in one batch of 3: the first chunk without context, then with, then the equal last partial ones
    assert batch_sizes == [3] * rounds


def test_recall_memory_batched_as_sequential(engine, batch_sizes):
    # the default memory: two steps per chunk, spans kept and rehearsed after each chunk, per session. Each
    # AdamW step moves a weight whose gradient is ~0 by up to lr in the direction of its rounding noise, so four
    # steps a chunk give 1e-4 rather than 1e-5 (at lr 3e-2 the rounding grows to 1e-3 within three chunks).
    configs = [config(0, memory="balanced"), config(1, memory="deep")]
    sequential, batched = twins(engine, configs, [50, 50])
    run_rounds(sequential, batched, 3, 1e-4)
    assert_same_sessions(batched, sequential, 1e-4)
    for b, s in zip(batched, sequential, strict=True):
        assert b.memory.spans and [sp.tokens for sp in b.memory.spans] == [sp.tokens for sp in s.memory.spans]
    assert batch_sizes == [2] * 3


def test_incompatible_sessions_fall_back(engine, batch_sizes):
    configs = [
        config(0),
        config(1),  # batched together
        config(2, fast={"kind": "mlp"}),  # another fast-weight kind
        config(3, fast={"rank": 8}),  # another rank
        config(4, chunk_tokens=12),  # another chunk length
        config(5),  # nothing to train: None
        config(6),  # only 10 tokens: a partial chunk
    ]
    sequential, batched = twins(engine, configs, [40, 40, 40, 40, 40, 0, 10])
    run_rounds(sequential, batched, 2, 1e-5)
    assert_same_sessions(batched, sequential, 1e-5)
    assert batch_sizes == [2, 2]


def test_rollback_in_a_batch_leaves_the_others_alone(engine, batch_sizes):
    configs = [
        config(0),
        config(1, optimizer="sgd", lr=1e20),  # finite update, NaN loss after it: rolled back
        config(2, optimizer="sgd", lr=1e20, steps_per_chunk=2),  # NaN loss at step 1: rolled back
        config(3, optimizer="sgd", lr=1e38, weight_decay=100.0),  # the step itself overflows
    ]
    sequential, batched = twins(engine, configs, [48] * 4)
    run_rounds(sequential, batched, 1, 1e-5)
    assert [s.stats.rolled_back_chunks for s in batched] == [0, 1, 1, 1]
    assert_same_sessions(batched, sequential, 1e-5)
    # the rolled-back sessions recorded their context under the restored weights: they train on normally
    sane = [{}, {"lr": 1e-2}, {"lr": 1e-2}, {"lr": 1e-2}]
    run_rounds(sequential, batched, 2, 1e-5, overrides=sane)
    assert_same_sessions(batched, sequential, 1e-5)
    assert [s.stats.rolled_back_chunks for s in batched] == [0, 1, 1, 1]
    assert batch_sizes == [4, 4, 4]


def test_a_sessions_own_answer_before_the_first_step_reads_it_as_before_the_chunk(engine):
    """Until a chunk's first optimizer step (``ttt.pause.changed()`` false) its session is as it was before the
    chunk: its own answer made at those pause points (the server's scheduler admits it there) is the answer it
    gives before the chunk, logprobs and all; the step then flags the change, and the answer after the chunk
    differs (the weights did change: the check is not empty)."""
    s = engine.create_session(config(3, lr=3e-2))
    s.append_tokens(rand_ids(40, seed=4))
    s.end_document()
    s.train_next_chunk()
    msgs = [{"role": "user", "content": "What did you read?"}]

    def answer():
        g = s.generate(msgs, max_tokens=6, temperature=0, top_logprobs=1)
        return g.text, [e.logprob for e in g.logprobs]

    before = answer()
    made, flags = [], []

    def handler():
        flags.append(ttt.pause.changed())
        if not flags[-1]:
            made.append(answer())

    with ttt.pause.pausing(handler):
        (report,) = train_sessions([s])
    assert not report.rolled_back and True in flags and False in flags
    assert flags == sorted(flags)  # changed once, for the rest of the chunk
    for text, logprobs in made:
        assert text == before[0]
        torch.testing.assert_close(logprobs, before[1], rtol=0, atol=1e-6)
    assert answer()[1] != before[1]


def test_a_session_twice_is_refused(engine):
    s = engine.create_session(config())
    with pytest.raises(ValueError, match="one chunk per batch"):
        train_sessions([s, s])


def test_cuts_give_the_gradients_of_one_backward():
    """A graph cut in three pieces: the same gradients as one backward, a pause point before each piece's."""
    torch.manual_seed(0)
    w = [torch.randn(5, 5, requires_grad=True) for _ in range(3)]
    x = torch.randn(4, 5)

    def loss(cuts):
        h = x
        for wi in w:
            h = torch.tanh((cuts.cut(h) if cuts else h) @ wi)
        return (h**2).sum()

    loss(None).backward()
    want = [wi.grad.clone() for wi in w]
    for wi in w:
        wi.grad = None
    pauses = []
    cuts = ttt.pause.Cuts()
    with ttt.pause.pausing(lambda: pauses.append(sum(wi.grad is not None for wi in w))):
        cuts.backward(loss(cuts))
    for got, expected in zip([wi.grad for wi in w], want, strict=True):
        torch.testing.assert_close(got, expected)
    assert pauses == [1, 2]  # the first piece (x @ w[0]) needs no gradient below it: no cut there


def test_pause_points_leave_training_unchanged(engine, monkeypatch):
    """Chunks trained with a pause handler (where the server decodes answers) get the same reports and weights
    as without one, to rounding; the handler runs before each layer's forward and backward and between pieces
    of the loss; another session's answer decoded at the pause points is the one it gives alone."""
    monkeypatch.setattr(ttt.ingest, "PAUSE_LOGITS", 4 * VOCAB)  # the loss of 16 tokens in pieces of 4
    configs = [config(0, steps_per_chunk=2), config(1, lr=3e-2)]
    plain, paused = twins(engine, configs, [50, 50])
    other = engine.create_session(config(5))
    other.append_tokens(rand_ids(40, seed=9))
    other.end_document()
    other.train_next_chunk()
    msgs = [{"role": "user", "content": "What did you read?"}]
    alone = other.generate(msgs, max_tokens=6, temperature=0).text
    pauses, answers = [], []

    def handler():
        pauses.append(torch.is_grad_enabled())
        if len(pauses) % 9 == 0:
            answers.append(other.generate(msgs, max_tokens=6, temperature=0).text)

    for _ in range(3):
        want = [s.train_next_chunk() for s in plain]
        before = len(pauses)
        with ttt.pause.pausing(handler):
            got = train_sessions(paused)
        assert_same_reports(got, want, 1e-5)
        # both chunks: 1 frozen + 2 fast layers, the loss of 2 x 16 tokens in 8 pieces (4 x VOCAB logits each);
        # backward: the 8 pieces, the last layer, the one below. Session 0's second step alone: 2 layers, 4 pieces,
        # backward 4 + 2. Measured after: 2 layers, 8 pieces.
        assert len(pauses) - before == (1 + 2 + 8) + (8 + 2) + (2 + 4) + (4 + 2) + (2 + 8)
    assert_same_sessions(paused, plain, 1e-5)
    assert not any(pauses)  # the handler runs without autograd, even in the middle of a forward that has it
    assert answers and all(a == alone for a in answers)
