"""Uncertainty for accuracies over test rows: seeded bootstrap intervals and the exact McNemar test (scipy).

Every function takes per-row 0/1 correctness (a parse failure is 0), so the same rows give the same numbers.
"""

import numpy as np
from scipy.stats import binomtest, bootstrap

BATCH = 1000  # resamples held in memory at once (n rows x BATCH)
LENGTH_BUCKETS = ((0, 100), (101, 200), (201, 300), (301, None))  # rationale tokens, as in the study


def _percentile_ci(values, resamples: int, seed: int) -> list[float]:
    """95% percentile bootstrap interval of the mean of `values` (rows resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return [0.0, 0.0]
    if np.all(values == values[0]):  # every resample has the same mean: scipy would warn and give nan
        return [round(float(values[0]), 4)] * 2
    result = bootstrap((values,), np.mean, n_resamples=resamples, batch=BATCH, vectorized=True,
                       method="percentile", confidence_level=0.95, rng=np.random.default_rng(seed))  # fmt: skip
    return [round(float(result.confidence_interval.low), 4), round(float(result.confidence_interval.high), 4)]


def accuracy_ci(correct, resamples: int, seed: int) -> list[float]:
    """[low, high]: 95% interval of the accuracy, bootstrapping over rows."""
    return _percentile_ci(correct, resamples, seed)


def mcnemar_p(a_right_b_wrong: int, a_wrong_b_right: int) -> float:
    """Exact (binomial) McNemar p-value, two-sided: are the discordant rows split evenly? 1.0 when there are none."""
    discordant = a_right_b_wrong + a_wrong_b_right
    if discordant == 0:
        return 1.0
    return float(binomtest(a_wrong_b_right, discordant, 0.5).pvalue)


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
        "accuracy_a": round(float(a.mean()), 4) if n else 0.0,
        "accuracy_b": round(float(b.mean()), 4) if n else 0.0,
        "difference": round(float((b - a).mean()), 4) if n else 0.0,
        "difference_ci95": _percentile_ci(b - a, resamples, seed),
        "mcnemar_p": mcnemar_p(a_right_b_wrong, a_wrong_b_right),
        "a_right_b_wrong": a_right_b_wrong,
        "a_wrong_b_right": a_wrong_b_right,
    }


def seed_summary(accuracies) -> dict:
    """One configuration's test accuracies across training seeds: mean, sample sd (0 for one seed), min, max, n."""
    values = np.asarray(accuracies, dtype=float)
    return {
        "n_seeds": len(values),
        "mean": round(float(values.mean()), 4),
        "sd": round(float(values.std(ddof=1)), 4) if len(values) > 1 else 0.0,
        "min": round(float(values.min()), 4),
        "max": round(float(values.max()), 4),
    }


def seed_difference_ci(a_correct, b_correct, resamples: int, seed: int) -> list[float]:
    """95% percentile interval of B's mean accuracy minus A's, over seeds and test rows (a two-level bootstrap).

    `a_correct`, `b_correct`: per-row 0/1 correctness, one row of the matrix per training seed, the same test rows in
    the same order. Each resample draws, with replacement, A's seeds, then B's seeds, then the test rows (the same
    rows for both: paired), and takes the mean over the drawn seeds of each one's accuracy on the drawn rows. Draws
    come from numpy's default_rng(seed) in batches of up to BATCH resamples, in that order, each as one
    (batch, count) array of `integers`.
    """
    a, b = np.asarray(a_correct, dtype=float), np.asarray(b_correct, dtype=float)
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, BATCH):
        k = min(BATCH, resamples - start)
        seeds_a, seeds_b = rng.integers(0, len(a), (k, len(a))), rng.integers(0, len(b), (k, len(b)))
        rows = rng.integers(0, n, (k, n))
        per_row = b[seeds_b].mean(axis=1) - a[seeds_a].mean(axis=1)  # (k, n): the drawn seeds' mean, row by row
        differences.append(np.take_along_axis(per_row, rows, axis=1).mean(axis=1))
    low, high = np.percentile(np.concatenate(differences), [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


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
