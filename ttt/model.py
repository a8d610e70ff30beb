"""The frozen base model: a Llama-family decoder read from a Hugging Face folder.

Our own forward (not transformers') so that the engine can
  * run the frozen prefix of layers once without autograd and backprop only through the fast layers,
  * thread per-session fast weights through any layer (see ``fast_weights.py``),
  * hand the final hidden states to a fused loss without materialising logits.
``tests/test_model.py`` checks it logit-for-logit against transformers on tiny configs.

Shapes in comments:
  B   rows of a batch: sessions training together, or answers decoding together
  S   sessions stacked in one batched step (``ttt.batch``: B == S there)
  T   new tokens in this forward (a chunk, a prompt piece, one decoded token)
  P   prefix tokens already cached before them (window, sinks, exact spans); keys span P + T
  C   a cache's capacity in tokens
  D   hidden size; H / kvh query / key-value heads; hd head_dim (D == H * hd)
  V   vocabulary size
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from kernels.attention import chunk_attention

from .cache import KVCache, RaggedCache, RollingContext, apply_rope

# Architectures whose checkpoints use Llama's module names and math (q/k/v/o, gate/up/down, RMSNorm, RoPE).
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class BaseModelMismatch(ValueError):
    """Weights made for a different base model than the one loaded (a saved session, a peft adapter)."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases
    o_proj_bias: bool = False  # Llama and Qwen3 tie it to attention_bias; Qwen2 has q/k/v biases only
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 normalises q and k per head
    sliding_window: int | None = None  # Mistral: each token attends to at most this many (itself included)
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """From a transformers ``PretrainedConfig``."""
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {hf.model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        if getattr(hf, "use_sliding_window", False):
            raise ValueError("per-layer sliding windows (use_sliding_window) are not supported")
        heads = hf.num_attention_heads
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", hf.model_type == "qwen2")),
            o_proj_bias=hf.model_type != "qwen2" and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=hf.model_type == "qwen3",
            sliding_window=getattr(hf, "sliding_window", None) if hf.model_type == "mistral" else None,
            model_type=hf.model_type,
        )


class LayerAdapter(Protocol):
    """What a fast-weight kind plugs into one decoder layer (see ``fast_weights.py``)."""

    def linear(self, name: str, x: torch.Tensor, base: nn.Linear) -> torch.Tensor: ...

    def after_block(self, h: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(
        self, x, rope, adapter: LayerAdapter | None, cache: KVCache | RaggedCache | RollingContext | None, layer: int
    ):
        # x: [B, T, D]; rope: (cos, sin) each [past + T, head_dim], past = tokens already in the cache
        B, T, _ = x.shape
        cfg = self.cfg
        lin = adapter.linear if adapter is not None else _plain_linear
        q = lin("q_proj", x, self.q_proj).view(B, T, cfg.num_heads, cfg.head_dim)
        k = lin("k_proj", x, self.k_proj).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = lin("v_proj", x, self.v_proj).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        if isinstance(cache, RaggedCache):  # answers of different lengths in one batch
            y = cache.attend(layer, q, k, v, rope, cfg.sliding_window)
            return lin("o_proj", y.transpose(1, 2).reshape(B, T, -1), self.o_proj)
        cos, sin = rope
        past = cache.length if cache is not None else 0
        q = apply_rope(q, cos[past:], sin[past:])
        if cache is None:
            k = apply_rope(k, cos, sin)
        else:
            k, v = cache.extend(layer, k, v, cos, sin)
        # With a cache, the T new queries see all `past` keys plus a causal triangle over themselves
        # (SDPA, or on CUDA the Triton kernel where a mask would be needed: kernels/attention.py).
        y = chunk_attention(q, k, v, cfg.sliding_window)
        y = y.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)
        return lin("o_proj", y, self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x, adapter: LayerAdapter | None):
        lin = adapter.linear if adapter is not None else _plain_linear
        return lin(
            "down_proj", F.silu(lin("gate_proj", x, self.gate_proj)) * lin("up_proj", x, self.up_proj), self.down_proj
        )


def _plain_linear(name: str, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
    return base(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, rope, adapter=None, cache=None, layer=0):
        h = h + self.self_attn(self.input_layernorm(h), rope, adapter, cache, layer)
        h = h + self.mlp(self.post_attention_layernorm(h), adapter)
        if adapter is not None:
            h = adapter.after_block(h)
        return h


class Transformer(nn.Module):
    """Decoder-only LM. Module names follow transformers' Llama, so checkpoints load by name."""

    def __init__(self, cfg: ModelConfig, inv_freq: torch.Tensor, rope_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scale = rope_scale

    def rope(self, start: int, length: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [start, start + length): each [length, head_dim]."""
        pos = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def positions(self, h: torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the cache's tokens and h's [B, T, D] after them: what every layer of one forward reads."""
        past = cache.length if cache is not None else 0
        return self.rope(0, past + h.shape[1], h.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def run_layers(
        self,
        h: torch.Tensor,
        start: int,
        end: int,
        adapters: dict[int, LayerAdapter] | None = None,
        cache: KVCache | RaggedCache | RollingContext | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Layers [start, end) on hidden states h: [B, T, D], after the cache's tokens if one is given.
        ``rope``: ``positions(h, cache)``, passed in by a caller that runs one forward a few layers at a time."""
        rope = rope if rope is not None else self.positions(h, cache)
        adapters = adapters or {}
        for i in range(start, end):
            h = self.layers[i](h, rope, adapters.get(i), cache, i)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [B, T, D] -> [B, T, V] (fp32)."""
        return self.lm_head(self.norm(h)).float()

    def forward(
        self, tokens, adapters=None, cache: KVCache | RaggedCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """tokens: [B, T] -> logits [B, T, V] (``last_only``: [B, 1, V], the last position's)."""
        h = self.run_layers(self.embed(tokens), 0, self.cfg.num_layers, adapters, cache)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.logits(h[:, -1:] if last_only else h)


@dataclass
class BaseModel:
    """The frozen model every session shares, with its tokenizer and identity."""

    model: Transformer
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    path: Path
    name: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The dtypes a base model loads in, by the names settings and flags use ("auto": bf16 on CUDA, fp32 on CPU).
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def model_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype: a name of ``DTYPES``, a torch dtype, or None for the device's default."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        dtype = DTYPES[dtype]
    return dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def fingerprint_checkpoint(path: Path, sample_bytes: int = 1 << 16) -> str:
    """A stable id of a checkpoint's weights that does not depend on the dtype we load them in.

    Hashes config.json plus every safetensors header (names, shapes, dtypes) and evenly spaced
    samples of the raw tensor bytes: cheap (about 1 MB read) yet different for any retrained model.
    """
    h = hashlib.sha256()
    cfg = json.loads((path / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        h.update(f"{key}={cfg.get(key)};".encode())
    for file in sorted(path.glob("*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(header_len))
            for i in range(16):
                f.seek(8 + header_len + (size - 8 - header_len) * i // 16)
                h.update(f.read(sample_bytes // 16))
    return h.hexdigest()[:32]


def _rope(hf_cfg, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and attention scale, as transformers computes them for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_params = getattr(hf_cfg, "rope_parameters", None) or {}
    rope_type = rope_params.get("rope_type", "default")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, torch.device("cpu"))
    theta = rope_params.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    return 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)), 1.0


def _checkpoint_state(path: Path, files: list[Path], model: Transformer, dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our module names; ValueError unless they are exactly the model's."""
    cfg, state = model.cfg, {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle is not iterable)
                state[key.removeprefix("model.")] = f.get_tensor(key).to(dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints store it
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        # A weight we would silently drop or leave random means the architecture is not what we think.
        raise ValueError(
            f"{path}: checkpoint does not match a {cfg.model_type} model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return state


def load_base_model(
    model_path: str | os.PathLike | None = None, device=None, dtype: torch.dtype | str | None = None
) -> BaseModel:
    """Load a local Hugging Face causal-LM folder (config + safetensors + tokenizer).

    ``model_path=None`` means the embedded default (SmolLM2-135M-Instruct, converted once into the cache).
    CUDA loads in bf16, CPU in fp32, unless ``dtype`` (a torch dtype or a name of ``DTYPES``) says otherwise.
    """
    from transformers import AutoConfig, AutoTokenizer

    from .default_model import default_model_dir

    path = Path(model_path) if model_path is not None else default_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    device = torch.device(device) if device is not None else default_device()
    dtype = model_dtype(dtype, device)

    hf_cfg = AutoConfig.from_pretrained(path)
    cfg = ModelConfig.from_hf(hf_cfg)
    inv_freq, rope_scale = _rope(hf_cfg, cfg)
    with torch.device("meta"):
        model = Transformer(cfg, torch.empty(cfg.head_dim // 2), rope_scale)
    model.load_state_dict(_checkpoint_state(path, files, model, dtype), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = inv_freq.float()
    model.to(device).eval().requires_grad_(False)

    tokenizer = AutoTokenizer.from_pretrained(path)
    fingerprint = fingerprint_checkpoint(path)
    return BaseModel(model, tokenizer, path, path.name, fingerprint, device, dtype)
