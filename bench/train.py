"""Training throughput and peak memory of the train stage's own trainer on the tiny model: fp32 vs 4-bit. A
Mistral-7B-shaped model with the study's settings on a GPU is bench/gpu.py's.

Run from the repo root after `dvc repro sft` (needs params.yaml, models/base, data/finetune/):
    python bench/train.py [--steps 30]
Each setting runs in its own process, so peak memory is its own. Prints a table.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nlistral.config import load_config

SETTINGS = {
    "tiny fp32": ["model.load_in_4bit=false"],
    "tiny 4-bit": ["model.load_in_4bit=true"],
}  # fmt: skip


def measure(name: str, steps: int) -> dict:
    """One setting, in this process: `steps` optimizer steps of nlistral.trainer's trainer, no eval, no saves."""
    from nlistral.trainer import EvaluateAtEnd, build_trainer

    cfg = load_config([*SETTINGS[name], f"train.max_steps={steps}", f"train.eval_steps={steps + 1}",
                       f"train.save_steps={steps + 1}", "train.early_stopping_patience=0"])  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(cfg, Path(scratch) / "out")
        trainer.remove_callback(EvaluateAtEnd)  # eval/save steps are past the end: training only
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return {"setting": name, "steps": steps, "tokens_per_s": round(trainer.state.num_input_tokens_seen / wall, 1),
            "steps_per_s": round(steps / wall, 2), "peak_mem_gib": round(peak / 2**30, 3),
            "memory": "GPU allocated" if torch.cuda.is_available() else "process RSS"}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return
    names = list(SETTINGS)
    print(f"{'setting':38} {'steps':>5} {'tokens/s':>10} {'steps/s':>8} {'peak GiB':>9}  memory")
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{name:38} {r['steps']:>5} {r['tokens_per_s']:>10} {r['steps_per_s']:>8} {r['peak_mem_gib']:>9}  "
            f"{r['memory']}"
        )


if __name__ == "__main__":
    main()
