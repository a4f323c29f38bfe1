"""The seed summaries and two-level bootstrap interval of `nlistral report --group-by`, computed here independently
(plain Python over the predictions, the same random draws as documented in stats.seed_difference_ci)."""

import statistics

import numpy as np

BATCH = 1000


def summary(accuracies) -> dict:
    return {"n_seeds": len(accuracies), "mean": round(statistics.mean(accuracies), 4),
            "sd": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else 0.0,
            "min": min(accuracies), "max": max(accuracies)}  # fmt: skip


def interval(a: list[list[bool]], b: list[list[bool]], resamples: int, seed: int) -> list[float]:
    """B minus A: per resample, A's seeds, B's seeds, then the rows drawn; each drawn seed's accuracy on the drawn rows,
    averaged; the 2.5th and 97.5th percentiles of the differences."""
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, BATCH):
        k = min(BATCH, resamples - start)
        seeds_a, seeds_b, rows = (rng.integers(0, len(a), (k, len(a))), rng.integers(0, len(b), (k, len(b))),
                                  rng.integers(0, len(a[0]), (k, len(a[0]))))  # fmt: skip
        for j in range(k):
            drawn = [int(r) for r in rows[j]]
            mean_b = statistics.fmean(statistics.fmean(b[s][r] for r in drawn) for s in seeds_b[j])
            mean_a = statistics.fmean(statistics.fmean(a[s][r] for r in drawn) for s in seeds_a[j])
            differences.append(mean_b - mean_a)
    return [round(float(v), 4) for v in np.percentile(differences, [2.5, 97.5])]
