"""The pieces of an ingest step: forwards that backprop only through the fast layers, the fused loss, the
guarded optimizer step and its rollback. ``batch.train_chunks`` puts them together (the one step).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from kernels.cross_entropy import fused_linear_cross_entropy

from .cache import RollingContext
from .config import IngestConfig
from .fast_weights import FastWeights
from .model import Transformer


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
    # [tokens] NLL of each of the chunk's tokens before the update (0 where nothing predicts it): its surprise
    surprise: torch.Tensor | None = field(default=None, repr=False)


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


def surprise_weighted_mean(nll: torch.Tensor, power: float) -> torch.Tensor:
    """[B, T] per-token NLL -> [B] loss: token t weighs (nll_t / row mean) ** power (detached); 0: a plain mean."""
    if power == 0:
        return nll.mean(dim=1)
    w = (nll.detach() / nll.detach().mean(dim=1, keepdim=True).clamp_min(1e-6)) ** power
    return (w * nll).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)


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
