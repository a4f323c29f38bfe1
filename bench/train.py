"""Training throughput and peak memory of the train stage's own trainer: tiny model fp32 vs 4-bit (and, with a GPU,
a Mistral-7B-shaped model with random weights in 4-bit with gradient checkpointing: real speed and memory).

Run from the repo root after `dvc repro sft` (needs params.yaml, models/base, data/finetune/):
    python bench/train.py [--steps 30] [--mistral7b]
Each setting runs in its own process, so peak memory is its own. Prints a table.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nlistral.config import load_config
from nlistral.paths import BASE_DIR, BASE_INFO

SETTINGS = {
    "tiny fp32": ["model.load_in_4bit=false"],
    "tiny 4-bit": ["model.load_in_4bit=true"],
    "mistral7b-shaped 4-bit + grad ckpt": ["model.load_in_4bit=true", "model.dtype=bfloat16",
                                           "train.gradient_checkpointing=true", "train.per_device_batch_size=4"],
}  # fmt: skip


def random_mistral7b(dest) -> None:
    """models/base with MistralConfig()'s shape and random bf16 weights (the tokenizer of models/base)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(Path.cwd() / BASE_DIR)
    with torch.device("cuda"):
        model = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer))).to(torch.bfloat16)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / BASE_INFO.name).write_text(json.dumps({"name_or_path": str(dest), "revision": None}))


def measure(name: str, steps: int) -> dict:
    """One setting, in this process: `steps` optimizer steps of train.build_trainer's trainer, no eval, no saves."""
    from nlistral.stages import train

    cfg = load_config([*SETTINGS[name], f"train.max_steps={steps}", f"train.eval_steps={steps + 1}",
                       f"train.save_steps={steps + 1}", "train.early_stopping_patience=0"])  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        if name.startswith("mistral7b"):  # a repo root whose models/base is the random 7B-shaped model
            root = Path(scratch) / "repo"
            (root / "models").mkdir(parents=True)
            for name_ in ("data", "metrics"):
                (root / name_).symlink_to(Path.cwd() / name_)
            random_mistral7b(root / BASE_DIR)
            os.chdir(root)
        trainer = train.build_trainer(cfg, Path(scratch) / "out")
        trainer.remove_callback(train.EvaluateAtEnd)  # eval/save steps are past the end: training only
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
    parser.add_argument("--mistral7b", action="store_true", help="also the 7B-shaped model (needs a CUDA GPU)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return
    names = [n for n in SETTINGS if not n.startswith("mistral7b")]
    if args.mistral7b:
        if not torch.cuda.is_available():
            sys.exit("--mistral7b needs a CUDA GPU")
        names.append("mistral7b-shaped 4-bit + grad ckpt")
    print(f"{'setting':38} {'steps':>5} {'tokens/s':>10} {'steps/s':>8} {'peak GiB':>9}  memory")
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{name:38} {r['steps']:>5} {r['tokens_per_s']:>10} {r['steps_per_s']:>8} {r['peak_mem_gib']:>9}  "
              f"{r['memory']}")


if __name__ == "__main__":
    main()
