"""Batched multi-session LoRA: the Triton kernels (interpreted on CPU) against the torch reference.

Tolerances (fp32): outputs and gradients within 1e-4 absolute + 1e-4 relative of the reference; the
values are O(10), so that is a few fp32 rounding steps of a length-100 dot product.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.multi_lora import multi_lora_linear, multi_lora_linear_reference

TOL = dict(atol=1e-4, rtol=1e-4)


def make_inputs(offsets, k, o, r, bias=True, dtype=torch.float32, device="cpu", seed=0):
    """Leaf tensors x [N, K], weight [O, K], bias [O], A [S, R, K], B [S, O, R] and the offsets [S + 1]."""
    gen = torch.Generator().manual_seed(seed)
    n, s = offsets[-1], len(offsets) - 1

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

    return dict(
        x=rand(n, k),
        weight=rand(o, k),
        bias=rand(o) if bias else None,
        lora_a=rand(s, r, k),
        lora_b=rand(s, o, r),
        seg_offsets=torch.tensor(offsets, device=device),
    )


def grads(fn, inputs, scale, gy):
    """fn's output and the gradients of <output, gy> for every differentiable input."""
    y = fn(**inputs, scale=scale)
    leaves = [t for t in inputs.values() if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad(y, leaves, gy)]


@pytest.mark.parametrize(
    "offsets, k, o, r, bias",
    [
        ([0, 10, 10, 30, 37], 48, 40, 5, True),  # ragged, one empty segment
        ([0, 37], 48, 40, 16, False),  # one session over two row blocks
        ([0, 0, 37, 37], 100, 80, 3, True),  # empty first and last, K and O over several tiles
        ([0, 1, 2, 3, 37], 33, 17, 8, True),  # one-row segments
        ([0, 1, 1, 2, 3], 33, 17, 8, True),  # at most a row per segment (decoding): the reference gathers
    ],
)
def test_triton_matches_reference_forward_and_backward(monkeypatch, offsets, k, o, r, bias):
    monkeypatch.setenv("TTT_KERNELS", "triton")
    inputs = make_inputs(offsets, k, o, r, bias)
    gy = torch.randn(offsets[-1], o, generator=torch.Generator().manual_seed(1))
    got = grads(multi_lora_linear, inputs, 0.7, gy)
    want = grads(multi_lora_linear_reference, inputs, 0.7, gy)
    assert len(got) == len(want) == (6 if bias else 5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_empty_segment_gets_zero_gradient(monkeypatch):
    monkeypatch.setenv("TTT_KERNELS", "triton")
    inputs = make_inputs([0, 20, 20, 37], 48, 40, 4)
    y = multi_lora_linear(**inputs, scale=2.0)
    ga, gb = torch.autograd.grad(y.square().sum(), [inputs["lora_a"], inputs["lora_b"]])
    assert ga[1].abs().max() == 0 and gb[1].abs().max() == 0
    assert ga[0].abs().max() > 0 and gb[2].abs().max() > 0


@pytest.mark.parametrize("offsets", [[0, 5, 5, 37], [0, 1, 1, 2]])  # its segment loop; its gather
def test_reference_is_per_row_lora(offsets):
    """The reference equals gathering each row's own A and B (written out here with einsum)."""
    inputs = make_inputs(offsets, 48, 40, 5)
    x, w, b, a, bb, offsets = inputs.values()
    owner = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())  # [N]: each row's session
    u = torch.einsum("nk,nrk->nr", x, a[owner])
    want = x @ w.T + b + 0.5 * torch.einsum("nr,nor->no", u, bb[owner])
    torch.testing.assert_close(multi_lora_linear_reference(**inputs, scale=0.5), want, **TOL)


def test_dispatch_uses_reference_when_asked(monkeypatch):
    monkeypatch.setenv("TTT_KERNELS", "torch")
    inputs = make_inputs([0, 12, 37], 48, 40, 5)
    with torch.no_grad():
        assert torch.equal(multi_lora_linear(**inputs, scale=0.3), multi_lora_linear_reference(**inputs, scale=0.3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 Triton kernels)")
def test_bf16_on_cuda_matches_fp32_reference():
    offsets = [0, 300, 300, 812, 1024]
    inputs = make_inputs(offsets, 576, 1536, 16, dtype=torch.bfloat16, device="cuda")
    fp32 = {
        k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    gy = torch.randn(offsets[-1], 1536, device="cuda")
    got = grads(multi_lora_linear, inputs, 2.0, gy.bfloat16())
    want = grads(multi_lora_linear_reference, fp32, 2.0, gy)
    for g, w in zip(got, want, strict=True):
        # bf16 keeps 8 bits of mantissa: compare relative to the tensor's scale
        assert (g.float() - w).abs().max() <= 2e-2 * w.abs().max()


def test_bench_runs_on_a_tiny_shape():
    from bench.multi_lora import Shape, run

    rows = run("cpu", shapes=(Shape("tiny", 3, 5, 48, 40, rank=4),))
    assert [(r["impl"], r["mode"]) for r in rows] == [
        ("loop", "fwd"),
        ("loop", "fwd+bwd"),
        ("batched_torch", "fwd"),
        ("batched_torch", "fwd+bwd"),
    ]
    assert all(r["max_err"] < 1e-5 and r["seconds"] > 0 for r in rows)
