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
from .memory import MIN_SPAN_TOKENS
from .model import BaseModelMismatch
from .peft import peft_files
from .session import SessionInfo, SessionStats

if TYPE_CHECKING:
    from .engine import Engine
    from .session import Session

FORMAT = "ttt-session"
FORMAT_VERSION = 1
KEEP_CHECKPOINTS = 2
log = logging.getLogger(__name__)


class SessionFormatError(ValueError):
    """A saved session is missing, truncated, corrupted or of an unknown format."""


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


def export_peft(session: Session, folder: str | os.PathLike) -> Path:
    """Write a LoRA session as a peft adapter folder (``PeftModel.from_pretrained`` loads it)."""
    files = peft_files(session)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_file(folder / name, data)
    return folder


LATEST = "LATEST"  # names a session folder's newest complete checkpoint and its manifest's sha256


def has_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved session (a complete checkpoint that ``LATEST`` names)."""
    return (Path(folder) / LATEST).is_file()


def saved_sessions(root: str | os.PathLike, depth: int = 1) -> list[Path]:
    """The session folders with a checkpoint ``depth`` levels below ``root`` (2: ``root/<user>/<session>``)."""
    root = Path(root)
    return [p.parent for p in root.glob("/".join(["*"] * depth + [LATEST])) if p.is_file()] if root.is_dir() else []


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    return sorted((p for p in root.glob("ckpt-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def save_session(session: Session, path: str | os.PathLike) -> Path:
    """Write a new checkpoint of ``session`` under folder ``path`` atomically; returns the checkpoint folder."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-ckpt-*"):  # left by a save that crashed: saves of a session never overlap
        shutil.rmtree(stale, ignore_errors=True)
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
            **session.memory.tensors(),
        }
        files["tokens.safetensors"] = _write_file(tmp / "tokens.safetensors", st_save(tokens))
        if session.fast.kind == "lora":
            (tmp / "adapter").mkdir()
            for name, data in peft_files(session).items():
                files[f"adapter/{name}"] = _write_file(tmp / "adapter" / name, data)
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
        _write_atomic(root / LATEST, f"{final.name} {manifest_sum}\n".encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The checkpoints the load skipped as damaged go first, so that pruning keeps the good fallback, not them.
    damaged = [c for c in existing if c.name in session.damaged_checkpoints]
    for old in damaged + [c for c in _checkpoints(root) if c not in damaged][KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)
    session.damaged_checkpoints = []
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


def _load_checkpoint(engine: Engine, ckpt: Path, manifest_sha256: str | None) -> Session:
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

    session = Session(engine, SessionConfig.from_dict(saved_config(manifest)), manifest["session_id"])
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
    session.memory.load_tensors(tokens)
    session.document_ended = manifest["document_ended"]
    session.text_stream.load_state(manifest["tokenizer_state"])
    session.stats = SessionStats(**manifest["stats"])
    return session


def load_session(engine: Engine, path: str | os.PathLike, fallback: bool = True) -> Session:
    """Load the newest good checkpoint under ``path``.

    A corrupted newest checkpoint falls back to the previous one (logged) when ``fallback``; a session
    of another base model is refused outright.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no saved session there")
    candidates: list[tuple[Path, str | None]] = []
    latest = root / LATEST
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
            # Reported with the session, relative to its folder: a client never sees server paths.
            session.restored_from = ckpt.name
            session.damaged_checkpoints = [c.name for c, _ in candidates[: candidates.index((ckpt, manifest_sum))]]
            session.warnings = [str(e).replace(f"{root}{os.sep}", "") for e in errors]
        return session
    raise errors[0]


# ---- peft import ---------------------------------------------------------------------------------


def estimate_checkpoint_bytes(session: Session) -> int:
    """About what a checkpoint of ``session`` takes on disk once it has trained (for disk quotas)."""
    weights = session.fast.num_bytes()
    moments = 2 if session.config.ingest.optimizer == "adamw" else 0
    adapter = weights if session.fast.kind == "lora" else 0
    cfg = session.config
    # token ids (8 bytes each): window, pending and a chunk's worth more; the span pool's ids and, per span of
    # at least MIN_SPAN_TOKENS tokens, its length, position and score (8 bytes each)
    tokens = 8 * (cfg.ingest.context_tokens + len(session.pending) + cfg.ingest.chunk_tokens + cfg.recall.pool_tokens)
    tokens += 24 * (cfg.recall.pool_tokens // MIN_SPAN_TOKENS)
    return weights * (1 + moments) + adapter + tokens + 16 * 1024  # + manifest and headers


def saved_config(manifest: dict) -> dict:
    """A checkpoint's session config; one saved before recall settings existed trained by next-token prediction
    alone, with one step per chunk (the "off" preset)."""
    config = manifest["config"]
    return config if "recall" in config else {**config, "memory": "off"}


def saved_info(root: Path) -> dict:
    """``Session.info`` of the session saved under ``root`` (its newest checkpoint), without loading its weights:
    the manifest and ``tokens.safetensors`` (token ids only) are read."""
    from .memory import SpanMemory

    name, digest = (root / LATEST).read_text().split()
    manifest = read_manifest(root / name, digest)
    config = SessionConfig.from_dict(saved_config(manifest))
    stats = SessionStats(**manifest["stats"])
    try:
        tokens = st_load((root / name / "tokens.safetensors").read_bytes())
    except Exception:  # unreadable: loading says why (or falls back to the previous checkpoint)
        tokens = {}
    memory = SpanMemory(config.recall)
    memory.load_tensors(tokens)
    pending = len(tokens.get("pending", ()))
    window = min(config.ingest.context_tokens, len(tokens.get("window", ())) + pending)
    return SessionInfo.describe(
        manifest["session_id"],
        stats,
        pending_tokens=pending,
        document_bytes=manifest["tokenizer_state"].get("bytes_received", 0),
        fast_weight_bytes=0,
        memory=config.memory,
        memory_spans=len(memory.spans),
        exact_tokens_read=len(memory.exact_tokens(before=stats.tokens_ingested + pending - window)),
        resident_bytes=0,
        restored_from=None,
        warnings=[],
    )


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when absent), but those of crashed saves (removed by the next save)."""
    if not Path(path).is_dir():
        return 0
    return sum(
        f.stat().st_size
        for f in Path(path).rglob("*")
        if f.is_file() and not any(part.startswith(".tmp-ckpt-") for part in f.parts)
    )
