"""Per-session settings: the one schema of what the fast weights are, how a document trains them and what a
session keeps to recall it.

Each setting is declared once, here, with its default, its documentation and its caps (``setting``): the
HTTP models, the gRPC mapping and the server's checks are derived from these fields (``SCHEMA``), so a new
setting is one field here (plus one proto field). Defaults were chosen by measurement on the default model
(README.md, "Choosing the defaults" and "Memory that answers"; ``bench/sweep.py`` and ``ttt recall``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

CHECKPOINTING_MODES = ("none", "recompute", "offload")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def setting(
    default,
    doc: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    max_length: int | None = None,
    per_chunk: bool = False,
):
    """A settings field: ``doc`` is its documentation (also in the OpenAPI schema); ``ge``/``le`` bound a
    number and ``max_length`` a string or list, so that one request cannot ask for an impossible allocation;
    ``per_chunk``: an ingest stream may change it for its own chunks (the others shape the session)."""
    meta = {"doc": doc, "ge": ge, "le": le, "max_length": max_length, "per_chunk": per_chunk}
    return field(default=default, metadata=meta)


def _finite(**values: float) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be finite")


@dataclass
class FastWeightConfig:
    """Which per-session weights sit on top of the frozen base model."""

    kind: str = setting(
        "lora", '"lora" or "mlp" (TTT-E2E\'s extra MLP): a key of fast_weights.FAST_WEIGHT_KINDS', max_length=64
    )
    layers: str = setting(
        "last_fraction:0.25", '"all", "last:N", "last_fraction:F" or layer indices "20,21,29"', max_length=1024
    )
    targets: tuple[str, ...] = setting(
        ("gate_proj", "up_proj", "down_proj"), "LoRA: the projections that get adapters", max_length=16
    )
    rank: int = setting(16, "LoRA rank", ge=1, le=1024)
    alpha: float = setting(32.0, "LoRA alpha (the delta is scaled by alpha / rank)")
    mlp_hidden: int = setting(256, "extra-MLP kind: hidden width of each layer's zero-initialised MLP", ge=1, le=16384)
    seed: int = setting(
        0, "initialisation of the fast weights (LoRA A, extra-MLP input projections)", ge=-(2**63), le=2**63 - 1
    )

    def __post_init__(self):
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in LINEAR_NAMES]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {LINEAR_NAMES}")
        if self.rank < 1 or self.mlp_hidden < 1:
            raise ValueError("rank and mlp_hidden must be >= 1")
        _finite(alpha=self.alpha)

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
            fraction = float(spec.removeprefix("last_fraction:"))
            if not 0 < fraction <= 1:  # also NaN; and 1e308 would overflow round()
                raise ValueError(f"layers {spec!r}: the fraction must be in (0, 1]")
            n = max(1, round(num_layers * fraction))
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

    chunk_tokens: int = setting(512, "tokens per chunk: each chunk is scored, then trained on", ge=2, le=1 << 16)
    context_tokens: int = setting(
        512, "preceding tokens given as unlabelled context (also the answers' window)", ge=0, le=1 << 16
    )
    sink_tokens: int = setting(
        4,
        "the document's first tokens kept in the context as attention sinks (StreamingLLM; cache.RollingContext)",
        ge=0,
        le=1 << 16,
    )
    steps_per_chunk: int = setting(1, "gradient steps per chunk", ge=1, le=100, per_chunk=True)
    optimizer: str = setting("adamw", '"adamw" or "sgd"', max_length=64)
    # 3e-3 is best for next-token prediction alone (off, fast); with balanced's extra updates 1.5e-3 keeps the
    # perplexity at the window's (docs/recall.md)
    lr: float = setting(3e-3, "learning rate", per_chunk=True)
    weight_decay: float = setting(0.0, "optimizer weight decay")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    max_grad_norm: float = setting(1.0, "gradient-norm clip; updates diverge without it", per_chunk=True)
    measure_loss_after: bool = setting(True, "one extra forward of the fast layers per chunk, for the report")
    activation_checkpointing: str = setting(
        "none",
        'what the fast layers keep for backward: "none" (every activation), "recompute" (each layer\'s '
        'input; the rest recomputed) or "offload" (as recompute, inputs in host memory)',
        max_length=64,
    )
    surprise_power: float = setting(
        0.0,
        "the next-token loss weighs token t by (nll_t / the chunk's mean nll) ** surprise_power "
        "(0: a plain mean; Titans' surprise)",
        ge=0,
        le=8,
    )

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
        if len(self.betas) != 2:
            raise ValueError("betas must be two numbers")
        _finite(weight_decay=self.weight_decay, beta1=self.betas[0], beta2=self.betas[1])
        if not 0 <= self.surprise_power < float("inf"):
            raise ValueError("surprise_power must be a finite number >= 0")


EXACT_SELECT = ("question", "surprise")


@dataclass
class RecallConfig:
    """What a session keeps so that it can answer about what left its window (``memory.py``, ``study.py``)."""

    exact_tokens: int = setting(
        128,
        "tokens of kept spans read verbatim by every answer (exact_select says which and where; 0: none)",
        ge=0,
        le=1 << 16,
    )
    exact_select: str = setting(
        "question",
        '"question": the kept spans that share the rarest words with the question, read right before it; '
        '"surprise": the most surprising kept spans, read before the window whatever is asked',
        max_length=16,
    )
    notes_alone: bool = setting(
        True,
        'an answer whose question finds notes (exact_select "question") reads them alone, with the base model: '
        "no window and no fast weights, whose next-token learning pulls answers toward the document's frequent "
        "names (false: the window, then the notes, under the fast weights)",
    )
    pool_tokens: int = setting(
        16384,
        "tokens of surprising spans kept in all, the exact ones and those rehearsed (at least exact_tokens)",
        ge=0,
        le=1 << 20,
    )
    spans_per_chunk: int = setting(
        12,
        "candidate spans (sentences, pieces of long ones) taken from each chunk by their peaks (a name, a number)",
        ge=1,
        le=64,
    )
    dense_spans_per_chunk: int = setting(
        8,
        "more candidate spans taken from each chunk by their density of surprise (the mean of their most "
        "surprising half): short facts, which never have as many peaks as a long sentence (0: none)",
        ge=0,
        le=64,
    )
    span_tokens: int = setting(24, "a span's longest length in tokens", ge=2, le=512)
    peak_tokens: int = setting(
        5, "a span's score: the summed NLL of its this-many most surprising tokens", ge=1, le=512
    )
    replay_spans: int = setting(8, "older spans rehearsed with each chunk's new ones", ge=0, le=256)
    replay_steps: int = setting(
        0, "gradient steps on the rehearsal batch after each chunk's step (0: none)", ge=0, le=100
    )
    replay_lr: float | None = setting(None, "the rehearsal's learning rate (null: the ingest lr)")
    study_spans: int = setting(
        0,
        "study: the chunk's this-many most surprising spans become templated "
        "questions answered by the model with the window in context, which the fast "
        "weights learn to answer without it (0: off)",
        ge=0,
        le=16,
    )
    study_top_k: int = setting(16, "study: teacher logits kept per answer token", ge=1, le=1024)

    @property
    def tokens_before_window(self) -> int:
        """Exact-span tokens every answer reads before the window, whatever is asked ("surprise"); spans chosen by
        the question go with its prompt instead."""
        return self.exact_tokens if self.exact_select == "surprise" else 0

    def __post_init__(self):
        counts = (
            self.exact_tokens,
            self.pool_tokens,
            self.dense_spans_per_chunk,
            self.replay_spans,
            self.replay_steps,
            self.study_spans,
        )
        if min(counts) < 0:
            raise ValueError(
                "exact_tokens, pool_tokens, dense_spans_per_chunk, replay_spans, replay_steps and study_spans "
                "must be >= 0"
            )
        if self.spans_per_chunk < 1 or self.span_tokens < 2 or self.peak_tokens < 1 or self.study_top_k < 1:
            raise ValueError("spans_per_chunk, peak_tokens and study_top_k must be >= 1, span_tokens >= 2")
        if self.exact_select not in EXACT_SELECT:
            raise ValueError(f"exact_select must be one of {', '.join(EXACT_SELECT)}")
        if self.replay_lr is not None and not 0 < self.replay_lr < float("inf"):
            raise ValueError("replay_lr must be a positive finite number (or null)")
        if self.study_spans and not self.replay_steps:
            raise ValueError("study_spans needs replay_steps >= 1 (study questions are learned in the rehearsal steps)")
        self.pool_tokens = max(self.pool_tokens, self.exact_tokens)


# Named trade-offs between ingest speed and recall: ``{"memory": name}`` starts a session from these settings,
# and any other setting given overrides them. No settings at all means DEFAULT_MEMORY (the dataclass defaults).
# Chosen by measurement: README.md, "Memory that answers" (``ttt recall``, ``ttt eval``).
REHEARSED_NOTES = {"pool_tokens": 2048, "spans_per_chunk": 4, "dense_spans_per_chunk": 2, "notes_alone": False}
PRESETS: dict[str, dict[str, dict]] = {
    # one step of next-token prediction per chunk, nothing else (the defaults before recall was measured)
    "off": {"recall": {"exact_tokens": 0, "pool_tokens": 0}},
    # as "off", plus the span memory and its exact spans (span selection costs next to nothing): the perplexity
    # of "off" (the weights learn only the text) and the needles of "balanced" (the exact spans read them back)
    "fast": {},
    # the fast weights learn the kept spans too (a second step per chunk, rehearsal), so they alone recall more,
    # at half the ingest speed and a perplexity no better than the window's; both keep the smaller pool and the
    # notes they were measured with (rehearsal draws its older spans from the pool: a larger one rehearses each
    # less often), read after the window under the fast weights that learned them
    "balanced": {
        "ingest": {"steps_per_chunk": 2, "lr": 1.5e-3},
        "recall": {"replay_steps": 1, **REHEARSED_NOTES, "exact_tokens": 512},
    },
    "deep": {
        "ingest": {"steps_per_chunk": 2},
        "recall": {**REHEARSED_NOTES, "exact_tokens": 1024, "pool_tokens": 4096, "replay_spans": 16, "replay_steps": 2},
    },
}
DEFAULT_MEMORY = "fast"
SECTIONS = {"fast": FastWeightConfig, "ingest": IngestConfig, "recall": RecallConfig}


@dataclass
class SettingSpec:
    """One field of ``SECTIONS``: what the doors derive their models and checks from."""

    section: str
    name: str
    type: object  # the field's annotation, resolved
    default: object
    doc: str
    ge: float | None
    le: float | None
    max_length: int | None
    per_chunk: bool


def _specs() -> list[SettingSpec]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            out.append(
                SettingSpec(
                    section,
                    f.name,
                    hints[f.name],
                    f.default,
                    m["doc"],
                    m["ge"],
                    m["le"],
                    m["max_length"],
                    m["per_chunk"],
                )
            )
    return out


SCHEMA: list[SettingSpec] = _specs()
PER_CHUNK = {s.name for s in SCHEMA if s.per_chunk and s.section == "ingest"}  # a stream may change them per chunk


def _type_name(annotation) -> str:
    """A field's type as JSON Schema names it ("integer", "number", "array", ...; "|null" when it may be null)."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", tuple: "array", type(None): "null"}
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) is not tuple else ()
    return "|".join(names[typing.get_origin(t) or t] for t in kinds or (annotation,))


def describe(spec: SettingSpec, default) -> dict:
    """One setting as plain data, for a form: ``default`` is the value a new session gets when it is not given."""
    return {
        "section": spec.section,
        "name": spec.name,
        "type": _type_name(spec.type),
        "default": default,
        "doc": spec.doc,
        "minimum": spec.ge,
        "maximum": spec.le,
        "max_length": spec.max_length,
        "per_chunk": spec.per_chunk,
    }


def merge(base: dict, override: dict) -> dict:
    """A partial SessionConfig dict (a request's settings) over another (the server's defaults), field by field.

    A preset the request names wins over the defaults' fields it sets (``{"memory": "off"}`` is off whatever
    the defaults say); the request's own fields win over both.
    """
    preset = PRESETS.get(override.get("memory")) if isinstance(override.get("memory"), str) else None
    out = {}
    for key, values in base.items():
        if isinstance(values, dict):
            out[key] = {f: v for f, v in values.items() if not preset or f not in preset.get(key, {})}
        else:
            out[key] = values
    for key, values in override.items():
        if isinstance(values, dict):
            out[key] = {**(out.get(key) or {}), **values}
        else:
            out[key] = values
    return out


def _check_types(section: str, values: dict) -> None:
    """A ValueError naming the field when a value has the wrong type (a float for an int, a list for a string)."""
    specs = {s.name: s for s in SCHEMA if s.section == section}
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None:
            continue  # an unknown field: the dataclass names it
        allowed = typing.get_args(spec.type) or (spec.type,)
        if typing.get_origin(spec.type) is tuple:
            ok = isinstance(value, (list, tuple))
        elif value is None:
            ok = type(None) in allowed
        elif isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
        else:
            ok = isinstance(value, tuple(t for t in allowed if isinstance(t, type)))
        if not ok:
            raise ValueError(f"{section}.{name} must be of type {spec.type}, not {type(value).__name__}")


def check_caps(settings: dict) -> dict:
    """``settings`` (a partial SessionConfig dict) if every value is within its field's caps; ValueError otherwise.

    The caps only keep one request from asking for an impossible allocation; the dataclasses check further.
    """
    specs = {(s.section, s.name): s for s in SCHEMA}
    for section, values in settings.items():
        for name, value in values.items() if isinstance(values, dict) else ():
            spec = specs.get((section, name))
            if spec is None:
                continue  # an unknown field: SessionConfig.from_dict names it
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section}.{name} must be a finite number")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and ((spec.ge is not None and value < spec.ge) or (spec.le is not None and value > spec.le)):
                raise ValueError(f"{section}.{name} must be between {spec.ge} and {spec.le}")
            if spec.max_length is not None and hasattr(value, "__len__") and len(value) > spec.max_length:
                raise ValueError(f"{section}.{name} is longer than {spec.max_length}")
    return settings


@dataclass
class SessionConfig:
    fast: FastWeightConfig = field(default_factory=FastWeightConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    recall: RecallConfig = field(default_factory=RecallConfig)
    memory: str = DEFAULT_MEMORY  # the preset these settings started from (PRESETS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> SessionConfig:
        """From a (possibly partial) dict such as ``{"memory": "fast", "ingest": {"lr": 1e-3}}``: the preset
        ``memory`` (default DEFAULT_MEMORY), then the given fields over it. Unknown keys are errors."""
        d = d or {}
        if not isinstance(d, dict):
            raise ValueError("session settings must be a mapping of sections")
        unknown = set(d) - {*SECTIONS, "memory"}
        if unknown:
            raise ValueError(f"unknown session config sections {sorted(unknown)}")
        memory = d.get("memory") or DEFAULT_MEMORY
        if not isinstance(memory, str) or memory not in PRESETS:
            raise ValueError(f"unknown memory preset {memory!r}; choose from {sorted(PRESETS)}")
        given = {}
        for s in SECTIONS:
            if not isinstance(d.get(s) or {}, dict):
                raise ValueError(f"settings section {s!r} must be a mapping of fields")
            _check_types(s, d.get(s) or {})
            given[s] = {**PRESETS[memory].get(s, {}), **(d.get(s) or {})}
        try:
            return cls(*(SECTIONS[s](**given[s]) for s in SECTIONS), memory)
        except TypeError as e:  # an unknown field name
            raise ValueError(f"bad session config: {e}") from None
