"""The seed summaries and Welch comparison of `nlistral report --group-by`, computed here independently (the standard
library for the summaries, scipy's `ttest_ind(equal_var=False)` for Welch's interval and p-value)."""

import statistics

from scipy.stats import ttest_ind


def summary(accuracies) -> dict:
    return {"n_seeds": len(accuracies), "mean": round(statistics.mean(accuracies), 4),
            "sd": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else None,
            "min": min(accuracies), "max": max(accuracies)}  # fmt: skip


def welch(a: list[float], b: list[float]) -> dict:
    """B's mean accuracy over seeds minus A's: Welch's 95% interval, df and two-sided p."""
    result = ttest_ind(b, a, equal_var=False)
    ci = result.confidence_interval(0.95)
    return {"difference": round(statistics.mean(b) - statistics.mean(a), 4),
            "difference_ci95": [round(float(ci.low), 4), round(float(ci.high), 4)], "df": round(float(result.df), 2),
            "p": float(result.pvalue)}  # fmt: skip
