"""How sure the student is: the probability of its label read off the step that wrote it, and calibration figures.

Both engines describe a generation as steps: (token text, {candidate token text: logprob}) — the hf engine from the
scores of `generate` (the top LOGPROBS of each step and every token holding a 0 or 1), a server from OpenAI's
`logprobs`/`top_logprobs` (the top LOGPROBS only). The label step is the one whose token holds the digit after
`"predicted_label":` (the first such key for a label-first task, the last for cot). Its probability of entailment
is p(token with 1) / (p(token with 0) + p(token with 1)), the two tokens being the written one and the same token
with the other digit (` 1,` against ` 0,`); a candidate not among the top ones counts as probability 0 (a server's
probability is then 0 or 1: the other digit was below its top 20). No label step (no `"predicted_label": 0|1` in
the text) or a label token holding another digit too (`10`): None. A parse failure that wrote a label (cut off
after it) keeps its probability; `calibration` counts only rows with a label.

Calibration (per model, over the rows with a probability; the confidence is that of the predicted label):
expected calibration error over BINS equal-width bins with a row-bootstrap 95% interval (ECE is biased upward at
small n: a perfectly calibrated model's ECE is above 0 by sampling noise alone, so the interval shows the spread,
not a test against 0), Brier score, the reliability diagram's bins, accuracy of the most confident 50/80/90% of the
rows (selective prediction) and the AUROC of confidence against correctness (Mann-Whitney U, scipy).
"""

import math
import re

import numpy as np

from nlistral.stats import resampled_rows

LOGPROBS = 20  # candidates kept per step (hf, which adds every digit token) and asked of a server (OpenAI's maximum)
BINS = 10
COVERAGES = (0.5, 0.8, 0.9)
_LABEL = re.compile(r'"predicted_label"\s*:\s*"?\s*([01])')

Steps = list[tuple[str, dict[str, float]]]


def label_probability(steps: Steps | None, label_first: bool) -> float | None:
    """P(entailment) at the step that wrote the label (module doc), or None."""
    if not steps:
        return None
    text = "".join(token for token, _ in steps)
    found = list(_LABEL.finditer(text))
    if not found:
        return None
    digit_at = (found[0] if label_first else found[-1]).start(1)
    end = 0
    for token, top in steps:
        start, end = end, end + len(token)
        if start <= digit_at < end:
            at = digit_at - start
            if token.count("0") + token.count("1") != 1:
                return None  # the digit shares its token with another digit: no clean alternative
            with_digit = {d: token[:at] + d + token[at + 1 :] for d in "01"}
            p = {d: math.exp(top[t]) if t in top else 0.0 for d, t in with_digit.items()}
            return round(p["1"] / (p["0"] + p["1"]), 6) if p["0"] + p["1"] > 0 else None
    return None


def _ece(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """ECE of each row of `confidence`/`correct` (2-D: one resample per row), BINS equal-width bins."""
    bins = np.minimum((confidence * BINS).astype(int), BINS - 1)
    total = np.zeros(confidence.shape[0])
    for b in range(BINS):
        inside = bins == b
        count = inside.sum(-1)
        gap = np.abs((confidence * inside).sum(-1) - (correct * inside).sum(-1))
        total += np.where(count > 0, gap, 0.0)
    return total / confidence.shape[1]


def _confidence(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p_entailment, confidence of the predicted label, 1.0 where right) of (p, true, predicted) rows."""
    p1, truth, label = (np.array(column, dtype=float) for column in zip(*rows, strict=True))
    return p1, np.where(label == 1, p1, 1 - p1), (label == truth).astype(float)


def _resampled_ece(samples, resamples: int, seed: int) -> np.ndarray:
    """ECE of each bootstrap resample of the rows (the same row draws for every (confidence, right) in `samples`,
    paired; the draws of nlistral.stats' row bootstrap): (len(samples), resamples)."""
    draws = [[_ece(confidence[rows], right[rows]) for confidence, right in samples]
             for rows in resampled_rows(len(samples[0][0]), resamples, seed)]  # fmt: skip
    return np.concatenate(draws, axis=-1)


def ece_difference(a_records, b_records, resamples: int, seed: int) -> dict | None:
    """B's ECE minus A's on the rows both gave a probability and a label (matched by id), with a paired bootstrap
    95% interval; None when there are no such rows (e.g. the teacher's)."""
    b_by_id = {str(r["id"]): r for r in b_records}
    keys = ("p_entailment", "true_label", "predicted_label")
    pairs = [(a, b_by_id[str(a["id"])]) for a in a_records if str(a["id"]) in b_by_id]
    pairs = [(a, b) for a, b in pairs if None not in (a.get(keys[0]), a.get(keys[2]), b.get(keys[0]), b.get(keys[2]))]
    if not pairs:
        return None
    (_, ca, ra), (_, cb, rb) = (_confidence([[r[k] for k in keys] for r in side]) for side in zip(*pairs, strict=True))
    point = _ece(cb[None], rb[None])[0] - _ece(ca[None], ra[None])[0]
    draws_a, draws_b = _resampled_ece([(ca, ra), (cb, rb)], resamples, seed)
    low, high = np.percentile(draws_b - draws_a, [2.5, 97.5])
    return {"n": len(pairs), "ece_difference": round(float(point), 4),
            "ece_difference_ci95": [round(float(low), 4), round(float(high), 4)]}  # fmt: skip


def calibration(p_entailment, true, predicted, resamples: int, seed: int) -> dict | None:
    """The calibration block of metrics/eval*.json (module doc) over the rows with a probability and a label; None
    if there are none."""
    from scipy.stats import mannwhitneyu

    rows = [(p, t, y) for p, t, y in zip(p_entailment, true, predicted, strict=True) if p is not None and y is not None]
    if not rows:
        return None
    p1, confidence, right = _confidence(rows)
    truth = np.array([t for _, t, _ in rows], dtype=float)
    n = len(rows)
    [ece_draws] = _resampled_ece([(confidence, right)], resamples, seed)
    bins = np.minimum((confidence * BINS).astype(int), BINS - 1)
    reliability = [
        {"bin": f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}", "rows": int(inside.sum()),
         "confidence": round(float(confidence[inside].mean()), 4), "accuracy": round(float(right[inside].mean()), 4)}
        for b in range(BINS) if (inside := bins == b).any()
    ]  # fmt: skip
    order = np.argsort(-confidence, kind="stable")
    coverage = {f"{int(c * 100)}": round(float(right[order[: max(1, math.ceil(c * n))]].mean()), 4) for c in COVERAGES}
    both = 0 < right.sum() < n
    auroc = float(mannwhitneyu(confidence[right == 1], confidence[right == 0]).statistic) / (
        right.sum() * (n - right.sum())) if both else None  # fmt: skip
    return {
        "n": n,
        "ece": round(float(_ece(confidence[None], right[None])[0]), 4),
        "ece_ci95": [round(float(v), 4) for v in np.percentile(ece_draws, [2.5, 97.5])],
        "brier": round(float(np.mean((p1 - truth) ** 2)), 4),
        "mean_confidence": round(float(confidence.mean()), 4),
        "accuracy_at_coverage": coverage,
        "auroc": round(auroc, 4) if auroc is not None else None,
        "reliability": reliability,
    }
