"""Stage: the three models on one extra test set, side by side -> metrics/test_sets/<set>.json and its plot CSV.

`nlistral summarise-set --set NAME` reads what `evaluate-set` wrote for the fine-tuned model, the base model and the
teacher, and writes for each its headline metrics (n, accuracy with its 95% CI, macro F1, parse failures) and its
accuracy per tag value (`by_tag`: tag column -> value -> n, accuracy, Clopper-Pearson CI), and the paired comparison
of each baseline (a) with the fine-tuned model (b), as eval.json's `comparisons` (nlistral.results, same rows by id).
`by_tag_comparisons` pairs them again within each tag value (difference, McNemar mid-p): the set's per-tag cells
are one family of `by_tag_family` comparisons, with Holm-adjusted p-values (`holm_p`).
"""

import json

from nlistral.formatting import terminal
from nlistral.io import read_jsonl, write_csv, write_json
from nlistral.paths import PLOT_SET_ACCURACY, SET_FILES, SET_METRICS, require
from nlistral.results import compare_records
from nlistral.stats import accuracy_ci, holm, mcnemar_midp

SHOWN = ("model_id", "n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "f1", "parse_failures",
         "parse_failure_rate", "parse_failures_by_reason", "accuracy_parsed")  # fmt: skip


def by_tag(records, tags) -> dict:
    """Tag column -> tag value (sorted) -> {n, accuracy, accuracy_ci95} over the rows with that value; the interval
    Clopper-Pearson's (a cell holds a handful of rows, where Wilson's coverage dips below 90%)."""
    table = {}
    for tag in tags:
        groups = {}
        for record in records:
            groups.setdefault(record["tags"][tag], []).append(bool(record["correct"]))
        table[tag] = {value: {"n": len(correct), "accuracy": round(sum(correct) / len(correct), 4),
                              "accuracy_ci95": accuracy_ci(correct, exact=True)}
                      for value, correct in sorted(groups.items())}  # fmt: skip
    return table


def by_tag_comparisons(records, tags) -> tuple[dict, int]:
    """Tag column -> value -> baseline -> {difference, mcnemar_midp, holm_p}: the fine-tuned model minus each baseline
    on the rows with that value, Holm-adjusted over every cell of the set (the family); and the family's size."""
    tuned = {str(r["id"]): r for r in records["fine-tuned"]}
    table, family = {}, {}
    for tag in tags:
        for baseline in ("base", "teacher"):
            groups = {}  # value -> [(baseline right, fine-tuned right)]
            for r in records[baseline]:
                pair = (bool(r["correct"]), bool(tuned[str(r["id"])]["correct"]))
                groups.setdefault(r["tags"][tag], []).append(pair)
            for value, pairs in groups.items():
                worse, better = pairs.count((True, False)), pairs.count((False, True))
                family[(tag, value, baseline)] = p = mcnemar_midp(worse, better)
                cell = table.setdefault(tag, {}).setdefault(value, {})
                cell[baseline] = {"difference": round((better - worse) / len(pairs), 4), "mcnemar_midp": p}
    for (tag, value, baseline), p in holm(family).items():
        table[tag][value][baseline]["holm_p"] = p
    return {tag: dict(sorted(values.items())) for tag, values in table.items()}, len(family)


def run(cfg, name: str) -> dict:
    records, metrics = {}, {}
    for model, (predictions_path, metrics_path) in SET_FILES.items():
        records[model] = read_jsonl(require(predictions_path, set_name=name))
        metrics[model] = json.loads(require(metrics_path, set_name=name).read_text(encoding="utf-8"))
    tuned = metrics["fine-tuned"]
    resamples, seed = cfg.eval.bootstrap, cfg.eval.seed
    summary = {
        "set": name,
        **{k: tuned[k] for k in ("source", "split", "revision", "dropped") if k in tuned},
        "n": tuned["n"],
        "tags": tuned["tags"],
        "models": {model: {k: m[k] for k in SHOWN} | {"by_tag": by_tag(records[model], tuned["tags"])}
                   for model, m in metrics.items()},
        "comparisons": {},
    }  # fmt: skip
    for baseline in ("base", "teacher"):
        comparison = compare_records(records[baseline], records["fine-tuned"], baseline, "fine-tuned", resamples, seed)
        del comparison["flipped"]  # in `nlistral compare --set NAME`; the summary keeps the counts
        summary["comparisons"][baseline] = comparison
    summary["by_tag_comparisons"], summary["by_tag_family"] = by_tag_comparisons(records, tuned["tags"])
    write_json(SET_METRICS.format(set=name), summary)
    plot = [{"model": model, "accuracy": m["accuracy"], "ci95_low": m["accuracy_ci95"][0],
             "ci95_high": m["accuracy_ci95"][1]} for model, m in summary["models"].items()]  # fmt: skip
    write_csv(PLOT_SET_ACCURACY.format(set=name), plot, ("model", "accuracy", "ci95_low", "ci95_high"))
    print(terminal(describe(summary)))
    return summary


def describe(summary: dict) -> str:
    """Accuracy per model, and per tag value, as a few lines of text."""
    models = summary["models"]
    lines = [f"summarise-set {summary['set']} ({summary['n']} rows): " + ", ".join(
        f"{model} {m['accuracy']:.4f} {m['accuracy_ci95']}" for model, m in models.items())]  # fmt: skip
    for tag in summary["tags"]:
        lines.append(f"  {tag + ' (rows)':<25}" + "".join(f"{model:>12}" for model in models))
        for value, cell in models["fine-tuned"]["by_tag"][tag].items():
            accuracies = "".join(f"{models[model]['by_tag'][tag][value]['accuracy']:>12.4f}" for model in models)
            lines.append(f"  {value[:18]:<18} {cell['n']:>4}  {accuracies}")
    lines.append(f"  -> {SET_METRICS.format(set=summary['set'])}")
    return "\n".join(lines)
