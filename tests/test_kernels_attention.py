"""kernels/attention.py: the Triton flash attention (interpreted on CPU) against the model's SDPA path.

Tolerances, fp32 (the interpreter has no bf16): outputs and gradients within atol 1e-5 / rtol 1e-5 of
the reference (largest difference seen: 2e-6); both sides accumulate in fp32 but sum in different orders
(online softmax, blocks of 16).
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import FlashChunkAttention, attention_reference, chunk_attention, chunk_mask

pytest.importorskip("triton")

ATOL, RTOL = 1e-5, 1e-5
CUDA = torch.cuda.is_available()


def qkv(B, H, KVH, T, N, D, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, KVH, N, D, generator=g)
    v = torch.randn(B, KVH, N, D, generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v)]


def forward_backward(fn, q, k, v, window):
    out = fn(q, k, v, window)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, grads


def assert_matches_reference(B, H, KVH, T, P, D, window, atol=ATOL, rtol=RTOL, **kw):
    q, k, v = qkv(B, H, KVH, T, P + T, D, **kw)
    out, grads = forward_backward(FlashChunkAttention.apply, q, k, v, window)
    ref, ref_grads = forward_backward(attention_reference, q, k, v, window)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize(
    "B, H, KVH, T, P, D, window",
    [
        (1, 4, 2, 37, 23, 16, None),  # chunk after context, GQA 2, nothing a multiple of the block
        (2, 4, 2, 37, 23, 48, 11),  # window shorter than the context (and than the chunk), head_dim padded to 64
        (1, 3, 1, 20, 0, 16, 7),  # no context, window cuts the chunk itself; 3 q heads on one kv head
        (1, 2, 2, 5, 40, 16, 30),  # few queries, long context, plain multi-head
    ],
)
def test_matches_reference_forward_and_grads(B, H, KVH, T, P, D, window):
    assert_matches_reference(B, H, KVH, T, P, D, window)


def test_mask_is_the_models():
    # query 2 of a chunk of 4 after 3 context keys is at position 5: with window 3 it sees keys 3, 4, 5
    assert chunk_mask(4, 7, 3, "cpu")[2].nonzero().flatten().tolist() == [3, 4, 5]
    assert chunk_mask(4, 7, None, "cpu")[2].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_non_contiguous_inputs():
    # the model hands over transposed views ([B, T, H, hd] -> [B, H, T, hd]) when there is no cache
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(1, 4, 2, 19, 32, 16))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    out, grads = forward_backward(FlashChunkAttention.apply, q, k, v, 9)
    ref, ref_grads = forward_backward(attention_reference, q, k, v, 9)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=RTOL)


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(FlashChunkAttention, "apply", lambda *a: calls.append(a[3]) or attention_reference(*a))
    monkeypatch.setenv("TTT_KERNELS", "triton")
    q, k, v = qkv(1, 4, 2, 6, 10, 16)
    chunk_attention(q, k, v)  # chunk after context: the kernel
    chunk_attention(q, k[:, :, :6], v[:, :, :6])  # plain causal: SDPA's is_causal
    chunk_attention(q[:, :, :1], k, v)  # decode: SDPA without a mask
    chunk_attention(q[:, :, :1], k, v, 4)  # decode past the window: the kernel
    assert calls == [None, 4]
    monkeypatch.setenv("TTT_KERNELS", "torch")
    chunk_attention(q, k, v)
    assert calls == [None, 4]


def test_model_forward_through_kernel_equals_reference(monkeypatch, tiny_model_dir):
    """A chunk after a RollingContext, through the fast layers with gradients: kernel path == SDPA path."""
    from ttt.cache import RollingContext
    from ttt.model import load_base_model

    calls = []
    kernel = FlashChunkAttention.apply
    monkeypatch.setattr(FlashChunkAttention, "apply", lambda *a: calls.append(1) or kernel(*a))
    base = load_base_model(tiny_model_dir, device="cpu")
    model = base.model
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 50), generator=torch.Generator().manual_seed(0))
    first, second = tokens[:, :21], tokens[:, 21:]  # a context of 21, then a chunk of 29

    def run(backend):
        monkeypatch.setenv("TTT_KERNELS", backend)
        context = RollingContext(model.cfg.num_layers, size=13, sink=4)  # 4 sinks + 13 recent keys: 17
        with torch.no_grad():
            model.run_layers(model.embed(first), 0, model.cfg.num_layers, None, context)
        context.commit()
        h = model.embed(second).requires_grad_()
        out = model.logits(model.run_layers(h, 0, model.cfg.num_layers, None, context))
        (grad,) = torch.autograd.grad(out.logsumexp(-1).sum(), h)
        return out, grad

    out, grad = run("triton")
    assert len(calls) == model.cfg.num_layers  # the chunk after its context, in every layer
    ref, ref_grad = run("torch")
    assert len(calls) == model.cfg.num_layers
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 300])
def test_cuda_bf16_matches_fp32_reference(window):
    # bf16 inputs, fp32 accumulation, the CUDA block sizes (64 x 64): within bf16 rounding of an fp32 reference
    q, k, v = qkv(2, 9, 3, 515, 1003, 64, device="cuda", dtype=torch.bfloat16)
    out, grads = forward_backward(FlashChunkAttention.apply, q, k, v, window)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, ref_grads = forward_backward(attention_reference, q32, k32, v32, window)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.float(), r, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_fp32_matches_reference():
    # fp32 inputs: tl.dot rounds them to tf32 on CUDA, hence looser than the interpreter's 1e-5
    assert_matches_reference(1, 9, 3, 515, 1003, 64, 300, atol=1e-2, rtol=1e-2, device="cuda")


def test_bench_rows():
    # bench/kernels.py calls bench.attention.run(); a tiny shape keeps it to milliseconds
    from bench.attention import Shape, run

    rows = run("cpu", shapes=(Shape("tiny", 4, 2, 16, 9, 7, window=5),), repeats=1)
    assert {r["impl"] for r in rows} == {"sdpa_mask", "naive"}  # no Triton on CPU, lower-right needs no window
    assert all(r["fwd_bwd_ms"] > 0 and r["max_err"] < 1e-5 for r in rows)
