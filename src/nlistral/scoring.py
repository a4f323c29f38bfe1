"""Scoring shared by the three evaluate stages: the test rows, prediction records and metrics with their intervals.

No torch here: the teacher baseline (an HTTP model) scores with this module alone. Generation is nlistral.evaluation.

An output `read_answer` cannot read (no JSON, no label, cut off at max_new_tokens) is a parse failure, never a
label. The confusion counts cover labelled outputs only, so tp + fp + tn + fn + parse_failures = n, and a failure
counts as wrong everywhere: accuracy = (tp + tn) / n; it is a missed positive in recall when the row is an
entailment (and a missed negative in the macro average's class-0 recall otherwise); precision is over the rows the
model gave that label, which a failure is not. `accuracy_parsed` = (tp + tn) / (n - parse_failures), None when no
row parsed. Intervals (nlistral.stats): accuracy, Wilson's; macro F1, a row bootstrap.
"""

from collections import Counter

from nlistral.confidence import calibration
from nlistral.data import load_split
from nlistral.parsing import read_answer
from nlistral.stats import accuracy_ci, macro_f1_ci


def eval_rows(cfg):
    """The test split, cut to `eval.limit` rows when set; every evaluate stage scores exactly these rows."""
    rows = load_split(cfg.data.dir, "test")
    return rows if cfg.eval.limit is None else rows.head(cfg.eval.limit)


def prediction(row, text: str | None, finish_reason: str | None, output_tokens: int, answer=None,
               p_entailment: float | None = None) -> dict:  # fmt: skip
    """One row of predictions*.jsonl (docs/evaluation.md: Evaluation). `answer` defaults to reading `text`;
    `p_entailment`: the student's probability of entailment at its label's step (None: the teacher, or none read)."""
    answer = answer or read_answer(text, finish_reason)
    return {
        "id": str(row.id),
        "premise": row.premise,
        "hypothesis": row.hypothesis,
        "true_label": int(row.label),
        "predicted_label": answer.label,
        "correct": answer.label == row.label,
        "parse_method": answer.method,
        "parse_error": answer.error,
        "finish_reason": finish_reason,
        "output_tokens": output_tokens,
        "output": text,
        "p_entailment": p_entailment,
    }


def _prf(tp: int, predicted: int, actual: int) -> tuple[float, float, float]:
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score(true_labels, predicted_labels) -> dict:
    """Metrics for 0/1 true labels vs 0/1/None predictions (None = parse failure, counted wrong; see module doc).

    Precision/recall/F1 from the counts directly (scikit-learn is not a dependency); `precision/recall/f1` are
    the entailment class's, `macro_*` the mean of both classes'.
    """
    pairs = list(zip(true_labels, predicted_labels, strict=True))
    tp = sum(t == 1 and p == 1 for t, p in pairs)
    fp = sum(t == 0 and p == 1 for t, p in pairs)
    tn = sum(t == 0 and p == 0 for t, p in pairs)
    fn = sum(t == 1 and p == 0 for t, p in pairs)
    failures = sum(p is None for _, p in pairs)
    positives = sum(t == 1 for t, _ in pairs)  # includes failures on entailment rows
    n = len(pairs)
    entailment = _prf(tp, tp + fp, positives)
    no_entailment = _prf(tn, tn + fn, n - positives)
    macro = [(a + b) / 2 for a, b in zip(entailment, no_entailment, strict=True)]
    return {
        "n": n,
        "accuracy": round((tp + tn) / n, 4) if n else 0.0,
        "precision": round(entailment[0], 4),
        "recall": round(entailment[1], 4),
        "f1": round(entailment[2], 4),
        "macro_precision": round(macro[0], 4),
        "macro_recall": round(macro[1], 4),
        "macro_f1": round(macro[2], 4),
        "parse_failures": failures,
        "parse_failure_rate": round(failures / n, 4) if n else 0.0,
        "accuracy_parsed": round((tp + tn) / (n - failures), 4) if n - failures else None,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def eval_metrics(cfg, records, model: str, model_id: str, wall: float) -> dict:
    """The metrics*.json object shared by the three evaluate stages (docs/evaluation.md: Evaluation)."""
    metrics = {"model": model, "model_id": model_id}
    metrics |= score([r["true_label"] for r in records], [r["predicted_label"] for r in records])
    metrics["accuracy_ci95"] = accuracy_ci([r["correct"] for r in records])
    metrics["macro_f1_ci95"] = macro_f1_ci([r["true_label"] for r in records], [r["predicted_label"] for r in records],
                                           cfg.eval.bootstrap, cfg.eval.seed)  # fmt: skip
    metrics["parse_failures_by_reason"] = dict(Counter(r["parse_error"] for r in records if r["parse_error"]))
    output_tokens = sum(r["output_tokens"] for r in records)
    metrics |= {
        "output_tokens_per_row": round(output_tokens / len(records), 2) if records else 0.0,
        "samples_per_s": round(len(records) / wall, 3) if wall else 0.0,
        "output_tokens_per_s": round(output_tokens / wall, 1) if wall else 0.0,
        "wall_time_s": round(wall, 2),
    }
    # None for the teacher (its API returns no probabilities) and where no label step was read
    columns = ([r.get(k) for r in records] for k in ("p_entailment", "true_label", "predicted_label"))
    metrics["calibration"] = calibration(*columns, cfg.eval.bootstrap, cfg.eval.seed)
    return metrics
