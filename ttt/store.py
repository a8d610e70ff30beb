"""Sessions on disk: safetensors + a JSON manifest with checksums, written atomically.

A session folder holds numbered checkpoints and a ``LATEST`` pointer::

    <session>/LATEST                 "ckpt-000007 <sha256 of its manifest.json>"
    <session>/ckpt-000007/manifest.json
                          fast_weights.safetensors   the session's weights (fp32)
                          optimizer.safetensors      optimizer state tensors
                          tokens.safetensors         recent window + untrained tokens
                          adapter/                   LoRA sessions: peft's adapter layout
    <session>/ckpt-000006/...        the previous checkpoint, kept as a fallback

A checkpoint is written into a temporary folder (each file fsynced), renamed into place, and only
then does ``LATEST`` (itself written to a temp file, fsynced and renamed) point at it. A crash at any
moment leaves ``LATEST`` naming a complete, verified checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import SessionConfig
from .session import SessionStats

if TYPE_CHECKING:
    from .engine import Engine
    from .session import Session

FORMAT = "ttt-session"
FORMAT_VERSION = 1
KEEP_CHECKPOINTS = 2
log = logging.getLogger(__name__)


class SessionFormatError(ValueError):
    """A saved session is missing, truncated, corrupted or of an unknown format."""


class BaseModelMismatch(ValueError):
    """A saved session was trained on a different base model than the one loaded."""


# ---- low-level atomic writes ---------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---- save ----------------------------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and the JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def peft_tensors(session: "Session") -> tuple[dict[str, torch.Tensor], dict]:
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


def export_peft(session: "Session", folder: str | os.PathLike) -> Path:
    """Write a LoRA session as a peft adapter folder (``PeftModel.from_pretrained`` loads it)."""
    if session.fast.kind != "lora":
        raise ValueError(f"only LoRA sessions have a peft form (this one is {session.fast.kind!r})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, adapter_config = peft_tensors(session)
    _write_file(folder / "adapter_model.safetensors", st_save(tensors))
    _write_file(folder / "adapter_config.json", json.dumps(adapter_config, indent=2).encode())
    return folder


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    return sorted((p for p in root.glob("ckpt-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def save_session(session: "Session", path: str | os.PathLike) -> Path:
    """Write a new checkpoint of ``session`` under folder ``path`` atomically; returns the checkpoint folder."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    existing = _checkpoints(root)
    number = int(existing[0].name.removeprefix("ckpt-")) + 1 if existing else 1
    final = root / f"ckpt-{number:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    try:
        files = {}
        fast_state = {k: v.detach().cpu().contiguous() for k, v in session.fast.state_dict().items()}
        files["fast_weights.safetensors"] = _write_file(tmp / "fast_weights.safetensors", st_save(fast_state))
        opt_tensors, opt_json = _optimizer_tensors(session.optimizer)
        files["optimizer.safetensors"] = _write_file(tmp / "optimizer.safetensors", st_save(opt_tensors))
        tokens = {
            "window": torch.tensor(session.window, dtype=torch.int64),
            "pending": torch.tensor(session.pending, dtype=torch.int64),
        }
        files["tokens.safetensors"] = _write_file(tmp / "tokens.safetensors", st_save(tokens))
        if session.fast.kind == "lora":
            (tmp / "adapter").mkdir()
            peft_state, adapter_config = peft_tensors(session)
            files["adapter/adapter_model.safetensors"] = _write_file(
                tmp / "adapter" / "adapter_model.safetensors", st_save(peft_state)
            )
            files["adapter/adapter_config.json"] = _write_file(
                tmp / "adapter" / "adapter_config.json", json.dumps(adapter_config, indent=2).encode()
            )
            _fsync_dir(tmp / "adapter")
        base = session.engine.base
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "session_id": session.id,
            "base_model": {"name": base.name, "fingerprint": base.fingerprint},
            "fast_weight_kind": session.fast.kind,
            "config": session.config.to_dict(),
            "stats": vars(session.stats),
            "document_ended": session.document_ended,
            "tokenizer_state": session.text_stream.state(),
            "optimizer": opt_json,
            "saved_at": time.time(),
            "files": files,
        }
        manifest_bytes = json.dumps(manifest, indent=2, allow_nan=True).encode()
        manifest_sum = _write_file(tmp / "manifest.json", manifest_bytes)["sha256"]
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "LATEST", f"{final.name} {manifest_sum}\n".encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(root)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- load ----------------------------------------------------------------------------------------


def _read_checked(ckpt: Path, name: str, files: dict) -> bytes:
    file = ckpt / name
    if not file.is_file():
        raise SessionFormatError(f"{file}: missing")
    data = file.read_bytes()
    expected = files.get(name)
    if expected is None:
        raise SessionFormatError(f"{ckpt / 'manifest.json'}: no checksum for {name}")
    if len(data) != expected["bytes"]:
        raise SessionFormatError(f"{file}: truncated or altered ({len(data)} bytes, manifest says {expected['bytes']})")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise SessionFormatError(f"{file}: checksum mismatch (corrupted)")
    return data


def read_manifest(ckpt: Path, expected_sha256: str | None = None) -> dict:
    file = ckpt / "manifest.json"
    if not file.is_file():
        raise SessionFormatError(f"{file}: missing")
    data = file.read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise SessionFormatError(f"{file}: checksum mismatch with LATEST (corrupted)")
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SessionFormatError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SessionFormatError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SessionFormatError(f"{file}: format_version {manifest.get('format_version')} is not supported")
    return manifest


def _load_checkpoint(engine: "Engine", ckpt: Path, manifest_sha256: str | None) -> "Session":
    from .session import Session

    manifest = read_manifest(ckpt, manifest_sha256)
    base = engine.base
    saved_base = manifest["base_model"]
    if saved_base["fingerprint"] != base.fingerprint:
        raise BaseModelMismatch(
            f"{ckpt}: session was trained on base model {saved_base['name']!r} "
            f"(fingerprint {saved_base['fingerprint']}), but this engine runs {base.name!r} ({base.fingerprint})"
        )
    files = manifest["files"]
    try:
        fast_state = st_load(_read_checked(ckpt, "fast_weights.safetensors", files))
        opt_tensors = st_load(_read_checked(ckpt, "optimizer.safetensors", files))
        tokens = st_load(_read_checked(ckpt, "tokens.safetensors", files))
    except SessionFormatError:
        raise
    except Exception as e:  # safetensors rejects a malformed header
        raise SessionFormatError(f"{ckpt}: unreadable safetensors ({e})") from None

    session = Session(engine, SessionConfig.from_dict(manifest["config"]), manifest["session_id"])
    device = base.device
    try:
        session.fast.load_state_dict({k: v.to(device) for k, v in fast_state.items()})
    except RuntimeError as e:
        raise SessionFormatError(f"{ckpt}: fast weights do not match the config ({e})") from None
    opt = manifest["optimizer"]
    state: dict[int, dict] = {}
    for key, value in [*opt_tensors.items(), *opt["scalars"].items()]:
        idx, name = key.split(".", 1)
        # As saved (CPU): load_state_dict moves moments to the parameters' device and keeps AdamW's
        # ``step`` on the CPU, as torch does (a CUDA step costs a host sync per parameter per step).
        state.setdefault(int(idx), {})[name] = value
    session.optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    session.window = tokens["window"].tolist()
    session.pending = tokens["pending"].tolist()
    session.document_ended = manifest["document_ended"]
    session.text_stream.load_state(manifest["tokenizer_state"])
    session.stats = SessionStats(**manifest["stats"])
    return session


def load_session(engine: "Engine", path: str | os.PathLike, fallback: bool = True) -> "Session":
    """Load the newest good checkpoint under ``path``.

    A corrupted newest checkpoint falls back to the previous one (logged) when ``fallback``; a session
    of another base model is refused outright.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no saved session there")
    candidates: list[tuple[Path, str | None]] = []
    latest = root / "LATEST"
    if latest.is_file():
        parts = latest.read_text().split()
        if len(parts) == 2 and parts[0].startswith("ckpt-"):
            candidates.append((root / parts[0], parts[1]))
    candidates += [(c, None) for c in _checkpoints(root) if all(c != p for p, _ in candidates)]
    if not candidates:
        raise FileNotFoundError(f"{root}: no checkpoint (LATEST and ckpt-* are missing)")
    errors = []
    for ckpt, manifest_sum in candidates:
        try:
            session = _load_checkpoint(engine, ckpt, manifest_sum)
        except SessionFormatError as e:
            errors.append(e)
            if not fallback:
                break
            continue
        if errors:
            log.warning("%s: loaded %s after: %s", root, ckpt.name, "; ".join(map(str, errors)))
        return session
    raise errors[0]
