"""The first GPU's measurements, as one JSON object: the train and evaluate stages' own code on a Mistral-7B-shaped
model with random weights (speed and memory are real, the weights are not), with a study experiment's settings
(`--experiment`, default ablation1).

    python bench/gpu.py                          # one CUDA GPU, ~3 min on an H200
    python bench/gpu.py --experiment ablation2 --rows 0   # another configuration, training only
    python bench/gpu.py --shape tiny --steps 2   # the same path on the CPU (tests/test_bench_gpu.py runs it)

1. models/base: MistralConfig()'s shape (7B) built straight in bfloat16 on the device, saved, with a byte-level BPE
   tokenizer trained on the data split (base_model.build_tokenizer: Mistral's own is on the hub, out of reach).
2. train: the train stage's trainer (nlistral.trainer), the model loaded in 4-bit NF4 + double quantization exactly
   as the stage loads it, on fine-tuning rows built from the data split (student prompt + the offline teacher's
   rationale): `--warmup` steps, then tokens/s and samples/s over `--steps` steps; peak GPU memory (CPU: RSS).
3. evaluate (hf engine): the adapter saved and loaded back as the stage loads it, greedy generation on `--rows` test
   rows at eval.batch_size; random weights never emit EOS, so every row runs to eval.max_new_tokens (the worst case).
4. evaluate (server engine), when `.venv-vllm/bin/vllm` exists or `--server-command` is given: the same rows through
   eval.engine=server, the stage starting and stopping the server (docs/evaluation.md: the vLLM commands).
5. `--variants`: the same measurements once per variant (docs/training.md, docs/evaluation.md), under "variants":
   training with padding-free batches on and off, gradient checkpointing on and off (tokens/s, samples/s, peak
   memory, pad_token_share); evaluation of the label task by generation (stopping at the label) and by label
   scoring (eval.scoring=likelihood); and the hf engine with the adapter merged into a bfloat16 copy of the base
   against the 4-bit base with the adapter unmerged, with how often their outputs agree on the same rows (merging
   into a 4-bit base would re-quantize: peft #1043). The command that made the JSON is in it ("command").
Run it from the repo root; nothing in the repo is written (a temporary repo root holds models/ and data/).
"""

import argparse
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, MistralConfig, TrainerCallback

from nlistral import evaluation, prompts
from nlistral.config import compose_params, load_config
from nlistral.data import load_split
from nlistral.io import write_json, write_jsonl
from nlistral.llm import offline
from nlistral.model import load_adapter_model, load_tokenizer
from nlistral.paths import ADAPTER_DIR, BASE_DIR, BASE_INFO, FINETUNE
from nlistral.stages import base_model
from nlistral.trainer import EvaluateAtEnd, TokenCount, build_trainer

REPO = Path.cwd()
VLLM = REPO / ".venv-vllm/bin/vllm"
# The documented command (docs/evaluation.md: eval.server.command), with this environment's vllm.
VLLM_COMMAND = (f"{VLLM} serve {{base}} --revision {{revision}} --config-format hf --quantization bitsandbytes "
                "--tokenizer {tokenizer} --enable-lora --lora-modules {name}={adapter} --max-lora-rank {rank} "
                "--host 127.0.0.1 --port {port} --generation-config vllm")  # fmt: skip
TOKENIZER_VOCAB = 32000  # MistralConfig()'s vocabulary: the tokenizer's ids must fit its embedding


def settings(args) -> list[str]:
    """The experiment's (ablation1: batch 16 x 2, r=16, paged 8-bit AdamW, gradient checkpointing, max length 512),
    timed steps only."""
    steps = args.warmup + args.steps
    cpu = ["model.allow_cpu=true"] if args.shape == "tiny" else []  # the 7B profile requires CUDA otherwise
    # random weights, no fine-tuning set: generation runs to max_new_tokens, whatever the trained answers' length
    return [f"experiment={args.experiment}", f"train.max_steps={steps}", f"train.eval_steps={steps + 1}",
            f"train.save_steps={steps + 1}", "train.early_stopping_patience=0", "train.logging_steps=1",
            "eval.allow_short_max_new_tokens=true", *cpu]  # fmt: skip


def build_base(cfg, shape: str, dest: Path) -> dict:
    """models/base as the base_model stage leaves it, with random weights of `shape` in model.dtype."""
    tokenizer = base_model.build_tokenizer(base_model.tokenizer_corpus(REPO / cfg.data.dir), TOKENIZER_VOCAB)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    if shape == "7b":
        config = MistralConfig(**ids)
    else:  # the embedded profile's shape (conf/model/tiny.yaml)
        tiny = OmegaConf.load(REPO / "conf/model/tiny.yaml").tiny
        config = MistralConfig(vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
                               num_hidden_layers=tiny.num_layers, intermediate_size=tiny.intermediate_size,
                               num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_kv_heads,
                               **ids)  # fmt: skip
    start = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.model.dtype))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    write_json(dest / BASE_INFO.name, {"name_or_path": str(dest), "revision": None, "built_tiny": False})
    parameters = model.num_parameters()
    del model
    release()
    return {"parameters": parameters, "vocab_size": config.vocab_size, "tokenizer_vocab": len(tokenizer),
            "build_and_save_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def rows_of(cfg, split: str, n: int) -> pd.DataFrame:
    """`n` rows of the data split, repeated (with distinct ids) when it has fewer."""
    rows = load_split(REPO / cfg.data.dir, split)
    rows = pd.concat([rows] * -(-n // len(rows)), ignore_index=True).head(n)
    return rows.assign(id=[f"bench-{i}" for i in range(n)])


def write_finetune_rows(cfg, n: int) -> None:
    """data/finetune/{train,dev}_ft.jsonl in the sft stage's shape: the student prompt, the offline teacher's answer."""
    rows = rows_of(cfg, "train", n)
    records = [{"id": r.id, "prompt": prompts.student_prompt(r.premise, r.hypothesis),
                "completion": prompts.completion_json(offline.rationale(offline.analyse(r.premise, r.hypothesis),
                                                                        int(r.label)), int(r.label))}
               for r in rows.itertuples()]  # fmt: skip
    for split in ("train", "dev"):
        path = Path(FINETUNE.format(split=split))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records)


class Timer(TrainerCallback):
    """Wall time and non-padding input tokens from the end of the warm-up steps to the end of the last step (before
    the Trainer's closing evaluation)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, state.max_steps):
            synchronize()
            mark = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)
            self.start, self.end = (mark, None) if state.global_step == self.warmup else (self.start, mark)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}  # fmt: skip
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def measure_training(cfg, args) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = build_trainer(cfg, Path("checkpoints"))
    built = time.perf_counter() - start
    trainer.remove_callback(EvaluateAtEnd)  # eval and save steps lie past the end: training only
    tokens = TokenCount(trainer)  # padded positions against real tokens: pad_token_share
    timer = Timer(args.warmup)
    trainer.add_callback(timer)
    trainer.train()
    (t0, tokens0, step0), (t1, tokens1, step1) = timer.start, timer.end
    batch = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.save_model(str(ADAPTER_DIR))  # as the stage does: adapter + tokenizer
    result = {
        "build_trainer_s": round(built, 1),  # 4-bit load + k-bit preparation + LoRA + tokenizing the rows
        "train_batch_size": trainer.args.train_batch_size, "gradient_accumulation_steps":
        trainer.args.gradient_accumulation_steps, "rows_per_step": batch, "mean_row_tokens": round(sum(lengths) /
        len(lengths), 1), "warmup_steps": step0, "timed_steps": step1 - step0,
        "s_per_step": round((t1 - t0) / (step1 - step0), 2), "tokens_per_s": round((tokens1 - tokens0) / (t1 - t0), 1),
        "samples_per_s": round((step1 - step0) * batch / (t1 - t0), 2),
        "trainable_params": trainer.model.get_nb_trainable_parameters()[0],
        "gradient_checkpointing": trainer.args.activation_checkpointing, **tokens.metrics(), **peak_memory(),
    }  # fmt: skip
    del trainer
    release()
    return result


def measure_hf_generation(cfg, rows) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    load_s = []

    def load():  # as the evaluate stage loads it: base in 4-bit + the adapter
        start = time.perf_counter()
        model = load_adapter_model(cfg)
        load_s.append(time.perf_counter() - start)
        return model

    outputs, wall = evaluation.run_generation(cfg, rows, load, load_tokenizer(ADAPTER_DIR), ADAPTER_DIR)
    release()
    return {"load_4bit_with_adapter_s": round(load_s[0], 1), **generation_figures(cfg, outputs, wall), **peak_memory()}


def generation_figures(cfg, outputs, wall: float) -> dict:
    tokens = sum(g.output_tokens for g in outputs)
    return {"rows": len(outputs), "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
            "wall_s": round(wall, 1), "samples_per_s": round(len(outputs) / wall, 2),
            "output_tokens_per_s": round(tokens / wall, 1), "mean_output_tokens": round(tokens / len(outputs), 1),
            "failed": sum(g.failure is not None for g in outputs)}  # fmt: skip


def measure_server_generation(cfg, rows, command: str) -> dict:
    cfg.eval.engine = "server"
    cfg.eval.server.command = command
    cfg.llm_cache_dir = str(Path(".cache"))  # a fresh reply cache: every row is generated
    outputs, wall = evaluation.run_generation(cfg, rows, None, load_tokenizer(ADAPTER_DIR), ADAPTER_DIR)
    return {"command": command, **generation_figures(cfg, outputs, wall)}


TRAIN_VARIANTS = {  # name -> train.* overrides on the experiment's settings
    "padding_free": {"padding_free": True},
    "padded": {"padding_free": False},
    "padding_free_no_checkpointing": {"padding_free": True, "gradient_checkpointing": False},
    "padded_no_checkpointing": {"padding_free": False, "gradient_checkpointing": False},
}


def measure_variants(cfg, args, rows) -> dict:
    """Training and evaluation variants (module doc, 5.), each on the same rows as the others."""
    variants = {}
    for name, overrides in TRAIN_VARIANTS.items():
        variants[f"train_{name}"] = measure_training(OmegaConf.merge(cfg, {"train": overrides}), args)
    if rows is None:
        return variants
    label = OmegaConf.merge(cfg, {"sft": {"format": "label_only"}})
    tokenizer = load_tokenizer(ADAPTER_DIR)
    for scoring in ("generate", "likelihood"):  # the cot adapter asked the label task: speed, not accuracy
        outputs, wall = evaluation.run_generation(label, rows, lambda: load_adapter_model(label), tokenizer,
                                                  ADAPTER_DIR, "label", scoring)  # fmt: skip
        variants[f"evaluate_label_{scoring}"] = generation_figures(label, outputs, wall) | peak_memory()
        release()
    unmerged = evaluation.run_generation(cfg, rows, lambda: load_adapter_model(cfg), tokenizer, ADAPTER_DIR)
    bf16 = OmegaConf.merge(cfg, {"model": {"load_in_4bit": False, "dtype": "bfloat16"}})
    merged = evaluation.run_generation(bf16, rows, lambda: load_adapter_model(bf16).merge_and_unload().eval(),
                                       tokenizer, ADAPTER_DIR)  # fmt: skip
    agree = sum(a.text == b.text for a, b in zip(unmerged[0], merged[0], strict=True))
    variants["generate_4bit_unmerged"] = generation_figures(cfg, *unmerged)
    variants["generate_bf16_merged"] = generation_figures(bf16, *merged) | {
        "same_output_as_4bit_unmerged": round(agree / len(rows), 4)}  # fmt: skip
    release()
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--experiment", choices=("ablation0", "ablation1", "ablation2"), default="ablation1")
    parser.add_argument("--warmup", type=int, default=2, help="training steps before timing starts")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--rows", type=int, default=64, help="test rows generated (0: training only)")
    parser.add_argument("--server-command", help="eval.server.command (default: vLLM's when .venv-vllm exists)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--variants", action="store_true", help="also measure the variants (module doc, 5.)")
    args = parser.parse_args()
    if args.shape == "7b" and not torch.cuda.is_available():
        parser.error("--shape 7b needs a CUDA GPU (--shape tiny runs on the CPU)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as params:  # what `dvc exp run -S ...` would compose
        params.write(compose_params(settings(args)))
        params.flush()
        cfg = load_config(params_file=params.name)
    test_rows = rows_of(cfg, "test", args.rows) if args.rows else None
    result = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "command": shlex.join(["python", *sys.argv]),  # exactly what ran: the figures depend on --steps, --rows...
        # torch.__version__ keeps the local build tag (2.11.0+cu130) that the package metadata drops
        "versions": {name: version(name) for name in ("transformers", "bitsandbytes", "peft", "trl", "accelerate")}
        | {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "shape": args.shape, "settings": settings(args), "dtype": cfg.model.dtype,
        "lora_r": cfg.train.lora_r, "optim": cfg.train.optim,
        "gradient_checkpointing": cfg.train.gradient_checkpointing, "max_seq_length": cfg.model.max_seq_length,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nlistral-gpu-") as root:
        os.chdir(root)  # the stages' relative paths (models/, data/finetune/) now lie here
        result["base"] = build_base(cfg, args.shape, Path(root) / BASE_DIR)
        write_finetune_rows(cfg, 4 * (args.warmup + args.steps) * cfg.train.per_device_batch_size)
        result["train"] = measure_training(cfg, args)
        if args.rows:
            result["generate_hf"] = measure_hf_generation(cfg, test_rows)
            command = args.server_command or (VLLM_COMMAND if VLLM.exists() else None)
            result["generate_server"] = (
                measure_server_generation(cfg, test_rows, command) if command
                else "not run: no .venv-vllm/bin/vllm (make vllm-env) and no --server-command"
            )  # fmt: skip
        if args.variants:
            result["variants"] = measure_variants(cfg, args, test_rows)
        os.chdir(REPO)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
