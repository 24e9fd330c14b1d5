# syntax=docker/dockerfile:1
#
# Caption service: NVIDIA Nemotron Nano 12B v2 VL behind an OpenAI-compatible
# POST /v1/chat/completions, a drop-in for the NIM that nv-ingest calls as `vlm`.
#
#   docker build -t nemotron-caption:latest .
#   docker run --gpus all --shm-size=2g -p 8000:8000 \
#       -e NGC_API_KEY -v nemotron-cache:/cache nemotron-caption:latest
#
# Base image: torch==2.13.0 from PyPI (requirements.txt) is the CUDA 13 build and
# brings its own CUDA user-space libraries as wheels (cuda-toolkit 13.0.x, cuDNN,
# NCCL), so the base only has to provide the NVIDIA container-runtime wiring
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, NVIDIA_REQUIRE_CUDA=13.0):
# the `base` flavour of the CUDA image is enough and keeps the image ~2 GB smaller
# than `runtime`. Host requirement: an NVIDIA driver that supports CUDA 13 (>= 580).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04 ships Python 3.12. tini is PID 1: it forwards SIGTERM to
# `python server.py` (which turns it into LitServe's orderly shutdown) and reaps
# the worker processes LitServe forks/spawns. gcc and the Python headers are for
# Triton (installed with the CUDA build of torch), which compiles a small launcher
# for our Mamba decode kernels (model/kernels.py) the first time they run.
# Versions of the distro packages are not pinned: the base image tag pins the
# Ubuntu release, and security updates should flow in on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment owned by root (read-only for the service user):
# Ubuntu's system Python is "externally managed" (PEP 668).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app

# Exactly what the README installs for the service. Copied alone first so the
# (large) dependency layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

# The fast decode path needs nothing more: our own Triton kernels for the Mamba
# state updates (model/kernels.py) and CUDA graphs (model/cuda_graphs.py). The
# mamba-ssm and causal-conv1d packages are NOT installed: causal-conv1d's Python
# module imports its compiled CUDA extension unconditionally, and transformers
# picks it as soon as it is importable, so a skip-build install can turn a
# working model into an import error.

# The service code only (see .dockerignore: no tests, .git, caches, docs).
# Add any new top-level package used by server.py here; tests/test_deploy.py
# checks that every local module it imports is copied.
COPY server.py client.py ./
COPY engine/ engine/
COPY model/ model/
COPY service/ service/

# Non-root user uid 1000, gid 1000; the model cache lives in a volume it owns. A
# fresh named volume mounted on /cache inherits this ownership; on Kubernetes use
# fsGroup: 1000. Ubuntu 24.04 images (the default base) already have the user and
# group `ubuntu` with these ids: it is reused as it is (a `groupadd --gid 1000`
# there fails with "GID '1000' already exists"). On a base without them, a user
# and group `app` are created with the same ids. Everything below names the ids,
# never a user name, so both cases behave the same.
RUN { getent group 1000 >/dev/null || groupadd --gid 1000 app; } \
    && { getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app app; } \
    && mkdir -p /cache/huggingface \
    && chown -R 1000:1000 /cache

# Container-specific settings only. Every other setting of server.py
# (MAX_BATCH_SIZE, MAX_PREFILL_TOKENS, MAX_MODEL_LEN, GPU_MEMORY_UTILIZATION, LOG_LEVEL,
# ENABLE_MOCK_INFERENCE, MODEL_ID, MODEL_REVISION, DEVICE, DTYPE, MAX_NUM_TILES,
# NIM_SERVED_MODEL_NAME, NGC_API_KEY / NVIDIA_API_KEY, NIM_REQUIRE_AUTH, HF_TOKEN,
# the OTEL_* tracing variables, ...) is read from the environment at start: pass it
# with `-e NAME=value` (`python server.py --help` lists them with their defaults).
# The code's defaults apply when unset; secrets are never baked into the image.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    HF_HOME=/cache/huggingface

VOLUME ["/cache"]
EXPOSE 8000
# Numeric so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 1000:1000

# Ready = model loaded and warmed up. The first start downloads ~25 GB of
# weights into the cache, hence the long start period (failures during it do not
# count; the first success ends it). python is the only HTTP client in the image.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health/ready' % os.environ.get('PORT', '8000'), timeout=8)"]

# SIGTERM (the default stop signal) starts a graceful drain; give it time:
# `docker stop -t 150` / compose stop_grace_period / k8s terminationGracePeriodSeconds.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "server.py"]
