"""Stage: greedy generation on the test split with base + adapter, scored -> metrics/eval.json, predictions, plots.

Generation is shared with evaluate_base (nlistral.evaluation), scoring with all three (nlistral.scoring: the rules).
The rationale-length plot buckets rows by the tokens of the reasoning the model wrote (its thought_process, or the
whole output when none could be read: a parse failure still counts, as wrong, in its bucket).

eval.json's `comparisons` pair each baseline (a) with the fine-tuned model (b), for each baseline whose predictions
are there: dvc.yaml makes this stage depend on both, so `dvc repro` always has them; a hand run without one (or with
one for other rows) prints why and skips that comparison rather than make the adapter wait for the teacher's bill.
"""

import mlflow

from nlistral import tracking
from nlistral.evaluation import check_engine, check_failures, check_scoring, eval_task, run_generation
from nlistral.formatting import terminal
from nlistral.io import content_digest, read_jsonl, write_csv, write_jsonl, write_metrics
from nlistral.model import base_info, load_adapter_model, load_tokenizer
from nlistral.paths import (
    ADAPTER_DIR,
    CONFUSION,
    EVAL_METRICS,
    PLOT_ACCURACY_BY_LENGTH,
    PLOT_RELIABILITY,
    PREDICTIONS,
    PREDICTIONS_BASE,
    PREDICTIONS_TEACHER,
)
from nlistral.redact import redacted
from nlistral.results import CompareError, compare_records
from nlistral.scoring import eval_metrics, eval_rows, prediction
from nlistral.stats import accuracy_by_length

UNPARSED = "unparsed"
BASELINES = {"base": PREDICTIONS_BASE, "teacher": PREDICTIONS_TEACHER}


def comparisons(cfg, records) -> dict:
    """{baseline: paired comparison baseline (a) vs fine-tuned (b)} for each baseline whose predictions exist."""
    found = {}
    for name, path in BASELINES.items():
        try:
            found[name] = compare_records(read_jsonl(path), records, name, "fine-tuned", cfg.eval.bootstrap,
                                          cfg.eval.seed)  # fmt: skip
        except FileNotFoundError:
            print(f"evaluate: no {path}, so no comparison with the {name} model (`nlistral evaluate-{name}`)")
        except CompareError as err:
            print(f"evaluate: {path} is not comparable, skipped: {terminal(err)}")
        else:
            del found[name]["flipped"]  # in `nlistral compare`; eval.json keeps the counts
    return found


def rationale_tokens(tokenizer, records, answers) -> list[int]:
    """Tokens of each output's reasoning: its thought_process, or the whole output when none was read."""
    return [len(tokenizer(a.thought_process, add_special_tokens=False).input_ids) if a.thought_process
            else r["output_tokens"] for r, a in zip(records, answers, strict=True)]  # fmt: skip


def _log_to_training_run(cfg, metrics: dict) -> None:
    """Log into the MLflow run that trained the adapter (found by its digest), else a new run tagged with it."""
    digest = content_digest(ADAPTER_DIR)
    tracking.connect(cfg)
    run_id = tracking.run_of_adapter(digest)
    if run_id is None:  # e.g. the adapter came from the DVC cache, trained against another tracking store
        print(f"evaluate: no run in {redacted(cfg.mlflow.tracking_uri)} trained this adapter; logging to a new run")
    with tracking.start_run("evaluate", run_id, tags=None if run_id else {tracking.ADAPTER_TAG: digest}) as run:
        flat = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        flat.update({f"confusion_{k}": v for k, v in metrics["confusion"].items()})
        flat["accuracy_ci95_low"], flat["accuracy_ci95_high"] = metrics["accuracy_ci95"]
        if calibration := metrics["calibration"]:
            flat |= {k: calibration[k] for k in ("ece", "brier", "auroc") if calibration[k] is not None}
            flat["ece_ci95_low"], flat["ece_ci95_high"] = calibration["ece_ci95"]
        for name, comparison in metrics["comparisons"].items():
            flat.update({f"vs_{name}_{k}": comparison[k] for k in ("difference", "mcnemar_p", "mcnemar_midp")})
        run.log(mlflow.log_metrics, {f"test_{k}": v for k, v in flat.items()})
        run.log(mlflow.log_artifact, PREDICTIONS)
        run.log(mlflow.log_artifact, CONFUSION)


def run(cfg) -> dict:
    check_engine(cfg)
    task = eval_task(cfg)
    scoring = check_scoring(cfg, task)
    rows = eval_rows(cfg)
    tokenizer = load_tokenizer(ADAPTER_DIR)
    outputs, wall = run_generation(cfg, rows, lambda: load_adapter_model(cfg), tokenizer, ADAPTER_DIR, task, scoring)

    answers = [g.answer(task) for g in outputs]
    records = [prediction(row, g.text, g.finish_reason, g.output_tokens, answer, g.p_entailment)
               for row, g, answer in zip(rows.itertuples(), outputs, answers, strict=True)]  # fmt: skip
    metrics = eval_metrics(cfg, records, "fine-tuned", base_info()["name_or_path"], wall)
    metrics |= {"task": task, "scoring": scoring}
    metrics["comparisons"] = comparisons(cfg, records)

    write_jsonl(PREDICTIONS, records)
    confusion = [{"actual": r["true_label"], "predicted": UNPARSED if r["predicted_label"] is None
                  else r["predicted_label"]} for r in records]  # fmt: skip
    write_csv(CONFUSION, confusion, ("actual", "predicted"))  # for `dvc plots` (template: confusion)
    by_length = accuracy_by_length(rationale_tokens(tokenizer, records, answers), [r["correct"] for r in records])
    write_csv(PLOT_ACCURACY_BY_LENGTH, by_length, ("rationale_tokens", "rows", "accuracy"))
    reliability = (metrics["calibration"] or {}).get("reliability", [])
    write_csv(PLOT_RELIABILITY, reliability, ("bin", "rows", "confidence", "accuracy"))  # `dvc plots`
    write_metrics(EVAL_METRICS, metrics)
    check_failures(cfg, outputs)
    _log_to_training_run(cfg, metrics)
    print(f"evaluate: accuracy {metrics['accuracy']} (95% CI {metrics['accuracy_ci95']}), f1 {metrics['f1']}, "
          f"{metrics['parse_failures']}/{metrics['n']} unparsed -> {EVAL_METRICS}")  # fmt: skip
    return metrics
