"""Intervals and tests against values computed by hand (exact bootstrap distributions, binomial sums)."""

from collections import Counter
from fractions import Fraction
from math import comb, factorial

import pytest

from nlistral.stats import accuracy_by_length, accuracy_ci, mcnemar_p, paired_comparison


def exact_bootstrap_ci(values) -> list[float]:
    """The percentile interval of the bootstrap mean's exact distribution (every resample of the rows, weighted)."""
    n, counts = len(values), Counter(values)
    levels = sorted(counts)

    def splits(i, left):  # every way to draw `left` rows among levels[i:]
        if i == len(levels) - 1:
            yield (left,)
            return
        for k in range(left + 1):
            for rest in splits(i + 1, left - k):
                yield (k, *rest)

    pmf = Counter()
    for draw in splits(0, n):
        weight = Fraction(factorial(n))
        for level, k in zip(levels, draw, strict=True):
            weight *= Fraction(counts[level], n) ** k / factorial(k)
        pmf[Fraction(sum(level * k for level, k in zip(levels, draw, strict=True)), n)] += weight
    cdf, bounds = Fraction(0), []
    for mean in sorted(pmf):
        cdf += pmf[mean]
        bounds += [float(mean)] * sum(1 for q in (Fraction(1, 40), Fraction(39, 40)) if cdf - pmf[mean] < q <= cdf)
    return [round(b, 4) for b in bounds]


def test_accuracy_ci_matches_the_exact_bootstrap_distribution():
    correct = [1] * 7 + [0] * 3
    # Binomial(10, 0.7): P(X <= 3) = 0.011 < 0.025 < P(X <= 4) = 0.047; P(X <= 9) = 0.972 < 0.975
    assert exact_bootstrap_ci(correct) == [0.4, 1.0]
    assert accuracy_ci(correct, resamples=10000, seed=42) == [0.4, 1.0]


def test_accuracy_ci_has_the_width_the_study_ignored():
    correct = [1] * 1767 + [0] * 205  # 89.6% of 1,972 rows: normal approximation +-1.35 points
    low, high = accuracy_ci(correct, resamples=10000, seed=42)
    half = 1.96 * (0.896 * 0.104 / 1972) ** 0.5
    assert low == pytest.approx(0.896 - half, abs=0.002) and high == pytest.approx(0.896 + half, abs=0.002)
    assert accuracy_ci(correct, 10000, 42) == [low, high]  # seeded: same rows, same interval


@pytest.mark.parametrize("value", [0, 1])
def test_a_constant_outcome_has_a_point_interval(value):
    assert accuracy_ci([value] * 25, resamples=1000, seed=0) == [float(value)] * 2


def test_paired_comparison_matches_hand_computed_values():
    a = [1] * 6 + [0] * 2 + [1] * 4  # rows 0-5: a right, b wrong; rows 6-7: a wrong, b right; 8-11: both right
    b = [0] * 6 + [1] * 2 + [1] * 4
    result = paired_comparison(a, b, resamples=10000, seed=42)
    assert exact_bootstrap_ci([y - x for x, y in zip(a, b, strict=True)]) == [-0.75, 0.0833]
    assert result == {
        "n": 12, "accuracy_a": 0.8333, "accuracy_b": 0.5, "difference": -0.3333,
        "difference_ci95": [-0.75, 0.0833],
        "mcnemar_p": 74 / 256,  # 2 * P(X <= 2), X ~ Binomial(8, 1/2) = 2 * (1 + 8 + 28) / 256
        "a_right_b_wrong": 6, "a_wrong_b_right": 2,
    }  # fmt: skip


def test_all_agree_is_no_difference_at_all():
    a = [1, 0, 1, 1, 0, 1]
    result = paired_comparison(a, list(a), resamples=1000, seed=0)
    assert result["difference"] == 0.0 and result["difference_ci95"] == [0.0, 0.0]
    assert result["mcnemar_p"] == 1.0 and result["a_right_b_wrong"] == result["a_wrong_b_right"] == 0


@pytest.mark.parametrize(("a", "b", "difference"), [([1] * 10, [0] * 10, -1.0), ([0] * 10, [1] * 10, 1.0)])
def test_all_flip_is_certain_and_significant(a, b, difference):
    result = paired_comparison(a, b, resamples=1000, seed=0)
    assert result["difference"] == difference and result["difference_ci95"] == [difference, difference]
    assert result["mcnemar_p"] == 2 / 2**10  # both tails of Binomial(10, 1/2) at its extremes


def test_mcnemar_exact_values():
    assert mcnemar_p(1, 6) == 2 * (comb(7, 0) + comb(7, 1)) / 2**7 == 0.125
    assert mcnemar_p(6, 1) == 0.125
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 0) == 1.0


def test_accuracy_by_length_uses_the_studys_buckets():
    lengths = [0, 100, 101, 200, 201, 300, 301, 5000]
    correct = [1, 0, 1, 1, 0, 0, 1, 0]
    assert accuracy_by_length(lengths, correct) == [
        {"rationale_tokens": "0-100", "rows": 2, "accuracy": 0.5},
        {"rationale_tokens": "101-200", "rows": 2, "accuracy": 1.0},
        {"rationale_tokens": "201-300", "rows": 2, "accuracy": 0.0},
        {"rationale_tokens": "301+", "rows": 2, "accuracy": 0.5},
    ]
    assert accuracy_by_length([], [])[0] == {"rationale_tokens": "0-100", "rows": 0, "accuracy": None}


def test_no_rows_one_row_and_the_settings_each_interval_uses():
    """Survivors of `make mutation` in stats.py, killed: empty and one-row inputs (an `if n` dropped, an index off by
    one), the resample count and seed reaching scipy (pinned values, seeds 0 and 1 differ), 4 decimals everywhere,
    and zip's strict check."""
    assert accuracy_ci([], 200, 0) == [0.0, 0.0] and accuracy_ci([True], 200, 0) == [1.0, 1.0]
    assert paired_comparison([], [], 200, 0) == {
        "n": 0, "accuracy_a": 0.0, "accuracy_b": 0.0, "difference": 0.0, "difference_ci95": [0.0, 0.0],
        "mcnemar_p": 1.0, "a_right_b_wrong": 0, "a_wrong_b_right": 0}  # fmt: skip
    correct = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 4
    assert accuracy_ci(correct, 200, 0) == [0.55, 0.8256] and accuracy_ci(correct, 200, 1) == [0.5494, 0.85]
    other = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1] * 4
    assert paired_comparison(correct, other, 200, 0)["difference_ci95"] == [-0.1006, 0.2756]
    assert paired_comparison(correct, other, 200, 1)["difference_ci95"] == [-0.1, 0.35]
    three = paired_comparison([0, 0, 1], [1, 1, 1], 200, 0)
    assert (three["accuracy_a"], three["accuracy_b"], three["difference"]) == (0.3333, 1.0, 0.6667)
    assert paired_comparison([1, 1, 1], [0, 0, 1], 200, 0)["accuracy_b"] == 0.3333
    assert accuracy_by_length([0, 0, 0], [1, 0, 0])[0]["accuracy"] == 0.3333
    with pytest.raises(ValueError):
        accuracy_by_length([0, 1], [1])


def test_a_constant_outcome_needs_no_bootstrap():
    """A constant outcome is answered without scipy's bootstrap (which warns on degenerate data): catches the
    constant check being dropped or inverted."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert accuracy_ci([1] * 25, 200, 0) == [1.0, 1.0] and accuracy_ci([0] * 25, 200, 0) == [0.0, 0.0]
        assert isinstance(accuracy_ci([1] * 25, 200, 0)[0], float)
