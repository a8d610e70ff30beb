"""Batched multi-session LoRA against a loop over sessions: time of one LoRA projection, and of whole ingest steps.

    python -m bench.multi_lora                    # CPU, fp32, shapes sized to run in about a minute
    python -m bench.multi_lora --device cuda      # bf16, adds the Triton kernel
    python -m bench.multi_lora --engine           # also train_sessions vs train_next_chunk on the default model

Projection: y = x @ W.T + scale * (x @ A[s].T) @ B[s].T for S sessions of T tokens each (a gate_proj with
a rank-16 LoRA), forward ("fwd", as a decode step) and forward + backward to x, A and B ("fwd+bwd", as
an ingest step); ``speedup`` is the loop's time over the row's:
  * loop: each session on its own, as ``LoRALayer.linear`` (the engine without batching);
  * batched_torch: ``kernels.multi_lora``'s reference: one base matmul over every row, LoRA per session
    (what the batched engine runs on CPU);
  * triton: ``kernels.multi_lora.MultiLoRALinear`` (CUDA only: on CPU it would be interpreted).
Engine (``--engine``): S sessions each with one full chunk ready (after one chunk of warm-up, so the
rolling context is full), trained by ``Session.train_next_chunk`` one by one, then by
``ttt.session.train_sessions`` in one batch.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.multi_lora import MultiLoRALinear, multi_lora_linear_reference


@dataclass(frozen=True)
class Shape:
    name: str
    sessions: int
    tokens: int  # per session
    d_in: int
    d_out: int
    rank: int = 16
    train: bool = True  # also time forward + backward (an ingest step; a decode step is forward only)


SHAPES = (
    Shape("SmolLM2 gate_proj ingest", 8, 512, 576, 1536),
    Shape("Llama-3-8B gate_proj ingest", 8, 512, 4096, 14336),
    Shape("SmolLM2 gate_proj decode", 8, 1, 576, 1536, train=False),
    Shape("Llama-3-8B gate_proj decode", 8, 1, 4096, 14336, train=False),
)
# The same kinds at sizes that keep the CPU run near a minute on 2 cores.
CPU_SHAPES = (SHAPES[0], Shape("Llama-3-8B gate_proj ingest", 8, 16, 4096, 14336), SHAPES[2], SHAPES[3])

Impl = Callable[..., torch.Tensor]


def loop(x, weight, bias, lora_a, lora_b, seg_offsets, scale):
    """The engine without batching: each session's rows through its own LoRALayer.linear."""
    bounds = seg_offsets.tolist()
    return torch.cat(
        [
            F.linear(x[lo:hi], weight, bias) + scale * F.linear(F.linear(x[lo:hi], lora_a[s]), lora_b[s])
            for s, (lo, hi) in enumerate(itertools.pairwise(bounds))
        ]
    )


def triton_impl(x, weight, bias, lora_a, lora_b, seg_offsets, scale):
    return MultiLoRALinear.apply(x, weight, bias, lora_a, lora_b, seg_offsets, scale)


def time_it(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call (Triton compiles, cuBLAS picks its kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def projection_rows(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n = shape.sessions * shape.tokens

    def rand(*size, std=1.0):
        return (torch.randn(*size, generator=g) * std).to(device, dtype)

    x = rand(n, shape.d_in).requires_grad_()
    weight = rand(shape.d_out, shape.d_in, std=shape.d_in**-0.5)  # frozen, like the base projection
    lora_a = rand(shape.sessions, shape.rank, shape.d_in, std=shape.d_in**-0.5).requires_grad_()
    lora_b = rand(shape.sessions, shape.d_out, shape.rank, std=0.01).requires_grad_()
    seg_offsets = torch.arange(0, n + 1, shape.tokens, device=device)
    gy = rand(n, shape.d_out)
    impls: dict[str, Impl] = {"loop": loop, "batched_torch": multi_lora_linear_reference}
    if device.type == "cuda":
        impls["triton"] = triton_impl
    with torch.no_grad():
        want = loop(x, weight, None, lora_a, lora_b, seg_offsets, 2.0).float()
    rows = []
    for impl, fn in impls.items():

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, weight, None, lora_a, lora_b, seg_offsets, 2.0)

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(x, weight, None, lora_a, lora_b, seg_offsets, 2.0), (x, lora_a, lora_b), gy)

        max_err = (fwd().float() - want).abs().max().item()
        for mode, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd))[: 2 if shape.train else 1]:
            rows.append(
                dict(
                    shape=shape.name,
                    sessions=shape.sessions,
                    tokens=shape.tokens,
                    d_in=shape.d_in,
                    d_out=shape.d_out,
                    rank=shape.rank,
                    impl=impl,
                    mode=mode,
                    device=device.type,
                    dtype=str(dtype).removeprefix("torch."),
                    seconds=time_it(step, device, repeats),
                    max_err=max_err,
                )
            )
    for r in rows:
        base = next(b for b in rows if b["impl"] == "loop" and b["mode"] == r["mode"])
        r["speedup"] = base["seconds"] / r["seconds"]
    return rows


def engine_rows(device: str, sessions: int, tokens: int) -> list[dict]:
    """train_next_chunk one session after another vs train_sessions, on the default model."""
    import ttt
    from ttt.session import train_sessions

    engine = ttt.load_engine(device=device)
    cfg = {"ingest": {"chunk_tokens": tokens, "context_tokens": tokens}}
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, engine.base.cfg.vocab_size, (sessions, 3 * tokens), generator=gen)
    rows = []
    for impl in ("sequential", "train_sessions"):
        group = [engine.create_session(cfg) for _ in range(sessions)]
        for s, ids in zip(group, text.tolist(), strict=True):
            s.append_tokens(ids)
            s.train_next_chunk()  # warm-up, and the rolling context is full from here on
        times = []
        for _ in range(2):
            t = time.perf_counter()
            reports = [s.train_next_chunk() for s in group] if impl == "sequential" else train_sessions(group)
            times.append(time.perf_counter() - t)
        seconds = statistics.median(times)
        rows.append(
            dict(
                shape="default model ingest step",
                sessions=sessions,
                tokens=tokens,
                impl=impl,
                mode="train",
                device=device,
                seconds=seconds,
                tokens_per_s=sessions * tokens / seconds,
                loss_before=statistics.mean(r.loss_before for r in reports),
            )
        )
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    rows[0]["speedup"] = 1.0
    return rows


def print_rows(rows: list[dict]) -> None:
    print(
        f"{'shape':30s} {'S x T':>8s} {'impl':14s} {'mode':8s} {'dtype':9s} {'ms':>9s} {'speedup':>8s} {'max_err':>9s}"
    )
    for r in rows:
        st = f"{r['sessions']}x{r['tokens']}"
        err = f"{r['max_err']:9.1e}" if "max_err" in r else f"{r['tokens_per_s']:6.0f} t/s"
        print(
            f"{r['shape'][:30]:30s} {st:>8s} {r['impl']:14s} {r['mode']:8s} {r.get('dtype', ''):9s} "
            f"{r['seconds'] * 1e3:9.2f} {r['speedup']:7.2f}x {err}"
        )


def run(device: str, engine: bool = False, shapes: tuple[Shape, ...] | None = None) -> list[dict]:
    """Every projection case (``shapes``, default: the device's) on ``device``; prints the table, returns its rows."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for shape in shapes or (SHAPES if cuda else CPU_SHAPES):
        rows += projection_rows(shape, dev, dtype, repeats=10 if cuda else 3)
    if engine:
        rows += engine_rows(device, sessions=8 if cuda else 4, tokens=512 if cuda else 256)
    print_rows(rows)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine", action="store_true", help="also whole ingest steps on the default model")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    run(args.device, args.engine)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
