# NLIstral's pinned environment. The code, data and outputs come from the checkout you mount at /work, so DVC
# hashes exactly the code that runs. No secrets are baked in: pass MISTRAL_API_KEY at `docker run` time.
#   docker build -t nlistral .
#   docker run --rm -v "$PWD:/work" -v nlistral-cache:/cache nlistral dvc repro          # embedded profile, CPU
#   docker run --rm --gpus all -e MISTRAL_API_KEY -e HF_TOKEN -v "$PWD:/work" -v nlistral-cache:/cache nlistral \
#       dvc exp run -S experiment=mistral7b_qlora
# The /cache volume keeps paid LLM replies and the hub's model weights across containers.
# On linux/amd64 PyPI's torch==2.13.0 is the CUDA build, which is what a GPU box wants.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/*

COPY requirements.txt constraints.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
 && printf '#!/bin/sh\nexec python -m nlistral "$@"\n' > /usr/local/bin/nlistral \
 && chmod +x /usr/local/bin/nlistral \
 && git config --system --add safe.directory '*'

ENV PYTHONPATH=/work/src \
    NLISTRAL_CACHE_DIR=/cache/nlistral \
    HF_HOME=/cache/huggingface \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /work
CMD ["nlistral", "--help"]
