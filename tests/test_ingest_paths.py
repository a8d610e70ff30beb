"""The ingest step's loss and memory paths give the same training: the fused linear cross-entropy (torch
reference and interpreted Triton) against cross-entropy on materialised logits, and activation
checkpointing ("recompute", "offload") against none.

A tiny random Llama with a 300-id vocabulary and 16-token steps (the interpreted Triton kernels cost time
per tile), every layer fast, a rolling context and two steps per chunk. Tolerances, fp32 on CPU: 1e-5 between
loss paths (the same sums in another order, then three chunks of AdamW steps), 1e-6 between checkpointing
modes (recompute runs the very same ops again).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ttt
import ttt.ingest
from kernels.dispatch import BACKEND_ENV, triton_available
from ttt import SessionConfig
from ttt.ingest import forward_hidden, next_token_nll

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
IDS = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0)).tolist()
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from conftest import make_tiny_checkpoint_fn

    path = make_tiny_checkpoint_fn(tmp_path_factory.mktemp("small-vocab"), "llama", seed=3, vocab_size=VOCAB)
    return ttt.load_engine(path, device="cpu")


def plain_token_nll(model, h, targets):
    """The loss before the fused kernel: F.cross_entropy on the materialised [B, T, V] fp32 logits."""
    logits = model.logits(h)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def ingest(engine, **ingest_cfg):
    """Train on IDS (chunks of 15 after a 12-token context, two steps each); reports, weights, a score after."""
    cfg = dict(chunk_tokens=15, context_tokens=12, sink_tokens=2, lr=1e-2, steps_per_chunk=2, **ingest_cfg)
    s = engine.create_session({"fast": {"layers": "all", "rank": 4}, "ingest": cfg})
    s.append_tokens(IDS)
    s.end_document()
    reports = []
    while (r := s.train_next_chunk()) is not None:
        assert not r.rolled_back
        reports.append(r)
    weights = {n: p.detach().clone() for n, p in s.fast.named_parameters()}
    return reports, weights, s.score("a b c d e f")  # ids below 300


def assert_same_training(a, b, tol):
    (ra, wa, score_a), (rb, wb, score_b) = a, b
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb, strict=True):
        torch.testing.assert_close(
            torch.tensor([x.loss_before, x.loss_after, x.grad_norm], dtype=torch.float64),
            torch.tensor([y.loss_before, y.loss_after, y.grad_norm], dtype=torch.float64),
            **tol,
        )
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **tol)
    torch.testing.assert_close(score_a, score_b, **tol)


@pytest.fixture(scope="module")
def plain(engine):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ttt.ingest, "token_nll", plain_token_nll)
        return ingest(engine)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
)
def test_fused_loss_trains_like_materialised_logits(engine, plain, backend, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, backend)
    fused = ingest(engine)
    assert_same_training(fused, plain, TOL)
    assert fused[0][-1].loss_after < fused[0][0].loss_before  # it trained at all


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_checkpointing_trains_like_none(engine, mode):
    assert_same_training(ingest(engine, activation_checkpointing=mode), ingest(engine), dict(rtol=1e-6, atol=1e-6))


def saved_bytes(engine, mode: str) -> int:
    """Bytes of activations autograd keeps for backward through one ingest loss (weights excluded)."""
    s = engine.create_session({"fast": {"layers": "all", "rank": 4}})
    tokens = torch.tensor([IDS])
    weights = {p.untyped_storage().data_ptr() for m in (engine.base.model, s.fast) for p in m.parameters()}
    sizes: dict[int, int] = {}  # storage -> bytes: views of one tensor count once

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            sizes[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        next_token_nll(engine.base.model, forward_hidden(engine.base.model, s.fast, tokens, checkpointing=mode), tokens)
    return sum(sizes.values())


def test_recompute_keeps_less_for_backward(engine):
    none, recompute = saved_bytes(engine, "none"), saved_bytes(engine, "recompute")
    # Per layer, 'none' keeps a dozen [T, D]-sized activations and the attention probabilities; recompute keeps
    # none of them (each layer's input lives in the checkpoint, the loss still saves its [T, D] input).
    assert recompute * 5 < none


def test_config_field_round_trips_and_old_configs_load():
    cfg = SessionConfig.from_dict({"ingest": {"activation_checkpointing": "offload"}})
    assert SessionConfig.from_dict(cfg.to_dict()) == cfg
    old = SessionConfig().to_dict()
    del old["ingest"]["activation_checkpointing"]  # a session saved before the field existed
    assert SessionConfig.from_dict(old).ingest.activation_checkpointing == "none"
    with pytest.raises(ValueError, match="activation_checkpointing"):
        SessionConfig.from_dict({"ingest": {"activation_checkpointing": "sometimes"}})
