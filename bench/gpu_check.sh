#!/usr/bin/env bash
# The checks that need a GPU, as one run on a CUDA machine (about 12 minutes on one H200):
# the CUDA-only tests, the kernel tests with Triton compiled instead of interpreted, and the
# benchmarks at GPU sizes. Everything lands in $OUT (default runs/gpu).
#
# Needs python3 with torch (CUDA), triton, transformers, safetensors, tokenizers, pytest; the project
# is imported from the working tree. The default model need not be installed: the tiny-model tests
# only need its tokenizer files, e.g. prepared on a dev machine with
#   mkdir -p .device/tokenizer && cp ~/.cache/ttt/models/SmolLM2-135M-Instruct/{tokenizer*.json,chat_template.jinja} .device/tokenizer/
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ -d .device/tokenizer ] && export TTT_TEST_TOKENIZER_DIR=$PWD/.device/tokenizer

{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee "$OUT/machine.txt"
# bf16 / CUDA variants (skipped on CPU machines), then every kernel test with Triton compiled.
python3 -m pytest -q -m gpu tests/test_kernels_cross_entropy.py tests/test_kernels_multi_lora.py tests/test_kernels_attention.py \
    tests/test_store.py tests/test_decode.py 2>&1 | tee "$OUT/pytest_gpu.log"
TTT_KERNELS=triton python3 -m pytest -q tests/test_kernels_cross_entropy.py tests/test_kernels_multi_lora.py \
    tests/test_kernels_attention.py tests/test_ingest_paths.py tests/test_batch.py 2>&1 | tee "$OUT/pytest_triton.log"
python3 -m bench.kernels --device cuda --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
# Continuous batching on the GPU (needs the default model installed): 16 answers at once vs one alone, and as before.
if python3 -c "from ttt.default_model import default_model_dir; default_model_dir()" 2>/dev/null; then
    python3 -m bench.load --start --device cuda --answers 16 --max-tokens 64 2>&1 | tee "$OUT/answers_batched.log"
    python3 -m bench.load --start --device cuda --answers 16 --max-tokens 64 --max-answer-rows 1 2>&1 \
        | tee "$OUT/answers_one_at_a_time.log"
    # The load test (8 ingest streams + 16 chat clients asking again at once): TTFT vs the idle server, errors,
    # every token accounted, ingest tokens/s; on a CPU the device is full here (README, *Many users at once*).
    timeout 150 python3 -m bench.load --start --device cuda --seconds 60 2>&1 | tee "$OUT/load_closed_loop.log"
fi
