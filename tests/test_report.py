"""The report stage: results.md and the cards hold only numbers from the metrics files, the page is safe and works in
a real headless Chromium, `nlistral export` gives a folder peft loads, `--experiments` compares DVC experiments.

The thoughts/reflections/sft outputs are made by the real stages on data/sample (offline LLMs, tiny tokenizer); the
train and evaluate outputs are written here in the formats of CONTRACT.md (metrics/train.json, train_history.csv,
eval*.json, predictions*.jsonl, confusion.csv, plots/accuracy_by_length.csv).
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from conftest import REPO, chromium
from test_imports import DEEP_LEARNING, loaded_by

from nlistral import paths
from nlistral.confidence import calibration
from nlistral.config import load_config
from nlistral.io import read_jsonl, write_csv, write_json, write_jsonl
from nlistral.stages import base_model, reflections, report, sft, thoughts
from nlistral.stats import macro_f1_difference, paired_comparison

INJECTED = '<script>document.title = "pwned"; window.pwned = true;</script><img src=x onerror="window.pwned = true">'
GIT_IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "nlistral-tests"), ("EMAIL", "tests@nlistral.invalid"))}  # fmt: skip


def predictions(rows, right, failed=lambda i: False, inject=False) -> list[dict]:
    """predictions*.jsonl rows: row i is right when right(i), a parse failure when failed(i)."""
    out = []
    for i, row in enumerate(rows):
        label = None if failed(i) else (row["label"] if right(i) else 1 - row["label"])
        reply = {"thought_process": "Step 1 ...", "predicted_label": label}
        output = (INJECTED if inject and i == 0 else "") + ("no json here" if label is None else json.dumps(reply))
        out.append({
            "id": row["id"], "premise": row["premise"], "hypothesis": row["hypothesis"], "true_label": row["label"],
            "predicted_label": label, "correct": label == row["label"],
            "parse_method": None if label is None else "json", "parse_error": "no_json" if label is None else None,
            "finish_reason": "stop", "output_tokens": 20 + i, "output": output,
        })  # fmt: skip
    return out


MACRO_F1 = {
    "fine-tuned": 0.6932,
    "base": 0.4987,
    "teacher": 0.6512,
}  # one per model: a cell shown in the wrong row shows


def eval_metrics(model, model_id, preds, ci) -> dict:
    n = len(preds)
    correct = sum(p["correct"] for p in preds)
    failures = sum(p["predicted_label"] is None for p in preds)
    conf = {k: sum(p["true_label"] == t and p["predicted_label"] == q for p in preds)
            for k, t, q in (("tp", 1, 1), ("fp", 0, 1), ("tn", 0, 0), ("fn", 1, 0))}  # fmt: skip
    return {
        "model": model, "model_id": model_id, "n": n, "accuracy": round(correct / n, 4), "accuracy_ci95": ci,
        "precision": 0.7143, "recall": 0.6818, "f1": 0.6977, "macro_precision": 0.7011, "macro_recall": 0.6955,
        "macro_f1": MACRO_F1[model], "macro_f1_ci95": [MACRO_F1[model] - 0.08, MACRO_F1[model] + 0.07],
        "parse_failures": failures, "parse_failure_rate": round(failures / n, 4),
        "parse_failures_by_reason": {"no_json": failures} if failures else {},
        "accuracy_parsed": round(correct / (n - failures), 4) if n - failures else None, "confusion": conf,
    }  # fmt: skip


def write_train_and_eval_outputs(cfg):
    """What the train and evaluate stages write (CONTRACT.md), for the sample's test rows."""
    with open(Path(cfg.data.dir) / "test.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["label"] = int(row["label"])
    tuned = predictions(rows, lambda i: i % 5, failed=lambda i: i % 11 == 3, inject=True)
    base = predictions(rows, lambda i: i % 2 == 0)
    teacher = predictions(rows, lambda i: i % 3)
    write_jsonl(paths.PREDICTIONS, tuned)
    write_jsonl(paths.PREDICTIONS_BASE, base)
    write_jsonl(paths.PREDICTIONS_TEACHER, teacher)
    results = eval_metrics("fine-tuned", "models/base", tuned, [0.6136, 0.8636])
    p_entailment = [None if p["predicted_label"] is None else 0.55 + 0.4 * p["predicted_label"] - 0.01 * (i % 7)
                    for i, p in enumerate(tuned)]  # fmt: skip
    results["calibration"] = calibration(p_entailment, [p["true_label"] for p in tuned],
                                         [p["predicted_label"] for p in tuned], 1000, 7)  # fmt: skip
    results["comparisons"] = {
        name: {"a": name, "b": "fine-tuned", **paired_comparison([p["correct"] for p in preds],
                                                                 [p["correct"] for p in tuned], 1000, 7),
               **macro_f1_difference([p["true_label"] for p in preds], [p["predicted_label"] for p in preds],
                                     [p["predicted_label"] for p in tuned], 1000, 7)}
        for name, preds in (("base", base), ("teacher", teacher))
    }  # fmt: skip
    write_json(paths.EVAL_METRICS, results)
    write_json(paths.EVAL_BASE_METRICS, eval_metrics("base", "models/base", base, [0.3409, 0.6364]))
    write_json(paths.EVAL_TEACHER_METRICS, eval_metrics("teacher", "overlap-heuristic-v1", teacher, [0.5227, 0.7955])
               | {"calibration": None})  # fmt: skip
    write_csv(paths.CONFUSION, [{"actual": p["true_label"], "predicted": "unparsed" if p["predicted_label"] is None
                                 else p["predicted_label"]} for p in tuned], ("actual", "predicted"))  # fmt: skip
    write_csv(
        paths.PLOT_ACCURACY_BY_LENGTH,
        [
            {"rationale_tokens": "0-100", "rows": 40, "accuracy": 0.725},
            {"rationale_tokens": "101-200", "rows": 4, "accuracy": 0.5},
            {"rationale_tokens": "201-300", "rows": 0, "accuracy": None},
            {"rationale_tokens": "301+", "rows": 0, "accuracy": None},
        ],
        ("rationale_tokens", "rows", "accuracy"),
    )
    write_json(paths.TRAIN_METRICS, {
        "train_loss": 2.8731, "train_loss_first": 6.1022, "train_loss_last": 1.2207, "eval_loss": 1.3391, "steps": 40,
        "epochs": 2.5, "train_rows": 128, "dev_rows": 44, "train_tokens": 28416, "loss_tokens": 17664,
        "max_row_tokens": 262, "rows_over_max_seq_length": 0, "trainable_params": 81920, "total_params": 1072512,
        "best_step": 30, "best_eval_loss": 1.2875,
        "stopped_early": True, "resumed_from_step": None, "total_steps": 160,
    })  # fmt: skip
    history = []
    for step in range(5, 45, 5):
        history.append({"step": step, "epoch": round(step / 16, 4), "loss": round(6.5 - step * 0.12, 4),
                        "eval_loss": round(5.0 - step * 0.12, 4) if step % 10 == 0 else "",
                        "learning_rate": 0.002, "grad_norm": 0.91})  # fmt: skip
    write_csv(paths.TRAIN_HISTORY, history, history[0].keys())
    write_test_set_outputs(cfg)


def write_test_set_outputs(cfg):
    """What evaluate-set writes for each default test set (the diagnostic CSV), then the real summarise-set stage."""
    from nlistral.stages import evaluate_set, summarise_set

    for name in cfg.eval.test_sets:
        rows, source = evaluate_set.set_rows(cfg, name)
        rows = [{"id": r.id, "premise": r.premise, "hypothesis": r.hypothesis, "label": int(r.label)}
                for r in rows.itertuples()]  # fmt: skip
        tags = evaluate_set.set_rows(cfg, name)[0][source["tags"]].to_dict("records")
        for model, right, ci in (("fine-tuned", lambda i: i % 4, [0.6, 0.86]), ("base", lambda i: i % 2 == 0,
                                 [0.33, 0.67]), ("teacher", lambda i: i % 3, [0.5, 0.8])):  # fmt: skip
            preds = predictions(rows, right)
            for p, tag in zip(preds, tags, strict=True):
                p["tags"] = tag
            predictions_path, metrics_path = (t.format(set=name) for t in paths.SET_FILES[model])
            write_jsonl(predictions_path, preds)
            write_json(metrics_path, source | eval_metrics(model, "models/base", preds, ci))
        summarise_set.run(cfg, name)


@pytest.fixture(scope="session")
def outputs(tmp_path_factory):
    """A repo root holding every file the report reads; the earlier stages really ran there."""
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "data" / "sample", root / "data" / "sample")
    cwd, cache = os.getcwd(), os.environ.get("NLISTRAL_CACHE_DIR")
    os.chdir(root)
    os.environ["NLISTRAL_CACHE_DIR"] = str(root / ".cache")
    try:
        cfg = load_config()
        for split in report.SPLITS:
            thoughts.run(cfg, split)
            reflections.run(cfg, split)
        base_model.run(cfg)
        for split in report.SPLITS:
            sft.run(cfg, split)
        rows = read_jsonl(paths.THOUGHTS.format(split="train"))  # a rationale is model output: anything can be in it
        rows[0]["thought_process"] = INJECTED + rows[0]["thought_process"]
        write_jsonl(paths.THOUGHTS.format(split="train"), rows)
        write_train_and_eval_outputs(cfg)
        git("git", "init", "-q", cwd=root)  # a real checkout (the reports must name none of its revision)
        git("git", "add", "params.yaml", cwd=root)
        git("git", "commit", "-qm", "params", cwd=root)
    finally:
        os.chdir(cwd)
        os.environ.pop("NLISTRAL_CACHE_DIR") if cache is None else os.environ.update(NLISTRAL_CACHE_DIR=cache)
    return root


@pytest.fixture
def reported(outputs, monkeypatch):
    """The report stage run on `outputs` (cwd = that root)."""
    monkeypatch.chdir(outputs)
    monkeypatch.setenv("DVC_EXP_NAME", "unit-exp")
    report.run(load_config())
    return outputs


def test_report_writes_results_cards_and_page(reported):
    """The page (reports/index.html) shows each model's own metrics in its own row of both tables (catches a
    template that puts one model's numbers in every row, or a page that is never written)."""
    results = (reported / paths.REPORT_RESULTS).read_text()
    assert results.startswith("# NLIstral results: unit-exp\n")
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=reported, capture_output=True, text=True)
    for name in (paths.REPORT_RESULTS, paths.REPORT_MODEL_CARD, paths.REPORT_DATASET_CARD, paths.REPORT_PAGE):
        text = (reported / name).read_text()  # the same inputs give the same files: no commit, date or time
        assert revision.stdout.strip() not in text and not re.search(r"\b20\d\d-\d\d-\d\d\b|UTC", text), name
    assert "**The embedded profile's numbers are not a result.**" in results
    eval_json = json.loads((reported / paths.EVAL_METRICS).read_text())
    base = eval_json["comparisons"]["base"]
    row = next(line for line in results.splitlines() if line.startswith("| base zero-shot |"))
    assert f"{base['mcnemar_p']:.3g}" in row and report.pct(base["difference"], True) in row
    assert "| teacher | `overlap-heuristic-v1` | 44 |" in results
    for split in ("train", "dev"):
        assert f"| {split} |" in (reported / paths.REPORT_DATASET_CARD).read_text()
    page = (reported / paths.REPORT_PAGE).read_text()
    headline, test_sets = expected_rows(reported)
    assert html_table(page, "headline") == [HEADER, *(row for row in headline)]
    assert html_table(page, "test-sets") == [["test set", "model", *HEADER[2:]], *test_sets]


HEADER = ["model", "model id", "rows", "accuracy", "95% CI", "macro F1 [95% CI]", "parse failures",
          "fine-tuned minus this", "macro F1: fine-tuned minus this", "McNemar p", "mid-p", "Holm p"]  # fmt: skip
MODEL_NAMES = {"fine-tuned": "fine-tuned", "base": "base zero-shot", "teacher": "teacher"}


def expected_cells(metrics: dict, comparison: dict | None, holm_p: float | None) -> list[str]:
    """One table row's cells from one model's own metrics (and its own comparison with the fine-tuned model)."""
    c = comparison
    f1 = f"{metrics['macro_f1']:.4f} [{metrics['macro_f1_ci95'][0]:.4f}, {metrics['macro_f1_ci95'][1]:.4f}]"
    versus = ["–"] * 5
    if c:
        low, high = c["macro_f1_difference_ci95"]
        versus = [f"{report.pct(c['difference'], True)} pp {report.interval(c['difference_ci95'], True)}",
                  f"{c['macro_f1_difference']:+.4f} [{low:+.4f}, {high:+.4f}]", report.pvalue(c["mcnemar_p"]),
                  report.pvalue(c["mcnemar_midp"]), report.pvalue(holm_p)]  # fmt: skip
    return [report.num(metrics["n"]), report.pct(metrics["accuracy"]), report.interval(metrics["accuracy_ci95"]),
            f1.replace(f"{metrics['macro_f1']:.4f}", report.num(metrics["macro_f1"]), 1),
            report.pct(metrics["parse_failure_rate"]), *versus]  # fmt: skip


def holm_by_hand(root) -> dict:
    """{(table, baseline): Holm-adjusted mid-p} over the family of the fine-tuned model against each baseline on the
    test split and every extra set: the i-th smallest of m p-values times m - i + 1, a running maximum, at most 1."""
    family = {("test", name): c["mcnemar_midp"]
              for name, c in json.loads((root / paths.EVAL_METRICS).read_text())["comparisons"].items()}  # fmt: skip
    for set_name in load_config().eval.test_sets:
        summary = json.loads((root / paths.SET_METRICS.format(set=set_name)).read_text())
        family |= {(set_name, name): c["mcnemar_midp"] for name, c in summary["comparisons"].items()}
    adjusted, running = {}, 0.0
    for i, (key, p) in enumerate(sorted(family.items(), key=lambda item: item[1])):
        running = max(running, min(1.0, p * (len(family) - i)))
        adjusted[key] = running
    return adjusted


def expected_rows(root) -> tuple[list[list[str]], list[list[str]]]:
    """The test split's table and the extra test sets' table as they must read, row by row, from the metrics files."""
    tuned = json.loads((root / paths.EVAL_METRICS).read_text())
    holm = holm_by_hand(root)
    headline = []
    for name, path in (("fine-tuned", paths.EVAL_METRICS), ("base", paths.EVAL_BASE_METRICS),
                       ("teacher", paths.EVAL_TEACHER_METRICS)):  # fmt: skip
        metrics = json.loads((root / path).read_text())
        comparison = tuned["comparisons"][name] if name != "fine-tuned" else None
        headline.append([MODEL_NAMES[name], metrics["model_id"],
                         *expected_cells(metrics, comparison, holm.get(("test", name)))])  # fmt: skip
    test_sets = []
    for set_name in load_config().eval.test_sets:
        summary = json.loads((root / paths.SET_METRICS.format(set=set_name)).read_text())
        for name, metrics in summary["models"].items():
            comparison = summary["comparisons"].get(name)
            test_sets.append([set_name, MODEL_NAMES[name],
                              *expected_cells(metrics, comparison, holm.get((set_name, name)))])  # fmt: skip
    return headline, test_sets


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header line starts with `header`, header row first."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def html_table(page: str, table_id: str) -> list[list[str]]:
    """The text of each cell of `<table id=table_id>`, row by row (header row first)."""
    from html.parser import HTMLParser

    class Table(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.rows, self.cell = False, [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table" and ("id", table_id) in attrs:
                self.inside = True
            elif self.inside and tag == "tr":
                self.rows.append([])
            elif self.inside and tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag == "table":
                self.inside = False
            elif self.inside and tag in ("td", "th"):
                self.rows[-1].append(" ".join(self.cell.split()))
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Table()
    parser.feed(page)
    assert parser.rows, f"no <table id={table_id}> in the page"
    return parser.rows


def test_report_lists_every_test_set_with_its_per_tag_table(reported):
    """Each per-tag cell is its own model's accuracy for its own tag value (not the teacher's, not another tag's)."""
    results = (reported / paths.REPORT_RESULTS).read_text()
    summary = json.loads((reported / paths.SET_METRICS.format(set="diagnostic")).read_text())
    for name, model in (("fine-tuned", "fine-tuned"), ("base", "base zero-shot"), ("teacher", "teacher")):
        m = summary["models"][name]
        cells = f"{report.pct(m['accuracy'])} | {report.interval(m['accuracy_ci95'])}"
        assert f"| diagnostic | {model} | 36 | {cells} |" in results
    assert "### diagnostic: accuracy by phenomenon" in results
    by_tag = markdown_table(results, "| phenomenon | rows |")
    models = summary["models"]
    versus = summary["by_tag_comparisons"]["phenomenon"]
    assert by_tag[0] == ["phenomenon", "rows"] + [c for m in models for c in (MODEL_NAMES[m], "95% CI")] + [
        c for b in ("base", "teacher") for c in (f"fine-tuned minus {MODEL_NAMES[b]}", "mid-p", "Holm p")
    ]
    assert by_tag[1:] == [[value, report.num(cell["n"])] + [
        c for m in models.values() for c in (report.pct(m["by_tag"]["phenomenon"][value]["accuracy"]),
                                             report.interval(m["by_tag"]["phenomenon"][value]["accuracy_ci95"]))] + [
        c for b in ("base", "teacher") for c in (f"{report.pct(versus[value][b]['difference'], True)} pp",
                                                report.pvalue(versus[value][b]["mcnemar_midp"]),
                                                report.pvalue(versus[value][b]["holm_p"]))]
        for value, cell in models["fine-tuned"]["by_tag"]["phenomenon"].items()]  # fmt: skip
    family = summary["by_tag_family"]  # every value of every tag column, against each baseline
    assert family == 2 * sum(len(values) for values in summary["by_tag_comparisons"].values())
    assert f"over this set's per-tag family ({family} comparisons" in results
    assert [row[0] for row in by_tag[1:]] == ["hypernym_hyponym", "lexical_overlap", "negation", "numbers",
                                              "quantifiers", "word_order"]  # fmt: skip


def test_cards_have_hugging_face_metadata(reported):
    from huggingface_hub import DatasetCard, ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard((reported / paths.REPORT_MODEL_CARD).read_text())
    assert card.data.library_name == "peft" and card.data.base_model == "models/base"
    assert card.data.license == "mit" and card.data.pipeline_tag == "text-generation"
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    eval_json = json.loads((reported / paths.EVAL_METRICS).read_text())
    assert {r.metric_type: r.metric_value for r in results if r.dataset_name == "sample"} == {
        "accuracy": eval_json["accuracy"], "f1": eval_json["macro_f1"]}  # fmt: skip
    diagnostic = json.loads((reported / paths.SET_METRICS.format(set="diagnostic")).read_text())
    assert {r.metric_type: r.metric_value for r in results if r.dataset_name == "diagnostic"} == {
        "accuracy": diagnostic["models"]["fine-tuned"]["accuracy"],
        "f1": diagnostic["models"]["fine-tuned"]["macro_f1"]}  # fmt: skip
    data_card = DatasetCard((reported / paths.REPORT_DATASET_CARD).read_text())
    assert data_card.data.configs[0]["data_files"][0] == {"split": "train", "path": "train_ft.jsonl"}
    assert data_card.data.license == "mit"


def source_values(root) -> tuple[list[float], list[str]]:
    """Every number in the metrics files and params.yaml, and every string value that contains a digit."""
    numbers, strings = [], []

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, bool) or node is None:
            return
        elif isinstance(node, int | float):
            numbers.append(float(node))
        elif isinstance(node, str):
            try:
                numbers.append(float(node))
            except ValueError:
                if re.search(r"\d", node):
                    strings.append(node)

    for path in [*(root / "metrics").rglob("*.json"), root / "params.yaml"]:
        walk(yaml.safe_load(path.read_text()))
    for path in (root / "metrics").rglob("*.csv"):
        walk(list(csv.DictReader(path.open())))
    return numbers, strings


NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?:%| pp)?")
PROSE = ("95% CI", "95%", "below 0.05", "10 equal-width bins", "10 bins", "50/80/90%", "at 50% / 80% / 90%", "at 50%",
          "at 80%", "at 90%")  # words of the text, not results  # fmt: skip


def test_calibration_tables_show_each_models_block_and_that_the_teacher_has_no_probabilities(reported):
    """results.md, the page and the model card: the fine-tuned model's calibration block cell by cell, the reliability
    bins, "no probabilities" for a model without them (the teacher, and here the base, whose file has no block)."""
    from nlistral.formatting import bounds, num, pct

    block = json.loads((reported / paths.EVAL_METRICS).read_text())["calibration"]
    coverage = block["accuracy_at_coverage"]
    cells = ["fine-tuned", num(block["n"]), num(block["ece"]), bounds(block["ece_ci95"]),
             num(block["brier"]), num(block["mean_confidence"]), pct(coverage["50"]), pct(coverage["80"]),
             pct(coverage["90"]), num(block["auroc"])]  # fmt: skip
    results = (reported / paths.REPORT_RESULTS).read_text()
    table = markdown_table(results, "| model | rows | ECE |")
    assert table[1] == cells and table[2][1] == "no probabilities"
    assert table[3][1] == "no probabilities (its API is asked for none)"
    bins = markdown_table(results, "| confidence bin |")[1:]
    assert [[b[0], int(b[1])] for b in bins] == [[b["bin"], b["rows"]] for b in block["reliability"]]
    page = (reported / paths.REPORT_PAGE).read_text()
    assert html_table(page, "calibration")[1] == cells and "reliability diagram of the fine-tuned model" in page
    card = (reported / paths.REPORT_MODEL_CARD).read_text()
    assert f"| {num(block['ece'])} {bounds(block['ece_ci95'])} |" in card


def test_every_number_in_results_and_cards_is_a_metrics_value(reported):
    """Each cell of results.md's two model tables is its own row's model and column's metric (catches, e.g., every
    row showing the teacher's accuracy, or a column showing another metric); every other number in results.md and
    the cards is a value of some metrics file or params.yaml."""
    results = (reported / paths.REPORT_RESULTS).read_text()
    headline, test_sets = expected_rows(reported)
    assert markdown_table(results, "| model | model id |") == [HEADER, *[[r[0], f"`{r[1]}`", *r[2:]] for r in headline]]
    assert markdown_table(results, "| test set | model |") == [["test set", "model", *HEADER[2:]], *test_sets]
    numbers, strings = source_values(reported)
    holm = holm_by_hand(reported)  # the one computed column: Holm over the family the two tables make
    numbers += [*holm.values(), len(holm)]
    assert f"on the test split and on every extra set, {len(holm)} comparisons." in results
    for name in (paths.REPORT_RESULTS, paths.REPORT_MODEL_CARD, paths.REPORT_DATASET_CARD):
        text = (reported / name).read_text()
        for phrase in sorted(strings, key=len, reverse=True) + list(PROSE):  # ids and labels such as 0-100
            text = text.replace(phrase, " ")
        found = NUMBER.findall(text)
        assert len(found) > 20, name  # the check cannot pass on an empty document
        for token in found:
            scale = 100 if token.endswith(("%", " pp")) else 1
            shown = Decimal(token.removesuffix("%").removesuffix(" pp"))
            half_unit = Decimal(10) ** shown.as_tuple().exponent / 2
            assert any(abs(Decimal(repr(v * scale)) - shown) <= half_unit for v in numbers), (name, token)


def test_without_baselines_the_table_says_not_evaluated_and_a_real_profile_has_no_warning(
    outputs, tmp_path, monkeypatch
):
    shutil.copytree(outputs, tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    eval_json = json.loads(Path(paths.EVAL_METRICS).read_text())
    del eval_json["comparisons"]
    write_json(paths.EVAL_METRICS, eval_json)
    for path in (
        paths.EVAL_BASE_METRICS,
        paths.PREDICTIONS_BASE,
        paths.EVAL_TEACHER_METRICS,
        paths.PREDICTIONS_TEACHER,
    ):
        Path(path).unlink()
    report.run(load_config(["model.name=mistral7b", "teacher.backend=mistral", "reflector.backend=mistral"]))
    results = Path(paths.REPORT_RESULTS).read_text()
    assert "| base zero-shot | not evaluated |" in results and "| teacher | not evaluated |" in results
    assert "not a result" not in results and "not a result" not in Path(paths.REPORT_MODEL_CARD).read_text()


def test_report_stage_imports_no_deep_learning(outputs, tmp_path):
    """`nlistral report` runs for real (a fresh interpreter, every metrics file there) and loads no torch,
    transformers, trl, peft or bitsandbytes: catches an import of them anywhere on report.run's path, not only at
    module level."""
    shutil.copytree(outputs, tmp_path / "repo", ignore=shutil.ignore_patterns("reports"))
    assert not loaded_by(tmp_path / "repo", "report") & DEEP_LEARNING
    assert (tmp_path / "repo" / paths.REPORT_PAGE).is_file()


def test_report_before_evaluate_names_the_stage_and_writes_nothing(outputs, tmp_path, monkeypatch, capsys):
    from nlistral import cli

    shutil.copytree(outputs, tmp_path / "repo", ignore=shutil.ignore_patterns("reports"))
    monkeypatch.chdir(tmp_path / "repo")
    Path(paths.EVAL_METRICS).unlink()
    assert cli.main(["report"]) == 2
    error = capsys.readouterr().err
    assert "metrics/eval.json not found: run `nlistral evaluate` or `dvc repro evaluate` first" in error
    assert not Path("reports").exists()


@pytest.mark.parametrize("command", ["report", "summary"])
def test_a_damaged_metrics_file_names_its_line_and_writes_nothing(outputs, tmp_path, monkeypatch, capsys, command):
    """metrics/ is committed: a merge that left conflict markers in metrics/eval.json was a JSONDecodeError
    traceback on main."""
    from nlistral import cli

    shutil.copytree(outputs, tmp_path / "repo", ignore=shutil.ignore_patterns("reports"))
    monkeypatch.chdir(tmp_path / "repo")
    text = Path(paths.EVAL_METRICS).read_text(encoding="utf-8")
    Path(paths.EVAL_METRICS).write_text("{\n<<<<<<< HEAD\n" + text[1:], encoding="utf-8")
    assert cli.main([command]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"nlistral {command}: error: {paths.EVAL_METRICS}:2: not JSON (")
    assert not captured.out
    assert not Path("reports").exists()


def test_export_gives_a_folder_peft_loads_with_the_card_as_readme(reported, tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model

    from nlistral import cli
    from nlistral.model import load_base_model

    cfg = load_config()
    model = get_peft_model(load_base_model(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = reported / paths.ADAPTER_DIR
    model.save_pretrained(adapter)
    shutil.copy(reported / paths.BASE_DIR / "tokenizer.json", adapter / "tokenizer.json")
    try:
        assert cli.main(["export", str(tmp_path / "hub")]) == 0
        hub = tmp_path / "hub"
        revision = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout
        card = (reported / paths.REPORT_MODEL_CARD).read_text()
        stamp = f"Exported by `nlistral export` from git revision `{revision.strip()}`."
        assert (hub / "README.md").read_text() == f"{card.rstrip()}\n\n{stamp}\n"
        loaded = PeftModel.from_pretrained(load_base_model(cfg), hub)
        assert loaded.peft_config["default"].r == 4
        assert cli.main(["export", str(hub)]) == 2  # never over an existing folder
    finally:
        shutil.rmtree(adapter)


def test_page_in_headless_chromium(reported, tmp_path):
    from playwright.sync_api import sync_playwright

    tuned = read_jsonl(reported / paths.PREDICTIONS)
    train_rows = read_jsonl(reported / paths.THOUGHTS.format(split="train"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto((reported / paths.REPORT_PAGE).as_uri())
        assert page.locator("#headline tr").count() == 4  # header + fine-tuned, base, teacher
        assert page.locator("#count").inner_text() == str(len(tuned))
        page.check('label[data-for="test"] input[data-flag="wrong"]')
        wrong = sum(not p["correct"] for p in tuned)
        assert page.locator("#count").inner_text() == str(wrong)
        assert page.locator("#rows details.row").count() == wrong
        page.check('label[data-for="test"] input[data-flag="parse_failure"]')
        assert page.locator("#rows details.row").count() == sum(p["predicted_label"] is None for p in tuned)
        page.uncheck('label[data-for="test"] input[data-flag="parse_failure"]')
        page.locator("#rows details.row").first.locator("summary").click()  # row 0: its output holds the script
        assert INJECTED in page.locator("#rows details.row").first.inner_text()
        page.screenshot(path=tmp_path / "report.png", full_page=True)

        page.click("#tab-sets")
        assert page.locator("#count").inner_text() == "36"
        page.select_option("#tag-filter", "phenomenon=negation")
        assert page.locator("#rows details.row").count() == 6
        page.select_option("#set-filter", "diagnostic")
        assert page.locator("#count").inner_text() == "6"
        assert page.locator("table.by-tag").count() == 1

        page.click("#tab-train")
        assert page.locator("#count").inner_text() == str(len(train_rows) + len(read_jsonl(
            reported / paths.THOUGHTS.format(split="dev"))))  # fmt: skip
        page.fill("#search", "pwned")
        assert page.locator("#rows details.row").count() == 1
        page.locator("#rows details.row summary").click()
        assert INJECTED in page.locator("#rows details.row").inner_text()
        assert page.evaluate("window.pwned") is None and page.title() == "NLIstral report: unit-exp"
        browser.close()
    print(f"screenshot: {tmp_path / 'report.png'}")
    assert (tmp_path / "report.png").stat().st_size > 10_000


EXP_STAGE = """
import json, os, sys
import yaml
right = yaml.safe_load(open("params.yaml"))["right"]
rows = [{"id": str(i), "true_label": i % 2, "correct": i < right} for i in range(20)]
with open("metrics/predictions.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\\n" for r in rows)
acc = right / 20
json.dump({"n": 20, "accuracy": acc, "accuracy_ci95": [max(acc - 0.2, 0), min(acc + 0.2, 1)], "macro_f1": acc,
           "parse_failure_rate": 0.0}, open("metrics/eval.json", "w"))
# the extra test set `diag`: 10 rows, ranked the other way round (right=18 -> 4 right, right=6 -> 8 right)
set_right = 10 - right // 3
os.makedirs("metrics/test_sets/diag", exist_ok=True)
with open("metrics/test_sets/diag/predictions.jsonl", "w") as f:
    f.writelines(json.dumps({"id": f"d{i}", "true_label": 1, "correct": i < set_right}) + "\\n" for i in range(10))
tuned = {"n": 10, "accuracy": set_right / 10, "accuracy_ci95": [0.1, 0.9], "macro_f1": 0.3, "parse_failure_rate": 0.1}
summary = {"models": {"fine-tuned": tuned, "base": {**tuned, "accuracy": 0.5}}}
json.dump(summary, open("metrics/test_sets/diag.json", "w"))
"""


def git(*cmd, cwd):
    done = subprocess.run(cmd, cwd=cwd, env={**GIT_IDENTITY, **os.environ}, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_report_experiments_lists_two_experiments_side_by_side(tmp_path, monkeypatch, capsys):
    from dvc.repo import Repo

    from nlistral import cli

    root = tmp_path / "exp"
    (root / "metrics").mkdir(parents=True)
    (root / "stage.py").write_text(EXP_STAGE)
    (root / "params.yaml").write_text("right: 10\n")
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "evaluate": {
                        "cmd": f"{sys.executable} stage.py",
                        "deps": ["stage.py"],
                        "params": ["right"],
                        "outs": [
                            "metrics/predictions.jsonl",
                            {"metrics/eval.json": {"cache": False}},
                            "metrics/test_sets/diag/predictions.jsonl",
                            {"metrics/test_sets/diag.json": {"cache": False}},
                        ],
                    }
                }
            }
        )
    )
    # fmt: skip
    monkeypatch.chdir(root)
    for name, value in GIT_IDENTITY.items():
        monkeypatch.setenv(name, value)
    git("git", "init", "-q", cwd=root)
    repo = Repo.init(str(root))  # DVC in-process: a `dvc` subprocess costs seconds of imports per call
    repo.reproduce()
    git("git", "add", "-A", cwd=root)
    git("git", "commit", "-qm", "baseline", cwd=root)
    repo.experiments.run(name="better", params=["right=18"])
    repo.experiments.run(name="worse", params=["right=6"])
    repo.close()
    capsys.readouterr()  # what DVC printed

    assert cli.main(["report", "--experiments", "better", "worse", "--reference", "worse"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == ["`worse`", "`better`"]
    assert rows["`better`"][:2] == ["20", "90.00%"] and rows["`worse`"][1] == "30.00%"
    assert rows["`better`"][7].startswith("+60.00 pp [") and rows["`worse`"][7] == "reference"
    # 12 rows right only in `better`, none the other way: McNemar mid-p = 2 * 0.5**12 / 2; a family of one
    assert float(rows["`better`"][8]) == float(rows["`better`"][9]) == pytest.approx(0.5**12, rel=1e-2)
    assert "Holm family: 1 comparisons (each experiment vs `worse`)." in out
    assert cli.main(["report", "--all"]) == 0
    assert {"`HEAD`", "`better`", "`worse`"} <= {line.split("|")[1].strip() for line in capsys.readouterr().out
                                                 .splitlines()[2:] if line.startswith("|")}  # fmt: skip

    # README: `nlistral report --experiments A B --set NAME` / `nlistral compare A B --set NAME` compare runs on a
    # set. `diag` ranks them the other way round, so reading the test split instead (or the wrong rows) shows.
    assert cli.main(["report", "--experiments", "better", "worse", "--reference", "worse", "--set", "diag"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == ["`worse`", "`better`"]
    assert rows["`better`"][:7] == ["10", "40.00%", "[10.00%, 90.00%]", "0.3", "10.00%", "50.00%", "not evaluated"]
    assert rows["`worse`"][1] == "80.00%" and rows["`worse`"][7] == "reference"
    assert rows["`better`"][7].startswith("-40.00 pp [") and rows["`better`"][8] == "0.0625"  # 4 flips: mid-p 0.5**4
    assert cli.main(["compare", "better", "worse", "--set", "diag", "--json", "cmp.json", "--bootstrap", "200"]) == 0
    result = json.loads(Path("cmp.json").read_text())
    assert (result["n"], result["accuracy_a"], result["accuracy_b"], result["mcnemar_p"]) == (10, 0.4, 0.8, 0.125)
    assert [f["id"] for f in result["flipped"]] == ["d4", "d5", "d6", "d7"]


def test_summary_fits_80_columns_and_states_its_holm_family(reported):
    """`nlistral summary` (what `make run` ends on): each baseline's row holds its McNemar mid-p and its Holm
    adjustment over the family the report names, whose size the footer states; no line over 80 columns."""
    from nlistral import summary

    out = summary.render(load_config())
    assert max(len(line) for line in out.splitlines()) <= 80, out
    holm = holm_by_hand(reported)
    assert f"Holm family: {len(holm)} comparisons" in out
    eval_json = json.loads((reported / paths.EVAL_METRICS).read_text())
    base = next(line for line in out.splitlines() if line.startswith("base zero-shot"))
    assert base.split()[-2:] == [summary._p(eval_json["comparisons"]["base"]["mcnemar_midp"]),
                                 summary._p(holm[("test", "base")])]  # fmt: skip


def test_summary_stays_within_80_columns_with_the_widest_figures():
    """The pipeline test's run printed 82 columns: a 100.0 share of unparsed outputs beside a -58.3 [-83.3, -33.3]
    difference. The widest figures each column can hold still fit, in the compact layout (one space between
    columns, none inside intervals); tiny p-values read "<0.001", larger ones keep two significant digits."""
    from nlistral import summary

    def model(accuracy):
        return {"n": 1972, "accuracy": accuracy, "accuracy_ci95": [accuracy, accuracy], "parse_failure_rate": 1.0}

    results = {"fine-tuned": model(0.0), "base": model(1.0), "teacher": model(1.0)}
    comparisons = {name: {"difference": -1.0, "difference_ci95": [-1.0, -1.0], "mcnemar_midp": p}
                   for name, p in (("base", 1.2e-07), ("teacher", 0.04998))}  # fmt: skip
    text = summary.table("Test split", results, comparisons, {"base": 3.4e-07, "teacher": 0.04998})
    assert max(len(line) for line in text.splitlines()) <= 80, text
    base, teacher = (line.split() for line in text.splitlines()[-2:])
    assert base[-4:] == ["-100.0", "[-100.0,-100.0]", "<0.001", "<0.001"]
    assert teacher[-2:] == ["<0.05", "<0.05"]  # 0.04998: never rounded across 0.05
    roomy = summary.table("Test split", {"fine-tuned": model(0.5)}, {}, {})
    assert "[50.0, 50.0]" in roomy  # the usual layout where it fits
