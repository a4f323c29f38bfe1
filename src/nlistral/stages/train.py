"""Stage: (Q)LoRA fine-tuning of models/base on the SFT rows -> models/adapter, metrics/train.json, one MLflow run.

Each row becomes prompt = "[INST] {prompt} [/INST]", completion = " {completion}". TRL's SFTTrainer tokenizes the
prompt (the tokenizer adds the one BOS), appends EOS to the completion, and masks the prompt tokens out of the loss.
Nothing is truncated (max_length=None): rows over model.max_seq_length tokens reach here only if the sft stage
kept them (sft.drop_too_long: false); they are trained on in full and counted in `rows_over_max_seq_length`.
"""

import json
import tempfile
import time

import mlflow
import torch
from datasets import Dataset
from omegaconf import OmegaConf
from peft import LoraConfig
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from nlistral import paths
from nlistral.io import read_jsonl, write_json
from nlistral.model import load_base_model, load_tokenizer, staged_dir
from nlistral.paths import ADAPTER_DIR, ADAPTER_MLFLOW_RUN, FINETUNE, SFT_METRICS
from nlistral.prompts import inst_prompt
from nlistral.stages import StageError


def sft_dataset(path) -> Dataset:
    rows = read_jsonl(path)
    if not rows:
        raise StageError(f"{path} has no rows to train on")
    return Dataset.from_list([{"prompt": inst_prompt(r["prompt"]), "completion": " " + r["completion"]} for r in rows])


def flatten(node, prefix: str) -> dict:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}.{key}").items()}


def flat_params(cfg) -> dict:
    """What made this run, for MLflow: data, model, train and sft params, and which LLMs wrote the data.

    Only these keys: nothing from the environment, and no API settings beyond backend and model names.
    """
    params = {}
    for section in ("data", "model", "train", "sft"):
        params |= flatten(OmegaConf.to_container(cfg[section], resolve=True), section)
    for role in ("teacher", "reflector"):
        params |= {f"{role}.backend": cfg[role].backend, f"{role}.model": cfg[role].model}
    return params


def data_metrics() -> dict:
    """The fine-tuning set's statistics (sft stage metrics), numeric values only, for MLflow."""
    stats = {}
    for split in ("train", "dev"):
        stats |= flatten(json.loads(paths.require(SFT_METRICS, split).read_text(encoding="utf-8")), f"sft_{split}")
    return {k: v for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def build_trainer(cfg, output_dir) -> SFTTrainer:
    """The trainer with its tokenized datasets (`trainer.train_dataset`: input_ids, labels with -100 on the prompt)."""
    train = cfg.train
    args = SFTConfig(
        output_dir=output_dir,
        max_length=None,  # never truncate
        completion_only_loss=True,
        num_train_epochs=train.num_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_batch_size,
        per_device_eval_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        warmup_steps=float(train.warmup_ratio),  # transformers 5: a float in [0, 1) is a ratio of the steps
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler_type,
        optim=train.optim,
        activation_checkpointing=train.gradient_checkpointing,
        bf16=cfg.model.dtype == "bfloat16",
        logging_steps=train.logging_steps,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=train.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",  # MLflow is logged by hand: its Trainer callback would end our run early
    )
    lora = LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=list(train.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    # bad input fails before a 7B model loads
    train_rows, dev_rows = (sft_dataset(paths.require(FINETUNE, split)) for split in ("train", "dev"))
    return SFTTrainer(
        model=load_base_model(cfg, for_training=True),
        args=args,
        train_dataset=train_rows,
        eval_dataset=dev_rows,
        processing_class=load_tokenizer(),
        peft_config=lora,
    )


def summarize(cfg, trainer, result, dev_loss: float, wall: float) -> dict:
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainable, total = trainer.model.get_nb_trainable_parameters()
    return {
        "train_loss": round(result.training_loss, 4),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(losses[-1], 4) if losses else None,
        "eval_loss": round(dev_loss, 4),
        "steps": result.global_step,
        "epochs": round(trainer.state.epoch, 2),
        "train_rows": len(lengths),
        "dev_rows": len(trainer.eval_dataset),
        "train_tokens": sum(lengths),
        "loss_tokens": sum(sum(label != -100 for label in row) for row in trainer.train_dataset["labels"]),
        "max_row_tokens": max(lengths),
        "rows_over_max_seq_length": sum(n > cfg.model.max_seq_length for n in lengths),
        "trainable_params": trainable,
        "total_params": total,
        "wall_time_s": round(wall, 2),
        "steps_per_second": round(result.global_step / wall, 2),
    }


def run(cfg) -> dict:
    set_seed(cfg.train.seed)  # before the LoRA weights are initialised
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(cfg, scratch)  # bad, empty or missing input fails here, before MLflow is touched
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        mlflow.set_experiment(cfg.mlflow.experiment)
        with mlflow.start_run() as mlrun:
            mlflow.log_params(flat_params(cfg))
            mlflow.log_metrics(data_metrics())
            start = time.perf_counter()
            result = trainer.train()
            wall = time.perf_counter() - start
            metrics = summarize(cfg, trainer, result, trainer.evaluate()["eval_loss"], wall)
            for entry in trainer.state.log_history:  # the loss curve
                if "loss" in entry:
                    step = {k: entry[k] for k in ("loss", "grad_norm", "learning_rate") if k in entry}
                    mlflow.log_metrics(step, step=entry["step"])
            mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})
            with staged_dir(ADAPTER_DIR) as out:
                trainer.model.save_pretrained(out)
                trainer.processing_class.save_pretrained(out)
                run_ids = {"run_id": mlrun.info.run_id, "experiment_id": mlrun.info.experiment_id}
                write_json(out / ADAPTER_MLFLOW_RUN.name, run_ids)
            mlflow.log_artifacts(str(ADAPTER_DIR), artifact_path="adapter")
    write_json(paths.TRAIN_METRICS, metrics)
    print(
        f"train: loss {metrics['train_loss_first']} -> {metrics['train_loss_last']}, "
        f"dev loss {metrics['eval_loss']}, {metrics['steps']} steps in {metrics['wall_time_s']} s -> {ADAPTER_DIR}"
    )
    return metrics
