"""`nlistral report --experiments A B ... | --all [--reference R] [--set NAME]`: the test table across DVC experiments
(on the test split, or on the extra test set NAME).

Each experiment's metrics/eval*.json and predictions are read at its revision through `dvc.api` (git for the
metrics, the DVC cache or remote for the predictions), and each is compared with the reference on the same rows:
accuracy difference with a paired-bootstrap 95% CI and the exact McNemar p-value.

`--group-by train.seed` (any params, dotted): experiments whose params differ only in those keys are one
configuration, named by the params that tell configurations apart. Per configuration: the mean test accuracy over its
seeds, their sd, min, max and count; against the reference's configuration: the difference of means with a 95%
interval over both seeds and test rows (stats.seed_difference_ci), and whether it exceeds the seed spread (the larger
of the two configurations' sds). Written to metrics/seeds.json, which the report stage shows (results.md, the page).
"""

import json

import yaml

from nlistral import paths
from nlistral.config import PARAMS_FILE
from nlistral.errors import ConfigError
from nlistral.formatting import interval, pct, pvalue
from nlistral.io import write_json
from nlistral.stats import paired_comparison, seed_difference_ci, seed_summary

SEED_COLUMNS = ("configuration", "experiments", "seeds", "mean accuracy", "sd", "min", "max",
                "minus reference, 95% CI (seeds + rows)", "beyond seed spread")  # fmt: skip
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


def flat_params(rev: str) -> dict:
    """params.yaml at `rev` as {dotted key: value}."""

    def walk(value, prefix):
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in walk(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    return walk(yaml.safe_load(read_at(rev, str(PARAMS_FILE))) or {}, "")


def configurations(params: dict[str, dict], group_by: list[str]) -> dict[str, list[str]]:
    """{configuration: its experiments}: experiments whose params differ only in `group_by` keys (or below them)
    share one, named by the other params that differ across `params` ("all" when none do)."""
    keys = sorted({k for p in params.values() for k in p if not any(k == g or k.startswith(f"{g}.") for g in group_by)})
    differing = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in params.values()}) > 1]
    groups = {}
    for name, p in params.items():
        groups.setdefault(", ".join(f"{k}={p.get(k)}" for k in differing) or "all", []).append(name)
    return groups


def seed_groups(runs: dict, groups: dict[str, list[str]], reference: str, resamples: int, seed: int) -> dict:
    """The metrics/seeds.json object: per configuration its seeds' accuracies summarised, and each configuration
    against `reference` (a configuration) over seeds and rows (module doc)."""
    ids = list(next(iter(runs.values()))["correct"])
    for name, run in runs.items():
        if set(run["correct"]) != set(ids):
            raise ConfigError(f"{name} and {next(iter(runs))} were scored on different test rows: no paired comparison")

    def matrix(members):  # seeds x rows
        return [[runs[m]["correct"][i] for i in ids] for m in members]

    found = {label: {"experiments": members, **seed_summary([runs[m]["eval"]["accuracy"] for m in members])}
             for label, members in groups.items()}  # fmt: skip
    ref = found[reference]
    for label, config in found.items():
        if label != reference:
            difference, spread = round(config["mean"] - ref["mean"], 4), max(config["sd"], ref["sd"])
            ci = seed_difference_ci(matrix(groups[reference]), matrix(groups[label]), resamples, seed)
            config["versus_reference"] = {"difference": difference, "difference_ci95": ci, "seed_sd": spread,
                                          "exceeds_seed_spread": abs(difference) > spread}  # fmt: skip
    return {"reference": reference, "rows": len(ids), "bootstrap": resamples, "seed": seed, "configurations": found}


def seed_table(summary: dict) -> str:
    """metrics/seeds.json as a markdown table, the reference configuration first."""
    lines = ["| " + " | ".join(SEED_COLUMNS) + " |", "|" + "---|" * len(SEED_COLUMNS)]
    for label, c in summary["configurations"].items():
        versus = c.get("versus_reference")
        cells = [f"`{label}`", ", ".join(f"`{e}`" for e in c["experiments"]), str(c["n_seeds"]), pct(c["mean"]),
                 f"{pct(c['sd'], True).lstrip('+')} pp", pct(c["min"]), pct(c["max"]),
                 f"{pct(versus['difference'], True)} pp {interval(versus['difference_ci95'], True)}" if versus
                 else "reference", ("yes" if versus["exceeds_seed_spread"] else "no") if versus else "–"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_experiments(
    experiments: list[str] | None, reference: str | None, resamples: int, seed: int, set_name: str | None = None,
    group_by: list[str] | None = None,
) -> str:  # fmt: skip
    names = experiments or all_experiments()
    if group_by:
        return seed_report(names, reference, resamples, seed, set_name, group_by)
    reference = reference or names[0]
    names = [reference, *(name for name in names if name != reference)]  # the reference first
    text = table({name: load(name, set_name) for name in names}, reference, resamples, seed)
    print(text)
    return text


def seed_report(names: list[str], reference: str | None, resamples: int, seed: int, set_name: str | None,
                group_by: list[str]) -> str:  # fmt: skip
    """--group-by: metrics/seeds.json and its table. `reference`: a configuration (`sft.format=cot`) or an experiment
    (its configuration); default: the first experiment's."""
    groups = configurations({name: flat_params(name) for name in names}, group_by)
    if reference and reference not in groups:
        found = [label for label, members in groups.items() if reference in members]
        if not found:
            raise ConfigError(f"--reference {reference!r} is neither a configuration ({', '.join(groups)}) nor one "
                              "of the experiments")  # fmt: skip
        reference = found[0]
    reference = reference or next(iter(groups))
    groups = {reference: groups[reference]} | groups  # the reference first
    runs = {name: load(name, set_name) for name in names}
    summary = seed_groups(runs, groups, reference, resamples, seed) | {"group_by": group_by, "set": set_name}
    write_json(paths.SEEDS, summary)
    text = seed_table(summary)
    print(f"{text}\n\n(written to {paths.SEEDS}; `nlistral report` shows it in {paths.REPORT_RESULTS})")
    return text
