#!/usr/bin/env bash
# Run HERE (after `make install`) before bench/gpu_check.sh goes to a bare CUDA machine that cannot reach PyPI:
# puts into .device/ (git-ignored; the device tool's `carry: [".device"]` takes it along, ~15 MB)
#   wheels/     the server's packages and what they need (fastapi, uvicorn, pydantic, grpcio + protobuf at the
#               versions that generated server/proto, ...), at the versions installed here, for that machine's
#               Python (PY_VERSION, default 3.12: the device tool's nvidia-h200 image has 3.12);
#   model/      the default model's config, tokenizer and chat template: the GPU run gives that shape random
#               weights (its 98-MB GGUF does not fit what travels; speed does not depend on the weights' values).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PY_VERSION=${PY_VERSION:-3.12}
DEV=.device
rm -rf "$DEV/wheels" "$DEV/model"
mkdir -p "$DEV/wheels" "$DEV/model"

# the same files, the weights aside, as the converted default model's folder
"$BIN/python" - "$DEV/model" <<'EOF'
import shutil, sys
from ttt.default_model import default_model_dir

src = default_model_dir()
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).is_file():
        shutil.copy(src / name, sys.argv[1])
EOF

# The server's packages and all they need, markers read for that Python: the image has torch, triton,
# transformers and the test tools, but not these, or not at these versions (protobuf must be at least the
# version that generated server/proto; fastapi needs opentelemetry-api).
pins=$("$BIN/python" - "$PY_VERSION" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement

env = {"python_version": sys.argv[1], "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
todo = ["fastapi", "uvicorn", "pydantic-settings", "grpcio-health-checking", "grpcio-reflection"]
todo += ["prometheus-client", "httpx"]  # in the image when last read, but the server cannot start without them
pins = {}
while todo:
    wanted = todo.pop()
    try:
        dist = distribution(wanted)
    except PackageNotFoundError:  # needed on that Python only: not installed here, so no version to pin
        print(f"gpu_prepare: {wanted} is not installed here; not carried", file=sys.stderr)
        continue
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name not in pins:
        pins[name] = dist.version
        todo += [r.name for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate(env)]
print(" ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
EOF
)
platforms=()
for n in 2_17 2_27 2_28 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
# shellcheck disable=SC2086  # one word per pin
"$BIN/pip" download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DEV/wheels" $pins
du -sh "$DEV"
