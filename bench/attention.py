"""Attention of an ingest chunk over its cached context: fwd and fwd+bwd time, peak memory, per implementation.

    python -m bench.attention                 # CPU, fp32, smaller shapes, < 1 min (FlexAttention off)
    python -m bench.attention --device cuda   # bf16, adds the Triton kernel and FlexAttention

Implementations (all compute ``kernels.attention.attention_reference``'s result; ``max_err`` says how closely):
  * triton: ``kernels.attention.FlashChunkAttention`` (CUDA only: on CPU it is interpreted);
  * sdpa_mask: SDPA with the explicit [T, N] bool mask (the model's path without the kernel);
  * sdpa_causal: SDPA with ``causal_lower_right`` (no window only): the bottom-right causal mask that
    flash / memory-efficient attention apply without a mask tensor;
  * flex: ``torch.compile(flex_attention)`` with a block mask of the same rule (skips masked blocks);
  * naive: matmul, masked softmax, matmul, the kv heads repeated for GQA.
Peak memory is measured on CUDA only (the CPU allocator keeps no statistics).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention import FlashChunkAttention, attention_reference, chunk_mask


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    chunk: int  # T queries
    context: int  # P cached keys before them
    window: int | None = None


SHAPES = (
    Shape("SmolLM 512+512", 9, 3, 64, 512, 512),  # the default ingest: chunk 512, context 512
    Shape("SmolLM 1024+2048", 9, 3, 64, 1024, 2048),
    Shape("SmolLM 1024+2048 w1024", 9, 3, 64, 1024, 2048, window=1024),  # Mistral-style sliding window
    Shape("Llama-3.2-1B 1024+2048", 32, 8, 64, 1024, 2048),  # the larger one
)
# The same kinds at sizes that keep the CPU run under a minute on 2 cores.
CPU_SHAPES = (
    SHAPES[0],
    Shape("SmolLM 512+1024 w512", 9, 3, 64, 512, 1024, window=512),
    Shape("Llama-3.2-1B 512+512", 32, 8, 64, 512, 512),
)

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int | None], torch.Tensor]


def sdpa_mask(q, k, v, window):
    mask = chunk_mask(q.shape[2], k.shape[2], window, q.device)  # [T, N]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sdpa_causal(q, k, v, window):
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[2], k.shape[2])  # no tensor: a flag for the fused kernels
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def naive(q, k, v, window):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, H, N, hd]
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [B, H, T, N]
    s = s.masked_fill(~chunk_mask(q.shape[2], k.shape[2], window, q.device), float("-inf"))
    return s.softmax(-1).to(v.dtype) @ v


def make_flex(T: int, N: int, window: int | None, device) -> Attn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    past = N - T

    def visible(b, h, i, j):
        ok = j <= past + i
        return ok & (j > past + i - window) if window is not None else ok

    block_mask = create_block_mask(visible, B=None, H=None, Q_LEN=T, KV_LEN=N, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, window: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (compilation, autotuning, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(fn: Attn, shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int, backward: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    T, N, D = shape.chunk, shape.context + shape.chunk, shape.head_dim
    q = torch.randn(1, shape.heads, T, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(1, shape.kv_heads, N, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(1, shape.kv_heads, N, D, generator=g).to(device, dtype).requires_grad_()
    qd, kd, vd = q.detach(), k.detach(), v.detach()  # forward only (FlexAttention on CPU refuses grad inputs)
    err = (fn(qd, kd, vd, shape.window).float() - attention_reference(qd, kd, vd, shape.window).float()).abs().max()
    fwd_ms = _time_ms(lambda: fn(qd, kd, vd, shape.window), device, repeats)
    row = {"max_err": err.item(), "fwd_ms": fwd_ms, "fwd_bwd_ms": None, "peak_mib": None}
    if backward:
        dout = torch.randn(q.shape, generator=g).to(device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        step = lambda: torch.autograd.grad(fn(q, k, v, shape.window), (q, k, v), dout)
        row["fwd_bwd_ms"] = _time_ms(step, device, repeats)
        if device.type == "cuda":
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


def run(device: str = "cpu", shapes=None, flex: bool | None = None, repeats: int | None = None) -> list[dict]:
    """Time every implementation on every shape; print a table and return its rows.

    ``shapes`` defaults to ``SHAPES`` on CUDA, ``CPU_SHAPES`` on CPU. ``flex`` defaults to CUDA only: on
    CPU FlexAttention has no backward and its first compile took 80 s here.
    """
    dev = torch.device(device)
    cpu = dev.type == "cpu"
    shapes = shapes or (CPU_SHAPES if cpu else SHAPES)
    dtype = torch.float32 if cpu else torch.bfloat16
    repeats = repeats or (1 if cpu else 10)
    flex = dev.type == "cuda" if flex is None else flex
    rows = []
    for shape in shapes:
        T, N = shape.chunk, shape.context + shape.chunk
        impls: dict[str, Callable[[], Attn]] = {}
        if dev.type == "cuda":
            impls["triton"] = lambda: FlashChunkAttention.apply
        impls["sdpa_mask"] = lambda: sdpa_mask
        if shape.window is None:
            impls["sdpa_causal"] = lambda: sdpa_causal
        if flex:
            impls["flex"] = lambda: make_flex(T, N, shape.window, dev)  # noqa: B023 (called in this iteration)
        impls["naive"] = lambda: naive
        for name, make in impls.items():
            row = {"shape": shape.name, "impl": name, "device": dev.type, "dtype": str(dtype).removeprefix("torch.")}
            try:
                backward = name != "flex" or dev.type == "cuda"
                row |= measure(make(), shape, dev, dtype, repeats, backward)
            except Exception as e:  # an implementation this torch/device lacks is a row, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows.append(row)
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print(f"{'shape':26s} {'impl':12s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'peak MiB':>9s} {'max err':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:26s} {r['impl']:12s} {r['error']}")
            continue
        print(
            f"{r['shape']:26s} {r['impl']:12s} {fmt(r['fwd_ms'], '9.2f')} {fmt(r['fwd_bwd_ms'], '11.2f')} "
            f"{fmt(r['peak_mib'], '9.1f')} {fmt(r['max_err'], '9.1e')}"
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--all-shapes", action="store_true", help="the full-size shapes on CPU too (minutes)")
    args = ap.parse_args(argv)
    run(args.device, SHAPES if args.all_shapes else None, flex=args.flex, repeats=args.repeats)


if __name__ == "__main__":
    main()
