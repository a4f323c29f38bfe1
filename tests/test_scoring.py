"""Scoring by hand (nlistral.scoring, no model): every metric of a confusion matrix with both kinds of parse failure,
the empty and one-class edges, one prediction record, the metrics object's throughput and interval, eval.limit.

Written against the survivors of `make mutation` in scoring.py: each assertion pins a count, a rounding or a
key a mutant changed without any test noticing.
"""

from collections import namedtuple

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from nlistral.parsing import Answer
from nlistral.scoring import eval_metrics, eval_rows, prediction, score
from nlistral.stats import accuracy_ci, macro_f1_ci

Row = namedtuple("Row", "id premise hypothesis label")
JSON_1 = '{"thought_process": "Step 1: x.", "predicted_label": 1}'


def test_every_metric_of_a_confusion_matrix_with_failures_on_both_classes():
    """tp 2, fn 1, a failure on an entailment row; tn 3, fp 1, a failure on a non-entailment row (n 9)."""
    metrics = score([1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, None, 0, 0, 1, None, 0])
    assert metrics == {
        "n": 9,
        "accuracy": 0.5556,  # 5/9
        "precision": 0.6667, "recall": 0.5, "f1": 0.5714,  # 2/3, 2/4, 4/7
        "macro_precision": 0.7083,  # (2/3 + 3/4) / 2: class 0's precision is tn / (tn + fn)
        "macro_recall": 0.55,  # (2/4 + 3/5) / 2
        "macro_f1": 0.619,  # (4/7 + 2/3) / 2
        "parse_failures": 2, "parse_failure_rate": 0.2222, "accuracy_parsed": 0.7143,  # 5/7
        "confusion": {"tp": 2, "fp": 1, "tn": 3, "fn": 1},
    }  # fmt: skip


def test_no_rows_one_class_and_only_failures_score_zero_not_an_error():
    zeros = dict.fromkeys(("accuracy", "precision", "recall", "f1", "macro_precision", "macro_recall", "macro_f1",
                           "parse_failure_rate"), 0.0)  # fmt: skip
    assert score([], []) == {"n": 0, **zeros, "parse_failures": 0, "accuracy_parsed": None,
                             "confusion": dict.fromkeys(("tp", "fp", "tn", "fn"), 0)}  # fmt: skip
    only_zeros = score([0, 0], [0, 0])  # no entailment row, none predicted: class 1 scores 0, not 1
    assert (only_zeros["precision"], only_zeros["recall"], only_zeros["f1"]) == (0.0, 0.0, 0.0)
    assert (only_zeros["macro_precision"], only_zeros["macro_f1"], only_zeros["accuracy"]) == (0.5, 0.5, 1.0)
    failed = score([1], [None])  # issue 32: accuracy over 0 parsed rows is no number, not 0.0
    assert (failed["accuracy"], failed["accuracy_parsed"], failed["parse_failure_rate"]) == (0.0, None, 1.0)
    with pytest.raises(ValueError):
        score([1, 0], [1])


def test_a_prediction_record_reads_the_reply_unless_given_its_answer():
    row = Row(7, "A man sleeps.", "A man rests.", 1)
    record = prediction(row, JSON_1, "stop", 12)
    assert record == {"id": "7", "premise": "A man sleeps.", "hypothesis": "A man rests.", "true_label": 1,
                      "predicted_label": 1, "correct": True, "parse_method": "json", "parse_error": None,
                      "finish_reason": "stop", "output_tokens": 12, "output": JSON_1, "p_entailment": None}  # fmt: skip
    cut = prediction(row, JSON_1, "length", 12)  # cut off at max_new_tokens: a failure, whatever it says
    assert (cut["predicted_label"], cut["correct"], cut["parse_error"]) == (None, False, "truncated")
    given = prediction(row, "no json here", "stop", 3, Answer(0, "regex", None, "x"))
    assert (given["predicted_label"], given["parse_method"], given["correct"]) == (0, "regex", False)


def test_the_metrics_object_adds_its_interval_and_throughput():
    cfg = OmegaConf.create({"eval": {"bootstrap": 1000, "seed": 1}})
    correct = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 4
    records = [prediction(Row(i, "p", "h", 1), JSON_1 if ok else "none", "stop", 5) for i, ok in enumerate(correct)]
    metrics = eval_metrics(cfg, records, "base", "models/base", 3.14159)
    assert (metrics["model"], metrics["model_id"], metrics["accuracy"]) == ("base", "models/base", 0.7)
    assert metrics["accuracy_ci95"] == accuracy_ci(correct) == [0.5457, 0.8193]  # Wilson, 28 of 40
    low, high = metrics["macro_f1_ci95"]  # 12 failures on entailment rows: macro F1 by the bootstrap
    assert low < metrics["macro_f1"] < high
    assert metrics["macro_f1_ci95"] == macro_f1_ci([1] * 40, [1 if ok else None for ok in correct], 1000, 1)
    assert metrics["parse_failures_by_reason"] == {"no_json": 12}
    assert (metrics["samples_per_s"], metrics["output_tokens_per_s"], metrics["wall_time_s"]) == (12.732, 63.7, 3.14)
    instant = eval_metrics(cfg, records, "base", "models/base", 0.0)
    assert (instant["samples_per_s"], instant["output_tokens_per_s"], instant["wall_time_s"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(("limit", "n"), [(None, 44), (3, 3)])
def test_eval_rows_are_the_test_split_cut_to_eval_limit(limit, n):
    cfg = OmegaConf.create({"data": {"dir": str(REPO / "data" / "sample")}, "eval": {"limit": limit}})
    rows = eval_rows(cfg)
    assert len(rows) == n and list(rows.id[:3]) == list(eval_rows(OmegaConf.merge(cfg, {"eval": {"limit": 3}})).id)
