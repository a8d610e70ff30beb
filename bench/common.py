"""What every benchmark script shares: the default document, its tokens, run metadata, device sync."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import ttt
from ttt.model import DTYPES

ROOT = Path(__file__).resolve().parent.parent  # the repository (results record paths relative to it)
# Public-domain default document, shipped as package data so `ttt eval` works from an installed wheel.
DEFAULT_DOC = Path(__file__).resolve().parent / "data" / "kjv_genesis_exodus.txt"


def add_model_args(ap) -> None:
    """``--model``, ``--device`` and ``--dtype``: the engine a benchmark loads (``load_engine(args)``)."""
    ap.add_argument("--model", help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", help="cuda, cpu, ... (default: CUDA when available)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="the model's dtype (default: bf16 on CUDA, fp32 on CPU)")


def load_engine(args) -> ttt.Engine:
    return ttt.load_engine(args.model, args.device, args.dtype)


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def document_tokens(engine: ttt.Engine, path: Path, tokens: int | None = None, offset: int = 0) -> list[int]:
    """Token ids of ``path`` from character ``offset`` on; ``tokens`` of them (the text repeats if too short)."""
    text = Path(path).read_text(encoding="utf-8")
    ids = engine.base.tokenizer(text[offset:], add_special_tokens=False).input_ids
    if tokens is None:
        return ids
    if not ids:
        raise ValueError(f"{path}: no tokens from character {offset}")
    return (ids * (tokens // len(ids) + 1))[:tokens]


def git_revision() -> str | None:
    """The commit of the checkout these scripts run from ("+dirty" with uncommitted changes); None if not a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def run_metadata(engine: ttt.Engine) -> dict:
    """The model and machine a result was measured on: stored with every results file."""
    base = engine.base
    return {
        "model": base.name,
        "model_fingerprint": base.fingerprint,
        "max_context": base.cfg.max_position_embeddings,
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "git_revision": git_revision(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def portable(value):
    """A path as results files record it: relative to the repository when inside it (no machine's absolute
    paths in committed results), as given otherwise; lists of paths likewise, other values unchanged."""
    if isinstance(value, list):
        return [portable(v) for v in value]
    if not isinstance(value, Path):
        return value
    try:
        return str(value.resolve().relative_to(ROOT))
    except ValueError:
        return str(value)


def settings_of(args) -> dict:
    """A command's arguments as results files record them (``portable`` paths)."""
    return {k: portable(v) for k, v in vars(args).items()}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
