"""Student generation speed: eval.engine=hf (batched, in-process) vs eval.engine=server, on the tiny model.

    python bench/serve_generation.py [--rows 44] [--max-new-tokens 256] [--concurrency 1 8]

In a temporary copy of the repo it builds the tiny base, runs stages 1-3 offline on data/sample, trains a LoRA
adapter for --steps steps, then generates on the test rows with eval.engine=hf and with eval.engine=server, the
stage starting tests/model_server.py (a transformers stand-in for `vllm serve` that answers one request at a time)
through eval.server.command. It prints samples/s (model loading and server start excluded) and whether the outputs equal
hf's. The stand-in measures the transport's cost, not vLLM's speed: on a GPU, vLLM batches concurrent requests.
"""

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nlistral.config import load_config  # noqa: E402
from nlistral.evaluation import run_generation  # noqa: E402
from nlistral.model import load_adapter_model, load_tokenizer  # noqa: E402
from nlistral.paths import ADAPTER_DIR  # noqa: E402
from nlistral.scoring import eval_rows  # noqa: E402
from nlistral.stages import base_model, reflections, sft, thoughts, train  # noqa: E402

SERVE = (f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests' / 'model_server.py'))} {{base}} --tokenizer "
         "{tokenizer} --enable-lora --lora-modules {name}={adapter} --max-lora-rank {rank} --port {port}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=44)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(REPO / "data" / "sample", Path(tmp) / "data" / "sample")
        shutil.copy(REPO / "params.yaml", Path(tmp) / "params.yaml")
        shutil.copytree(REPO / "conf", Path(tmp) / "conf")
        os.chdir(tmp)
        cfg = load_config([f"train.max_steps={args.steps}", "model.load_in_4bit=false", f"eval.limit={args.rows}",
                           f"eval.max_new_tokens={args.max_new_tokens}", f"llm_cache_dir={tmp}/cache"])  # fmt: skip
        base_model.run(cfg)
        for split in ("train", "dev"):  # the offline teacher and reflector (params.yaml's defaults)
            for stage in (thoughts, reflections, sft):
                stage.run(cfg, split)
        train.run(cfg)
        rows, tokenizer = eval_rows(cfg), load_tokenizer(ADAPTER_DIR)
        hf, wall = run_generation(cfg, rows, lambda: load_adapter_model(cfg), tokenizer, ADAPTER_DIR)
        print(f"hf (batch {cfg.eval.batch_size}): {len(rows) / wall:.2f} samples/s ({len(rows)} rows, {wall:.2f} s)")
        cfg.eval.engine, cfg.eval.server.command = "server", SERVE
        for concurrency in args.concurrency:
            cfg.eval.server.max_concurrency = concurrency
            cfg.llm_cache_dir = f"{tmp}/cache-{concurrency}"  # a fresh reply cache: every row is generated
            served, wall = run_generation(cfg, rows, None, tokenizer, ADAPTER_DIR)
            same = sum(a == b for a, b in zip(hf, served, strict=True))
            print(f"server (max_concurrency {concurrency}): {len(rows) / wall:.2f} samples/s ({wall:.2f} s); "
                  f"outputs equal to hf's for {same}/{len(rows)} rows")  # fmt: skip


if __name__ == "__main__":
    main()
