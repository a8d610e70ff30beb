"""Per-session fast weights on a shared frozen base model.

A kind is a ``FastWeights`` subclass holding one small module per fast layer; each module
implements ``model.LayerAdapter`` (``linear`` wraps a base projection, ``after_block`` adds to the
residual stream). Adding a kind is one class plus one line in ``FAST_WEIGHT_KINDS``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FastWeightConfig
from .model import RMSNorm, Transformer

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def projection(model: Transformer, layer: int, name: str) -> nn.Linear:
    block = model.layers[layer]
    return getattr(block.self_attn if name in ATTENTION_NAMES else block.mlp, name)


def module_path(layer: int, name: str) -> str:
    """The projection's module path in transformers' Llama naming (used by the peft export)."""
    return f"model.layers.{layer}.{'self_attn' if name in ATTENTION_NAMES else 'mlp'}.{name}"


class LoRALayer(nn.Module):
    """Low-rank deltas on chosen projections of one layer: y = W x + scale * B (A x)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        self.scale = scale
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (out_f, in_f) in shapes.items():
            # Kaiming-uniform A (as nn.Linear and peft do) and zero B: the delta starts at exactly zero.
            bound = 1.0 / math.sqrt(in_f)
            self.lora_A[name] = nn.Parameter(torch.empty(rank, in_f).uniform_(-bound, bound, generator=gen))
            self.lora_B[name] = nn.Parameter(torch.zeros(out_f, rank))

    def linear(self, name: str, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        # x: [B, T, in] -> [B, T, out]
        y = base(x)
        if name in self.lora_A:
            a, b = self.lora_A[name], self.lora_B[name]
            y = y + self.scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return y

    def after_block(self, h: torch.Tensor) -> torch.Tensor:
        return h


class ExtraMLPLayer(nn.Module):
    """TTT-E2E's layout: a zero-initialised gated MLP added to the residual stream after the layer."""

    def __init__(self, dim: int, hidden: int, eps: float, gen: torch.Generator):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.norm = RMSNorm(dim, eps)
        self.gate = nn.Parameter(torch.empty(hidden, dim).uniform_(-bound, bound, generator=gen))
        self.up = nn.Parameter(torch.empty(hidden, dim).uniform_(-bound, bound, generator=gen))
        self.down = nn.Parameter(torch.zeros(dim, hidden))  # zero: the layer starts as the identity

    def linear(self, name: str, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        return base(x)

    def after_block(self, h: torch.Tensor) -> torch.Tensor:
        # h: [B, T, D]
        dt = h.dtype
        x = self.norm(h).to(dt)  # the norm's weight is fp32; keep the base dtype
        return h + F.linear(F.silu(F.linear(x, self.gate.to(dt))) * F.linear(x, self.up.to(dt)), self.down.to(dt))


class FastWeights(nn.Module):
    """One session's fast weights: a module per fast layer, kept in fp32 whatever the base dtype."""

    kind = ""

    def __init__(self, cfg: FastWeightConfig, model: Transformer):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = cfg.layer_indices(model.cfg.num_layers)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.per_layer = nn.ModuleDict({str(i): self.make_layer(model, i, gen) for i in self.layer_ids})

    def make_layer(self, model: Transformer, layer: int, gen: torch.Generator) -> nn.Module:
        raise NotImplementedError

    @property
    def first_layer(self) -> int:
        """Backprop stops here: layers before it run once, without autograd."""
        return self.layer_ids[0]

    def adapters(self) -> dict[int, nn.Module]:
        return {i: self.per_layer[str(i)] for i in self.layer_ids}

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @classmethod
    def count_parameters(cls, cfg: FastWeightConfig, model: Transformer) -> int:
        """How many parameters ``cls(cfg, model)`` would hold, without allocating them."""
        return len(cfg.layer_indices(model.cfg.num_layers)) * cls.layer_parameters(cfg, model)

    @classmethod
    def layer_parameters(cls, cfg: FastWeightConfig, model: Transformer) -> int:
        raise NotImplementedError


class LoRAFastWeights(FastWeights):
    kind = "lora"

    def make_layer(self, model, layer, gen):
        shapes = {n: tuple(projection(model, layer, n).weight.shape) for n in self.cfg.targets}
        return LoRALayer(shapes, self.cfg.rank, self.cfg.scale, gen)

    @classmethod
    def layer_parameters(cls, cfg, model):
        # every layer of a Llama has the same projection shapes: layer 0's stand for all
        return sum(cfg.rank * sum(projection(model, 0, n).weight.shape) for n in cfg.targets)


class ExtraMLPFastWeights(FastWeights):
    kind = "mlp"

    def make_layer(self, model, layer, gen):
        return ExtraMLPLayer(model.cfg.hidden_size, self.cfg.mlp_hidden, model.cfg.rms_norm_eps, gen)

    @classmethod
    def layer_parameters(cls, cfg, model):
        d = model.cfg.hidden_size
        return 3 * cfg.mlp_hidden * d + d  # gate, up, down and the norm's weight


FAST_WEIGHT_KINDS: dict[str, type[FastWeights]] = {k.kind: k for k in (LoRAFastWeights, ExtraMLPFastWeights)}


def fast_weight_kind(cfg: FastWeightConfig) -> type[FastWeights]:
    if cfg.kind not in FAST_WEIGHT_KINDS:
        raise ValueError(f"unknown fast-weight kind {cfg.kind!r}; choose from {sorted(FAST_WEIGHT_KINDS)}")
    return FAST_WEIGHT_KINDS[cfg.kind]


def build_fast_weights(cfg: FastWeightConfig, model: Transformer) -> FastWeights:
    """Fresh fast weights of ``cfg.kind`` for ``model``, on the model's device, in fp32."""
    fast = fast_weight_kind(cfg)(cfg, model)
    return fast.to(model.embed_tokens.weight.device)
