"""`nlistral report --experiments A B ... | --all [--reference R] [--set NAME]`: the test table across DVC experiments
(on the test split, or on the extra test set NAME).

Each experiment's metrics/eval*.json and predictions are read at its revision through `dvc.api` (git for the
metrics, the DVC cache or remote for the predictions), and each is compared with the reference on the same rows:
accuracy difference with a paired-bootstrap 95% CI and McNemar's mid-p, Holm-adjusted over the table's comparisons
(one family: every experiment against the reference).

`--group-by train.seed` (any params, dotted): experiments whose params differ only in those keys are one
configuration, named by the params that tell configurations apart. Per configuration: the mean test accuracy over its
seeds, their sd, min, max and count; against the reference's configuration: the difference of means with Welch's t
95% interval and p-value on the per-seed accuracies (stats.welch), the p-values Holm-adjusted over the table (one
family: every configuration that gets a statement against the reference). A configuration with one seed, or a
reference with one, gets no seed statement at all, nor does one whose seeds and the reference's each agree exactly
(no spread to test against).
Written to metrics/seeds.json, which the report stage shows (results.md, the page).
"""

import json

import yaml

from nlistral import paths
from nlistral.config import PARAMS_FILE
from nlistral.errors import ConfigError
from nlistral.formatting import code, interval, pct, pvalue, terminal
from nlistral.io import json_record, parse_jsonl, write_json
from nlistral.stats import holm, paired_comparison, seed_summary, welch

SEED_COLUMNS = ("configuration", "experiments", "seeds", "mean accuracy", "sd", "min", "max",
                "minus reference, Welch 95% CI (seeds)", "df", "Welch p", "Holm p")  # fmt: skip
COLUMNS = ("experiment", "rows", "accuracy", "95% CI", "macro F1", "parse failures", "base zero-shot", "teacher",
           "minus reference", "McNemar mid-p", "Holm p")  # fmt: skip


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
        metrics = paths.SET_METRICS.format(set=set_name)
        summary = json_record(read_at(rev, metrics), f"{metrics} at {rev}")
        path = paths.SET_PREDICTIONS.format(set=set_name)
        return {
            "eval": summary["models"]["fine-tuned"],
            **{name: summary["models"].get(name) for name in ("base", "teacher")},
            "correct": {str(r["id"]): bool(r["correct"]) for r in parse_jsonl(read_at(rev, path), f"{path} at {rev}")},
        }
    base, teacher = (read_at(rev, path, required=False) for path in (paths.EVAL_BASE_METRICS,
                                                                     paths.EVAL_TEACHER_METRICS))  # fmt: skip
    predictions = parse_jsonl(read_at(rev, paths.PREDICTIONS), f"{paths.PREDICTIONS} at {rev}")
    return {
        "eval": json_record(read_at(rev, paths.EVAL_METRICS), f"{paths.EVAL_METRICS} at {rev}"),
        "base": base and json_record(base, f"{paths.EVAL_BASE_METRICS} at {rev}"),
        "teacher": teacher and json_record(teacher, f"{paths.EVAL_TEACHER_METRICS} at {rev}"),
        "correct": {str(r["id"]): bool(r["correct"]) for r in predictions},
    }


def table(runs: dict, reference: str, resamples: int, seed: int) -> str:
    """The markdown table, one row per experiment, compared with `reference` on the rows they share."""
    ref, ids = runs[reference]["correct"], list(runs[reference]["correct"])
    compared = {}
    for name, run in runs.items():
        if set(run["correct"]) != set(ref):
            raise ConfigError(f"{name} and {reference} were scored on different test rows: no paired comparison")
        if name != reference:
            compared[name] = paired_comparison([ref[i] for i in ids], [run["correct"][i] for i in ids], resamples, seed)
    adjusted = holm({name: c["mcnemar_midp"] for name, c in compared.items()})
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, run in runs.items():
        result = run["eval"]
        versus = ("reference", "–", "–")
        if c := compared.get(name):
            versus = (f"{pct(c['difference'], True)} pp {interval(c['difference_ci95'], True)}",
                      pvalue(c["mcnemar_midp"]), pvalue(adjusted[name]))  # fmt: skip
        cells = [
            code(name),
            str(result["n"]),
            pct(result["accuracy"]),
            interval(result["accuracy_ci95"]),
            f"{result['macro_f1']:g}",
            pct(result["parse_failure_rate"]),
            *(pct(run[b]["accuracy"]) if run[b] else "not evaluated" for b in ("base", "teacher")),
            *versus,
        ]
        lines.append("| " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + f"\n\nHolm family: {len(compared)} comparisons (each experiment vs {code(reference)})."


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


def seed_groups(runs: dict, groups: dict[str, list[str]], reference: str) -> dict:
    """The metrics/seeds.json object: per configuration its seeds' accuracies summarised, and each configuration
    against `reference` (a configuration): Welch on the per-seed accuracies, Holm over the table (module doc)."""
    ids = list(next(iter(runs.values()))["correct"])
    for name, run in runs.items():
        if set(run["correct"]) != set(ids):
            raise ConfigError(f"{name} and {next(iter(runs))} were scored on different test rows: no paired comparison")
    accuracies = {label: [runs[m]["eval"]["accuracy"] for m in members] for label, members in groups.items()}
    found = {label: {"experiments": members, **seed_summary(accuracies[label])} for label, members in groups.items()}
    tested = {label: welch(accuracies[reference], accuracies[label]) for label in found if label != reference}
    for label, result in tested.items():  # no test: why, in the table's words
        if result is None:
            spread = min(len(accuracies[label]), len(accuracies[reference])) > 1
            found[label]["no_statement"] = "no spread across seeds" if spread else "one seed"
    tested = {label: result for label, result in tested.items() if result}
    for label, p in holm({label: result["p"] for label, result in tested.items()}).items():
        found[label]["versus_reference"] = tested[label] | {"holm_p": p}
    return {"reference": reference, "rows": len(ids), "family": len(tested), "configurations": found}


def seed_table(summary: dict) -> str:
    """metrics/seeds.json as a markdown table, the reference configuration first."""
    lines = ["| " + " | ".join(SEED_COLUMNS) + " |", "|" + "---|" * len(SEED_COLUMNS)]
    for label, c in summary["configurations"].items():
        v = c.get("versus_reference")
        versus = (
            "reference" if label == summary["reference"] else f"no statement: {c.get('no_statement')}",
            "–",
            "–",
            "–",
        )
        if v:
            versus = (f"{pct(v['difference'], True)} pp {interval(v['difference_ci95'], True)}",
                      "–" if v["df"] is None else f"{v['df']:g}", pvalue(v["p"]), pvalue(v["holm_p"]))  # fmt: skip
        sd = "–" if c["sd"] is None else f"{pct(c['sd'], True).lstrip('+')} pp"
        cells = [code(label), ", ".join(code(e) for e in c["experiments"]), str(c["n_seeds"]), pct(c["mean"]), sd,
                 pct(c["min"]), pct(c["max"]), *versus]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    family = (
        f"Holm family: {summary['family']} comparisons (each configuration with a seed statement vs "
        f"`{summary['reference']}`)."
    )
    return "\n".join(lines) + "\n\n" + family


def compare_experiments(
    experiments: list[str] | None, reference: str | None, resamples: int, seed: int, set_name: str | None = None,
    group_by: list[str] | None = None,
) -> str:  # fmt: skip
    names = experiments or all_experiments()
    if group_by:
        return seed_report(names, reference, set_name, group_by)
    reference = reference or names[0]
    names = [reference, *(name for name in names if name != reference)]  # the reference first
    text = table({name: load(name, set_name) for name in names}, reference, resamples, seed)
    print(terminal(text))
    return text


def seed_report(names: list[str], reference: str | None, set_name: str | None, group_by: list[str]) -> str:
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
    summary = seed_groups(runs, groups, reference) | {"group_by": group_by, "set": set_name}
    write_json(paths.SEEDS, summary)
    text = seed_table(summary)
    print(f"{terminal(text)}\n\n(written to {paths.SEEDS}; `nlistral report` shows it in {paths.REPORT_RESULTS})")
    return text
