"""Coverage of every interval the report shows, and the false-positive rate of its tests, by simulation.

    .venv/bin/python bench/coverage.py [--reps N] > bench/results/coverage.md

Each cell draws data with a known truth, computes the interval exactly as nlistral.stats does, and counts how often
it holds the truth (nominal 95%) or how often a test rejects at 0.05 when there is no difference (nominal 5%).
tests/test_coverage.py runs the same functions on a few grid points with fewer repetitions. Seeded: the same command
prints the same tables. docs/evaluation.md and docs/experiments.md show them.

- single proportions (accuracy, per-tag cells): Wilson; the old percentile bootstrap beside it (its exact bootstrap
  distribution for 0/1 rows is Binomial(n, k/n) / n, so its interval is computed exactly, not resampled);
- paired differences of two models on the same rows, at the study's size (1,972 rows): the paired bootstrap, and
  McNemar's exact and mid-p tests;
- macro F1 and its paired difference: the row bootstrap;
- two configurations across training seeds, with the seed x row structure: each row has a difficulty shared by every
  model, each (configuration, seed) a random effect, each (seed, row) its own coin flip; Welch's t on the seed
  accuracies, its coverage of the difference on these test rows and of the difference over the row population.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import expit, logit
from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from nlistral.stats import (  # noqa: E402
    accuracy_ci,
    macro_f1_ci,
    macro_f1_difference,
    mcnemar_midp,
    mcnemar_p,
    paired_comparison,
    welch,
)

STUDY_ROWS = 1972
PROPORTION_GRID = [(n, p) for n in (20, 50, 200, 2000) for p in (0.5, 0.7, 0.9)]
RESAMPLES = 1000  # eval.bootstrap's minimum: the report's intervals use at least this many


def proportion(n: int, p: float, reps: int, seed: int) -> dict:
    """Wilson's coverage of p by simulation (and exactly: the binomial sum), and the old percentile bootstrap's."""
    rng = np.random.default_rng(seed)
    draws = rng.binomial(n, p, reps)
    pmf = {k: w for k, w in enumerate(binom.pmf(np.arange(n + 1), n, p)) if w > 1e-12}  # the rest adds < 1e-9
    intervals = {k: accuracy_ci([1] * k + [0] * (n - k)) for k in set(pmf) | set(draws.tolist())}
    boot = {k: (binom.ppf(0.025, n, k / n) / n, binom.ppf(0.975, n, k / n) / n) for k in pmf}
    return {
        "wilson": float(np.mean([intervals[k][0] <= p <= intervals[k][1] for k in draws])),
        "wilson_exact": float(sum(w for k, w in pmf.items() if intervals[k][0] <= p <= intervals[k][1])),
        "bootstrap_exact": float(sum(w for k, w in pmf.items() if boot[k][0] <= p <= boot[k][1])),
    }


def paired_rows(rng, n: int, accuracy_a: float, difference: float, discordant: float):
    """Two models' 0/1 correctness on the same n rows: a fraction `discordant` of rows split between "only A right"
    and "only B right" so that B's accuracy is A's plus `difference`."""
    only_b = (discordant + difference) / 2
    only_a = discordant - only_b
    both = accuracy_a - only_a
    cell = rng.choice(4, n, p=[both, only_a, only_b, 1 - both - only_a - only_b])
    return (cell <= 1).astype(int), ((cell == 0) | (cell == 2)).astype(int)


def paired(accuracy_a: float, difference: float, discordant: float, reps: int, seed: int, n=STUDY_ROWS) -> dict:
    """The paired bootstrap interval's coverage of B - A, and how often McNemar (exact, mid-p) rejects at 0.05."""
    rng = np.random.default_rng(seed)
    covered = exact = mid = 0
    for rep in range(reps):
        a, b = paired_rows(rng, n, accuracy_a, difference, discordant)
        c = paired_comparison(a, b, RESAMPLES, rep)
        covered += c["difference_ci95"][0] <= difference <= c["difference_ci95"][1]
        exact += c["mcnemar_p"] < 0.05
        mid += c["mcnemar_midp"] < 0.05
    return {"coverage": covered / reps, "exact_reject": exact / reps, "midp_reject": mid / reps}


def mcnemar_rejections(n: int, discordant: float, reps: int, seed: int) -> dict:
    """McNemar's exact and mid-p tests at no difference: how often each rejects at 0.05 (nominal 0.05)."""
    rng = np.random.default_rng(seed)
    d = rng.binomial(n, discordant, reps)
    b = rng.binomial(d, 0.5)
    return {"exact": float(np.mean([mcnemar_p(x, y - x) < 0.05 for x, y in zip(b, d, strict=True)])),
            "midp": float(np.mean([mcnemar_midp(x, y - x) < 0.05 for x, y in zip(b, d, strict=True)]))}  # fmt: skip


def labelled(true, u, accuracy: float, failures: float = 0.02):
    """Predictions for `true` labels from uniforms `u`: right when u < accuracy, a parse failure (-1, counted wrong)
    when u falls in the next `failures`, else the other label."""
    return np.where(u < accuracy, true, np.where(u < accuracy + failures, -1, 1 - true))


def as_labels(predicted) -> list:
    return [None if p < 0 else int(p) for p in predicted]


def population_macro_f1(accuracy: float, failures: float = 0.02) -> float:
    """Macro F1 of `labelled`'s model over the whole population (its cell probabilities)."""
    wrong = 1 - accuracy - failures
    tp = accuracy / 2  # and tn: the two classes are symmetric
    fp = fn = wrong / 2
    f1 = 2 * tp / (2 * tp + fp + fn + failures / 2)  # a failure on a class-1 row is a missed positive of class 1
    return float(f1)


def f1_interval(n: int, accuracy: float, reps: int, seed: int) -> float:
    """The macro F1 bootstrap interval's coverage of the population macro F1 (half the rows entailment)."""
    rng = np.random.default_rng(seed)
    truth, covered = population_macro_f1(accuracy), 0
    for rep in range(reps):
        true = rng.integers(0, 2, n)
        low, high = macro_f1_ci(true.tolist(), as_labels(labelled(true, rng.random(n), accuracy)), RESAMPLES, rep)
        covered += low <= truth <= high
    return covered / reps


def f1_difference(n: int, accuracy_a: float, accuracy_b: float, reps: int, seed: int) -> float:
    """The paired macro F1 difference interval's coverage of the population difference: two models on the same
    rows, correlated as models on one test set are (B's uniform is A's on half the rows, its own on the rest)."""
    rng = np.random.default_rng(seed)
    truth, covered = population_macro_f1(accuracy_b) - population_macro_f1(accuracy_a), 0
    for rep in range(reps):
        true, u = rng.integers(0, 2, n), rng.random(n)
        u_b = np.where(rng.random(n) < 0.5, u, rng.random(n))
        a, b = labelled(true, u, accuracy_a), labelled(true, u_b, accuracy_b)
        result = macro_f1_difference(true.tolist(), as_labels(a), as_labels(b), RESAMPLES, rep)
        low, high = result["macro_f1_difference_ci95"]
        covered += low <= truth <= high
    return covered / reps


NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(40)  # E over a standard normal seed effect
WEIGHTS = WEIGHTS / WEIGHTS.sum()


def expected_accuracy(mu: float, z, seed_sd: float) -> float:
    """A configuration's accuracy on rows of difficulty z, averaged over training seeds (the estimand)."""
    return float(np.sum(WEIGHTS * expit(mu + z[:, None] + seed_sd * NODES[None, :]).mean(axis=0)))


def seeds(k: int, accuracy_a: float, accuracy_b: float, seed_sd: float, reps: int, seed: int,
          n=STUDY_ROWS, row_sd: float = 1.5) -> dict:  # fmt: skip
    """Welch across seeds: coverage of B - A on the drawn test rows and over the row population, and how often it
    rejects at 0.05. Each rep draws new rows (difficulty z ~ N(0, row_sd) on the logit scale, shared by every model),
    k seed effects per configuration (N(0, seed_sd)), and each (seed, row) outcome as its own coin."""
    rng = np.random.default_rng(seed)
    population = rng.normal(0, row_sd, 200_000)
    mu_a, mu_b = (float(logit(a)) for a in (accuracy_a, accuracy_b))
    shift = {}
    for name, mu, target in (("a", mu_a, accuracy_a), ("b", mu_b, accuracy_b)):  # mu so the population mean is target
        for _ in range(30):
            mu += float(logit(target) - logit(expected_accuracy(mu, population[:20000], seed_sd)))
        shift[name] = mu
    truth_population = expected_accuracy(shift["b"], population, seed_sd) - expected_accuracy(shift["a"], population,
                                                                                              seed_sd)  # fmt: skip
    covered = covered_population = rejected = shown = 0
    for _ in range(reps):
        z = rng.normal(0, row_sd, n)
        truth = expected_accuracy(shift["b"], z, seed_sd) - expected_accuracy(shift["a"], z, seed_sd)
        accuracies = {}
        for name in ("a", "b"):
            u = rng.normal(0, seed_sd, k)
            accuracies[name] = (rng.random((k, n)) < expit(shift[name] + z[None, :] + u[:, None])).mean(axis=1)
        result = welch(accuracies["a"], accuracies["b"])
        if result is None:  # every seed equal within each side: no statement (no interval, no rejection)
            continue
        low, high = result["difference_ci95"]
        shown += 1
        covered += low <= truth <= high
        covered_population += low <= truth_population <= high
        rejected += result["p"] < 0.05
    return {"coverage": covered / max(shown, 1), "coverage_population": covered_population / max(shown, 1),
            "reject": rejected / reps, "no_statement": 1 - shown / reps}  # fmt: skip


def main(reps: int) -> None:
    started = time.time()
    print(f"# Coverage by simulation (`bench/coverage.py --reps {reps}`)\n")
    print(f"Nominal: intervals 95%, tests 5%. Bootstrap intervals use {RESAMPLES} resamples (eval.bootstrap's "
          "minimum).\n")  # fmt: skip

    print("## Single proportions: Wilson (the report's) vs the percentile bootstrap (before issue 32)\n")
    print("| n | p | Wilson, simulated | Wilson, exact | percentile bootstrap, exact |")
    print("|---|---|---|---|---|")
    for i, (n, p) in enumerate(PROPORTION_GRID):
        r = proportion(n, p, max(reps * 4, 2000), i)
        print(f"| {n} | {p} | {r['wilson']:.3f} | {r['wilson_exact']:.3f} | {r['bootstrap_exact']:.3f} |")

    print(f"\n## Paired difference of two models on the same {STUDY_ROWS} rows: paired bootstrap, McNemar\n")
    print("| accuracy A | B - A | discordant rows | interval coverage | exact McNemar rejects | mid-p rejects |")
    print("|---|---|---|---|---|---|")
    for i, (acc, diff, disc) in enumerate([(0.7, 0.0, 0.1), (0.9, 0.0, 0.05), (0.9, 0.0, 0.01), (0.7, 0.02, 0.1),
                                           (0.88, 0.02, 0.05), (0.85, 0.05, 0.15)]):  # fmt: skip
        r = paired(acc, diff, disc, reps, 100 + i)
        print(f"| {acc} | {diff:+} | {disc} | {r['coverage']:.3f} | {r['exact_reject']:.3f} | {r['midp_reject']:.3f} |")

    print("\nMcNemar at no difference, more repetitions (rejection rates at 0.05):\n")
    print("| rows | discordant rows | exact rejects | mid-p rejects |")
    print("|---|---|---|---|")
    for i, (n, disc) in enumerate([(200, 0.1), (STUDY_ROWS, 0.01), (STUDY_ROWS, 0.05), (STUDY_ROWS, 0.15)]):
        r = mcnemar_rejections(n, disc, 20 * reps, 200 + i)
        print(f"| {n} | {disc} | {r['exact']:.3f} | {r['midp']:.3f} |")

    print("\n## Macro F1 (2% parse failures): row bootstrap interval, paired difference\n")
    print("| rows | accuracy | macro F1 interval coverage |")
    print("|---|---|---|")
    for i, (n, acc) in enumerate([(200, 0.7), (200, 0.9), (STUDY_ROWS, 0.7), (STUDY_ROWS, 0.9)]):
        print(f"| {n} | {acc} | {f1_interval(n, acc, reps, 300 + i):.3f} |")
    print("\n| rows | accuracy A | accuracy B | paired difference coverage |")
    print("|---|---|---|---|")
    for i, (n, a, b) in enumerate([(200, 0.8, 0.8), (STUDY_ROWS, 0.8, 0.8), (STUDY_ROWS, 0.85, 0.9)]):
        print(f"| {n} | {a} | {b} | {f1_difference(n, a, b, reps, 400 + i):.3f} |")

    print(
        f"\n## Across seeds: Welch's t on the per-seed accuracies ({STUDY_ROWS} rows, row difficulty sd 1.5 logits)\n"
    )
    print("| seeds per configuration | seed sd (logits) | accuracy A | accuracy B | coverage (these rows) | "
          "coverage (row population) | rejects at 0.05 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for i, (k, sd, a, b) in enumerate([(k, sd, a, b) for k in (2, 3, 5) for sd in (0.05, 0.15)
                                       for a, b in ((0.89, 0.89), (0.89, 0.91))]):  # fmt: skip
        r = seeds(k, a, b, sd, reps, 500 + i)
        print(f"| {k} | {sd} | {a} | {b} | {r['coverage']:.3f} | {r['coverage_population']:.3f} | {r['reject']:.3f} |")
    print(f"\n({reps} repetitions per cell unless stated; {time.time() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1000, help="repetitions per cell (default 1000)")
    main(parser.parse_args().reps)
