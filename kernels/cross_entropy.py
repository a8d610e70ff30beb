"""Fused linear cross-entropy (the Cut Cross Entropy idea): the loss of ``cross_entropy(h @ W.T, y)``
and its gradients without ever holding the [tokens, vocab] logits.

At 4096 tokens and Llama 3's 128256-id vocabulary the fp32 logits alone are 2.1 GB, and the naive
loss keeps two more tensors of that size (log-softmax for backward, then its gradient). Here:

  * forward keeps one fp32 number per token, the log-sum-exp ``lse`` over the vocabulary;
  * backward recomputes the logits a tile at a time and turns each tile straight into its share of
    ``dh = (softmax - onehot) @ W`` (and ``dW = (softmax - onehot).T @ h`` when W trains).

Two implementations of the same math, chosen by ``dispatch.use_triton``:
  * Triton (CUDA): one kernel streams vocabulary tiles through an online log-sum-exp per row block,
    split over the vocabulary so that a few thousand tokens still fill the GPU; the backward kernel
    recomputes each (row block, vocab block) tile and accumulates dh and dW with fp32 atomics.
  * torch (CPU, the reference): the same per token-chunk, each chunk's logits [rows, V] a temporary.

Triton keeps the logits in fp32 from its fp32 accumulators; the reference computes them as
``Transformer.logits`` does (a matmul in the inputs' dtype, then fp32); both do the softmax and the loss
in fp32, so in fp32 both equal the materialised path to rounding. The per-token losses come out of an
autograd Function; reductions are plain torch ops on them, so "mean", "sum" and "none" share one
backward. Not done yet: skipping backward tiles whose softmax is negligible (CCE's gradient filter), which
would also cut the backward's atomic traffic (N * V * D / BLOCK_V adds into dh); autotuned tiles. The
kernels have run only under the interpreter so far: their GPU speed is unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import triton_available, use_triton

REDUCTIONS = ("mean", "sum", "none")
# The torch reference holds one chunk's fp32 logits at a time: 2**24 of them is 64 MB (130 tokens at vocab 128256).
# Smaller chunks save little more and slow CPU matmuls down (2**21: 3x slower than 2**25 here).
REFERENCE_CHUNK_ELEMENTS = 1 << 24

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _logits_tile(
        h_ptr,
        w_ptr,
        rows,
        cols,
        N,
        V,
        D,
        stride_h,
        stride_w,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # logits[rows, cols] = h[rows] @ w[cols].T in fp32: [BLOCK_N, BLOCK_V] (0 outside [N, V])
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds[None, :] < D
            h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=(rows[:, None] < N) & d_ok, other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=(cols[:, None] < V) & d_ok, other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _lse_forward_kernel(
        h_ptr,
        w_ptr,
        targets_ptr,
        lse_ptr,
        target_logit_ptr,
        N,
        V,
        D,
        stride_h,
        stride_w,
        blocks_per_split,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Program (row block, vocab split): online log-sum-exp of its rows over its vocabulary blocks.
        # lse_ptr, target_logit_ptr: [splits, N] partials, combined by the caller (logsumexp, sum).
        split = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of exp(logit - m)
        target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(V, BLOCK_V))
        for b in range(first, last):
            cols = b * BLOCK_V + tl.arange(0, BLOCK_V)
            logits = _logits_tile(
                h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION
            )
            logits = tl.where(cols[None, :] < V, logits, float("-inf"))
            target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(logits, axis=1))  # finite: every block has a column < V
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m = m_new
        # An empty split (more splits than blocks) leaves -inf, which logsumexp over splits ignores.
        tl.store(lse_ptr + split * N + rows, m + tl.log(s), mask=row_ok)
        tl.store(target_logit_ptr + split * N + rows, target_logit, mask=row_ok)

    @triton.jit
    def _backward_kernel(
        h_ptr,
        w_ptr,
        targets_ptr,
        lse_ptr,
        grad_ptr,
        dh_ptr,
        dw_ptr,
        N,
        V,
        D,
        stride_h,
        stride_w,
        COMPUTE_DW: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Program (row block, vocab block): dlogits = grad * (softmax - onehot) on its tile, then
        # dh[rows] += dlogits @ w[cols] and dw[cols] += dlogits.T @ h[rows]; dh: [N, D], dw: [V, D] fp32, contiguous.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok, col_ok = rows < N, cols < V
        grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        logits = _logits_tile(
            h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION
        )
        p = tl.exp(logits - lse[:, None])
        dlogits = (p - (cols[None, :] == targets[:, None]).to(tl.float32)) * grad[:, None]
        dlogits = tl.where(col_ok[None, :], dlogits, 0.0).to(h_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_V]
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            rows_ok, cols_ok = row_ok[:, None] & (ds[None, :] < D), col_ok[:, None] & (ds[None, :] < D)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=cols_ok, other=0.0)
            dh = tl.dot(dlogits, w, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(dh_ptr + rows[:, None] * D + ds[None, :], dh, mask=rows_ok)
            if COMPUTE_DW:
                h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=rows_ok, other=0.0)
                dw = tl.dot(tl.trans(dlogits), h, input_precision=PRECISION)  # [BLOCK_V, BLOCK_D]
                tl.atomic_add(dw_ptr + cols[:, None] * D + ds[None, :], dw, mask=cols_ok)


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    programs: int  # aim for at least this many forward programs (vocab splits make up for few row blocks)


def _tile_config(h: torch.Tensor) -> TileConfig:
    if h.is_cuda:
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count
        return TileConfig(block_n=64, block_v=64, block_d=64, num_warps=4, programs=4 * sms)
    # The CPU interpreter runs programs one by one with numpy: wide tiles mean fewer interpreted steps;
    # two programs per row block still exercise the combination of vocabulary splits.
    return TileConfig(block_n=16, block_v=128, block_d=64, num_warps=1, programs=2)


def _precision(h: torch.Tensor) -> str:
    # fp32 inputs get exact fp32 products (a drop-in for F.cross_entropy), not TF32's 10-bit mantissas.
    return "ieee" if h.dtype == torch.float32 else "tf32"


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Per-token losses [N] (0 on ignored tokens) of h: [N, D] against weight: [V, D]; Triton kernels."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int):
        N, D = h.shape
        V = weight.shape[0]
        cfg = _tile_config(h)
        row_blocks = triton.cdiv(N, cfg.block_n)
        vocab_blocks = triton.cdiv(V, cfg.block_v)
        splits = max(1, min(vocab_blocks, cfg.programs // row_blocks))
        blocks_per_split = triton.cdiv(vocab_blocks, splits)
        lse_parts = torch.empty(splits, N, device=h.device, dtype=torch.float32)
        target_parts = torch.empty_like(lse_parts)
        _lse_forward_kernel[(row_blocks, splits)](
            h,
            weight,
            targets,
            lse_parts,
            target_parts,
            N,
            V,
            D,
            h.stride(0),
            weight.stride(0),
            blocks_per_split,
            cfg.block_n,
            cfg.block_v,
            cfg.block_d,
            _precision(h),
            num_warps=cfg.num_warps,
        )
        lse = torch.logsumexp(lse_parts, dim=0)  # [N]
        valid = targets != ignore_index
        ctx.save_for_backward(h, weight, targets, lse, valid)
        return torch.where(valid, lse - target_parts.sum(0), 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, targets, lse, valid = ctx.saved_tensors
        N, D = h.shape
        V = weight.shape[0]
        cfg = _tile_config(h)
        grad = torch.where(valid, grad_loss, 0.0).float().contiguous()
        dh = torch.zeros(N, D, device=h.device, dtype=torch.float32)
        compute_dw = ctx.needs_input_grad[1]
        dw = torch.zeros(V, D, device=h.device, dtype=torch.float32) if compute_dw else dh  # dh: an unused pointer
        _backward_kernel[(triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v))](
            h,
            weight,
            targets,
            lse,
            grad,
            dh,
            dw,
            N,
            V,
            D,
            h.stride(0),
            weight.stride(0),
            compute_dw,
            cfg.block_n,
            cfg.block_v,
            cfg.block_d,
            _precision(h),
            num_warps=cfg.num_warps,
        )
        return dh.to(h.dtype), dw.to(weight.dtype) if compute_dw else None, None, None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The torch reference: the same per-token losses, ``chunk_rows`` tokens' logits at a time.

    Logits are ``h @ W.T`` in the inputs' dtype cast to fp32, exactly as ``Transformer.logits``, so that
    in fp32 this matches the materialised path to rounding. Backward recomputes each chunk's logits,
    except when only ``h`` needs a gradient (the frozen LM head of ingest): then forward, while a chunk's
    softmax is at hand, keeps ``(softmax - onehot) @ W`` per token ([N, D], like h) and backward only
    scales it, which saves a [N, V] x [V, D] matmul and the logits' recomputation (a third of the work).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int):
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)  # any index: ignored rows are zeroed
        lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        target_logit = torch.empty_like(lse)
        early = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]  # dh now, no dW: see the docstring
        dh_unscaled = torch.empty_like(h) if early else None
        for rows in _chunks(h.shape[0], chunk_rows):
            logits = (h[rows] @ weight.T).float()  # [rows, V]
            target_logit[rows] = logits.gather(1, safe_targets[rows, None])[:, 0]
            m = logits.amax(dim=-1)  # log-sum-exp in place: no second [rows, V] buffer
            total = logits.sub_(m[:, None]).exp_().sum(dim=-1)
            lse[rows] = total.log().add_(m)
            if early:
                softmax = logits.div_(total[:, None])
                softmax.scatter_add_(1, safe_targets[rows, None], torch.full_like(total[:, None], -1.0))
                dh_unscaled[rows] = softmax.to(h.dtype) @ weight
        if early:
            ctx.save_for_backward(dh_unscaled, valid)
        else:
            ctx.save_for_backward(h, weight, safe_targets, lse, valid)
        ctx.chunk_rows, ctx.early = chunk_rows, early
        return torch.where(valid, lse - target_logit, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.early:
            dh_unscaled, valid = ctx.saved_tensors
            grad = torch.where(valid, grad_loss, 0.0).float()
            return (dh_unscaled.float() * grad[:, None]).to(dh_unscaled.dtype), None, None, None, None
        h, weight, targets, lse, valid = ctx.saved_tensors
        grad = torch.where(valid, grad_loss, 0.0).float()
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for rows in _chunks(h.shape[0], ctx.chunk_rows):
            dlogits = (h[rows] @ weight.T).float().sub_(lse[rows, None]).exp_()  # softmax: [rows, V]
            dlogits.scatter_add_(1, targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            dlogits = dlogits.mul_(grad[rows, None]).to(h.dtype)
            if dh is not None:
                dh[rows] = dlogits @ weight
            if dw is not None:
                dw.addmm_(dlogits.T.float(), h[rows].float())
        return dh, dw.to(weight.dtype) if dw is not None else None, None, None, None


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, targets)`` in fp32, without materialising the logits.

    h: [..., D], weight: [V, D], targets: [...] (int). Returns a scalar for "mean" (over the tokens not
    equal to ``ignore_index``; NaN when there are none, as F.cross_entropy) and "sum", or the per-token
    losses [...] (0 where ignored) for "none". Gradients flow to ``h`` and, if it requires them, ``weight``.
    ``chunk_rows`` sets the torch reference's tokens per chunk (default: 64 MB of fp32 logits).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: choose from {REDUCTIONS}")
    if h.shape[:-1] != targets.shape or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"shapes: h {tuple(h.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}")
    if h.dtype != weight.dtype:
        raise ValueError(f"h is {h.dtype} but weight is {weight.dtype}: cast one (the matmul runs in one dtype)")
    h2, t = h.reshape(-1, h.shape[-1]).contiguous(), targets.reshape(-1).contiguous()
    weight = weight.contiguous()
    if use_triton(h2, weight):
        loss = TritonLinearCrossEntropy.apply(h2, weight, t, ignore_index)
    else:
        rows = chunk_rows or max(1, REFERENCE_CHUNK_ELEMENTS // weight.shape[0])
        loss = ChunkedLinearCrossEntropy.apply(h2, weight, t, ignore_index, rows)
    if reduction == "none":
        return loss.view(targets.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (t != ignore_index).sum()
