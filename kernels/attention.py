"""Causal attention of an ingest chunk over its cached context, with an optional sliding window.

The chunk's T queries sit at positions [P, P + T) after the P context keys (``RollingContext``: the
document's first ``sink`` tokens, then its most recent ones, re-indexed 0..P-1) and attend to keys
[0, P + T): query i sees key j when j <= P + i and, with a window (Mistral), P + i - window < j.
Sinks need no rule of their own: the model's mask treats them as ordinary context keys, so does this.

Which path runs (``chunk_attention``), and why. ``python -m bench.attention --all-shapes``, fp32, on a shared
2-core CPU (contended: figures move by 20-40% between runs), ms forward / forward+backward:

    q heads x hd, kv heads, chunk + context     SDPA mask    SDPA lower-right   naive         Flex (compiled)
    SmolLM 9x64 kv3, 512+512                    153 / 613    132 / 494          367 / 578     134 / no backward
    SmolLM 9x64 kv3, 1024+2048                  575 / 1875   576 / 2142         1999 / 5141
    SmolLM 9x64 kv3, 1024+2048, window 1024     757 / 2340   (needs no window)  2152 / 5048
    Llama-3.2-1B 32x64 kv8, 1024+2048           1745 / 5792  1853 / 5696        6246 / 16001

* CPU: SDPA with the explicit [T, N] mask (``attention_reference``). Its CPU flash kernel takes the mask, so it
  is as fast as the lower-right causal variant (which torch materialises into the same mask on CPU) and 2-3x
  faster than matmul-softmax. FlexAttention has no CPU backward in torch 2.13 (NotImplementedError; ingest needs
  gradients) and its forward is no faster. Triton only runs interpreted on CPU: a correctness tool, not timed.
* CUDA: the Triton kernel below for a chunk after context or a window that cuts the chunk; SDPA ``is_causal``
  (its flash backend) for a chunk without context; SDPA without a mask for one-token decode (``decode_attention``,
  which on a CPU folds the query heads onto their key/value head). The reason is
  structural, NOT MEASURED (no GPU was available when this was written): with an explicit mask CUDA SDPA cannot
  use its flash backend and falls back to memory-efficient or math attention (the latter materialises
  [B, H, T, N] scores), while this kernel keeps O(T * hd) memory per head, sums a GQA group's dk/dv in registers
  and skips key blocks above the diagonal and outside the window. ``python -m bench.attention --device cuda``
  times the kernel against SDPA lower-right causal (flash-eligible, no window) and compiled FlexAttention; if
  either wins, route that case there. Block sizes are a fixed, untuned 64 x 64 on CUDA (16 x 16 interpreted).
* Known slack: every visited block evaluates the mask (no separate full-block loop), and dk/dv are computed for
  the context keys too although the model detaches them (half the dk/dv work at 512+512).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # without the `gpu` extra dispatch.use_triton is False and only the reference runs
    triton = None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def chunk_mask(T: int, N: int, window: int | None, device) -> torch.Tensor:
    """[T, N] bool, True where query i (at position N - T + i) may see key j."""
    past = N - T
    mask = torch.ones(T, N, dtype=torch.bool, device=device).tril(past)
    if window is not None:  # query i sees keys j with i - window < j <= i
        mask &= ~torch.ones_like(mask).tril(past - window)
    return mask


def attention_reference(q, k, v, window: int | None = None) -> torch.Tensor:
    """The model's SDPA path. q: [B, H, T, hd]; k, v: [B, KVH, N, hd], N = P + T -> [B, H, T, hd]."""
    T, N = q.shape[2], k.shape[2]
    if N == T and (window is None or window >= T):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=chunk_mask(T, N, window, q.device), enable_gqa=True)


def decode_attention(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One new query per row: q [B, H, 1, hd]; k, v [B, KVH, N, hd]; mask None or [B, 1, 1, N] -> [B, H, 1, hd].

    On a CPU the H / KVH query heads that share a key/value head go in as that head's H / KVH queries (the same
    sums): SDPA's CPU flash kernel runs a block per head and query, and a block of one query is slow there, 5-6x
    in bf16 (16 rows x 300 keys, SmolLM's 9 heads over 3: 2.5 ms a layer with enable_gqa, 0.36 ms so; fp32 0.29 /
    0.23). Elsewhere SDPA's own GQA (not measured on a GPU; CUDA's flash kernel folds a one-query call itself).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    B, H, _, hd = q.shape
    y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], H // k.shape[1], hd), k, v, attn_mask=mask)
    return y.reshape(B, H, 1, hd)  # not view: a kernel may lay its output out position first ([B, G, KVH, hd])


def chunk_attention(q, k, v, window: int | None = None) -> torch.Tensor:
    """``attention_reference``'s result, through the Triton kernel where that is the better path.

    q: [B, H, T, hd]; k, v: [B, KVH, N, hd] (H a multiple of KVH: GQA) -> [B, H, T, hd].
    """
    T, N = q.shape[2], k.shape[2]
    if T == 1 and (window is None or window >= N):  # decode: every key is visible, SDPA needs no mask
        return decode_attention(q, k, v)
    masked = N > T or (window is not None and window < T)  # else plain causal: SDPA's own flash kernel
    if masked and use_triton(q, k, v):
        return FlashChunkAttention.apply(q, k, v, window)
    return attention_reference(q, k, v, window)


# --- Triton ---------------------------------------------------------------------------------------
# Scores are kept in log2 units (scale * log2(e) folded into q.k) so that exp2 replaces exp; the
# saved log-sum-exp per query row (LSE) is in the same units and lets the backward recompute P.


@_jit
def _visible(rows, cols, past, N, window, HAS_WINDOW: tl.constexpr):
    # rows: [M] query indices in the chunk, cols: [N'] key indices -> [M, N'] bool
    ok = (cols[None, :] <= past + rows[:, None]) & (cols[None, :] < N)
    if HAS_WINDOW:
        ok &= cols[None, :] > past + rows[:, None] - window
    return ok


@_jit
def _key_range(start_m, past, N, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # Key blocks that queries [start_m, start_m + BLOCK_M) can see: [lo, hi), lo a multiple of BLOCK_N.
    hi = tl.minimum(N, past + start_m + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, past + start_m - window + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@_jit
def _fwd_kernel(
    Q, K, V, Out, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, N, H, window, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP  # SDPA's enable_gqa: q heads [g * GROUP, (g + 1) * GROUP) share kv head g
    past = N - T
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims[None, :] < HEAD_DIM
    rmask = rows < T
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :], mask=rmask[:, None] & dmask, other=0.0)
    K += b * skb + kvh * skh
    V += b * svb + kvh * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, past, N, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kvmask = (cols[:, None] < N) & dmask
        k = tl.load(K + cols[:, None] * skt + dims[None, :], mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(V + cols[:, None] * svt + dims[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(_visible(rows, cols, past, N, window, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see nothing in this block yet (window edge, padding rows): keep exp2 away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (never stored) see no key at all
    o = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + b * sob + h * soh + rows[:, None] * sot + dims[None, :], o, mask=rmask[:, None] & dmask)
    tl.store(LSE + bh * T + rows, m_i + tl.log2(l_safe), mask=rmask)


@_jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    T, N, H, window, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (query block, q head): dq = scale * dS @ K over the visible key blocks.
    # Q, DO, DQ share q's strides (the wrapper makes them so).
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // GROUP
    past = N - T
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims[None, :] < HEAD_DIM
    rmask = rows < T
    qoff = b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :]
    q = tl.load(Q + qoff, mask=rmask[:, None] & dmask, other=0.0)
    do = tl.load(DO + qoff, mask=rmask[:, None] & dmask, other=0.0)
    lse = tl.load(LSE + bh * T + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh * T + rows, mask=rmask, other=0.0)
    K += b * skb + kvh * skh
    V += b * svb + kvh * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, past, N, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kvmask = (cols[:, None] < N) & dmask
        k = tl.load(K + cols[:, None] * skt + dims[None, :], mask=kvmask, other=0.0)
        v = tl.load(V + cols[:, None] * svt + dims[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = _visible(rows, cols, past, N, window, HAS_WINDOW) & rmask[:, None]
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N], the forward's softmax
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + qoff, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask[:, None] & dmask)


@_jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    T, N, H, KV_HEADS, window, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (key block, kv head), looping over the GROUP q heads that share it: dk and dv are
    # summed in registers and stored once, no atomics. DK, DV share k's strides (the wrapper makes them so).
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b, kvh = bkv // KV_HEADS, bkv % KV_HEADS
    past = N - T
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims[None, :] < HEAD_DIM
    kvmask = (cols[:, None] < N) & dmask
    koff = b * skb + kvh * skh + cols[:, None] * skt + dims[None, :]
    k = tl.load(K + koff, mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svt + dims[None, :], mask=kvmask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Queries that see these keys: i >= j - past, and with a window i < j + window - past.
    lo = tl.maximum(0, start_n - past) // BLOCK_M * BLOCK_M
    hi = T
    if HAS_WINDOW:
        hi = tl.minimum(T, start_n + BLOCK_N + window - 1 - past)
    for g in range(GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            rmask = rows < T
            qoff = b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :]
            q = tl.load(Q + qoff, mask=rmask[:, None] & dmask, other=0.0)  # [BLOCK_M, BLOCK_D]
            do = tl.load(DO + qoff, mask=rmask[:, None] & dmask, other=0.0)
            lse = tl.load(LSE + bh * T + rows, mask=rmask, other=0.0)
            delta = tl.load(DELTA + bh * T + rows, mask=rmask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
            ok = _visible(rows, cols, past, N, window, HAS_WINDOW) & rmask[:, None]
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    tl.store(DK + koff, (dk * sm_scale).to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=kvmask)


def _blocks(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D). Interpreted on CPU: small blocks (the interpreter's cost grows with
    the block, not the work). CUDA: 64 x 64, the usual flash-attention tile for head_dim <= 128 (untuned)."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16
    return (16, 16, block_d) if device.type != "cuda" else (64, 64, block_d)


class FlashChunkAttention(torch.autograd.Function):
    """Flash attention (online softmax, fp32 accumulation) of a chunk over its context; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, window: int | None):
        # q: [B, H, T, hd]; k, v: [B, KVH, N, hd]. The kernels index the last dim with stride 1.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        B, H, T, D = q.shape
        KVH, N = k.shape[1], k.shape[2]
        if H % KVH or N < T:
            raise ValueError(f"need q heads ({H}) a multiple of kv heads ({KVH}) and keys ({N}) >= queries ({T})")
        bm, bn, bd = _blocks(D, q.device)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # log2 units
        sm_scale = 1.0 / math.sqrt(D)
        _fwd_kernel[(triton.cdiv(T, bm), B * H)](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            T, N, H, window or 0, sm_scale * math.log2(math.e),
            GROUP=H // KVH, HEAD_DIM=D, HAS_WINDOW=window is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        window = ctx.window
        B, H, T, D = q.shape
        KVH, N = k.shape[1], k.shape[2]
        bm, bn, bd = _blocks(D, q.device)
        q, do = q.contiguous(), do.contiguous()  # one set of strides for q, do and dq
        k, v = k.contiguous(), v.contiguous()  # and for k, v, dk, dv
        delta = (do.float() * o.float()).sum(-1)  # [B, H, T]: rowsum(dO * O) = rowsum(P * dP)
        sm_scale = 1.0 / math.sqrt(D)
        args = (T, N, H)
        consts = dict(GROUP=H // KVH, HEAD_DIM=D, HAS_WINDOW=window is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        scales = (window or 0, sm_scale * math.log2(math.e), sm_scale)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        dq = torch.empty_like(q)
        _bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](q, k, v, do, dq, lse, delta, *strides, *args, *scales, **consts)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _bwd_dkdv_kernel[(triton.cdiv(N, bn), B * KVH)](
            q, k, v, do, dk, dv, lse, delta, *strides, *args, KVH, *scales, **consts
        )
        return dq, dk, dv, None
