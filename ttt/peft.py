"""Sessions as peft LoRA adapters and back: the layout ``PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained`` loads, checked against what our fast weights can express. ``ttt.store.export_peft``
writes one as a folder."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import FastWeightConfig, SessionConfig
from .model import BaseModelMismatch

if TYPE_CHECKING:
    from .engine import Engine
    from .session import Session

FINGERPRINT_KEY = "ttt_base_fingerprint"  # in the metadata of an exported adapter_model.safetensors


def peft_tensors(session: Session) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA session's weights and config in peft's adapter layout (keys as ``PeftModel`` saves them)."""
    from .fast_weights import module_path

    fast, cfg = session.fast, session.config.fast
    tensors = {}
    for layer in fast.layer_ids:
        lora = fast.per_layer[str(layer)]
        for name in cfg.targets:
            prefix = f"base_model.model.{module_path(layer, name)}"
            tensors[f"{prefix}.lora_A.weight"] = lora.lora_A[name].detach().cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = lora.lora_B[name].detach().cpu().contiguous()
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(session.engine.base.path),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(cfg.targets),
        "layers_to_transform": list(fast.layer_ids),
        "layers_pattern": "layers",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    return tensors, adapter_config


def peft_files(session: Session) -> dict[str, bytes]:
    """``adapter_model.safetensors`` and ``adapter_config.json`` of a LoRA session, as bytes.

    The safetensors metadata also names the base model's fingerprint (peft ignores it; ``import_peft``
    checks it).
    """
    if session.fast.kind != "lora":
        raise ValueError(f"only LoRA sessions have a peft form (this one is {session.fast.kind!r})")
    tensors, adapter_config = peft_tensors(session)
    metadata = {FINGERPRINT_KEY: session.engine.base.fingerprint}  # one key: safetensors orders keys at random
    return {
        "adapter_model.safetensors": st_save(tensors, metadata=metadata),
        "adapter_config.json": json.dumps(adapter_config, indent=2).encode(),
    }


# A LoRA weight in peft's saved layout: base_model.model.model.layers.<layer>.<self_attn|mlp>.<proj>.lora_<A|B>.weight
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """A peft adapter that is malformed or that our fast weights cannot express."""


def _adapter_error(problem: str) -> AdapterError:
    return AdapterError(f"peft adapter: {problem}")


def peft_session_config(adapter_config: dict, tensors: dict[str, torch.Tensor]) -> FastWeightConfig:
    """The FastWeightConfig a peft LoRA adapter maps onto; refuses what our LoRA cannot express."""
    c = adapter_config
    if str(c.get("peft_type", "")).upper() != "LORA":
        raise _adapter_error(f"peft_type {c.get('peft_type')!r} is not supported (LORA only)")
    unsupported = {
        "use_dora": bool(c.get("use_dora")),
        "bias": c.get("bias", "none") != "none",
        "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
        "modules_to_save": bool(c.get("modules_to_save")),
        "rank_pattern": bool(c.get("rank_pattern")),
        "alpha_pattern": bool(c.get("alpha_pattern")),
    }
    if any(unsupported.values()):
        raise _adapter_error(f"unsupported options {sorted(k for k, v in unsupported.items() if v)}")
    weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = PEFT_KEY.match(key)
        if m is None:
            raise _adapter_error(f"unexpected tensor {key!r} (expected LoRA A/B weights of Llama layers)")
        weights.setdefault((int(m[1]), m[2]), {})[m[3]] = value
    if not weights:
        raise _adapter_error("no LoRA weights")
    layers = sorted({layer for layer, _ in weights})
    targets = sorted({name for _, name in weights})
    missing = [f"{layer}.{name}" for layer in layers for name in targets if len(weights.get((layer, name), {})) != 2]
    if missing:  # our LoRA puts the same projections on every fast layer
        raise _adapter_error(f"every layer needs A and B of the same projections ({targets}); missing {missing[:5]}")
    rank, alpha = c.get("r"), c.get("lora_alpha", c.get("r"))
    if type(rank) is not int or rank < 1:  # bool is an int too
        raise _adapter_error(f"r must be a positive integer, not {rank!r}")
    if type(alpha) not in (int, float):
        raise _adapter_error(f"lora_alpha must be a number, not {alpha!r}")
    if any(t.dim() != 2 for w in weights.values() for t in w.values()):
        raise _adapter_error("LoRA A and B weights must be matrices")
    if any(w["A"].shape[0] != rank or w["B"].shape[1] != rank for w in weights.values()):
        raise _adapter_error(f"tensor ranks do not match r={rank}")
    alpha = float(alpha)
    if c.get("use_rslora"):  # peft scales by alpha / sqrt(r); ours is alpha / r
        alpha *= math.sqrt(rank)
    try:
        layer_list = ",".join(map(str, layers))
        return FastWeightConfig(kind="lora", layers=layer_list, targets=tuple(targets), rank=rank, alpha=alpha)
    except ValueError as e:
        raise _adapter_error(str(e)) from None


def import_peft(
    engine: Engine, files: dict[str, bytes], session_id: str | None = None, settings: dict | None = None
) -> Session:
    """A new session whose fast weights are a peft LoRA adapter.

    ``files``: the bytes of ``adapter_config.json`` and ``adapter_model.safetensors`` (as
    ``export_peft`` or peft's ``save_pretrained`` write them). The optimizer starts fresh; ``settings`` is a
    partial SessionConfig dict without "fast" (memory preset, ingest and recall settings for the session's
    later documents: the fast weights are the adapter's). Refuses non-LoRA adapters,
    shapes that do not fit the base model, and an adapter made for another base model.
    """
    from .session import Session

    try:
        adapter_config = json.loads(files["adapter_config.json"])
        data = files["adapter_model.safetensors"]
        tensors = st_load(data)
        metadata = safe_metadata(data)
    except KeyError as e:
        raise _adapter_error(f"missing {e.args[0]}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _adapter_error(f"adapter_config.json is not valid JSON ({e})") from None
    except Exception as e:  # safetensors rejects a malformed header
        raise _adapter_error(f"adapter_model.safetensors is unreadable ({e})") from None
    if not isinstance(adapter_config, dict):
        raise _adapter_error("adapter_config.json must be a JSON object")

    base = engine.base
    fingerprint = metadata.get(FINGERPRINT_KEY)
    # peft records the base model's path or hub name; only its last component can be compared across machines.
    named = Path(str(adapter_config.get("base_model_name_or_path") or "")).name
    if (fingerprint and fingerprint != base.fingerprint) or (not fingerprint and named and named != base.name):
        made_for = f"{named or '?'!r}" + (f" (fingerprint {fingerprint})" if fingerprint else "")
        raise BaseModelMismatch(
            f"the adapter was made for base model {made_for}, but this engine runs {base.name!r} ({base.fingerprint})"
        )
    fast_cfg = peft_session_config(adapter_config, tensors)
    if (settings or {}).get("fast"):
        raise ValueError("fast-weight settings come from the adapter: send only memory, ingest and recall settings")
    config = dataclasses.replace(SessionConfig.from_dict(settings), fast=fast_cfg)
    try:
        fast_cfg.layer_indices(base.cfg.num_layers)
    except ValueError:
        n = base.cfg.num_layers
        raise _adapter_error(f"layers {fast_cfg.layers} do not all exist in the base model ({n} layers)") from None
    session = Session(engine, config, session_id)
    state = {}
    for key, value in tensors.items():
        m = PEFT_KEY.match(key)
        state[f"per_layer.{m[1]}.lora_{m[3]}.{m[2]}"] = value.to(torch.float32)
    own = session.fast.state_dict()
    wrong = [k for k, v in state.items() if own[k].shape != v.shape]
    if wrong:
        raise _adapter_error(f"shapes do not match the base model: {wrong[:3]}")
    session.fast.load_state_dict({k: v.to(base.device) for k, v in state.items()})
    return session


def safe_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}
