#!/usr/bin/env bash
# The checks that need a GPU, as ONE run on a bare CUDA machine that cannot reach PyPI (the device tool's H200):
#
#   here:   bash bench/gpu_prepare.sh          # .device/: wheels the image lacks + the default model's shape
#   there:  OUT=... bash bench/gpu_check.sh    # device tool: run(command="bash bench/gpu_check.sh",
#                                              #   carry=[".device"], timeout_s=600)
#
# The steps go most valuable first, each within its own limit and all within LIMIT seconds (default 540: the tool
# allows 600 per command), so a slow step costs the ones after it, never the results before it:
#   1. continuous batching: 16 answers at once vs one alone (#12's GPU target, >= 10x), then with batching off;
#   2. the load test, closed loop (8 ingest streams + 16 chat clients asking again at once, 60 s);
#   3. the CUDA-only tests (bf16 / CUDA variants, skipped on CPU machines);
#   4. every kernel test with Triton compiled instead of interpreted; the kernel benchmarks at GPU sizes;
#   5. the load test, open loop (0.5 chats/s, 60 s).
# Where the default model is not installed (its 98-MB GGUF does not travel), the benchmarks run its shape with
# random weights from .device/model: speed does not depend on the weights' values (answers then run to max_tokens).
# Output (the tool brings back at most 8 files): $OUT/steps.txt (each step's exit status and seconds),
# $OUT/gpu_check.log (everything the steps printed, in order), $OUT/kernels.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
LIMIT=${LIMIT:-540}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu LIMIT=... tries the script's own steps on a machine without a GPU
PY=${PY:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
STEPS=$OUT/steps.txt
: >"$LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: COMMAND for at most SECONDS (and what is left of LIMIT), output to LOG
    local name=$1 most=$2 left=$((LIMIT - SECONDS)) started=$SECONDS
    shift 2
    if ((left < 20)); then
        echo "$name: skipped (LIMIT reached)" | tee -a "$STEPS"
        return
    fi
    ((most < left)) || most=$left
    echo "=== $name (at most ${most} s): $*" >>"$LOG"
    timeout "$most" "$@" >>"$LOG" 2>&1
    echo "$name: exit $? in $((SECONDS - started)) s" | tee -a "$STEPS"
}

# The server's packages this image lacks, at this checkout's versions, ahead of the image's own.
if compgen -G ".device/wheels/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ttt-site \
        .device/wheels/*.whl >>"$LOG" 2>&1 || echo "wheels: install failed (see gpu_check.log)" | tee -a "$STEPS"
    export PYTHONPATH=/tmp/ttt-site:$PWD
else
    export PYTHONPATH=$PWD
fi
[ -f .device/model/tokenizer.json ] && export TTT_TEST_TOKENIZER_DIR=$PWD/.device/model

{
    nvidia-smi -L
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} >>"$LOG" 2>&1

MODEL=$($PY -c "from ttt.default_model import default_model_dir; print(default_model_dir())" 2>/dev/null)
if [ -z "$MODEL" ] && [ -f .device/model/config.json ]; then
    MODEL=.device/model
    [ -f "$MODEL/model.safetensors" ] || step random_weights 120 $PY - "$MODEL" <<'EOF'
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM

torch.manual_seed(0)
config = AutoConfig.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(sys.argv[1])
print("random weights of", config.model_type, config.num_hidden_layers, "layers in", sys.argv[1])
EOF
fi
echo "model: ${MODEL:-none}" | tee -a "$STEPS"

LOAD=($PY -m bench.load --start --device "$DEVICE" --model "$MODEL")
if [ -n "$MODEL" ]; then
    step answers_batched 150 "${LOAD[@]}" --answers 16 --max-tokens 64
    step answers_one_at_a_time 120 "${LOAD[@]}" --answers 16 --max-tokens 64 --max-answer-rows 1
    step load_closed_loop 150 "${LOAD[@]}" --seconds 60
fi
step pytest_cuda 120 $PY -m pytest -q -m gpu tests/test_kernels_cross_entropy.py tests/test_kernels_multi_lora.py \
    tests/test_kernels_attention.py tests/test_store.py tests/test_decode.py
step pytest_triton 150 env TTT_KERNELS=triton $PY -m pytest -q tests/test_kernels_cross_entropy.py \
    tests/test_kernels_multi_lora.py tests/test_kernels_attention.py tests/test_ingest_paths.py tests/test_batch.py
step bench_kernels 90 $PY -m bench.kernels --device "$DEVICE" --out "$OUT/kernels.json"
[ -n "$MODEL" ] && step load_open_loop 130 "${LOAD[@]}" --seconds 60 --chat-rate 0.5
echo "done in $SECONDS s" | tee -a "$STEPS"
