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
from .pause import Cuts, changing, may_pause, pause_point

# Where a pause handler may run, the loss goes in pieces of this many logits (tokens x vocabulary): 170 tokens at
# SmolLM2's 49152 ids, whose forward or backward takes about 0.2 s on 2 CPU cores, like the rest of the chunk's
# longest stretches between pause points (half of it saved little more there and cost up to 20% in speed)
PAUSE_LOGITS = 1 << 23


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
        h = model.embed(inputs)
        rope = model.positions(h, context)  # once: the layers run one at a time, with pause points between
        for i in range(first_fast):
            pause_point()
            h = model.run_layers(h, i, i + 1, None, context, rope)
        return h


def forward_hidden(
    model: Transformer,
    fast: FastWeights | None,
    inputs: torch.Tensor,
    context: RollingContext | None = None,
    h_prefix: torch.Tensor | None = None,
    checkpointing: str = "none",
    cuts: Cuts | None = None,
) -> torch.Tensor:
    """Final hidden states [B, T, D] of ``inputs`` [B, T] after the ``context`` tokens.

    Layers below the first fast layer run without autograd (pass their output as ``h_prefix`` to
    reuse it across steps); only the fast layers build a graph, whose saved activations
    ``checkpointing`` ("none", "recompute", "offload": IngestConfig.activation_checkpointing) trims.
    A pause point comes before each layer; ``cuts`` cuts the graph between the fast layers, so that
    its backward pauses between them too.
    """
    first = fast.first_layer if fast is not None else model.cfg.num_layers
    if h_prefix is None:
        h_prefix = prefix_hidden(model, inputs, first, context)
    adapters = fast.adapters() if fast is not None else None
    recompute = checkpointing != "none" and torch.is_grad_enabled()
    rope = model.positions(h_prefix, context)  # once: the layers run one at a time, with pause points between
    h = h_prefix
    for i in range(first, model.cfg.num_layers):
        pause_point()
        if cuts is not None:
            h = cuts.cut(h)
        if not recompute:
            h = model.run_layers(h, i, i + 1, adapters, context, rope)
            continue
        # Between forward and backward only the layer's input survives (in host memory when offloading:
        # the copy back to the device happens inside, so it is redone at recompute time); backward reruns
        # the layer. Its RollingContext.extend reruns too and records the same keys/values.
        x = h.to("cpu") if checkpointing == "offload" else h
        h = checkpoint(_run_layer, model, x, i, adapters, context, rope, h.device, use_reentrant=False)
    return h


def _run_layer(model: Transformer, h: torch.Tensor, i: int, adapters, context, rope, device) -> torch.Tensor:
    return model.run_layers(h.to(device), i, i + 1, adapters, context, rope)


def next_token_nll(
    model: Transformer, h: torch.Tensor, inputs: torch.Tensor, start: int = 0, cuts: Cuts | None = None
) -> torch.Tensor:
    """NLL of inputs[:, start + 1:] each predicted from the hidden state before it -> [B, T - start - 1].

    Where a pause handler may run, the loss goes in pieces of about ``PAUSE_LOGITS`` logits with a pause point
    between them, cut apart by ``cuts`` when given (so that its backward pauses between them too)."""
    h, targets = h[:, start:-1], inputs[:, start + 1 :]
    if not may_pause():
        return token_nll(model, h, targets)
    cut = cuts.cut if cuts is not None else lambda x: x
    h = cut(h)
    step = max(1, PAUSE_LOGITS // (h.shape[0] * model.cfg.vocab_size))
    pieces = []
    for t in range(0, h.shape[1], step):
        pause_point()
        pieces.append(cut(token_nll(model, h[:, t : t + step], targets[:, t : t + step])))
    return torch.cat(pieces, dim=1)


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
    changing()  # answers made at pause points from here on would see these weights mid-step (ttt.pause)
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
