"""`nlistral summary`: what `make run` ends on. The test table (three models: accuracy with its 95% CI, parse
failures, the fine-tuned model minus each baseline with its paired 95% CI, McNemar mid-p and its Holm adjustment),
the same per extra test set, the Holm family's size, and where the report, metrics, plots and runs are; at most 80
columns. Every figure comes from the metrics files the report reads, rounded to 0.1 point here (reports/results.md
shows them to 0.01); the Holm p-values are computed from them as the report computes them (results.headline_family).
"""

from nlistral import paths
from nlistral.formatting import pvalue, terminal
from nlistral.results import MODEL_NAMES, headline_family, is_embedded, test_results, test_set_results

WIDTH = 80
HEADER = ("model", "acc.", "95% CI", "unparsed", "fine-tuned - this", "mid-p", "Holm p")


def _pct(value, signed=False) -> str:
    return "–" if value is None else f"{value * 100:{'+' if signed else ''}.1f}"


def _interval(bounds, gap: str) -> str:
    return "–" if bounds is None else f"[{_pct(bounds[0])},{gap}{_pct(bounds[1])}]"


def _p(value) -> str:
    """A p-value in at most 6 characters, never rounded across 0.05: below 0.001 "<0.001"; just below 0.05, where
    two digits would read 0.05 (formatting.pvalue adds digits instead), "<0.05"."""
    if value < 0.001:
        return "<0.001"
    text = pvalue(value, 2)
    return "<0.05" if len(text) > 6 and value < 0.05 else text


def rows(results: dict, comparisons: dict, holm: dict, gap: str) -> list[tuple[str, ...]]:
    """One row per model: its accuracy and, for a baseline, the fine-tuned model's difference from it."""
    lines = []
    for name, r in results.items():
        versus = ("", "", "")
        if c := comparisons.get(name):
            versus = (f"{_pct(c['difference'], True)} {_interval(c['difference_ci95'], gap)}",
                      _p(c["mcnemar_midp"]), _p(holm[name]))  # fmt: skip
        lines.append((MODEL_NAMES[name], _pct(r["accuracy"]), _interval(r["accuracy_ci95"], gap),
                      _pct(r["parse_failure_rate"]), *versus))  # fmt: skip
    return lines


def layout(lines: list[tuple[str, ...]], separator: str) -> list[str]:
    widths = [max(len(line[i]) for line in [HEADER, *lines]) for i in range(len(HEADER))]
    return [
        separator.join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [HEADER, *lines]
    ]


def table(title: str, results: dict, comparisons: dict, holm: dict) -> str:
    """`title`, its row count (the models were scored on the same rows) and the table; where wide figures (100.0,
    -58.3 [-83.3, -33.3]) would take it past 80 columns, one space between columns and none inside intervals."""
    counts = {r["n"] for r in results.values()}
    rows_ = (
        f"{counts.pop()} rows"
        if len(counts) == 1
        else "rows: " + ", ".join(f"{n} {r['n']}" for n, r in results.items())
    )
    text = layout(rows(results, comparisons, holm, " "), "  ")
    if max(map(len, text)) > WIDTH:
        text = layout(rows(results, comparisons, holm, ""), " ")
    return "\n".join([f"{title}, {rows_} (percentages, 95% CIs):", *text])


def render(cfg) -> str:
    results, test_sets = test_results(), test_set_results(cfg)
    comparisons = results["fine-tuned"].get("comparisons", {})
    family = headline_family(comparisons, test_sets)
    out = [table("Test split", results, comparisons, family["holm"]["test"])]
    for name, s in test_sets.items():
        out += ["", table(f"Extra test set {name}", s["models"], s.get("comparisons", {}), family["holm"][name])]
    out += [
        "",
        f"Holm family: {family['size']} comparisons, the fine-tuned model vs each baseline in",
        "the tables above; a difference counts when its Holm p (its McNemar mid-p,",
        "Holm-adjusted) is below 0.05.",
    ]
    if is_embedded(cfg):
        out += ["", "Embedded profile (stand-in LLMs, tiny model): these numbers are not a result."]
    out += [
        "",
        f"Report:  {paths.REPORT_RESULTS} (every table), {paths.REPORT_PAGE} (a browser),",
        f"         {paths.REPORT_MODEL_CARD}, {paths.REPORT_DATASET_CARD}",
        f"Metrics: metrics/, {paths.SET_METRICS.format(set='<set>')}: .venv/bin/dvc metrics show",
        "Plots:   .venv/bin/dvc plots show",
        "Runs:    .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db, then open",
        "  http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning",
        "Git:     dvc.lock, metrics/, reports/ are committed; git diff shows what moved",
    ]
    return "\n".join(out)


def run(cfg) -> None:
    print(terminal(render(cfg)))
