"""nlistral.confidence: the label's probability read off a generation's steps, and the calibration figures, checked
against hand-computed values and scikit-learn's AUROC (a dev dependency here, not the code's)."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nlistral.confidence import calibration, label_probability


def steps(*tokens):
    return [(text, top) for text, top in tokens]


def test_the_label_step_gives_the_probability_of_entailment_from_the_two_digit_tokens():
    answer = steps(('{"', {}), ("predicted_label", {}), ('":', {}),
                   (" 0,", {" 0,": math.log(0.6), " 1,": math.log(0.2), " 0": math.log(0.1)}), (' "', {}))  # fmt: skip
    assert label_probability(answer, label_first=True) == pytest.approx(0.25)
    # the other digit below the candidates: certainty; no label step: None
    assert label_probability(steps(('{"predicted_label": ', {}), ("1", {"1": -0.01})), True) == 1.0
    assert label_probability(steps(("no json", {"no": 0.0})), True) is None
    # cot: the last key is the answer's; a label-first task: the first
    last = ("0", {"0": math.log(0.9), "1": math.log(0.1)})
    cot = steps(('"predicted_label": 1 ... ', {}), ('{"predicted_label": ', {}), last)
    assert label_probability(cot, label_first=False) == pytest.approx(0.1)
    assert label_probability(cot, label_first=True) is None  # no candidates known at that step


def test_a_cot_answer_cut_off_after_its_label_keeps_its_probability_but_not_a_label():
    """Review r4: docs/evaluation.md said a parse failure has no probability; one that wrote its label before
    max_new_tokens cut it keeps one, and calibration leaves the row out (it has no label)."""
    from nlistral.parsing import read_answer

    cut = steps(('{"thought_process": "Step 1", "predicted_label":', {}), (" 1", {" 1": math.log(0.8), " 0": -2.0}))
    text = "".join(token for token, _ in cut)
    assert read_answer(text, "length", "cot").error == "truncated"
    assert label_probability(cut, label_first=False) is not None
    assert calibration([0.9, 0.7], [1, 0], [None, 1], 1000, 0)["n"] == 1
    assert label_probability(steps(('{"predicted_label": ', {}), ("10", {"10": -0.1})), True) is None


def test_calibration_figures_by_hand_and_against_scikit_learn():
    p = [0.9, 0.8, 0.3, 0.6, 0.1, 0.55]
    true = [1, 0, 0, 1, 1, 0]
    predicted = [1, 1, 0, 1, 0, 1]
    block = calibration(p, true, predicted, 2000, 0)
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.9, 0.55])
    right = np.array([1, 0, 1, 1, 0, 0])
    # bins (width 0.1): 0.5-0.6: {0.55}, 0.6-0.7: {0.6}, 0.7-0.8: {0.7}, 0.8-0.9: {0.8}, 0.9-1.0: {0.9, 0.9}
    ece = (abs(0.55 - 0) + abs(0.6 - 1) + abs(0.7 - 1) + abs(0.8 - 0) + 2 * abs(0.9 - 0.5)) / 6
    assert block["ece"] == round(ece, 4) and block["n"] == 6
    assert block["ece_ci95"][0] <= block["ece"] <= block["ece_ci95"][1]
    assert block["brier"] == round(np.mean((np.array(p) - np.array(true)) ** 2), 4)
    assert block["auroc"] == round(roc_auc_score(right, confidence), 4)
    # most confident first (ties in row order): right 1, 0, 0, 1, 1, 0 -> 3 rows 1/3, 5 rows 3/5, 6 rows 1/2
    assert block["accuracy_at_coverage"] == {"50": 0.3333, "80": 0.6, "90": 0.5}
    assert [b["rows"] for b in block["reliability"]] == [1, 1, 1, 1, 2]
    # rows without a probability or a label are left out; none at all: no block
    assert calibration([None, 0.7], [1, 1], [1, None], 10, 0) is None
    assert calibration([None, 0.7, 0.2], [1, 1, 0], [1, 1, 0], 10, 0)["n"] == 2


def test_compare_shows_the_ece_difference_with_its_paired_interval(tmp_path, capsys):
    """`nlistral compare A B` on two predictions files: B's ECE minus A's on the rows both gave a probability for;
    a side without probabilities (the teacher) says so."""
    from nlistral import compare
    from nlistral.io import write_jsonl

    rows = [{"id": str(i), "premise": "p", "hypothesis": f"h{i}", "true_label": i % 2} for i in range(40)]
    a = [r | {"predicted_label": 1, "correct": r["true_label"] == 1, "p_entailment": 0.9} for r in rows]
    b = [r | {"predicted_label": r["true_label"], "correct": True, "p_entailment": 0.2 + 0.7 * r["true_label"]}
         for r in rows]  # fmt: skip
    teacher = [r | {"p_entailment": None} for r in b]
    for name, records in (("a", a), ("b", b), ("teacher", teacher)):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    result = compare.run(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), None, "unused", 1000, 0)
    ece_a = calibration([0.9] * 40, [r["true_label"] for r in rows], [1] * 40, 10, 0)["ece"]
    ece_b = calibration([r["p_entailment"] for r in b], [r["true_label"] for r in rows],
                        [r["true_label"] for r in rows], 10, 0)["ece"]  # fmt: skip
    assert result["calibration"]["ece_difference"] == round(ece_b - ece_a, 4) < 0
    low, high = result["calibration"]["ece_difference_ci95"]
    assert low <= result["calibration"]["ece_difference"] <= high < 0
    assert "ECE: B - A = " in capsys.readouterr().out
    without = compare.run(str(tmp_path / "a.jsonl"), str(tmp_path / "teacher.jsonl"), None, "x", 100, 0)
    assert without["calibration"] is None
    assert "ECE: no probabilities on one side" in capsys.readouterr().out
