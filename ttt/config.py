"""Per-session settings: what the fast weights are, and how a document trains them.

Defaults were chosen by measurement on the default model (see README.md, "Choosing the defaults",
and ``bench/sweep.py`` which reproduces it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

CHECKPOINTING_MODES = ("none", "recompute", "offload")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FastWeightConfig:
    """Which per-session weights sit on top of the frozen base model."""

    kind: str = "lora"  # a key of fast_weights.FAST_WEIGHT_KINDS: "lora" or "mlp" (TTT-E2E's extra MLP)
    # "all", "last:N" (the last N layers), "last_fraction:F" or a comma list of layer indices "20,21,29".
    layers: str = "last_fraction:0.25"
    # LoRA: which projections get adapters.
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    rank: int = 16
    alpha: float = 32.0
    mlp_hidden: int = 256  # extra-MLP kind: hidden width of each layer's zero-initialised MLP
    seed: int = 0  # initialisation of the fast weights (LoRA A, extra-MLP input projections)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in LINEAR_NAMES]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {LINEAR_NAMES}")
        if self.rank < 1 or self.mlp_hidden < 1:
            raise ValueError("rank and mlp_hidden must be >= 1")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_indices(self, num_layers: int) -> list[int]:
        """The fast layers, ascending, for a model with ``num_layers`` layers."""
        spec = self.layers.strip()
        if spec == "all":
            idx = list(range(num_layers))
        elif spec.startswith("last:"):
            n = int(spec.removeprefix("last:"))
            idx = list(range(max(0, num_layers - n), num_layers))
        elif spec.startswith("last_fraction:"):
            n = max(1, round(num_layers * float(spec.removeprefix("last_fraction:"))))
            idx = list(range(num_layers - n, num_layers))
        else:
            try:
                idx = sorted({int(i) for i in spec.split(",")})
            except ValueError:
                raise ValueError(
                    f"bad layers spec {spec!r}: use 'all', 'last:N', 'last_fraction:F' or '1,2,3'"
                ) from None
        if not idx or idx[0] < 0 or idx[-1] >= num_layers:
            raise ValueError(f"layers {spec!r} selects no valid layer of a {num_layers}-layer model")
        return idx


@dataclass
class IngestConfig:
    """How each chunk of a document becomes a gradient step."""

    chunk_tokens: int = 512  # tokens per chunk: each chunk is scored, then trained on
    context_tokens: int = 512  # preceding tokens given as unlabelled context (also the query window)
    # The document's first tokens stay in the context as attention sinks (StreamingLLM); see model.RollingContext.
    sink_tokens: int = 4
    steps_per_chunk: int = 1
    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # gradient-norm clip; updates diverge without it
    measure_loss_after: bool = True  # one extra forward of the fast layers per chunk, for the report
    # What the fast layers keep for backward: "none" (every activation), "recompute" (only each layer's input;
    # the rest is recomputed in backward: torch.utils.checkpoint) or "offload" (as recompute, with those inputs
    # in host memory; the same as recompute on CPU). For long chunks on large models; see bench/kernels.py.
    activation_checkpointing: str = "none"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.chunk_tokens < 2:
            raise ValueError("chunk_tokens must be >= 2")
        if self.context_tokens < 0 or self.sink_tokens < 0 or self.steps_per_chunk < 1:
            raise ValueError("context_tokens and sink_tokens must be >= 0, steps_per_chunk >= 1")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r}: choose 'adamw' or 'sgd'")
        if self.activation_checkpointing not in CHECKPOINTING_MODES:
            mode = self.activation_checkpointing
            raise ValueError(f"activation_checkpointing {mode!r}: choose from {CHECKPOINTING_MODES}")
        if not 0 < self.lr < float("inf") or not 0 < self.max_grad_norm < float("inf"):
            raise ValueError("lr and max_grad_norm must be positive finite numbers")


@dataclass
class SessionConfig:
    fast: FastWeightConfig = field(default_factory=FastWeightConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> SessionConfig:
        """From a (possibly partial) dict such as ``{"ingest": {"lr": 1e-3}}``; unknown keys are errors."""
        d = d or {}
        unknown = set(d) - {"fast", "ingest"}
        if unknown:
            raise ValueError(f"unknown session config sections {sorted(unknown)}")
        try:
            return cls(FastWeightConfig(**d.get("fast", {})), IngestConfig(**d.get("ingest", {})))
        except TypeError as e:  # an unknown field name
            raise ValueError(f"bad session config: {e}") from None
