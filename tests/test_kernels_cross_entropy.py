"""kernels/cross_entropy.py: the Triton kernels (interpreted on CPU, see conftest.py) and the chunked torch
reference against F.cross_entropy on materialised logits, forward and gradients.

Tolerances: fp32 results against an fp64 ground truth, rtol 1e-5 / atol 1e-5 (losses and gradients);
the kernels only reorder fp32 sums. bf16 (CUDA only) against the fp32 path: rtol 2e-2 / atol 2e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.dispatch import BACKEND_ENV, triton_available

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
FP32 = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def make_inputs(n: int, vocab: int, hidden: int, *, ignored: int = 0, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden**-0.5 * 3  # logits of a few units: a peaked softmax
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.randperm(n, generator=g)[:ignored]] = -100
    return h.to(device), w.to(device), t.to(device)


def loss_and_grads(fn, h, w, t, reduction, train_weight=True):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_(train_weight)
    loss = fn(h, w, t, reduction)
    # A random upstream gradient: "none" must weigh each token's gradient by its own.
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype).to(loss.device)
    inputs = (h, w) if train_weight else (h,)
    return (loss.detach(), *torch.autograd.grad(loss, inputs, up))


def naive(h, w, t, reduction):
    return F.cross_entropy((h @ w.T).float(), t, reduction=reduction)


def fused(h, w, t, reduction, **kw):
    return fused_linear_cross_entropy(h, w, t, reduction=reduction, **kw)


def check_against_fp64(h, w, t, reduction, train_weight=True, **kw):
    expect = loss_and_grads(naive, h.double(), w.double(), t, reduction, train_weight)
    got = loss_and_grads(lambda *a: fused(*a, **kw), h, w, t, reduction, train_weight)
    for g, e in zip(got, expect, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e.float(), **FP32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n, vocab, hidden, ignored", [(37, 1000, 48, 5), (1, 17, 16, 0), (70, 300, 100, 69)])
def test_matches_materialised_logits(backend, reduction, n, vocab, hidden, ignored):
    # Odd shapes: tokens not a multiple of the row block, vocabulary below one tile or ending mid-tile,
    # hidden not a multiple of the D tile; the last case leaves one token that counts.
    h, w, t = make_inputs(n, vocab, hidden, ignored=ignored)
    check_against_fp64(h, w, t, reduction, chunk_rows=8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_frozen_weight_and_leading_dims(backend, reduction):
    # The engine's case: a frozen (possibly tied) LM head, hidden states [B, T, D] and targets [B, T].
    # (The reference then computes dh in forward; several chunks check that it is stitched right.)
    h, w, t = make_inputs(2 * 19, 500, 40, ignored=3)
    check_against_fp64(h, w, t, reduction, train_weight=False, chunk_rows=8)
    loss = fused(h.view(2, 19, 40), w, t.view(2, 19), "none")
    assert loss.shape == (2, 19) and (loss.flatten()[t == -100] == 0).all()
    torch.testing.assert_close(loss.flatten(), naive(h, w, t, "none"), **FP32)


def test_all_ignored(backend):
    h, w, t = make_inputs(9, 100, 16, ignored=9)
    h.requires_grad_()
    assert fused(h, w, t, "mean").isnan()  # 0 / 0 tokens, as F.cross_entropy
    loss = fused(h, w, t, "sum")
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all()


def test_uses_the_chosen_backend(backend):
    h, w, t = make_inputs(5, 50, 16)
    loss = fused(h.requires_grad_(), w, t, "none")
    expect = "TritonLinearCrossEntropy" if backend == "triton" else "ChunkedLinearCrossEntropy"
    node = loss.grad_fn.next_functions[0][0]  # under the reshape to the targets' shape
    assert type(node).__name__.startswith(expect)


def test_reference_never_saves_logits():
    # What autograd keeps between forward and backward is the inputs and one fp32 number per token.
    h, w, t = make_inputs(64, 1000, 16)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        fused(h.requires_grad_(), w, t, "mean", chunk_rows=8)
    assert saved and max(s.numel() for s in saved) <= w.numel() and all(s != (64, 1000) for s in saved)


def test_bad_arguments():
    h, w, t = make_inputs(4, 10, 8)
    with pytest.raises(ValueError, match="reduction"):
        fused(h, w, t, "avg")
    with pytest.raises(ValueError, match="shapes"):
        fused(h, w[:, :4], t, "mean")
    with pytest.raises(ValueError, match="dtype"):
        fused(h, w.double(), t, "mean")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and triton")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_bf16_cuda(reduction, monkeypatch):
    # The model's dtype on GPU: bf16 inputs, fp32 accumulation; compared with the fp32 path on the same values.
    monkeypatch.setenv(BACKEND_ENV, "triton")
    h, w, t = make_inputs(1000, 4099, 200, ignored=10, device="cuda")
    h, w = h.bfloat16(), w.bfloat16()
    expect = loss_and_grads(naive, h.float(), w.float(), t, reduction)
    got = loss_and_grads(fused, h, w, t, reduction)
    for g, e in zip(got, expect, strict=True):
        torch.testing.assert_close(g.float(), e, rtol=2e-2, atol=2e-2)
