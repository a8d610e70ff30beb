"""The engine on the tiny random Llama (tests/conftest.py): ingest, chunking, rolling context,
rollback, fast-weight configs, sessions, generation and scoring.

Tolerances (fp32 on CPU, one thread): 1e-5 where the same tokens pass the same weights in one
forward either way (first chunk's score, ``score`` on a fresh session), 1e-4 where the rolling context
splits one forward into chunks (different matmul shapes/summation order) or where the fast weights
moved by a negligible learning rate (1e-12).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ttt
import ttt.ingest
from ttt import SessionConfig
from ttt.cache import RollingContext
from ttt.config import FastWeightConfig, IngestConfig
from ttt.generate import PrefixCache, chat_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 49152
MSGS = [{"role": "user", "content": "Tell me about the rolling context."}]
# A short repeating pattern: a few steps of training should make it more predictable.
PATTERN = [1000, 2000, 3000, 4000, 5000] * 20


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ttt.load_engine(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def one_layer_engine(tmp_path_factory):
    """A 1-layer model: its keys/values depend only on the token, so a rolling window equals a fresh forward."""
    from conftest import make_tiny_checkpoint_fn

    path = make_tiny_checkpoint_fn(tmp_path_factory.mktemp("one-layer"), "llama", seed=1, num_hidden_layers=1)
    return ttt.load_engine(path, device="cpu")


def make_session(engine, *, kind="lora", layers="all", rank=4, memory="off", **ingest):
    """A small session; by default without the recall memory (its spans and rehearsal: tests/test_memory.py), so
    that these tests see the bare ingest step and window."""
    cfg = dict(chunk_tokens=16, context_tokens=24, sink_tokens=4, lr=1e-2)
    cfg.update(ingest)
    fast = {"kind": kind, "layers": layers, "rank": rank, "mlp_hidden": 32}
    return engine.create_session({"fast": fast, "ingest": cfg, "memory": memory})


def rand_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def base_nll(engine, ids: list[int]) -> torch.Tensor:
    """Per-token NLL of ids[1:] under the plain base model, one causal forward (independent of ttt.ingest)."""
    with torch.no_grad():
        logits = engine.base.model(torch.tensor([ids]))[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def fast_snapshot(session) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in session.fast.named_parameters()}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a, b) -> bool:
    """Bit-identical nested optimizer state dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def train_all(session) -> list:
    reports = []
    while (r := session.train_next_chunk()) is not None:
        reports.append(r)
    return reports


# ---- ingest / chunking ---------------------------------------------------------------------------


def test_chunking_counts_reports_and_stats(engine):
    s = make_session(engine)
    ids = rand_ids(50)
    assert s.append_tokens(ids) == 3  # 50 // 16 full chunks; the partial one waits for end_document
    assert s.chunks_ready == 3
    s.end_document()
    assert s.chunks_ready == 4
    reports = train_all(s)
    assert [r.index for r in reports] == [0, 1, 2, 3]
    assert [r.tokens for r in reports] == [16, 16, 16, 2]
    assert all(math.isfinite(r.loss_before) and math.isfinite(r.loss_after) for r in reports)
    assert not any(r.rolled_back for r in reports)
    assert s.stats.tokens_ingested == 50 and s.stats.chunks == 4 and s.stats.rolled_back_chunks == 0
    assert s.stats.last_loss_before == reports[-1].loss_before
    assert s.pending == [] and s.chunks_ready == 0
    assert s.window == ids[-24:]
    assert s.train_next_chunk() is None
    info = s.info()
    assert info["tokens_ingested"] == 50 and info["pending_tokens"] == 0 and info["chunks"] == 4


def test_streaming_partial_chunk_waits_for_end_of_document(engine):
    s = make_session(engine)
    s.append_tokens(rand_ids(20))
    assert s.train_next_chunk().tokens == 16
    assert s.train_next_chunk() is None  # 4 pending tokens: not a full chunk while the document is open
    assert len(s.pending) == 4
    s.append_tokens(rand_ids(12, seed=1))
    assert s.chunks_ready == 1
    assert s.train_next_chunk().tokens == 16


def test_first_chunk_score_is_base_model_nll(engine):
    ids = rand_ids(16, seed=3)
    expected = base_nll(engine, ids).mean().item()
    for kind in ("lora", "mlp"):  # both start as exactly the base model (LoRA B = 0, extra-MLP down = 0)
        s = make_session(engine, kind=kind)
        s.append_tokens(ids)
        r = s.train_next_chunk()
        assert r.loss_before == pytest.approx(expected, abs=1e-5)


def test_loss_after_below_loss_before(engine):
    for kind in ("lora", "mlp"):
        s = make_session(engine, kind=kind, lr=1e-2)
        s.append_tokens(PATTERN[:48])
        for r in train_all(s):
            assert r.loss_after < r.loss_before, (kind, r)


def test_rolling_context_equals_full_forward_when_window_covers_document(engine):
    ids = rand_ids(50, seed=4)
    full = base_nll(engine, ids)  # full[j] = NLL of ids[j + 1]
    s = make_session(engine, context_tokens=64, lr=1e-12)  # weights effectively frozen
    s.append_tokens(ids)
    s.end_document()
    reports = train_all(s)
    assert [r.tokens for r in reports] == [16, 16, 16, 2]
    for k, r in enumerate(reports):
        start, end = 16 * k, min(16 * k + 16, 50)
        targets = full[max(start - 1, 0) : end - 1]  # chunk 0 has no carried token: 15 targets
        assert r.loss_before == pytest.approx(targets.mean().item(), abs=1e-4), k


def test_small_window_is_sink_plus_recent_tokens(one_layer_engine):
    """With one layer a token's key/value depends on the token alone, so each chunk's score must equal one
    fresh forward over [document's first 4 tokens] + [the 19 tokens before the carry] + [carry] + chunk."""
    eng = one_layer_engine
    ids = rand_ids(70, seed=5)
    s = make_session(eng, kind="mlp", context_tokens=24, sink_tokens=4, lr=1e-12)
    s.append_tokens(ids)
    s.end_document()
    reports = train_all(s)
    assert [r.tokens for r in reports] == [16, 16, 16, 16, 6]
    for k, r in enumerate(reports):
        start = 16 * k
        chunk = ids[start : start + 16]
        before = ids[: max(start - 1, 0)]  # what the rolling context should hold
        if len(before) > 23:
            before = before[:4] + before[-19:]
        seq = before + ids[max(start - 1, 0) : start] + chunk
        expected = base_nll(eng, seq)[-len(chunk) :] if k else base_nll(eng, seq)
        assert r.loss_before == pytest.approx(expected.mean().item(), abs=1e-4), k
    assert s._rolling.length == 23  # sink 4 + size 19, plus the carried token = context_tokens


def test_rolling_context_keeps_sink_and_most_recent_keys(engine, monkeypatch):
    model = engine.base.model
    ids = rand_ids(70, seed=6)
    sink, size = 4, 19
    ctx = RollingContext(model.cfg.num_layers, size, sink)
    seen_k: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(model.cfg.num_layers)}
    seen_v: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(model.cfg.num_layers)}
    positions: list[int] = []
    orig_extend = ctx.extend

    def recording_extend(layer, k, v, cos, sin):
        for j, pos in enumerate(positions):  # the document index of each new token
            seen_k[layer][pos] = k[:, :, j].clone()
            seen_v[layer][pos] = v[:, :, j].clone()
        return orig_extend(layer, k, v, cos, sin)

    monkeypatch.setattr(ctx, "extend", recording_extend)
    committed = 0  # document tokens committed so far
    for start in range(0, 70, 16):
        positions[:] = list(range(max(start - 1, 0), min(start + 16, 70)))  # carry + chunk, as in ingest
        with torch.no_grad():
            model.run_layers(
                model.embed(torch.tensor([[ids[p] for p in positions]])), 0, model.cfg.num_layers, None, ctx
            )
        ctx.commit(drop_last=1)
        committed = positions[-1]  # all but the last token (the next carry)
        kept = (
            list(range(committed))
            if committed <= sink + size
            else list(range(sink)) + list(range(committed - size, committed))
        )
        assert ctx.length == len(kept)
        for layer in range(model.cfg.num_layers):
            assert ctx.k[layer].shape[2] == ctx.v[layer].shape[2] == len(kept)
            assert torch.equal(ctx.k[layer], torch.stack([seen_k[layer][p] for p in kept], dim=2))
            assert torch.equal(ctx.v[layer], torch.stack([seen_v[layer][p] for p in kept], dim=2))
    assert ctx.length == sink + size
    # Layer 0's (un-rotated) keys depend only on the token: check them independently of the recording.
    block = model.layers[0]
    kept_ids = torch.tensor([ids[:sink] + ids[committed - size : committed]])
    with torch.no_grad():
        k0 = block.self_attn.k_proj(block.input_layernorm(model.embed(kept_ids)))
    k0 = k0.view(1, -1, model.cfg.num_kv_heads, model.cfg.head_dim).transpose(1, 2)
    torch.testing.assert_close(ctx.k[0], k0, atol=1e-6, rtol=1e-6)


def test_only_fast_weights_change(engine):
    model = engine.base.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = make_session(engine, layers="last:2", lr=1e-2)
    fast0 = fast_snapshot(s)
    s.append_tokens(PATTERN[:32])
    train_all(s)
    for n, p in model.named_parameters():
        assert not p.requires_grad and p.grad is None, n
        assert torch.equal(p, before[n]), n
    fast1 = fast_snapshot(s)
    changed = [n for n in fast0 if not torch.equal(fast0[n], fast1[n])]
    assert any("lora_B" in n for n in changed)
    assert all(p.grad is None for p in s.fast.parameters())  # zeroed (set to None) after each chunk
    assert set(s.fast.adapters()) == {1, 2}


def test_backprop_stops_at_first_fast_layer(engine):
    model = engine.base.model
    calls: dict[int, list[bool]] = {0: [], 1: [], 2: []}
    input_needs_grad: list[bool] = []
    hooks = [
        model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls[i].append(torch.is_grad_enabled()))
        for i in range(3)
    ]
    hooks.append(model.layers[2].register_forward_pre_hook(lambda m, a: input_needs_grad.append(a[0].requires_grad)))
    try:
        s = make_session(engine, layers="last:1", steps_per_chunk=2)
        assert s.fast.first_layer == 2
        s.append_tokens(PATTERN[:32])
        train_all(s)
    finally:
        for h in hooks:
            h.remove()
    # Per chunk: the frozen prefix runs once without autograd; the fast layer runs for 2 steps + loss_after.
    assert calls[0] == [False, False] and calls[1] == [False, False]
    assert calls[2] == [True, True, False] * 2
    assert input_needs_grad == [False] * 6  # the fast layer's input is a constant: no graph below it


def test_nonfinite_loss_rolls_back_chunk(engine, monkeypatch):
    s = make_session(engine, lr=1e-2)
    s.append_tokens(PATTERN[:48])
    assert not s.train_next_chunk().rolled_back  # some optimizer state to preserve
    weights, opt_state = fast_snapshot(s), copy.deepcopy(s.optimizer.state_dict())
    poison = {"on": True}
    real_token_nll = ttt.ingest.token_nll

    def token_nll(model, h, targets):
        out = real_token_nll(model, h, targets)
        return out * float("nan") if poison["on"] else out

    monkeypatch.setattr(ttt.ingest, "token_nll", token_nll)
    r = s.train_next_chunk()
    assert r.index == 1 and r.rolled_back and "non-finite" in r.error
    assert r.loss_after is None
    assert same_tensors(weights, fast_snapshot(s))
    assert same_state(opt_state, s.optimizer.state_dict())
    assert s.stats.rolled_back_chunks == 1 and s.stats.chunks == 2 and s.stats.tokens_ingested == 32
    assert all(p.grad is None for p in s.fast.parameters())
    poison["on"] = False
    r = s.train_next_chunk()
    assert not r.rolled_back and r.error is None
    assert math.isfinite(r.loss_before) and r.loss_after < r.loss_before
    assert not same_tensors(weights, fast_snapshot(s))
    assert s.stats.rolled_back_chunks == 1


def test_overflowing_step_rolls_back(engine):
    # Gradients are clipped to norm 1, but SGD's weight decay (applied inside the step) is not:
    # lr 1e38 * (grad + 100 * w) overflows fp32, so the step itself yields inf weights.
    s = make_session(engine, optimizer="sgd", lr=1e38, weight_decay=100.0)
    weights, opt_state = fast_snapshot(s), copy.deepcopy(s.optimizer.state_dict())
    s.append_tokens(PATTERN[:32])
    r = s.train_next_chunk()
    assert r.rolled_back and "non-finite weights" in r.error and r.loss_after is None
    assert math.isfinite(r.loss_before) and math.isfinite(r.grad_norm)
    assert same_tensors(weights, fast_snapshot(s))
    assert same_state(opt_state, s.optimizer.state_dict())
    assert s.stats.rolled_back_chunks == 1


@pytest.mark.parametrize(
    "steps, error", [(1, "non-finite loss after the update"), (2, "non-finite loss (nan) at step 1")]
)
def test_update_that_breaks_the_loss_is_not_kept(engine, steps, error):
    """A finite but huge update (the loss under it is NaN) must not stay: the session would never recover."""
    s = make_session(engine, optimizer="sgd", lr=1e20, steps_per_chunk=steps)
    weights, opt_state = fast_snapshot(s), copy.deepcopy(s.optimizer.state_dict())
    s.append_tokens(PATTERN[:48])
    r = s.train_next_chunk()
    assert r.rolled_back and error in r.error and r.loss_after is None
    assert math.isfinite(r.loss_before) and s.stats.rolled_back_chunks == 1
    assert same_tensors(weights, fast_snapshot(s))  # the whole chunk's update is undone, not just step 1
    assert same_state(opt_state, s.optimizer.state_dict())
    assert all(bool(torch.isfinite(k).all()) for k in s._rolling.k if k is not None)
    r = s.train_next_chunk(lr=1e-2)  # a sane learning rate from here on
    assert not r.rolled_back and math.isfinite(r.loss_before) and r.loss_after < r.loss_before


def test_two_steps_per_chunk_lower_loss_after(engine):
    out = {}
    for steps in (1, 2):
        s = make_session(engine, lr=1e-2, steps_per_chunk=steps)
        s.append_tokens(PATTERN[:16])
        out[steps] = s.train_next_chunk()
    assert out[1].loss_before == out[2].loss_before  # same seed, same data
    assert out[2].loss_after < out[1].loss_after < out[1].loss_before


@pytest.mark.parametrize("kind", ["lora", "mlp"])
@pytest.mark.parametrize(
    "layers, expected", [("all", [0, 1, 2]), ("last:2", [1, 2]), ("0,2", [0, 2]), ("last_fraction:0.34", [2])]
)
def test_fast_weight_kinds_and_layer_specs_train(engine, kind, layers, expected):
    s = make_session(engine, kind=kind, layers=layers, lr=1e-2)
    assert s.fast.layer_ids == expected and s.fast.first_layer == expected[0]
    assert s.fast.kind == kind and s.fast.num_bytes() > 0
    w0 = fast_snapshot(s)
    s.append_tokens(PATTERN[:16])
    r = s.train_next_chunk()
    assert not r.rolled_back and r.loss_after < r.loss_before
    assert not same_tensors(w0, fast_snapshot(s))


def test_lora_targets_include_attention(engine):
    s = engine.create_session(
        {
            "fast": {"layers": "last:1", "rank": 2, "targets": ["q_proj", "v_proj"]},
            "ingest": {"chunk_tokens": 16, "context_tokens": 24, "lr": 1e-2},
        }
    )
    layer = s.fast.per_layer["2"]
    assert set(layer.lora_A) == {"q_proj", "v_proj"} and layer.lora_B["q_proj"].shape == (64, 2)
    s.append_tokens(PATTERN[:32])
    assert all(not r.rolled_back and r.loss_after < r.loss_before for r in train_all(s))


@pytest.mark.parametrize(
    "fast",
    [
        {"layers": "last:x"},
        {"layers": "3"},
        {"layers": "-1"},
        {"layers": "last:0"},
        {"layers": ""},
        {"layers": "last_fraction:2"},
        {"layers": "1,,2"},
        {"targets": ["bogus_proj"]},
        {"kind": "bogus"},
        {"rank": 0},
    ],
)
def test_bad_fast_weight_configs_raise(engine, fast):
    with pytest.raises(ValueError):
        engine.create_session({"fast": fast})


@pytest.mark.parametrize(
    "cfg",
    [
        {"bogus": {}},
        {"fast": {"bogus": 1}},
        {"ingest": {"bogus": 1}},
        {"ingest": {"chunk_tokens": 1}},
        {"ingest": {"lr": 0}},
        {"ingest": {"optimizer": "rmsprop"}},
        {"ingest": {"steps_per_chunk": 0}},
    ],
)
def test_bad_session_configs_raise(cfg):
    with pytest.raises(ValueError):
        SessionConfig.from_dict(cfg)


def test_session_config_round_trip():
    cfg = SessionConfig(FastWeightConfig(kind="mlp", layers="0,2"), IngestConfig(chunk_tokens=16, lr=1e-3))
    again = SessionConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.ingest.betas == (0.9, 0.999)
    assert SessionConfig.from_dict({"ingest": {"lr": 5e-4}}).ingest.lr == 5e-4
    assert SessionConfig.from_dict(None) == SessionConfig()


def test_memory_stays_bounded(engine):
    s = make_session(engine, context_tokens=24, sink_tokens=4, lr=1e-3)
    ids = rand_ids(405, seed=7)
    for i in range(0, 405, 45):  # appends interleaved with training, as a stream would
        s.append_tokens(ids[i : i + 45])
        while s.train_next_chunk() is not None:
            assert len(s.window) <= 24 and len(s.pending) < 16 + 45
            assert s._rolling.length <= 24
    assert s.stats.tokens_ingested == 400 and len(s.pending) == 5 < 16
    assert s.window == ids[376:400]
    assert s._rolling.length == 23
    for k, v in zip(s._rolling.k, s._rolling.v, strict=True):
        assert k.shape[2] <= 24 and v.shape[2] <= 24
    assert s.recent_tokens() == ids[376:405]  # the answers' window: the trained one, then the untrained tokens


def test_bad_token_ids_and_session_ids(engine):
    s = make_session(engine)
    for bad in ([-1], [VOCAB], [5, VOCAB + 10]):
        with pytest.raises(ValueError):
            s.append_tokens(bad)
    assert s.pending == []
    for bad_id in ("../x", "a/b", "", ".hidden", "a" * 129, "a b"):
        with pytest.raises(ValueError):
            engine.create_session(session_id=bad_id)
    assert engine.create_session(session_id="ok-id.1").id == "ok-id.1"


def test_append_is_all_or_nothing(engine):
    """``Session.append``: text (bytes may split a character), then token ids that end the text before them;
    a refused piece (ids out of the vocabulary, over the limit) leaves pending tokens and the tokenizer as
    they were."""
    from ttt.session import TokenLimit

    s = make_session(engine)
    text = "In the beginning God created the heaven and the earth. Café 日本"
    data = text.encode()
    added = s.append(data[:-2])  # ends inside 本
    held_back = s.text_stream.state()
    assert added == len(s.pending) > 0

    before = list(s.pending)
    with pytest.raises(ValueError):
        s.append([5, VOCAB])
    with pytest.raises(TokenLimit):
        s.append(data[-2:] + b" and more words to be over the limit", limit=2)
    assert s.pending == before and s.text_stream.state() == held_back  # nothing kept of either

    assert s.append(data[-2:]) + s.end_document() + added == len(s.pending)
    assert s.pending == engine.base.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [1, 2, 3]
    assert s.append(ids, limit=3) == 3 and s.pending[-3:] == ids


def test_lone_first_token_is_counted_not_trained(engine):
    s = make_session(engine)
    w0 = fast_snapshot(s)
    s.append_tokens([42])
    s.end_document()
    r = s.train_next_chunk()
    assert r.tokens == 1 and math.isnan(r.loss_before) and not r.rolled_back
    assert same_tensors(w0, fast_snapshot(s)) and s.window == [42] and s.stats.tokens_ingested == 1


# ---- generate / score ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy(engine):
    """The base model's greedy answer to MSGS (gibberish, but deterministic)."""
    return engine.generate(MSGS, max_tokens=24)


def test_greedy_is_deterministic_and_stops_at_length(engine, greedy):
    again = engine.generate(MSGS, max_tokens=24)
    assert isinstance(greedy, ttt.Generation)
    assert again == greedy
    assert greedy.finish_reason == "length" and greedy.completion_tokens == 24
    assert greedy.prompt_tokens == len(chat_prompt(engine.base.tokenizer, MSGS))
    assert len(greedy.text) > 20
    # A shorter budget gives a prefix of the same greedy text.
    short = engine.generate(MSGS, max_tokens=6)
    assert short.completion_tokens == 6 and greedy.text.startswith(short.text)


def test_stream_matches_non_streamed(engine, greedy):
    ts = engine.generate(MSGS, max_tokens=24, stream=True)
    assert isinstance(ts, ttt.TokenStream)
    deltas = list(ts)
    assert all(d for d in deltas) and len(deltas) > 1
    assert "".join(deltas) == greedy.text == ts.text
    assert ts.finish_reason == "length"
    assert ts.prompt_tokens == greedy.prompt_tokens and ts.completion_tokens == 24


def test_seed_makes_sampling_reproducible(engine):
    a = engine.generate(MSGS, max_tokens=12, temperature=1.0, seed=0)
    b = engine.generate(MSGS, max_tokens=12, temperature=1.0, seed=0)
    c = engine.generate(MSGS, max_tokens=12, temperature=1.0, seed=1)
    assert a.text == b.text and a.completion_tokens == 12
    assert a.text != c.text


def test_tiny_top_p_is_greedy(engine, greedy):
    g = engine.generate(MSGS, max_tokens=24, temperature=0.8, top_p=1e-6, seed=123)
    assert g.text == greedy.text


def test_stop_string_truncates(engine, greedy):
    text = greedy.text
    mid = len(text) // 2
    stop = text[mid : mid + 3]
    assert stop.strip() and stop in text
    expected = text[: text.find(stop)]
    g = engine.generate(MSGS, max_tokens=24, stop=stop)
    assert g.finish_reason == "stop" and g.text == expected
    assert 0 < g.completion_tokens < 24
    ts = engine.generate(MSGS, max_tokens=24, stop=[stop, "never-occurs-xyz"], stream=True)
    deltas = list(ts)
    assert "".join(deltas) == expected and all(stop not in d for d in deltas)
    assert ts.finish_reason == "stop" and ts.completion_tokens == g.completion_tokens


def test_session_window_is_part_of_prompt_and_weights_unchanged(engine):
    s = make_session(engine, lr=1e-2)
    fresh = s.generate(MSGS, max_tokens=8)
    base = engine.generate(MSGS, max_tokens=8)
    assert fresh == base  # zero-delta fast weights, empty window: exactly the base model
    n_prompt = len(chat_prompt(engine.base.tokenizer, MSGS))
    s.append_tokens(PATTERN[:40])
    train_all(s)
    w = fast_snapshot(s)
    opt_state = copy.deepcopy(s.optimizer.state_dict())
    g = s.generate(MSGS, max_tokens=8)
    assert len(s.window) == 24 and len(s.pending) == 8  # 40 tokens: two chunks trained, 8 read
    assert g.prompt_tokens == 24 + 8 + n_prompt
    ts = s.generate(MSGS, max_tokens=8, temperature=1.0, seed=3, stream=True)
    "".join(ts)
    assert ts.prompt_tokens == 24 + 8 + n_prompt
    assert same_tensors(w, fast_snapshot(s)) and same_state(opt_state, s.optimizer.state_dict())
    assert all(p.grad is None for p in s.fast.parameters())
    s.append_tokens([7, 8, 9])  # untrained tokens are part of the query window too
    assert s.generate(MSGS, max_tokens=2).prompt_tokens == 24 + 8 + 3 + n_prompt
    assert s.recent_tokens() == s.window + PATTERN[32:40] + [7, 8, 9]
    s.append_tokens(PATTERN[:13])  # as many untrained tokens as the window holds: the last 24 of them
    assert s.recent_tokens() == [*PATTERN[32:40], 7, 8, 9, *PATTERN[:13]]
    s.append_tokens([1, 2, 3])  # more: the window grows on (its keys/values are extended, not rebuilt)...
    assert s.recent_tokens() == [*PATTERN[32:40], 7, 8, 9, *PATTERN[:13], 1, 2, 3]
    s.append_tokens(PATTERN[:9])  # ... until 1.5 x 24 are read: then it starts half a window further on
    assert s.recent_tokens() == [*PATTERN[1:13], 1, 2, 3, *PATTERN[:9]] == s.pending[12:]


def prefills(engine, monkeypatch) -> list[int]:
    """A list that records the tokens of each pass over the layers with a cache, but for single decoded tokens."""
    prefilled = []
    run_layers = type(engine.base.model).run_layers

    def spy(model, h, start, end, adapters=None, cache=None, rope=None):
        if cache is not None and h.shape[1] > 1:
            prefilled.append(h.shape[1])
        return run_layers(model, h, start, end, adapters, cache, rope)

    monkeypatch.setattr(type(engine.base.model), "run_layers", spy)
    return prefilled


def test_answers_reuse_the_windows_keys_and_values_until_the_weights_change(engine, monkeypatch):
    s = make_session(engine, memory="balanced")  # answers read the most surprising spans kept, then the window
    s.config.recall.exact_select = "surprise"
    s.append_tokens(PATTERN[:48])
    train_all(s)
    prompt_tokens = len(chat_prompt(engine.base.tokenizer, MSGS))
    prefilled = prefills(engine, monkeypatch)
    params = ttt.SamplingParams(max_tokens=6)
    # The same answer as prefilling window + prompt in one forward (no cache): same weights, same tokens.
    assert len(s.answer_prefix()) > len(s.recent_tokens())
    expect = engine.answer(MSGS, params, s.fast, s.answer_prefix(), stream=False)
    first = s.generate(MSGS, max_tokens=6)
    cached = s._answer_prefix.cache
    again = s.generate(MSGS, max_tokens=6, stream=True)
    assert "".join(again) == first.text == expect.text
    prefix = len(s.answer_prefix())
    assert again.prompt_tokens == first.prompt_tokens == prefix + prompt_tokens
    # without a cache prefix + prompt at once; then the prefix once, and each answer its prompt
    assert prefilled == [prefix + prompt_tokens, prefix, prompt_tokens, prompt_tokens]
    assert s._answer_prefix.cache is cached and s.resident_bytes() > cached.num_bytes() > 0

    s.append_tokens(PATTERN[48:58])  # read, not trained: the window grows, its keys/values are extended
    prefilled.clear()
    grown = s.generate(MSGS, max_tokens=6)
    assert s._answer_prefix.cache.tokens == s.answer_prefix() == cached.tokens + PATTERN[48:58]
    assert prefilled == [10, prompt_tokens]  # only the new tokens, then the prompt
    whole = PrefixCache.build(engine.base.model, s.fast, s.answer_prefix())
    for extended, built in zip(s._answer_prefix.cache.k + s._answer_prefix.cache.v, whole.k + whole.v, strict=True):
        torch.testing.assert_close(extended, built, rtol=1e-5, atol=1e-5)
    assert grown.text == engine.answer(MSGS, params, s.fast, s.answer_prefix(), stream=False).text
    s.append_tokens(PATTERN[58:64])
    train_all(s)  # the weights change: a new prefix
    changed = s.generate(MSGS, max_tokens=6)
    assert s._answer_prefix.cache is not cached and s._answer_prefix.cache.tokens == s.answer_prefix()
    assert changed.text == engine.answer(MSGS, params, s.fast, s.answer_prefix(), stream=False).text
    s.to("cpu")  # a move drops the cache (it is rebuilt where the session is)
    assert s._answer_prefix is None


def test_a_session_asked_while_it_reads_has_the_next_prefix_built_ahead(engine, monkeypatch):
    s = make_session(engine)
    s.append_tokens(PATTERN[:16])
    train_all(s)
    assert not s.talked_to and not s.warm_prefix() and s._answer_prefix is None  # never asked: nothing built
    prompt_tokens = len(chat_prompt(engine.base.tokenizer, MSGS))
    prefilled = prefills(engine, monkeypatch)
    params = ttt.SamplingParams(max_tokens=6)
    found = engine.answer_prefixes.copy()
    s.generate(MSGS, max_tokens=6)  # asked: the prefix is built for the question (window, then prompt)
    assert s.talked_to and prefilled == [len(s.recent_tokens()), prompt_tokens]
    assert engine.answer_prefixes - found == {"built": 1}
    s.append_tokens(PATTERN[16:32])
    train_all(s)
    prefilled.clear()
    assert s.warm_prefix() and prefilled == [len(s.recent_tokens())]  # the new weights' prefix, ahead
    assert not s.warm_prefix()  # up to date: nothing to do
    s.append_tokens(PATTERN[:5])  # read, not trained: the tokens read since join it ahead too
    prefilled.clear()
    assert s.warm_prefix() and prefilled == [5]
    prefilled.clear()
    found = engine.answer_prefixes.copy()
    ahead = s.generate(MSGS, max_tokens=6)
    assert prefilled == [prompt_tokens]  # the question prefills only its prompt
    assert engine.answer_prefixes - found == {"ready": 1}
    assert ahead.text == engine.answer(MSGS, params, s.fast, s.answer_prefix(), stream=False).text
    s.append_tokens(PATTERN[32:43])
    train_all(s)
    assert s.warm_prefix()  # read, so warmed again
    s.append_tokens(PATTERN[43:64])
    train_all(s)
    prefilled.clear()
    assert not s.talked_to and not s.warm_prefix() and not prefilled  # kept up to date but never read: stop


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": 3}],
        [{"content": "hi"}],
        [{"role": "user"}],
    ],
)
def test_bad_messages_raise(engine, messages):
    with pytest.raises(ValueError):
        engine.generate(messages, max_tokens=2)


def test_bad_sampling_and_too_long_prompts_raise(engine):
    s = make_session(engine)
    for kwargs in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            s.generate(MSGS, **kwargs)
    with pytest.raises(ValueError):  # max_position_embeddings is 512
        s.generate([{"role": "user", "content": "hello " * 600}], max_tokens=2)
    with pytest.raises(ValueError):
        engine.generate(MSGS, max_tokens=600)


def test_score_fresh_session_is_base_nll(engine):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = engine.base.tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 32  # scored in several chunks
    s = make_session(engine, chunk_tokens=16, context_tokens=64)
    assert s.score(text) == pytest.approx(base_nll(engine, ids).mean().item(), abs=1e-5)
    with pytest.raises(ValueError):
        s.score("")


def test_score_after_window(engine):
    s = make_session(engine, context_tokens=24, lr=1e-12)
    doc = rand_ids(40, seed=9)
    s.append_tokens(doc)
    train_all(s)
    text = "Hello world, again."
    ids = engine.base.tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) <= 16
    expected = base_nll(engine, doc[-24:] + ids)[-len(ids) :].mean().item()
    assert s.score(text) == pytest.approx(expected, abs=1e-4)
    w = fast_snapshot(s)
    s.score(text)
    assert same_tensors(w, fast_snapshot(s))


def test_step_settings_override_one_chunk(engine):
    s = make_session(engine, lr=1e-2)
    s.append_tokens(PATTERN[:48])
    with pytest.raises(ValueError):
        s.train_next_chunk(chunk_tokens=8)  # shapes the session: not per chunk
    with pytest.raises(ValueError):
        s.train_next_chunk(lr=-1.0)
    frozen = s.train_next_chunk(lr=1e-30)  # the weights cannot move
    assert abs(frozen.loss_after - frozen.loss_before) < 1e-6
    moved = s.train_next_chunk()  # back to the session's own lr
    assert moved.loss_after < moved.loss_before - 1e-3
    assert s.config.ingest.lr == 1e-2
