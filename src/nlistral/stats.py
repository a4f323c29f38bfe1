"""Uncertainty for accuracies over test rows and across training seeds (scipy), each method's coverage checked by
simulation (tests/test_coverage.py; bench/coverage.py prints the whole grid; docs/evaluation.md shows it).

- one accuracy (a single proportion): Wilson's score interval (a per-tag cell's handful of rows: Clopper-Pearson's);
- two models on the same rows: the difference with a paired (row) bootstrap percentile interval, McNemar's exact
  and mid-p tests; macro F1 with a row bootstrap interval, and its paired difference;
- two configurations across training seeds: Welch's t interval and test on the per-seed accuracies;
- a family of comparisons: Holm's step-down adjustment.

Per-row inputs are 0/1 correctness (a parse failure is 0), so the same rows give the same numbers.
"""

import numpy as np
from scipy.stats import binomtest, t

BATCH = 1000  # resamples held in memory at once (n rows x BATCH)
LENGTH_BUCKETS = ((0, 100), (101, 200), (201, 300), (301, None))  # rationale tokens, as in the study


def _round(bounds) -> list[float]:
    return [round(float(bound), 4) for bound in bounds]


def accuracy_ci(correct, exact: bool = False) -> list[float] | None:
    """[low, high]: Wilson's 95% score interval of the accuracy (rows right / rows), or with `exact` Clopper-Pearson's
    (never below 95% coverage, wider: for the handful of rows of a per-tag cell, where Wilson's fell to 86%); None for
    no rows.

    Not the bootstrap: at 6/6 right the percentile bootstrap gives [1, 1] (Wilson [0.61, 1]), and at n = 20, p = 0.9
    it covers 88% of the time (Wilson 96%; the grid is in docs/evaluation.md)."""
    n = len(correct)
    if n == 0:
        return None
    interval = binomtest(int(sum(bool(c) for c in correct)), n).proportion_ci(0.95, "exact" if exact else "wilson")
    return _round((interval.low, interval.high))


def resampled_rows(n: int, resamples: int, seed: int):
    """Batches of (batch, n) row indices drawn with replacement, from numpy's default_rng(seed)."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, BATCH):
        yield rng.integers(0, n, (min(BATCH, resamples - start), n))


def _percentile(values) -> list[float]:
    return _round(np.percentile(np.concatenate(values), [2.5, 97.5]))


def mean_ci(values, resamples: int, seed: int) -> list[float] | None:
    """95% percentile bootstrap interval of the mean of `values` (rows resampled with replacement); None if empty."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return None
    return _percentile([values[rows].mean(axis=1) for rows in resampled_rows(len(values), resamples, seed)])


def macro_f1(true, predicted) -> np.ndarray:
    """Macro F1 (nlistral.scoring's rules: -1 = a parse failure, wrong for both classes) of each row of `true` and
    `predicted` (2-D arrays of labels, one resample per row), vectorised for the bootstrap."""
    tp, fp = ((true == 1) & (predicted == 1)).sum(-1), ((true == 0) & (predicted == 1)).sum(-1)
    tn, fn = ((true == 0) & (predicted == 0)).sum(-1), ((true == 1) & (predicted == 0)).sum(-1)
    positives = (true == 1).sum(-1)
    negatives = true.shape[-1] - positives

    def f1(hits, predicted_as, actual):
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted_as > 0, hits / predicted_as, 0.0)
            recall = np.where(actual > 0, hits / actual, 0.0)
            return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)

    return (f1(tp, tp + fp, positives) + f1(tn, tn + fn, negatives)) / 2


def _labels(values) -> np.ndarray:
    return np.asarray([-1 if v is None else int(v) for v in values], dtype=int)


def macro_f1_ci(true_labels, predicted_labels, resamples: int, seed: int) -> list[float] | None:
    """95% row-bootstrap percentile interval of macro F1 (None = a parse failure); None for no rows."""
    true, predicted = _labels(true_labels), _labels(predicted_labels)
    if len(true) == 0:
        return None
    return _percentile([macro_f1(true[rows], predicted[rows]) for rows in resampled_rows(len(true), resamples, seed)])


def macro_f1_difference(true_labels, a_labels, b_labels, resamples: int, seed: int) -> dict:
    """B's macro F1 minus A's on the same rows, with its paired bootstrap 95% interval (both scored per resample)."""
    true, a, b = _labels(true_labels), _labels(a_labels), _labels(b_labels)
    if len(true) == 0:
        return {"macro_f1_difference": None, "macro_f1_difference_ci95": None}
    point = float(macro_f1(true, b) - macro_f1(true, a))
    draws = [macro_f1(true[rows], b[rows]) - macro_f1(true[rows], a[rows])
             for rows in resampled_rows(len(true), resamples, seed)]  # fmt: skip
    return {"macro_f1_difference": round(point, 4), "macro_f1_difference_ci95": _percentile(draws)}


def mcnemar_p(a_right_b_wrong: int, a_wrong_b_right: int) -> float:
    """Exact (binomial) McNemar p-value, two-sided: are the discordant rows split evenly? 1.0 when there are none."""
    discordant = a_right_b_wrong + a_wrong_b_right
    if discordant == 0:
        return 1.0
    return float(binomtest(a_wrong_b_right, discordant, 0.5).pvalue)


def mcnemar_midp(a_right_b_wrong: int, a_wrong_b_right: int) -> float:
    """McNemar's mid-p (Fagerland, Lydersen & Laake 2013): the exact p less one probability of the observed split,
    2 P(X < m) + P(X = m) for m the smaller count, X ~ Binomial(discordant, 1/2); 1.0 for an even split or none.
    Summed in integers (scipy's cdf - pmf leaves float residue: 0.0624999... for 0.0625)."""
    discordant, smaller = int(a_right_b_wrong + a_wrong_b_right), int(min(a_right_b_wrong, a_wrong_b_right))
    below, term = 0, 1  # sum of C(discordant, k) for k < smaller; C(discordant, k)
    for k in range(smaller):
        below, term = below + term, term * (discordant - k) // (k + 1)
    return min(1.0, (2 * below + term) / 2**discordant)


def paired_comparison(a_correct, b_correct, resamples: int, seed: int) -> dict:
    """The paired comparison of two models on the same rows (in the same order): B minus A.

    The difference's interval resamples rows, keeping each row's pair of outcomes together (paired bootstrap).
    """
    a, b = np.asarray(a_correct, dtype=int), np.asarray(b_correct, dtype=int)
    n = len(a)
    a_right_b_wrong = int(np.sum((a == 1) & (b == 0)))
    a_wrong_b_right = int(np.sum((a == 0) & (b == 1)))
    return {
        "n": n,
        "accuracy_a": round(float(a.mean()), 4) if n else None,
        "accuracy_b": round(float(b.mean()), 4) if n else None,
        "difference": round(float((b - a).mean()), 4) if n else None,
        "difference_ci95": mean_ci(b - a, resamples, seed),
        "mcnemar_p": mcnemar_p(a_right_b_wrong, a_wrong_b_right),
        "mcnemar_midp": mcnemar_midp(a_right_b_wrong, a_wrong_b_right),
        "a_right_b_wrong": a_right_b_wrong,
        "a_wrong_b_right": a_wrong_b_right,
    }


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjustment of a family {name: p}: the i-th smallest p times (m - i + 1), never below an
    earlier adjusted p, at most 1. A family member is significant at 0.05 when its adjusted p is below 0.05. Not
    rounded: 0.04999952 rounded to 6 decimals is 0.05, across the line."""
    adjusted, running = {}, 0.0
    ordered = sorted(pvalues.items(), key=lambda item: item[1])
    for i, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, p * (len(ordered) - i)))
        adjusted[name] = running
    return {name: adjusted[name] for name in pvalues}


def seed_summary(accuracies) -> dict:
    """One configuration's test accuracies across training seeds: mean, sample sd (None for one seed), min, max, n."""
    values = np.asarray(accuracies, dtype=float)
    return {
        "n_seeds": len(values),
        "mean": round(float(values.mean()), 4),
        "sd": round(float(values.std(ddof=1)), 4) if len(values) > 1 else None,
        "min": round(float(values.min()), 4),
        "max": round(float(values.max()), 4),
    }


def welch(a_accuracies, b_accuracies) -> dict | None:
    """B's mean accuracy over its seeds minus A's: Welch's t 95% interval and two-sided p on the per-seed accuracies
    (Welch-Satterthwaite df). Each seed's accuracy is one observation: the test rows are the same for every seed, so
    the row-by-row noise of each seed is inside its accuracy and counted once. None (no statement) unless both have
    2+ seeds and the seeds vary on at least one side: with every seed's accuracy equal within each configuration
    there is no spread to test against (a point "interval" and p = 0 are what the old code said; on 40 rows, 2 seeds,
    that point missed the truth in 43% of draws: docs/experiments.md)."""
    a, b = np.asarray(a_accuracies, dtype=float), np.asarray(b_accuracies, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    difference = float(b.mean() - a.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    if se == 0:
        return None
    df = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))
    half = float(t.ppf(0.975, df)) * se
    p = float(2 * t.sf(abs(difference) / se, df))
    return {"difference": round(difference, 4), "difference_ci95": _round([difference - half, difference + half]),
            "df": round(df, 2), "p": p}  # fmt: skip


def accuracy_by_length(lengths, correct, column: str = "rationale_tokens") -> list[dict]:
    """Rows and accuracy per length bucket (LENGTH_BUCKETS); accuracy None for an empty bucket."""
    table = []
    for low, high in LENGTH_BUCKETS:
        inside = [c for n, c in zip(lengths, correct, strict=True) if n >= low and (high is None or n <= high)]
        table.append({
            column: f"{low}-{high}" if high else f"{low}+",
            "rows": len(inside),
            "accuracy": round(sum(inside) / len(inside), 4) if inside else None,
        })  # fmt: skip
    return table
