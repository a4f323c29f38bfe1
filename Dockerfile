# NLIstral runtime image. No secrets are baked in: pass MISTRAL_API_KEY (or mount .env) at `docker run` time.
#   docker build -t nlistral .
#   docker run --rm -v "$PWD:/work" -w /work nlistral dvc repro         # embedded profile, CPU
#   docker run --rm --gpus all -e MISTRAL_API_KEY -v "$PWD:/work" -w /work nlistral \
#       dvc exp run -S teacher=mistral -S reflector=mistral -S model=mistral7b
# On linux/amd64 PyPI's torch==2.13.0 is the CUDA build, which is what a GPU box wants.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nlistral
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps -e .

ENV HF_HOME=/cache/huggingface
CMD ["nlistral", "--help"]
