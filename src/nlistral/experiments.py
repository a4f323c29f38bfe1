"""`nlistral report --experiments A B ... | --all [--reference R] [--set NAME]`: the test table across DVC experiments
(on the test split, or on the extra test set NAME).

Each experiment's metrics/eval*.json and predictions are read at its revision through `dvc.api` (git for the
metrics, the DVC cache or remote for the predictions), and each is compared with the reference on the same rows:
accuracy difference with a paired-bootstrap 95% CI and the exact McNemar p-value.
"""

import json

from nlistral import paths
from nlistral.config import ConfigError
from nlistral.stages.report import interval, pct, pvalue
from nlistral.stats import paired_comparison

COLUMNS = ("experiment", "rows", "accuracy", "95% CI", "macro F1", "parse failures", "base zero-shot", "teacher",
           "minus reference", "McNemar p")  # fmt: skip


def all_experiments() -> list[str]:
    """The commit in the workspace (HEAD) and every experiment based on it, by name."""
    import dvc.api

    rows = dvc.api.exp_show(repo=".", num=1)
    return ["HEAD"] + [row["Experiment"] for row in rows if row.get("Experiment")]


def read_at(rev: str, path: str, required: bool = True):
    """The text of `path` at git revision or experiment `rev`; None if it is absent there and not required."""
    import dvc.api
    from dvc.exceptions import DvcException, PathMissingError

    try:
        return dvc.api.read(path, repo=".", rev=rev)
    except (PathMissingError, FileNotFoundError):
        if required:
            raise ConfigError(f"{rev}: {path} not found (did `dvc exp run` finish for it?)") from None
        return None
    except DvcException as err:
        raise ConfigError(f"{rev!r} is not a git revision or DVC experiment here: {err}") from None


def load(rev: str, set_name: str | None = None) -> dict:
    """An experiment's test metrics (baselines None where absent) and per-row correctness; with `set_name`, those
    of the extra test set (metrics/test_sets/<set>.json and the fine-tuned model's predictions on it)."""
    if set_name:
        summary = json.loads(read_at(rev, paths.SET_METRICS.format(set=set_name)))
        predictions = read_at(rev, paths.SET_PREDICTIONS.format(set=set_name)).splitlines()
        return {
            "eval": summary["models"]["fine-tuned"],
            **{name: summary["models"].get(name) for name in ("base", "teacher")},
            "correct": {str(r["id"]): bool(r["correct"]) for r in map(json.loads, filter(str.strip, predictions))},
        }
    base, teacher = (read_at(rev, path, required=False) for path in (paths.EVAL_BASE_METRICS,
                                                                     paths.EVAL_TEACHER_METRICS))  # fmt: skip
    predictions = [json.loads(line) for line in read_at(rev, paths.PREDICTIONS).splitlines() if line.strip()]
    return {
        "eval": json.loads(read_at(rev, paths.EVAL_METRICS)),
        "base": base and json.loads(base),
        "teacher": teacher and json.loads(teacher),
        "correct": {str(r["id"]): bool(r["correct"]) for r in predictions},
    }


def table(runs: dict, reference: str, resamples: int, seed: int) -> str:
    """The markdown table, one row per experiment, compared with `reference` on the rows they share."""
    ref = runs[reference]["correct"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, run in runs.items():
        result = run["eval"]
        if set(run["correct"]) != set(ref):
            raise ConfigError(f"{name} and {reference} were scored on different test rows: no paired comparison")
        if name == reference:
            versus = ("reference", "–")
        else:
            ids = list(ref)
            c = paired_comparison([ref[i] for i in ids], [run["correct"][i] for i in ids], resamples, seed)
            versus = (f"{pct(c['difference'], True)} pp {interval(c['difference_ci95'], True)}", pvalue(c["mcnemar_p"]))
        cells = [
            f"`{name}`",
            str(result["n"]),
            pct(result["accuracy"]),
            interval(result["accuracy_ci95"]),
            f"{result['macro_f1']:g}",
            pct(result["parse_failure_rate"]),
            *(pct(run[b]["accuracy"]) if run[b] else "not evaluated" for b in ("base", "teacher")),
            *versus,
        ]
        lines.append("| " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def compare_experiments(
    experiments: list[str] | None, reference: str | None, resamples: int, seed: int, set_name: str | None = None
) -> str:
    names = experiments or all_experiments()
    reference = reference or names[0]
    names = [reference, *(name for name in names if name != reference)]  # the reference first
    text = table({name: load(name, set_name) for name in names}, reference, resamples, seed)
    print(text)
    return text
