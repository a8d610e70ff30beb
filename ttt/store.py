"""Sessions on disk: safetensors + a JSON manifest with checksums, written atomically.

A session folder holds numbered checkpoints and a ``LATEST`` pointer::

    <session>/LATEST                 "ckpt-000007 <sha256 of its manifest.json>"
    <session>/ckpt-000007/manifest.json
                          fast_weights.safetensors   the session's weights (fp32)
                          optimizer.safetensors      optimizer state tensors
                          tokens.safetensors         recent window + untrained tokens
                          adapter/                   LoRA sessions: peft's adapter layout
    <session>/ckpt-000006/...        the previous checkpoint, kept as a fallback

A checkpoint is written complete first (a local folder: into a temporary folder, each file fsynced, then renamed
into place; an object store: under a name no other save uses), and only then does ``LATEST`` point at it, moved by
a compare-and-swap (``storage.py`` says what each backend guarantees). A crash at any moment leaves ``LATEST``
naming a complete, verified checkpoint. Where a lease guards the session (``lease.py``), ``LATEST`` also carries
the fencing number of the last writer (``ckpt-000007 <sha256> 12``): a save under an older number is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import storage
from .config import SessionConfig
from .lease import LATEST, LeaseLost, Pointer, read_lease, swap_latest
from .memory import MIN_SPAN_TOKENS
from .model import BaseModelMismatch
from .peft import peft_files
from .session import SessionInfo, SessionStats
from .storage import Folder, as_folder

if TYPE_CHECKING:
    from .engine import Engine
    from .session import Session

FORMAT = "ttt-session"
FORMAT_VERSION = 1
KEEP_CHECKPOINTS = 2
log = logging.getLogger(__name__)


class SessionFormatError(ValueError):
    """A saved session is missing, truncated, corrupted or of an unknown format."""


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
        storage._write_file(folder / name, data)
    return folder


def has_checkpoint(folder: str | os.PathLike | Folder) -> bool:
    """Whether ``folder`` holds a saved session (a complete checkpoint that ``LATEST`` names)."""
    return as_folder(folder).exists(LATEST)


def saved_sessions(root: str | os.PathLike | Folder, depth: int = 1) -> list[tuple[str, ...]]:
    """The names of the session folders with a checkpoint ``depth`` levels below ``root`` (2: ``(user, session)``)."""
    root = as_folder(root)
    if depth == 1:
        return [(name,) for name in root.subfolders() if root.child(name).exists(LATEST)]
    return [(name, *below) for name in root.subfolders() for below in saved_sessions(root.child(name), depth - 1)]


def checkpoints(root: str | os.PathLike | Folder) -> list[str]:
    """Checkpoint names, newest first."""
    return sorted((n for n in as_folder(root).subfolders() if n.startswith("ckpt-")), reverse=True)


def remove_checkpoints(folder: str | os.PathLike | Folder) -> None:
    """Delete a saved session: ``LATEST`` first (it is gone at once; a crash leaves only checkpoints nothing names,
    which a later save prunes), then its checkpoints. Its ``LEASE`` stays, so that fencing numbers keep growing."""
    folder = as_folder(folder)
    folder.remove(LATEST)
    for name in checkpoints(folder):
        folder.remove(name)
    folder.clean()


def _checkpoint_files(session: Session, fence: int | None, sums: dict) -> Iterator[tuple[str, bytes]]:
    """The files of a checkpoint of ``session``, its manifest (with every other file's checksum) last."""

    def checked(name: str, data: bytes) -> tuple[str, bytes]:
        sums[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        return name, data

    yield checked(
        "fast_weights.safetensors",
        st_save({k: v.detach().cpu().contiguous() for k, v in session.fast.state_dict().items()}),
    )
    opt_tensors, opt_json = _optimizer_tensors(session.optimizer)
    yield checked("optimizer.safetensors", st_save(opt_tensors))
    tokens = {
        "window": torch.tensor(session.window, dtype=torch.int64),
        "pending": torch.tensor(session.pending, dtype=torch.int64),
        **session.memory.tensors(),
    }
    yield checked("tokens.safetensors", st_save(tokens))
    if session.fast.kind == "lora":
        for name, data in peft_files(session).items():
            yield checked(f"adapter/{name}", data)
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
        "fence": fence,
        "files": dict(sums),
    }
    data = json.dumps(manifest, indent=2, allow_nan=True).encode()
    sums["manifest.json"] = {"sha256": hashlib.sha256(data).hexdigest()}
    yield "manifest.json", data


def save_session(session: Session, path: str | os.PathLike | Folder, fence: int | None = None) -> Path | str:
    """Write a new checkpoint of ``session`` under ``path`` (a folder or an fsspec URL) and point ``LATEST`` at it;
    returns the checkpoint (a Path, or a URL). ``fence``: the writer's lease fencing number (LeaseLost, nothing
    kept, when ``LATEST`` carries a newer one)."""
    root = as_folder(path)

    def refuse_if_newer(held: int) -> None:
        if fence is not None and held > fence:
            raise LeaseLost(f"{root.name}: a newer writer (fence {held} > {fence}) owns the session; not saved")

    lease = read_lease(root)[0] if fence is not None else None
    refuse_if_newer(lease.fence if lease is not None else 0)
    root.clean()  # what a crashed save left: under a lease, saves of a session never overlap
    existing = checkpoints(root)
    number = int(existing[0][5:11]) + 1 if existing else 1
    name = root.unique(f"ckpt-{number:06d}")
    sums: dict = {}
    root.write_all(name, _checkpoint_files(session, fence, sums))
    new = Pointer(name, sums["manifest.json"]["sha256"])
    previous: list[Pointer | None] = [None]

    def point(current: Pointer | None) -> Pointer | None:
        if current is not None and current.checkpoint == name:
            return None  # a retried swap whose first attempt landed: done, ``previous`` as that attempt saw it
        held = current.fence if current is not None else 0
        refuse_if_newer(held)
        previous[:] = [current]
        return replace(new, fence=max(held, fence or 0))

    try:
        swap_latest(root, point)
    except LeaseLost:
        root.remove(name)
        raise
    # One fallback stays: the checkpoint this session was loaded from when the newer ones were damaged (its first
    # save since), else the one LATEST named until now. The others before the new one go: older ones, damaged ones,
    # those of failed saves.
    last = previous[0].checkpoint if previous[0] else None
    fallback = session.restored_from if session.damaged_checkpoints else last
    for old in checkpoints(root):
        if old < name and old != fallback:
            root.remove(old)
    session.damaged_checkpoints = []
    return root.child(name).location


# ---- load ----------------------------------------------------------------------------------------


def _read(folder: Folder, name: str) -> bytes:
    try:
        return folder.read(name)
    except FileNotFoundError:
        raise SessionFormatError(f"{folder}/{name}: missing") from None


def _read_checked(ckpt: Folder, name: str, files: dict) -> bytes:
    file = f"{ckpt}/{name}"
    data = _read(ckpt, name)
    expected = files.get(name)
    if expected is None:
        raise SessionFormatError(f"{ckpt}/manifest.json: no checksum for {name}")
    if len(data) != expected["bytes"]:
        raise SessionFormatError(f"{file}: truncated or altered ({len(data)} bytes, manifest says {expected['bytes']})")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise SessionFormatError(f"{file}: checksum mismatch (corrupted)")
    return data


def read_manifest(ckpt: str | os.PathLike | Folder, expected_sha256: str | None = None) -> dict:
    ckpt = as_folder(ckpt)
    file = f"{ckpt}/manifest.json"
    data = _read(ckpt, "manifest.json")
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


def _load_checkpoint(engine: Engine, ckpt: Folder, manifest_sha256: str | None) -> Session:
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
    root = as_folder(path)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no saved session there")
    pointer = Pointer.parse(root.read_versioned(LATEST)[0])
    candidates: list[tuple[str, str | None]] = [(pointer.checkpoint, pointer.manifest_sha256)] if pointer else []
    candidates += [(c, None) for c in checkpoints(root) if all(c != p for p, _ in candidates)]
    if not candidates:
        raise FileNotFoundError(f"{root}: no checkpoint (LATEST and ckpt-* are missing)")
    errors = []
    for ckpt, manifest_sum in candidates:
        try:
            session = _load_checkpoint(engine, root.child(ckpt), manifest_sum)
        except SessionFormatError as e:
            errors.append(e)
            if not fallback:
                break
            continue
        if errors:
            log.warning("%s: loaded %s after: %s", root, ckpt, "; ".join(map(str, errors)))
            # Reported with the session, relative to its folder: a client never sees server paths.
            session.restored_from = ckpt
            session.damaged_checkpoints = [c for c, _ in candidates[: candidates.index((ckpt, manifest_sum))]]
            session.warnings = [str(e).replace(f"{root}/", "") for e in errors]
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


def saved_info(root: str | os.PathLike | Folder) -> dict:
    """``Session.info`` of the session saved under ``root`` (its newest checkpoint), without loading its weights:
    the manifest and ``tokens.safetensors`` (token ids only) are read."""
    from .memory import SpanMemory

    root = as_folder(root)
    pointer = Pointer.parse(_read(root, LATEST))
    if pointer is None:
        raise SessionFormatError(f"{root}/{LATEST}: not a checkpoint pointer")
    ckpt = root.child(pointer.checkpoint)
    manifest = read_manifest(ckpt, pointer.manifest_sha256)
    config = SessionConfig.from_dict(saved_config(manifest))
    stats = SessionStats(**manifest["stats"])
    try:
        tokens = st_load(ckpt.read("tokens.safetensors"))
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


def disk_bytes(path: str | os.PathLike | Folder) -> int:
    """Bytes of the files under ``path`` (0 when absent), but those of crashed saves (removed by the next save)."""
    return as_folder(path).size()
