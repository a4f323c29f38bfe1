"""Stage: (Q)LoRA fine-tuning of models/base on the SFT rows -> models/adapter, metrics/train.json, one MLflow run.

The trainer (chat-template rows, loss on the completion only, LoRA, `train.*` arguments) is nlistral.trainer's.
Rows over model.max_seq_length tokens (kept by the sft stage) are counted in `rows_over_max_seq_length`.

Training evaluates on the dev set every `train.eval_steps` steps and at the last step, stops early after
`train.early_stopping_patience` evaluations without a lower dev loss, and keeps the checkpoint with the lowest dev
loss as the adapter. Checkpoints live in checkpoints/<fingerprint>/, outside DVC's outs (which DVC deletes before a
stage runs); the fingerprint covers the config and the fine-tuning data, so a re-run after a crash continues its own
run's latest checkpoint (optimizer, scheduler, RNG, early-stopping state, MLflow run) and never another's.

Under `accelerate launch` (several processes) every process trains and takes part in saving the adapter; only the
main one logs to MLflow and writes.
The MLflow run (store, name, provenance, writes that never fail hours of training) is nlistral.tracking's.
"""

import hashlib
import json
import re
import shutil
import time
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlflow
import safetensors
import safetensors.torch
import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback, set_seed
from transformers.trainer import TRAINING_ARGS_NAME

from nlistral import paths, tracking
from nlistral.io import content_digest, write_csv, write_json, write_metrics
from nlistral.model import base_info, staged_dir
from nlistral.paths import ADAPTER_DIR, FINETUNE, SFT_METRICS, TRAIN_HISTORY, TRAIN_METRICS
from nlistral.redact import redacted
from nlistral.trainer import TokenCount, build_trainer

CHECKPOINTS = Path("checkpoints")  # resume state, not a stage output: git- and dvc-ignored, see the module doc
CHECKPOINT_RUN = "mlflow_run.json"  # beside the checkpoints: the MLflow run a resumed training continues
HISTORY_FIELDS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")  # tokens/s: in MLflow


def flatten(node, prefix: str) -> dict:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}.{key}").items()}


def flat_params(cfg) -> dict:
    """What made this run, for MLflow: data, model, train and sft params, and which LLMs wrote the data.

    Only these keys: nothing from the environment, and no API settings beyond backend and model names; strings
    `redacted` (a dataset URL may hold a token).
    """
    params = {}
    for section in ("data", "model", "train", "sft"):
        params |= flatten(OmegaConf.to_container(cfg[section], resolve=True), section)
    for role in ("teacher", "reflector"):
        params |= {f"{role}.backend": cfg[role].backend, f"{role}.model": cfg[role].model}
    return {key: redacted(value) if isinstance(value, str) else value for key, value in params.items()}


def data_metrics() -> dict:
    """The fine-tuning set's statistics (sft stage metrics), numeric values only, for MLflow."""
    stats = {}
    for split in ("train", "dev"):
        stats |= flatten(json.loads(paths.require(SFT_METRICS, split).read_text(encoding="utf-8")), f"sft_{split}")
    return {k: v for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def fingerprint(cfg) -> str:
    """Identifies a training run: model + train config (less `resume`), base model, fine-tuning data."""
    train = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items() if k != "resume"}
    identity = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "train": train,
        "base": base_info(),
        "data": {split: md5(paths.require(FINETUNE, split)) for split in ("train", "dev")},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run_tags(cfg) -> dict:
    """Where the run came from, beyond the git commit and DVC experiment (tracking.start_run tags those): the base
    model, the fine-tuning data's digests, and the CPU threads torch used (OMP_NUM_THREADS; docs/experiments.md)."""
    info = base_info()
    source = info.get("source")  # a GGUF file that base_model converted
    tags = {
        "base_model": f"tiny ({cfg.model.name})"
        if info.get("built_tiny")
        else f"{source['name_or_path']} ({source['gguf_file']})"
        if source
        else info["name_or_path"],
        "base_model_revision": info.get("revision"),
        "torch_threads": str(torch.get_num_threads()),
    }
    tags |= {f"{split}_ft_md5": md5(paths.require(FINETUNE, split)) for split in ("train", "dev")}
    return {k: v for k, v in tags.items() if v is not None}


def redacted_params(cfg) -> str:
    """The composed config as YAML, for the run's artifacts, with every string `redacted`: no credential in a URL,
    query or command anywhere in it."""

    def walk(node):
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return redacted(node) if isinstance(node, str) else node

    return OmegaConf.to_yaml(OmegaConf.create(walk(OmegaConf.to_container(cfg, resolve=True))))


class MlflowCurves(TrainerCallback):
    """Loss, dev loss, learning rate, grad norm and tokens/s into the stage's MLflow run as they are logged (the
    stage adds it on the main process: a trainer built by hand logs nowhere, never into a stray run)."""

    def __init__(self, run: tracking.Run):
        self.run = run

    NAMES = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
             "train_tokens_per_second": "tokens_per_s"}  # fmt: skip

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {name: logs[key] for key, name in self.NAMES.items() if key in (logs or {})}
        if "loss" in values or "eval_loss" in values:
            self.run.log(mlflow.log_metrics, values, step=state.global_step)


def sort_target_modules(adapter_dir: Path) -> None:
    """peft writes `target_modules` from a set, in an order that changes with Python's hash seed: sorted, the same
    adapter is the same file (and DVC hash) on every run."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        write_json(config_path, config)


def checkpoint_step(path) -> int:
    return int(re.fullmatch(r"checkpoint-(\d+)", Path(path).name).group(1))


def damage(checkpoint: Path) -> str | None:
    """What in `checkpoint` cannot be read back (a file cut short by a kill during a copy, a full disk), or None:
    torch's files are zip archives (every member's CRC checked), safetensors and JSON files are read whole."""
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    if (bad := archive.testzip()) is not None:
                        return f"{path.name}: {bad} fails its checksum"
            elif path.suffix == ".safetensors":
                safetensors.torch.load_file(path)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (zipfile.BadZipFile, safetensors.SafetensorError, OSError, ValueError) as err:
            return f"{path.name}: {err}"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that reads back (trainer_state.json is written last, so a kill mid-save
    leaves none; a damaged one is passed over, saying so, for the one before it)."""
    complete = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    for checkpoint in sorted(complete, key=checkpoint_step, reverse=True):
        if (why := damage(checkpoint)) is None:
            return checkpoint
        print(f"train: not resuming from {checkpoint}, it is damaged ({why}); trying the one before")
    return None


@contextmanager
def training_run(run_dir: Path, resuming: bool):
    """The stage's MLflow run (nlistral.tracking): a new one, or when resuming the one stored beside the
    checkpoints (unless the checkpoint outlived its tracking store)."""
    stored = run_dir / CHECKPOINT_RUN
    run_id = json.loads(stored.read_text(encoding="utf-8"))["run_id"] if resuming and stored.is_file() else None
    with tracking.start_run("train", run_id if run_id and tracking.run_exists(run_id) else None) as run:
        write_json(stored, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
        yield run


def history(log_history) -> list[dict]:
    """One row per logged step: training and evaluation entries of the same step merged."""
    rows = {}
    for entry in log_history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue
        row = rows.setdefault(entry["step"], {"step": entry["step"]})
        row["epoch"] = round(entry["epoch"], 4)
        row |= {k: entry[k] for k in ("loss", "eval_loss", "learning_rate", "grad_norm") if k in entry}
    return [rows[step] for step in sorted(rows)]


def summarize(cfg, trainer, result, resumed_from: int | None, wall: float, params: tuple[int, int],
              tokens: TokenCount) -> dict:  # fmt: skip
    """`params`: (trainable, total) counted before training: under FSDP `trainer.model` is then the wrapper, whose
    flat parameters are this rank's shard and no longer 4-bit (transformers/trainer.py: `self.model =
    self.model_wrapped = model`)."""
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainable, total = params
    state = trainer.state
    best_step = checkpoint_step(state.best_model_checkpoint)
    return {
        "train_loss": round(result.training_loss, 4),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(losses[-1], 4) if losses else None,
        "eval_loss": round(state.best_metric, 4),  # the adapter's: the best checkpoint's
        "best_step": best_step,
        "best_eval_loss": round(state.best_metric, 4),
        "stopped_early": state.global_step < state.max_steps,
        "resumed_from_step": resumed_from,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": round(state.epoch, 2),
        "train_rows": len(lengths),
        "dev_rows": len(trainer.eval_dataset),
        "train_tokens": sum(lengths),
        "loss_tokens": sum(sum(label != -100 for label in row) for row in trainer.train_dataset["labels"]),
        "max_row_tokens": max(lengths),
        "rows_over_max_seq_length": sum(n > cfg.model.max_seq_length for n in lengths),
        "trainable_params": trainable,
        "total_params": total,
        "processes": trainer.args.world_size,
        "wall_time_s": round(wall, 2),
        "steps_per_second": round((state.global_step - (resumed_from or 0)) / wall, 2),
        **tokens.metrics(),  # this session's training batches: real tokens, positions, the padded share
        "tokens_per_second": round(tokens.tokens / wall, 1),
    }


def run(cfg) -> dict:
    set_seed(cfg.train.seed)  # before the LoRA weights are initialised
    run_dir = CHECKPOINTS / fingerprint(cfg)  # missing input fails here, before MLflow is touched
    tracking.connect(cfg)  # a tracking server that does not answer fails here, before any model loads
    trainer = build_trainer(cfg, run_dir)  # bad or empty input and bad train.* values fail here
    params = trainer.model.get_nb_trainable_parameters()  # before train() wraps the model (summarize)
    tokens = TokenCount(trainer)
    main = trainer.is_world_process_zero()  # one process unless started by `accelerate launch`
    checkpoint = latest_checkpoint(run_dir) if cfg.train.resume == "auto" else None
    if checkpoint is None and main:
        shutil.rmtree(run_dir, ignore_errors=True)  # partial or unwanted checkpoints of this configuration
    trainer.accelerator.wait_for_everyone()
    resumed_from = checkpoint_step(checkpoint) if checkpoint else None
    with training_run(run_dir, resuming=checkpoint is not None) if main else nullcontext() as run:
        if main:
            trainer.add_callback(MlflowCurves(run))
            run.log(mlflow.set_tags, run_tags(cfg))
            run.log(mlflow.log_params, flat_params(cfg))
            run.log(mlflow.log_metrics, data_metrics())
            if checkpoint:
                print(f"train: resuming from {checkpoint} (step {resumed_from})")
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        wall = time.perf_counter() - start
        # Every process saves: under FSDP the adapter's full state dict is gathered from all of them (the main one
        # writes it), so a rank that skipped this call would hang the others.
        if not main:
            trainer.save_model()
            return {}
        metrics = summarize(cfg, trainer, result, resumed_from, wall, params, tokens)
        run.log(mlflow.log_metrics, {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        with staged_dir(ADAPTER_DIR) as out:  # the best checkpoint's weights (load_best_model_at_end)
            trainer.save_model(str(out))  # the adapter and the tokenizer
            (out / TRAINING_ARGS_NAME).unlink()  # the Trainer's pickled arguments: params.yaml in MLflow says it
            sort_target_modules(out)
            run.log(mlflow.set_tag, tracking.ADAPTER_TAG, content_digest(out))  # how `evaluate` finds this run
        write_csv(TRAIN_HISTORY, history(trainer.state.log_history), HISTORY_FIELDS)
        run.log(mlflow.log_artifacts, str(ADAPTER_DIR), artifact_path="adapter")
        run.log(mlflow.log_text, redacted_params(cfg), "params.yaml")
        for split in ("train", "dev"):
            run.log(mlflow.log_artifact, str(paths.require(SFT_METRICS, split)), artifact_path="sft")
    write_metrics(TRAIN_METRICS, metrics)
    shutil.rmtree(run_dir, ignore_errors=True)  # finished: the adapter is out, nothing left to resume
    print(
        f"train: loss {metrics['train_loss_first']} -> {metrics['train_loss_last']}, best dev loss "
        f"{metrics['best_eval_loss']} at step {metrics['best_step']}"
        f"{' (stopped early)' if metrics['stopped_early'] else ''}, {metrics['steps']} steps in "
        f"{metrics['wall_time_s']} s -> {ADAPTER_DIR}"
    )
    return metrics
