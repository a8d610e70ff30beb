"""The score-then-update step: one chunk of a document becomes gradient steps on fast weights.

For each chunk (with the preceding ``context_tokens`` as unlabelled context, held as cached keys and
values in a ``RollingContext`` so each token passes the model once):
  1. the frozen layers below the first fast layer run once, without autograd;
  2. the fast layers run with autograd; the first forward's loss is the chunk's honest score
     (its weights have not seen the chunk yet);
  3. clip the gradient norm, step; a non-finite loss, gradient or result is rolled back, never kept.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from kernels.cross_entropy import fused_linear_cross_entropy

from .config import IngestConfig
from .fast_weights import FastWeights
from .model import RollingContext, Transformer


@dataclass
class ChunkReport:
    """What one chunk did to a session."""

    index: int  # the chunk's number within the session, from 0
    tokens: int  # tokens in the chunk
    loss_before: float  # mean NLL of the chunk before any update on it (the honest score)
    loss_after: float | None  # mean NLL after the update(s); None when not measured
    seconds: float
    grad_norm: float  # before clipping, of the last step
    rolled_back: bool = False  # the chunk's update was undone (non-finite loss, gradient, weights or loss after)
    error: str | None = None  # why it was rolled back


def make_optimizer(params, cfg: IngestConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def token_nll(model: Transformer, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ``targets`` [B, T] from final hidden states ``h`` [B, T, D] -> [B, T] (fp32).

    The same as cross-entropy on ``model.logits(h)``, without ever holding the [B, T, V] logits
    (kernels/cross_entropy.py): at vocab 128256 and 4096 tokens that is gigabytes against megabytes.
    """
    return fused_linear_cross_entropy(model.norm(h), model.lm_head.weight, targets, reduction="none")


def prefix_hidden(model: Transformer, inputs: torch.Tensor, first_fast: int, context=None) -> torch.Tensor:
    """Hidden states after the frozen layers [0, first_fast): computed once per chunk, without autograd."""
    with torch.no_grad():
        return model.run_layers(model.embed(inputs), 0, first_fast, None, context)


def forward_hidden(
    model: Transformer,
    fast: FastWeights | None,
    inputs: torch.Tensor,
    context: RollingContext | None = None,
    h_prefix: torch.Tensor | None = None,
    checkpointing: str = "none",
) -> torch.Tensor:
    """Final hidden states [B, T, D] of ``inputs`` [B, T] after the ``context`` tokens.

    Layers below the first fast layer run without autograd (pass their output as ``h_prefix`` to
    reuse it across steps); only the fast layers build a graph, whose saved activations
    ``checkpointing`` ("none", "recompute", "offload": IngestConfig.activation_checkpointing) trims.
    """
    first = fast.first_layer if fast is not None else model.cfg.num_layers
    if h_prefix is None:
        h_prefix = prefix_hidden(model, inputs, first, context)
    adapters = fast.adapters() if fast is not None else None
    if checkpointing == "none" or not torch.is_grad_enabled():
        return model.run_layers(h_prefix, first, model.cfg.num_layers, adapters, context)
    h = h_prefix
    for i in range(first, model.cfg.num_layers):
        # Between forward and backward only the layer's input survives (in host memory when offloading:
        # the copy back to the device happens inside, so it is redone at recompute time); backward reruns
        # the layer. Its RollingContext.extend reruns too and records the same keys/values.
        x = h.to("cpu") if checkpointing == "offload" else h
        h = checkpoint(_run_layer, model, x, i, adapters, context, h.device, use_reentrant=False)
    return h


def _run_layer(model: Transformer, h: torch.Tensor, i: int, adapters, context, device) -> torch.Tensor:
    return model.run_layers(h.to(device), i, i + 1, adapters, context)


def next_token_nll(model: Transformer, h: torch.Tensor, inputs: torch.Tensor, start: int = 0) -> torch.Tensor:
    """NLL of inputs[:, start + 1:] each predicted from the hidden state before it -> [B, T - start - 1]."""
    return token_nll(model, h[:, start:-1], inputs[:, start + 1 :])


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def snapshot(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    """A copy of the weights and the optimizer state for ``restore`` (tiny next to a forward)."""
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def restore(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, saved) -> None:
    with torch.no_grad():
        for p, old in zip(params, saved[0], strict=True):
            p.copy_(old)
    optimizer.load_state_dict(saved[1])


def update(params, optimizer: torch.optim.Optimizer, cfg: IngestConfig, step: int) -> tuple[float, str | None, bool]:
    """Clip the gradients of ``params`` and step: (norm before clipping, why it failed or None, whether it stepped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
    if not math.isfinite(grad_norm):
        return grad_norm, f"non-finite gradient norm ({grad_norm}) at step {step}", False
    try:
        optimizer.step()
    except RuntimeError as e:  # e.g. an lr so large that torch refuses the arithmetic
        return grad_norm, f"optimizer step failed at step {step}: {e}", True
    optimizer.zero_grad(set_to_none=True)
    if not _all_finite(params):
        return grad_norm, f"non-finite weights after step {step}", True
    return grad_norm, None, True


def train_chunk(
    model: Transformer,
    fast: FastWeights,
    optimizer: torch.optim.Optimizer,
    context: RollingContext | None,
    carry: torch.Tensor,
    chunk: torch.Tensor,
    cfg: IngestConfig,
    index: int,
) -> ChunkReport:
    """Score, then train on, ``chunk`` [T].

    ``carry`` [0 or 1] is the previous chunk's last token: it predicts the chunk's first token.
    ``context`` holds the keys/values of the tokens before it and rolls forward over this chunk at the end.
    """
    t0 = time.perf_counter()
    inputs = torch.cat([carry, chunk])[None]  # [1, T'], every token after the first is a target
    h_prefix = prefix_hidden(model, inputs, fast.first_layer, context)
    params = [p for p in fast.parameters() if p.requires_grad]
    for group in optimizer.param_groups:  # the config is the source of truth (it may differ per stream)
        group["lr"] = cfg.lr
    # Restored if any step goes non-finite: a rolled-back chunk keeps none of its steps (tiny next to a forward).
    saved = snapshot(params, optimizer)
    loss_before, grad_norm, error, stepped = math.nan, math.nan, None, False

    for step in range(cfg.steps_per_chunk):
        h = forward_hidden(model, fast, inputs, context, h_prefix, cfg.activation_checkpointing)
        loss = next_token_nll(model, h, inputs).mean()
        if step == 0:
            loss_before = loss.item()
        if not math.isfinite(loss.item()):
            error = f"non-finite loss ({loss.item()}) at step {step}"
            break
        loss.backward()
        grad_norm, error, stepped_now = update(params, optimizer, cfg, step)
        stepped |= stepped_now
        if error is not None:
            break
    optimizer.zero_grad(set_to_none=True)

    loss_after = None
    if cfg.measure_loss_after and error is None:
        with torch.no_grad():
            h = forward_hidden(model, fast, inputs, context, h_prefix)
            loss_after = next_token_nll(model, h, inputs).mean().item()
        if not math.isfinite(loss_after):
            error, loss_after = f"non-finite loss after the update ({loss_after})", None
    if error is not None and stepped:
        # Finite weights can still make the loss non-finite: undo every step of the chunk, and re-record the
        # context's keys/values under the restored weights (the last forward's may be non-finite).
        restore(params, optimizer, saved)
        if context is not None:
            with torch.no_grad():
                forward_hidden(model, fast, inputs, context, h_prefix)
    if context is not None:
        context.commit(drop_last=1)  # the last token is the next chunk's first input
    return ChunkReport(
        index=index,
        tokens=chunk.numel(),
        loss_before=loss_before,
        loss_after=loss_after,
        seconds=time.perf_counter() - t0,
        grad_norm=grad_norm,
        rolled_back=error is not None,
        error=error,
    )
