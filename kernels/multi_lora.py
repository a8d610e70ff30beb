"""Batched multi-session LoRA (the Punica / S-LoRA idea): one launch for a batch that mixes sessions.

    y[n] = x[n] @ W.T + bias + scale * (x[n] @ A[s].T) @ B[s].T    for the rows n of session s

The rows of ``x`` are grouped into contiguous segments, one per session: session s owns rows
``seg_offsets[s]:seg_offsets[s + 1]`` (ragged, possibly empty). The frozen base projection is one plain
matmul over every row; the LoRA part is two segmented matmuls: "shrink" u = x @ A[s].T ([N, rank]) and
"expand" y += scale * u @ B[s].T, accumulated into the base output in place. Backward reuses both
(grad_u = scale * gy @ B[s], grad_x += grad_u @ A[s]) plus a segmented reduction for the weights
(grad_A[s] = grad_u[s].T @ x[s], grad_B[s] = scale * gy[s].T @ u[s]), so each session's A and B get
gradients from their own rows only.

Segments are addressed by the offsets alone: the grid covers (segment, row block, column block) with
as many row blocks as the whole batch has, and blocks past their segment's end return at once. No
host synchronisation, at the price of idle programs when segments are short.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .dispatch import triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_matmul_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        seg_ptr,
        J,
        K,
        stride_xm,
        stride_xk,
        stride_ws,
        stride_wj,
        stride_wk,
        stride_om,
        stride_oj,
        alpha,
        ACCUMULATE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # out[rows of s] (+)= alpha * x[rows of s] @ w[s].T;  x: [N, K], w: [S, J, K] (any strides), out: [N, J]
        seg = tl.program_id(0)
        start = tl.load(seg_ptr + seg)
        end = tl.load(seg_ptr + seg + 1)
        row0 = start + tl.program_id(1) * BLOCK_M
        if row0 < end:
            rows = row0 + tl.arange(0, BLOCK_M)
            cols = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
            ks = tl.arange(0, BLOCK_K)
            row_ok, col_ok = rows < end, cols < J
            x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
            w_ptrs = w_ptr + seg * stride_ws + ks[:, None] * stride_wk + cols[None, :] * stride_wj
            acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = ks + k0 < K
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
                b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_J]
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
            acc = acc * alpha
            out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oj
            mask = row_ok[:, None] & col_ok[None, :]
            if ACCUMULATE:
                acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _segment_outer_kernel(
        g_ptr,
        x_ptr,
        dw_ptr,
        seg_ptr,
        J,
        K,
        stride_gm,
        stride_gj,
        stride_xm,
        stride_xk,
        stride_ds,
        stride_dj,
        stride_dk,
        alpha,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # dw[s] = alpha * g[rows of s].T @ x[rows of s];  g: [N, J], x: [N, K], dw: [S, J, K]. Empty segment: 0.
        seg = tl.program_id(0)
        start = tl.load(seg_ptr + seg)
        end = tl.load(seg_ptr + seg + 1)
        js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        j_ok, k_ok = js < J, ks < K
        acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            g = tl.load(
                g_ptr + rows[:, None] * stride_gm + js[None, :] * stride_gj,
                mask=row_ok[:, None] & j_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_J]
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        dw_ptrs = dw_ptr + seg * stride_ds + js[:, None] * stride_dj + ks[None, :] * stride_dk
        tl.store(dw_ptrs, (acc * alpha).to(dw_ptr.dtype.element_ty), mask=j_ok[:, None] & k_ok[None, :])


def _precision(t: torch.Tensor) -> str:
    # fp32 inputs get exact fp32 products: tf32 would miss the torch reference by ~1e-3
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two tile edge covering ``n`` within [lo, hi] (tl.dot needs edges >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _segment_matmul(x, w, seg_offsets, alpha: float, out=None) -> torch.Tensor:
    """out[rows of s] (+)= alpha * x[rows of s] @ w[s].T;  x: [N, K], w: [S, J, K] (a strided view is fine)."""
    N, K = x.shape
    S, J, _ = w.shape
    accumulate = out is not None
    if out is None:
        out = torch.empty(N, J, device=x.device, dtype=x.dtype)
    BLOCK_M, BLOCK_J, BLOCK_K = 32, _block(J), _block(K)
    grid = (S, triton.cdiv(N, BLOCK_M), triton.cdiv(J, BLOCK_J))
    if N and J:
        _segment_matmul_kernel[grid](
            x,
            w,
            out,
            seg_offsets,
            J,
            K,
            x.stride(0),
            x.stride(1),
            w.stride(0),
            w.stride(1),
            w.stride(2),
            out.stride(0),
            out.stride(1),
            alpha,
            ACCUMULATE=accumulate,
            PRECISION=_precision(x),
            BLOCK_M=BLOCK_M,
            BLOCK_J=BLOCK_J,
            BLOCK_K=BLOCK_K,
        )
    elif not accumulate:
        out.zero_()
    return out


def _segment_outer(g, x, seg_offsets, alpha: float) -> torch.Tensor:
    """dw[s] = alpha * g[rows of s].T @ x[rows of s];  g: [N, J], x: [N, K] -> dw: [S, J, K]."""
    S = seg_offsets.numel() - 1
    J, K = g.shape[1], x.shape[1]
    dw = torch.empty(S, J, K, device=g.device, dtype=g.dtype)
    BLOCK_J, BLOCK_K = _block(J), _block(K)
    _segment_outer_kernel[(S, triton.cdiv(J, BLOCK_J), triton.cdiv(K, BLOCK_K))](
        g,
        x,
        dw,
        seg_offsets,
        J,
        K,
        g.stride(0),
        g.stride(1),
        x.stride(0),
        x.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        alpha,
        PRECISION=_precision(g),
        BLOCK_M=32,
        BLOCK_J=BLOCK_J,
        BLOCK_K=BLOCK_K,
    )
    return dw


class MultiLoRALinear(torch.autograd.Function):
    """The Triton path: base matmul in torch (cuBLAS), both LoRA matmuls and their gradients in Triton."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, seg_offsets, scale: float):
        # x: [N, K]; weight: [O, K]; lora_a: [S, R, K]; lora_b: [S, O, R]; seg_offsets: [S + 1]
        y = F.linear(x, weight, bias)  # [N, O]
        u = _segment_matmul(x, lora_a, seg_offsets, 1.0)  # shrink: [N, R]
        _segment_matmul(u, lora_b, seg_offsets, scale, out=y)  # expand, added into y
        ctx.save_for_backward(x, weight, lora_a, lora_b, seg_offsets, u)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, lora_a, lora_b, seg_offsets, u = ctx.saved_tensors
        gy = gy.contiguous()  # [N, O]
        scale = ctx.scale
        # grad_u[n] = scale * gy[n] @ B[s]: a shrink by B[s] viewed as [R, O]
        gu = _segment_matmul(gy, lora_b.transpose(1, 2), seg_offsets, scale)  # [N, R]
        gx = gy @ weight  # [N, K]
        _segment_matmul(gu, lora_a.transpose(1, 2), seg_offsets, 1.0, out=gx)  # expand by A[s] viewed as [K, R]
        ga = _segment_outer(gu, x, seg_offsets, 1.0) if ctx.needs_input_grad[3] else None  # [S, R, K]
        gb = _segment_outer(gy, u, seg_offsets, scale) if ctx.needs_input_grad[4] else None  # [S, O, R]
        gw = gy.t() @ x if ctx.needs_input_grad[1] else None
        gbias = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gbias, ga, gb, None, None


def multi_lora_linear_reference(x, weight, bias, lora_a, lora_b, seg_offsets, scale: float) -> torch.Tensor:
    """Plain torch, a loop over segments (autograd does the backward); same arguments as ``multi_lora_linear``."""
    if x.shape[0] <= lora_a.shape[0]:  # at most a row per segment (decoding): gather each row's A and B, one bmm
        seg = torch.repeat_interleave(torch.arange(lora_a.shape[0], device=x.device), seg_offsets.diff())  # [N]
        delta = torch.bmm(torch.bmm(x[:, None], lora_a[seg].transpose(1, 2)), lora_b[seg].transpose(1, 2))[:, 0]
    else:
        segments = enumerate(itertools.pairwise(seg_offsets.tolist()))
        # [N, O]: the segments cover the rows in order
        delta = torch.cat([F.linear(F.linear(x[lo:hi], lora_a[s]), lora_b[s]) for s, (lo, hi) in segments])
    return F.linear(x, weight, bias) + scale * delta


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """y = x @ weight.T + bias + scale * (x @ lora_a[s].T) @ lora_b[s].T for the rows of each session s.

    x: [N, K]; weight: [O, K]; bias: [O] or None; lora_a: [S, R, K]; lora_b: [S, O, R];
    seg_offsets: [S + 1] ascending integers, 0 first and N last: session s owns rows
    seg_offsets[s]:seg_offsets[s + 1] (may be empty). Returns [N, O] in x's dtype; differentiable in
    x, lora_a and lora_b (and weight, bias). A and B are cast to x's dtype, as ``LoRALayer`` does.
    """
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if use_triton(x, weight, lora_a, lora_b):
        return MultiLoRALinear.apply(x.contiguous(), weight, bias, lora_a, lora_b, seg_offsets, float(scale))
    return multi_lora_linear_reference(x, weight, bias, lora_a, lora_b, seg_offsets, scale)
