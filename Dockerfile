# NLIstral's pinned environment. The code, data and outputs come from the checkout you mount at /work, so DVC
# hashes exactly the code that runs. No secrets are baked in: pass MISTRAL_API_KEY at `docker run` time.
#   docker build --build-arg UID=$(id -u) --build-arg GID=$(id -g) -t nlistral .
#   docker run --rm -v "$PWD:/work" -v nlistral-cache:/cache nlistral dvc repro          # embedded profile, CPU
#   docker run --rm --gpus all --ipc=host -e MISTRAL_API_KEY -e HF_TOKEN -v "$PWD:/work" -v nlistral-cache:/cache \
#       nlistral dvc exp run -S experiment=mistral7b_qlora
# The container runs as your user (UID/GID at build time), so what it writes into the mounted checkout (models/,
# .dvc/cache, git objects of `dvc exp run`) stays yours and host-side git and dvc keep working. --ipc=host gives
# NCCL the shared memory that several GPUs (accelerate launch) need. The /cache volume keeps paid LLM replies and
# the hub's model weights across containers. On linux/amd64 PyPI's torch==2.13.0 is the CUDA build.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/*

COPY requirements.txt constraints.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
 && printf '#!/bin/sh\nexec python -m nlistral "$@"\n' > /usr/local/bin/nlistral \
 && chmod +x /usr/local/bin/nlistral \
 && git config --system --add safe.directory '*'

ARG UID=1000
ARG GID=1000
RUN groupadd --gid "$GID" nlistral \
 && useradd --uid "$UID" --gid "$GID" --create-home nlistral \
 && mkdir -p /cache /work && chown nlistral:nlistral /cache /work
USER nlistral

ENV PYTHONPATH=/work/src \
    NLISTRAL_CACHE_DIR=/cache/nlistral \
    HF_HOME=/cache/huggingface \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /work
CMD ["nlistral", "--help"]
