"""Kernel benchmarks: peak memory and time of the fused linear cross-entropy against the naive loss, of one
ingest step with and without activation checkpointing, then the other kernels' benchmarks if present
(``bench.multi_lora``, ``bench.attention``).

    python -m bench.kernels                          # CPU, about 2 minutes: memory is the figure that counts
    python -m bench.kernels --quick                  # 1024 tokens, seconds
    python -m bench.kernels --device cuda --out runs/bench_kernels.json

Loss: loss + backward of ``cross_entropy(h @ W.T, y)`` for [tokens, hidden] hidden states against a frozen
[vocab, hidden] LM head (as in ingest), at SmolLM2's vocabulary (49152) and Llama 3's (128256):
  * naive: F.cross_entropy on the materialised fp32 logits (what the engine did before);
  * chunked: ``kernels.cross_entropy``'s torch reference (the CPU path);
  * triton: the Triton kernels (CUDA only: on CPU they would be interpreted).
CUDA uses the models' hidden sizes (576, 4096) in bf16; CPU uses fp32 and a hidden size of 256 by default
(``--hidden``): the logits, which are what the fused loss removes, do not depend on it, and it keeps the
CPU run near two minutes.

Ingest step: one ``batch.train_chunks`` (frozen prefix, fast layers with autograd, loss, backward, AdamW
step) on random weights of SmolLM2-135M's layer shapes, 8 fast layers (the default's last quarter) after
one frozen one, for each ``IngestConfig.activation_checkpointing`` mode ("offload" on CUDA only: on CPU it
is "recompute").

Peak memory: each case runs in a fresh process. CUDA: ``torch.cuda.max_memory_allocated`` above what was
allocated before. CPU: torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the
process's resident-set high-water mark (VmHWM, reset to the current RSS through /proc/self/clear_refs)
minus the RSS before, after returning glibc's free lists to the OS (malloc_trim) so that recycled memory
cannot hide new allocations. It counts every page the step touched, allocator slack included: an upper
bound on the tensors' bytes. CPU cases run once after a small warm-up (see ``measure``), CUDA ones take
the median of 5 after a full one.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.dispatch import BACKEND_ENV

LOSS_CASES = (("SmolLM2-135M", 49152, 576), ("Llama-3-8B", 128256, 4096))  # (name, vocab, hidden on CUDA)
CPU_HIDDEN = 256
# SmolLM2-135M's shapes (hidden, intermediate, heads, kv heads, head_dim, vocab): the default model's fast layers.
INGEST_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152)
FAST_LAYERS = 8
ROOT = Path(__file__).resolve().parent.parent


# ---- measuring, inside one child process ---------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(step: Callable[[int], object], tokens: int, device: torch.device, repeats: int) -> tuple[float, int]:
    """(seconds, peak bytes above the start) of ``step(tokens)``; see the module docstring for how memory is read.

    A warm-up comes first: on CUDA the full step (Triton compiles, cuBLAS picks kernels); on CPU the same code
    path on 16 tokens, which pages in the library code and starts the thread pool (RSS would count both).
    """
    step(tokens if device.type == "cuda" else 16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _proc_status_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status_kib("VmHWM") * 1024
    return statistics.median(times), peak - base


def loss_case(spec: dict) -> dict:
    """Loss + backward of one implementation; the loss value too, to check that they agree."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(0)
    n, vocab, hidden = spec["tokens"], spec["vocab"], spec["hidden"]
    h = torch.randn(n, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device, dtype)  # frozen, like the LM head
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    if spec["impl"] == "naive":

        def loss_fn(h, t):
            return F.cross_entropy((h @ w.T).float(), t)  # [n, vocab] fp32 logits, as Transformer.logits
    else:
        from kernels.cross_entropy import fused_linear_cross_entropy

        os.environ[BACKEND_ENV] = {"chunked": "torch", "triton": "triton"}[spec["impl"]]

        def loss_fn(h, t):
            return fused_linear_cross_entropy(h, w, t)

    losses = []

    def step(n: int):
        h.grad = None
        loss = loss_fn(h[:n], t[:n])
        loss.backward()
        losses.append(loss.item())

    seconds, peak = measure(step, n, device, spec["repeats"])
    return {"seconds": seconds, "peak_bytes": peak, "loss": losses[-1]}


def ingest_case(spec: dict) -> dict:
    """One ingest step (batch.train_chunks) of ``tokens`` tokens with the given activation checkpointing."""
    from ttt.batch import ChunkItem, train_chunks
    from ttt.config import FastWeightConfig, IngestConfig
    from ttt.fast_weights import build_fast_weights
    from ttt.ingest import make_optimizer
    from ttt.model import ModelConfig, Transformer

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    cfg = ModelConfig(
        **INGEST_SHAPE,
        num_layers=spec["fast_layers"] + 1,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    model = Transformer(cfg, inv_freq)
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.02)  # tied LM head: N(0, 1) would give loss ~500
    model = model.to(device, dtype).eval().requires_grad_(False)
    fast = build_fast_weights(FastWeightConfig(layers=f"last:{spec['fast_layers']}"), model)
    ingest = IngestConfig(measure_loss_after=False, activation_checkpointing=spec["mode"])
    optimizer = make_optimizer(fast.parameters(), ingest)
    chunk = torch.randint(0, cfg.vocab_size, (spec["tokens"],), device=device)
    reports = []

    def step(n: int):
        item = ChunkItem(fast, optimizer, None, chunk[:0], chunk[:n], ingest, len(reports))
        reports.extend(train_chunks(model, [item]))

    seconds, peak = measure(step, spec["tokens"], device, spec["repeats"])
    return {"seconds": seconds, "peak_bytes": peak, "loss": reports[-1].loss_before}


CASES = {"loss": loss_case, "ingest_step": ingest_case}


def run_child(spec: dict) -> dict:
    """Run one case in a fresh interpreter (see the module docstring) and return its row."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--child", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    row = dict(spec)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
        row["error"] = lines[-1][:160] if lines else f"exit status {proc.returncode}"
    else:
        row |= json.loads(proc.stdout.strip().splitlines()[-1])
        row["peak_mib"] = row.pop("peak_bytes") / 2**20
    return row


# ---- the table --------------------------------------------------------------------------------------


def add_ratios(rows: list[dict], baseline: Callable[[dict], bool], group: Callable[[dict], tuple]) -> None:
    """mem_ratio / speedup of each row against the baseline row of its group (baseline / row: > 1 is better)."""
    base = {group(r): r for r in rows if baseline(r) and "error" not in r}
    for r in rows:
        b = base.get(group(r))
        if b is not None and "error" not in r:
            r["mem_ratio"] = b["peak_mib"] / max(r["peak_mib"], 1e-9)
            r["speedup"] = b["seconds"] / r["seconds"]


def print_rows(title: str, rows: list[dict], label: Callable[[dict], str]) -> None:
    print(f"\n{title}")
    print(f"{'case':44s} {'peak MiB':>10s} {'seconds':>9s} {'mem ratio':>10s} {'speedup':>8s} {'loss':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{label(r):44s} error: {r['error']}")
            continue
        print(
            f"{label(r):44s} {r['peak_mib']:10.1f} {r['seconds']:9.3f} {r.get('mem_ratio', 1):9.1f}x "
            f"{r.get('speedup', 1):7.2f}x {r['loss']:8.4f}"
        )


def loss_rows(device: str, tokens: int, hidden: int | None, repeats: int) -> list[dict]:
    cuda = device == "cuda"
    impls = ("naive", "chunked", "triton") if cuda else ("naive", "chunked")
    rows = []
    for name, vocab, model_hidden in LOSS_CASES:
        for impl in impls:
            spec = dict(
                bench="loss",
                model=name,
                vocab=vocab,
                hidden=hidden or (model_hidden if cuda else CPU_HIDDEN),
                tokens=tokens,
                impl=impl,
                device=device,
                dtype="bfloat16" if cuda else "float32",
                repeats=repeats,
            )
            rows.append(run_child(spec))
    add_ratios(rows, lambda r: r["impl"] == "naive", lambda r: (r["vocab"], r["hidden"]))
    print_rows(
        f"loss + backward, {tokens} tokens, {device} (ratios: naive / row)",
        rows,
        lambda r: f"vocab {r['vocab']:6d} hidden {r['hidden']:4d} {r['dtype']:8s} {r['impl']}",
    )
    return rows


def ingest_rows(device: str, tokens: int, repeats: int) -> list[dict]:
    modes = ("none", "recompute", "offload") if device == "cuda" else ("none", "recompute")
    rows = [
        run_child(
            dict(
                bench="ingest_step",
                mode=mode,
                tokens=tokens,
                fast_layers=FAST_LAYERS,
                device=device,
                dtype="bfloat16" if device == "cuda" else "float32",
                repeats=repeats,
            )
        )
        for mode in modes
    ]
    add_ratios(rows, lambda r: r["mode"] == "none", lambda r: ())
    print_rows(
        f"one ingest step, SmolLM2-135M layer shapes, {FAST_LAYERS} fast layers, {tokens} tokens, {device}",
        rows,
        lambda r: f"activation_checkpointing={r['mode']}",
    )
    return rows


def other_benchmarks(device: str) -> list[dict]:
    """Rows of the other kernels' benchmarks (each prints its own table), tagged with their module."""
    rows = []
    for module in ("bench.multi_lora", "bench.attention"):
        if importlib.util.find_spec(module) is None:
            continue
        print(f"\n{module}")
        rows += [{"bench": module.removeprefix("bench."), **r} for r in importlib.import_module(module).run(device)]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the loss cases")
    ap.add_argument("--ingest-tokens", type=int, default=None, help="chunk of the ingest step (CPU 1024, CUDA 4096)")
    ap.add_argument("--hidden", type=int, default=None, help=f"hidden size of every loss case (CPU {CPU_HIDDEN})")
    ap.add_argument("--quick", action="store_true", help="1024 tokens, 512 for the ingest step")
    ap.add_argument("--no-others", action="store_true", help="skip bench.multi_lora and bench.attention")
    ap.add_argument("--out", type=Path, default=None, help="write every row to this JSON file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one case, in a fresh process
    args = ap.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(CASES[spec["bench"]](spec)))
        return

    cuda = args.device == "cuda"
    tokens = 1024 if args.quick else args.tokens
    ingest_tokens = args.ingest_tokens or (512 if args.quick else 4096 if cuda else 1024)
    repeats = 5 if cuda else 1
    t0 = time.perf_counter()
    rows = loss_rows(args.device, tokens, args.hidden, repeats) + ingest_rows(args.device, ingest_tokens, repeats)
    if not args.no_others:
        rows += other_benchmarks(args.device)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        from bench.common import git_revision

        meta = {
            "device": args.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "git_revision": git_revision(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
