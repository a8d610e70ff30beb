"""Our decoder (ttt/model.py) against transformers, logit for logit, on tiny random fp32 checkpoints.

Tolerance: fp32 on CPU, atol 1e-4 / rtol 1e-4 on logits of magnitude ~1 (every weight, bias and
norm gain is random, see conftest.build_tiny_checkpoint, so a missing bias or norm shows up as O(0.1)).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch

from ttt.cache import KVCache
from ttt.model import fingerprint_checkpoint, load_base_model

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = RTOL = 1e-4
B, T = 2, 37  # odd length on purpose
VOCAB = 1000  # the logit tests need no tokenizer-sized vocabulary (the session tiny model has 49152)


def _tokens(vocab: int, batch: int = B, length: int = T, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    tokens[0, -1] = vocab - 1  # the last embedding row / logit column too
    return tokens


def test_kernels_is_our_folder_alone():
    """Hugging Face's `kernels` package (a dependency of transformers >= 5.25) has our kernels/ folder's import
    name; installed beside it, one shadows the other (pyproject.toml bounds transformers for this reason)."""
    import kernels

    assert Path(kernels.__file__).parent == Path(__file__).parents[1] / "kernels", kernels.__file__
    try:
        other = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.fail(f"the distribution kernels {other.version} is installed and shadows or is shadowed by kernels/")


def _hf_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(input_ids=tokens).logits.float()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # head_dim 16, theta 1e4: wavelengths 6..~2e4, so the high (<16), smoothed (16..64) and low (>64) bands all occur
    "original_max_position_embeddings": 64,
}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-attn-bias": ("llama", {"attention_bias": True}),  # q/k/v AND o_proj biases
    "llama-mlp-bias": ("llama", {"mlp_bias": True}),
    "llama-odd-sizes": (
        "llama",
        # head_dim != hidden / heads, MQA, odd intermediate, rope theta, small odd vocab
        {
            "head_dim": 24,
            "num_key_value_heads": 1,
            "intermediate_size": 77,
            "rope_theta": 500.0,
            "vocab_size": 301,
            "num_hidden_layers": 2,
            "rms_norm_eps": 1e-6,
        },
    ),
    "llama-mha": ("llama", {"num_key_value_heads": 4, "num_hidden_layers": 2}),
    "llama-rope-llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-rope-yarn": ("llama", {"rope_parameters": YARN_ROPE}),  # attention_factor != 1 scales cos/sin
    "llama-rope-linear": ("llama", {"rope_parameters": LINEAR_ROPE}),
    # sliding_window (default 4096) is >= T here; our forward always attends to the full causal prefix.
    "mistral": ("mistral", {"head_dim": 16}),
    "qwen2": ("qwen2", {}),  # q/k/v biases, no o_proj bias
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),  # per-head q_norm / k_norm, explicit head_dim
    "qwen3-attn-bias-hd32": ("qwen3", {"attention_bias": True, "head_dim": 32}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, tmp_path, make_tiny_checkpoint):
    model_type, overrides = VARIANTS[variant]
    path = make_tiny_checkpoint(tmp_path, model_type, seed=7, **{"vocab_size": VOCAB, **overrides})
    bm = load_base_model(path, device="cpu")
    assert bm.dtype == torch.float32 and bm.device.type == "cpu"
    assert bm.cfg.model_type == model_type
    assert not any(p.requires_grad for p in bm.model.parameters())
    if bm.cfg.tie_word_embeddings:
        assert bm.model.lm_head.weight is bm.model.embed_tokens.weight

    tokens = _tokens(bm.cfg.vocab_size)
    with torch.no_grad():
        ours = bm.model(tokens)
    ref = _hf_logits(path, tokens)
    assert ours.shape == ref.shape == (B, T, bm.cfg.vocab_size)
    assert ours.dtype == torch.float32
    assert ref.abs().max() > 0.5  # the comparison is not vacuous
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_mistral_sliding_window_shorter_than_sequence(tmp_path, make_tiny_checkpoint):
    path = make_tiny_checkpoint(
        tmp_path, "mistral", head_dim=16, sliding_window=8, vocab_size=VOCAB, num_hidden_layers=2
    )
    tokens = _tokens(VOCAB)
    with torch.no_grad():
        ours = load_base_model(path, device="cpu").model(tokens)
    torch.testing.assert_close(ours, _hf_logits(path, tokens), atol=ATOL, rtol=RTOL)


def test_llama3_rope_actually_rescales(tmp_path, make_tiny_checkpoint):
    """Guard against the rope_parameters being silently ignored (which the logit test would also catch)."""
    small = {"num_hidden_layers": 1, "vocab_size": VOCAB}
    plain = load_base_model(make_tiny_checkpoint(tmp_path, "llama", **small), device="cpu")
    scaled = load_base_model(
        make_tiny_checkpoint(tmp_path, "llama", rope_parameters=LLAMA3_ROPE, **small), device="cpu"
    )
    a, b = plain.model.inv_freq, scaled.model.inv_freq
    assert a[0] == b[0]  # highest frequency untouched
    torch.testing.assert_close(b[-1], a[-1] / LLAMA3_ROPE["factor"])  # lowest divided by factor


# ---------------------------------------------------------------- KV cache, run_layers


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(tiny_model_dir, device="cpu")


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(tiny):
    model, cfg = tiny.model, tiny.cfg
    chunks = [20, 1, 1, 1, 6, 1, 7]  # prefill, single-token decodes, a multi-token append, more decodes
    total = sum(chunks)
    tokens = _tokens(cfg.vocab_size, length=total, seed=5)
    full = model(tokens)

    cache = KVCache(cfg, B, max_len=total + 3, device="cpu", dtype=torch.float32)
    start = 0
    for n in chunks:
        out = model(tokens[:, start : start + n], cache=cache)
        assert out.shape == (B, n, cfg.vocab_size)
        torch.testing.assert_close(out, full[:, start : start + n], atol=ATOL, rtol=RTOL)
        start += n
        assert cache.length == start

    with pytest.raises(ValueError, match="overflow"):
        model(tokens[:, :4], cache=cache)


@torch.no_grad()
def test_kv_cache_decode_matches_transformers(tiny, tiny_model_dir):
    """The cached path against transformers directly (not only against our own full forward)."""
    cfg = tiny.cfg
    tokens = _tokens(cfg.vocab_size, length=T, seed=9)
    ref = _hf_logits(tiny_model_dir, tokens)
    cache = KVCache(cfg, B, max_len=T, device="cpu", dtype=torch.float32)
    outs = [tiny.model(tokens[:, :30], cache=cache)]
    outs += [tiny.model(tokens[:, i : i + 1], cache=cache) for i in range(30, T)]
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_run_layers_split_equals_one_pass(tiny):
    model, L = tiny.model, tiny.cfg.num_layers
    tokens = _tokens(tiny.cfg.vocab_size)
    h0 = model.embed(tokens)
    whole = model.run_layers(h0, 0, L)
    torch.testing.assert_close(model.logits(whole), model(tokens), atol=0, rtol=0)
    for k in range(L + 1):
        split = model.run_layers(model.run_layers(h0, 0, k), k, L)
        torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_distinct(tmp_path, tiny_model_dir, make_tiny_checkpoint):
    fp = fingerprint_checkpoint(tiny_model_dir)
    assert fp == fingerprint_checkpoint(tiny_model_dir)
    assert len(fp) == 32 and int(fp, 16) >= 0
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    assert fingerprint_checkpoint(copy) == fp  # the weights, not the path

    other = make_tiny_checkpoint(tmp_path, "llama", seed=1, tokenizer=False)  # same config, other seed
    assert json.loads((other / "config.json").read_text()) == json.loads((tiny_model_dir / "config.json").read_text())
    assert fingerprint_checkpoint(other) != fp


def test_fingerprint_independent_of_load_dtype(tiny_model_dir, tiny):
    bf16 = load_base_model(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert tiny.model.embed_tokens.weight.dtype == torch.float32
    assert bf16.fingerprint == tiny.fingerprint == fingerprint_checkpoint(tiny_model_dir)


# ---------------------------------------------------------------- errors


def test_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json") as e:
        load_base_model(tmp_path, device="cpu")
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        load_base_model(tmp_path / "does-not-exist", device="cpu")
    assert str(tmp_path / "does-not-exist") in str(e.value)


def test_missing_safetensors(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors") as e:
        load_base_model(tmp_path, device="cpu")
    assert str(tmp_path) in str(e.value)


def test_unsupported_model_type(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(tmp_path)
    save_file({"wte.weight": torch.zeros(100, 32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="gpt2"):
        load_base_model(tmp_path, device="cpu")
