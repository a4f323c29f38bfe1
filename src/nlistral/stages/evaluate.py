"""Stage: greedy generation on the test split with base + adapter, scored -> metrics/eval.json, predictions, plot.

Scoring: an output parse_reply cannot read (no JSON, no label, cut off at max_new_tokens) is a parse failure,
never a label. The confusion counts cover parsed outputs only, so tp + fp + tn + fn + parse_failures = n, and
failures count as wrong: accuracy = (tp + tn) / n, and a failure on an entailment row is a missed positive in
recall. Precision is over the rows the model labelled entailment, which a failure is not.
"""

import json
import time
from collections import Counter

import mlflow
import torch
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from nlistral.data import load_split
from nlistral.io import write_csv, write_json, write_jsonl
from nlistral.model import load_adapter_model, load_tokenizer
from nlistral.parsing import ReplyError, parse_reply
from nlistral.paths import ADAPTER_DIR, ADAPTER_MLFLOW_RUN, CONFUSION, EVAL_METRICS, PREDICTIONS
from nlistral.prompts import inst_prompt, student_prompt

UNPARSED = "unparsed"


def parse_generation(text: str, finish_reason: str) -> tuple[int | None, str | None]:
    """(label, None) for a readable output, (None, reason) for a parse failure."""
    try:
        return parse_reply(text, finish_reason=finish_reason)["predicted_label"], None
    except ReplyError as err:
        return None, err.reason


def score(true_labels, predicted_labels) -> dict:
    """Metrics for 0/1 true labels vs 0/1/None predictions (None = parse failure, counted wrong; see module doc).

    Precision/recall/F1 from the counts directly (scikit-learn is not a dependency); positive class = 1.
    """
    pairs = list(zip(true_labels, predicted_labels, strict=True))
    tp = sum(t == 1 and p == 1 for t, p in pairs)
    fp = sum(t == 0 and p == 1 for t, p in pairs)
    tn = sum(t == 0 and p == 0 for t, p in pairs)
    fn = sum(t == 1 and p == 0 for t, p in pairs)
    failures = sum(p is None for _, p in pairs)
    positives = sum(t == 1 for t, _ in pairs)  # includes failures on entailment rows
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": round((tp + tn) / n, 4) if n else 0.0,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "parse_failures": failures,
        "parse_failure_rate": round(failures / n, 4) if n else 0.0,
        "accuracy_parsed": round((tp + tn) / (n - failures), 4) if n - failures else 0.0,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


@torch.inference_mode()
def generate(model, tokenizer, prompts, batch_size: int, max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy (text, finish_reason) per prompt, in order. Batched with left padding, longest prompts first."""
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        batch = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for i, ids in zip(batch, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
            stopped = tokenizer.eos_token_id in ids
            ids = ids[: ids.index(tokenizer.eos_token_id)] if stopped else ids
            results[i] = (tokenizer.decode(ids, skip_special_tokens=True), "stop" if stopped else "length")
    return results


def _log_to_training_run(cfg, metrics: dict) -> None:
    """Log into the MLflow run that trained the adapter, or a new linked run if this store does not have it."""
    train_run = json.loads(ADAPTER_MLFLOW_RUN.read_text(encoding="utf-8"))["run_id"]
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    run_id = train_run
    try:
        mlflow.get_run(train_run)
    except MlflowException:  # e.g. the adapter came from the DVC cache, trained against another tracking store
        print(f"evaluate: MLflow run {train_run} not found in {cfg.mlflow.tracking_uri}; logging to a new run")
        run_id = None
    with mlflow.start_run(run_id=run_id, tags=None if run_id else {"adapter_run_id": train_run}):
        flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        flat.update({f"confusion_{k}": v for k, v in metrics["confusion"].items()})
        mlflow.log_metrics({f"test_{k}": v for k, v in flat.items()})
        mlflow.log_artifact(PREDICTIONS)
        mlflow.log_artifact(CONFUSION)


def run(cfg) -> dict:
    rows = load_split(cfg.data.dir, "test")
    if cfg.eval.limit is not None:
        rows = rows.head(cfg.eval.limit)
    tokenizer = load_tokenizer(ADAPTER_DIR)
    model = load_adapter_model(cfg)
    prompts = [inst_prompt(student_prompt(r.premise, r.hypothesis)) for r in rows.itertuples()]
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    wall = time.perf_counter() - start

    records = []
    for row, (text, finish_reason) in zip(rows.itertuples(), outputs, strict=True):
        label, error = parse_generation(text, finish_reason)
        records.append({"id": row.id, "true_label": row.label, "predicted_label": label, "parse_error": error,
                        "finish_reason": finish_reason, "output": text})  # fmt: skip
    metrics = score([r["true_label"] for r in records], [r["predicted_label"] for r in records])
    metrics["parse_failure_reasons"] = dict(Counter(r["parse_error"] for r in records if r["parse_error"]))
    metrics.update(wall_time_s=round(wall, 2), rows_per_second=round(len(records) / wall, 2))

    write_jsonl(PREDICTIONS, records)
    confusion = [{"actual": r["true_label"], "predicted": UNPARSED if r["predicted_label"] is None
                  else r["predicted_label"]} for r in records]  # fmt: skip
    write_csv(CONFUSION, confusion, ("actual", "predicted"))  # for `dvc plots` (template: confusion)
    write_json(EVAL_METRICS, metrics)
    _log_to_training_run(cfg, metrics)
    print(f"evaluate: accuracy {metrics['accuracy']}, f1 {metrics['f1']}, "
          f"{metrics['parse_failures']}/{metrics['n']} unparsed -> {EVAL_METRICS}")  # fmt: skip
    return metrics
