# NLIstral's pinned environment. The code, data and outputs come from the checkout you mount at /work, so DVC
# hashes exactly the code that runs. No secrets and no host configuration are baked in: pass MISTRAL_API_KEY at
# `docker run` time; the build's own pip settings come in as build secrets (below), which never reach a layer.
#   make image                         # docker or podman, your UID/GID; `make image BASE=...` for another base
#   docker run --rm -v "$PWD:/work" -v nlistral-cache:/cache nlistral dvc repro          # embedded profile, CPU
#   docker run --rm --gpus all --ipc=host -e MISTRAL_API_KEY -e HF_TOKEN -v "$PWD:/work" -v nlistral-cache:/cache \
#       nlistral dvc exp run -S experiment=mistral7b_qlora
# The container runs as your user (UID/GID at build time), so what it writes into the mounted checkout (models/,
# .dvc/cache, git objects of `dvc exp run`) stays yours and host-side git and dvc keep working. --ipc=host gives
# NCCL the shared memory that several GPUs (accelerate launch) need. The /cache volume keeps paid LLM replies and
# the hub's model weights across containers.

# The base: Debian bookworm with Python 3.11 (its venv module and pip), `python` on PATH and apt-get. Pinned by
# tag, not digest: no registry was reachable where this was written, so no digest could be read (see
# docs/real-setup.md). Where none is reachable, scripts/base-image.sh makes one from Debian's packages.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# A C compiler and Python's headers: Triton (TRL's fused LM-head loss on CUDA) compiles its driver module with them
# at first use, and fails with "Failed to find C compiler" without.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git make gcc libc6-dev \
 && if [ ! -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
        apt-get install -y --no-install-recommends python3-dev; fi \
 && rm -rf /var/lib/apt/lists/*

# requirements-image.txt: the runtime lock resolved against PyPI (the CUDA torch and its nvidia-* wheels), every
# file's sha256 in it, installed with --require-hashes. Optional build secrets for pip where PyPI sits behind a
# proxy or a mirror: `ca` (a CA bundle) and `pip.conf` (index settings); they are mounted for this one RUN only.
COPY requirements-image.txt /tmp/
RUN --mount=type=secret,id=ca --mount=type=secret,id=pip.conf --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -s /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --disable-pip-version-check --require-hashes -r /tmp/requirements-image.txt \
 && printf '#!/bin/sh\nexec python -m nlistral "$@"\n' > /opt/venv/bin/nlistral \
 && chmod +x /opt/venv/bin/nlistral \
 && rm /tmp/requirements-image.txt \
 && git config --system --add safe.directory /work

# UID 0 (a root build) keeps root; any other UID gets its own user and group.
ARG UID=1000
ARG GID=1000
RUN if [ "$UID" != 0 ]; then \
        { getent group "$GID" >/dev/null || groupadd --gid "$GID" nlistral; } \
        && useradd --uid "$UID" --gid "$GID" --create-home nlistral; fi \
 && mkdir -p /cache /work && chown "$UID:$GID" /cache /work
USER ${UID}:${GID}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/work/src \
    NLISTRAL_CACHE_DIR=/cache/nlistral \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /work
CMD ["nlistral", "--help"]
