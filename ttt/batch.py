"""THE ingest step: score, then train on, the next chunk of one session or of several sessions in one batch.

For each chunk (with the preceding ``context_tokens`` as unlabelled context, held as cached keys and values
in a ``RollingContext`` so each token passes the model once):
  1. the frozen layers below the first fast layer run once, without autograd;
  2. the fast layers run with autograd; the first forward's per-token loss is the chunk's honest score
     (its weights have not seen the chunk yet) and each token's surprise;
  3. each session clips its gradient norm and steps; a non-finite loss, gradient or result is rolled back,
     never kept, and the others are untouched.
Every forward and backward reaches a pause point before each layer and between pieces of the loss
(``ttt.pause``): where the server's scheduler decodes waiting answers without changing what is learned.

Several sessions' chunks that fit one rectangular batch are stacked into [S, T]: the frozen prefix and the
fast layers run once over it, and every LoRA projection goes through ``kernels.multi_lora`` with each
session's own A and B (stacked at every forward, so gradients flow back to each session's Parameters).
Each session's loss is its own mean NLL and the sum is backpropagated once: session s's weights touch only
its own rows, so its gradient is exactly that of its own loss (``tests/test_batch.py``: the reports and
weights match training the chunks one by one, up to float rounding). Batched together are LoRA fast weights
with the same layers, targets, rank and scale, on the same device, the same number of input tokens (chunk +
carried token) and the same context length, i.e. the steady state under load. Anything else (extra-MLP fast
weights, a document's last partial chunk, a session whose window is still filling) is a batch of one, which
runs on the session's own fast weights and context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.multi_lora import multi_lora_linear

from .cache import RollingContext
from .config import IngestConfig
from .fast_weights import FastWeights, LoRALayer
from .ingest import (
    ChunkReport,
    forward_hidden,
    next_token_nll,
    prefix_hidden,
    restore,
    snapshot,
    surprise_weighted_mean,
    update,
)
from .model import Transformer
from .pause import Cuts


@dataclass
class ChunkItem:
    """One session's next chunk and the state that trains on it."""

    fast: FastWeights
    optimizer: torch.optim.Optimizer
    context: RollingContext | None
    carry: torch.Tensor  # [0 or 1]: the previous chunk's last token, which predicts the chunk's first
    chunk: torch.Tensor  # [T]
    cfg: IngestConfig
    index: int

    @property
    def num_inputs(self) -> int:
        return self.carry.numel() + self.chunk.numel()


def batch_key(item: ChunkItem) -> Hashable | None:
    """Items with equal keys can share one batch; None: the item trains alone."""
    fast = item.fast
    if fast.kind != "lora" or item.num_inputs < 2:
        return None
    c = fast.cfg
    device = next(fast.parameters()).device
    context_length = -1 if item.context is None else item.context.length
    return (
        tuple(fast.layer_ids),
        c.targets,
        c.rank,
        c.scale,
        device,
        item.num_inputs,
        context_length,
        item.cfg.activation_checkpointing,
    )


class StackedContext:
    """Several sessions' RollingContexts of equal length, seen by the model as one batch (row i: session i)."""

    def __init__(self, contexts: list[RollingContext]):
        self.contexts = contexts

    @property
    def length(self) -> int:
        return self.contexts[0].length

    def extend(self, layer: int, k, v, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [S, kv_heads, T, head_dim]; each session records its own row, as in a forward of its own
        rows = [c.extend(layer, k[i : i + 1], v[i : i + 1], cos, sin) for i, c in enumerate(self.contexts)]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


class StackedLoRALayer:
    """One fast layer of several LoRA sessions (a ``model.LayerAdapter``): session i owns batch row i."""

    def __init__(self, layers: list[LoRALayer], seg_offsets: torch.Tensor):
        self.scale = layers[0].scale
        self.seg_offsets = seg_offsets  # [S + 1]: row i of the batch is flattened rows [i * T, (i + 1) * T)
        self.lora_a = {n: torch.stack([la.lora_A[n] for la in layers]) for n in layers[0].lora_A}  # [S, R, in]
        self.lora_b = {n: torch.stack([la.lora_B[n] for la in layers]) for n in layers[0].lora_B}  # [S, out, R]

    def linear(self, name: str, x: torch.Tensor, base) -> torch.Tensor:
        # x: [S, T, in] -> [S, T, out]
        if name not in self.lora_a:
            return base(x)
        y = multi_lora_linear(
            x.flatten(0, 1), base.weight, base.bias, self.lora_a[name], self.lora_b[name], self.seg_offsets, self.scale
        )
        return y.view(*x.shape[:2], -1)

    def after_block(self, h: torch.Tensor) -> torch.Tensor:
        return h


class StackedFastWeights:
    """Several sessions' LoRA fast weights as the one ``fast`` argument of ``ingest.forward_hidden``."""

    def __init__(self, fasts: list[FastWeights], tokens: int):
        self.fasts = fasts
        self.first_layer = fasts[0].first_layer
        device = next(fasts[0].parameters()).device
        self.seg_offsets = torch.arange(0, (len(fasts) + 1) * tokens, tokens, device=device)

    def adapters(self) -> dict[int, StackedLoRALayer]:
        # stacked afresh at every forward: the optimizers step the sessions' own Parameters in between
        return {
            i: StackedLoRALayer([f.per_layer[str(i)] for f in self.fasts], self.seg_offsets)
            for i in self.fasts[0].layer_ids
        }


@dataclass
class _Run:
    """One session's progress through its chunk."""

    item: ChunkItem
    params: list[torch.nn.Parameter]
    saved: tuple
    loss_before: float = math.nan
    grad_norm: float = math.nan
    loss_after: float | None = None
    error: str | None = None
    stepped: bool = False
    surprise: torch.Tensor | None = None


class _Group:
    """The chunks of one ``train_group`` call through its phases: score and step, measure, roll back, report."""

    def __init__(self, model: Transformer, items: list[ChunkItem]):
        self.model, self.items = model, items
        self.inputs = torch.stack([torch.cat([it.carry, it.chunk]) for it in items])  # [S, T']
        self.has_context = items[0].context is not None
        self.rows = list(range(len(items)))
        self.runs = []
        for it in items:
            params = [p for p in it.fast.parameters() if p.requires_grad]
            for group in it.optimizer.param_groups:  # the config is the source of truth (it may differ per stream)
                group["lr"] = it.cfg.lr
            self.runs.append(_Run(it, params, snapshot(params, it.optimizer)))
        # the frozen prefix of layers, once, without autograd: [S, T', D]
        self.h_prefix = prefix_hidden(model, self.inputs, items[0].fast.first_layer, self._context(self.rows))

    def _context(self, rows: list[int]):
        if len(self.items) == 1:  # one session: its own context, no stacking
            return self.items[0].context
        return StackedContext([self.items[i].context for i in rows]) if self.has_context else None

    def forward(self, rows: list[int], cuts: Cuts | None = None) -> torch.Tensor:
        """Final hidden states [len(rows), T', D] of the sessions in ``rows``; each context records its keys/values."""
        items = self.items
        fast = (
            items[0].fast
            if len(items) == 1
            else StackedFastWeights([items[i].fast for i in rows], self.inputs.shape[1])
        )
        checkpointing = items[0].cfg.activation_checkpointing
        return forward_hidden(
            self.model, fast, self.inputs[rows], self._context(rows), self.h_prefix[rows], checkpointing, cuts
        )

    def step(self, step: int) -> bool:
        """One optimizer step for every session still stepping (False when none is): scored first, at step 0
        that score is the honest loss_before."""
        items, runs = self.items, self.runs
        rows = [i for i in self.rows if runs[i].error is None and step < items[i].cfg.steps_per_chunk]
        if not rows:
            return False
        cuts = Cuts()  # the backward pauses between layers, as the forward does
        nll = next_token_nll(self.model, self.forward(rows, cuts), self.inputs[rows], cuts=cuts)  # [len(rows), T' - 1]
        losses = torch.stack(
            [surprise_weighted_mean(nll[j : j + 1], items[i].cfg.surprise_power)[0] for j, i in enumerate(rows)]
        )
        finite = []
        for j, (i, loss) in enumerate(zip(rows, nll.mean(dim=1).tolist(), strict=True)):
            if step == 0:
                runs[i].loss_before = loss
                # the chunk's tokens' surprise; a chunk without a carried token has nothing to predict its first
                runs[i].surprise = F.pad(nll[j].detach(), (items[i].chunk.numel() - nll.shape[1], 0)).cpu()
            if math.isfinite(loss):
                finite.append(j)
            else:
                runs[i].error = f"non-finite loss ({loss}) at step {step}"
        if finite:
            cuts.backward(losses[finite].sum())
        for j in finite:
            run = runs[rows[j]]
            run.grad_norm, run.error, stepped = update(run.params, run.item.optimizer, run.item.cfg, step)
            run.stepped |= stepped
        return True

    def measure_after(self) -> None:
        """loss_after, where the config asks for it; a non-finite one fails the chunk."""
        measured = [i for i in self.rows if self.items[i].cfg.measure_loss_after and self.runs[i].error is None]
        if not measured:
            return
        with torch.no_grad():
            after = next_token_nll(self.model, self.forward(measured), self.inputs[measured]).mean(dim=1).tolist()
        for i, loss in zip(measured, after, strict=True):
            if math.isfinite(loss):
                self.runs[i].loss_after = loss
            else:
                self.runs[i].error = f"non-finite loss after the update ({loss})"

    def roll_back(self) -> None:
        """Failed chunks that stepped get their weights and optimizer back (and their contexts re-recorded)."""
        undone = [i for i in self.rows if self.runs[i].error is not None and self.runs[i].stepped]
        for i in undone:
            restore(self.runs[i].params, self.items[i].optimizer, self.runs[i].saved)
        if undone and self.has_context:
            with torch.no_grad():  # re-record the contexts' keys/values under the restored weights
                self.forward(undone)

    def reports(self, seconds: float) -> list[ChunkReport]:
        """Commit the contexts and say what happened to each chunk."""
        out = []
        for run in self.runs:
            run.item.optimizer.zero_grad(set_to_none=True)
            if self.has_context:
                run.item.context.commit(drop_last=1)  # the last token is the next chunk's first input
            out.append(
                ChunkReport(
                    index=run.item.index,
                    tokens=run.item.chunk.numel(),
                    loss_before=run.loss_before,
                    loss_after=run.loss_after,
                    seconds=seconds,
                    grad_norm=run.grad_norm,
                    rolled_back=run.error is not None,
                    error=run.error,
                    surprise=run.surprise,
                )
            )
        return out


def train_group(model: Transformer, items: list[ChunkItem]) -> list[ChunkReport]:
    """Score, then train on, the chunks of ``items``: one item, or several with equal ``batch_key``."""
    t0 = time.perf_counter()
    group = _Group(model, items)
    for step in range(max(it.cfg.steps_per_chunk for it in items)):
        if not group.step(step):
            break
    group.measure_after()
    group.roll_back()
    return group.reports((time.perf_counter() - t0) / len(items))  # the batch's time, shared: the sum is the device's


def train_chunks(model: Transformer, items: Sequence[ChunkItem]) -> list[ChunkReport]:
    """Score, then train on, each item's chunk; one report per item, in order.

    Items with equal ``batch_key`` share one batch; the others are batches of one. The items must belong to
    distinct sessions.
    """
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        key = batch_key(item)
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    reports: list[ChunkReport | None] = [None] * len(items)
    for rows in groups.values():
        if items[rows[0]].num_inputs < 2:  # a lone first token: nothing to predict it from
            done = [ChunkReport(items[rows[0]].index, 1, math.nan, None, 0.0, 0.0)]
        else:
            done = train_group(model, [items[i] for i in rows])
        for i, report in zip(rows, done, strict=True):
            reports[i] = report
    return reports
