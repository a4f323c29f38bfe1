"""Stage: the metrics and output files -> reports/results.md, model_card.md, dataset_card.md and index.html.

Reads only what earlier stages wrote (metrics/, data/original_thoughts, data/reflected_thoughts, data/finetune) and
params.yaml; every figure in the reports is a value from one of those files, formatted, never recomputed. The
baselines (metrics/eval_base.json, eval_teacher.json) may be absent: their rows then say "not evaluated". Every set in
eval.test_sets needs its summary (metrics/test_sets/<set>.json, `summarise-set`). metrics/seeds.json (configurations
across seeds, `nlistral report --experiments ... --group-by`) is shown when present.
"""

import base64
import csv
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from jinja2.utils import htmlsafe_json_dumps
from markupsafe import Markup
from omegaconf import OmegaConf

from nlistral import paths
from nlistral.formatting import bounds, code, interval, md, num, pct, pvalue, signed
from nlistral.io import atomic_open, iter_jsonl
from nlistral.results import (
    MODEL_NAMES,
    headline_family,
    is_embedded,
    optional_json,
    read_json,
    test_results,
    test_set_results,
)

SPLITS = ("train", "dev")
BASELINES = ("base", "teacher")


def read_csv(template, split=None) -> list[dict]:
    with open(paths.require(template, split), encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def provenance() -> dict:
    """The DVC experiment's name (DVC_EXP_NAME), else "workspace". No date, branch or commit: the same inputs give the
    same report, byte for byte (the commit that holds it names its code; `nlistral export` stamps the revision)."""
    return {"experiment": os.environ.get("DVC_EXP_NAME") or "workspace"}


def collect(cfg) -> dict:
    """Everything the templates show, read from the files (see module doc)."""
    splits = {
        split: {
            "thoughts": read_json(paths.THOUGHTS_METRICS, split),
            "reflections": read_json(paths.REFLECTIONS_METRICS, split),
            "sft": read_json(paths.SFT_METRICS, split),
            "teacher_by_length": read_csv(paths.PLOT_TEACHER_ACCURACY, split),
        }
        for split in SPLITS
    }
    removal_reasons = sorted({reason for s in splits.values() for reason in s["sft"]["dropped"]})
    results, test_sets = test_results(), test_set_results(cfg)
    return {
        "run": provenance(),
        "embedded": is_embedded(cfg),
        "cfg": OmegaConf.to_container(cfg, resolve=True),
        "splits": splits,
        "removal_reasons": removal_reasons,
        "train": read_json(paths.TRAIN_METRICS),
        "results": results,
        "comparisons": results["fine-tuned"].get("comparisons", {}),
        "test_sets": test_sets,
        "family": headline_family(results["fine-tuned"].get("comparisons", {}), test_sets),
        "seeds": optional_json(paths.SEEDS),  # `nlistral report --experiments ... --group-by`, when it ran here
        "accuracy_by_length": read_csv(paths.PLOT_ACCURACY_BY_LENGTH),
        "model_names": MODEL_NAMES,
    }


def env() -> Environment:
    environment = Environment(
        loader=PackageLoader("nlistral", "templates"),
        autoescape=select_autoescape(["html.j2"]),  # every string in the page is escaped (data, names, model output)
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(
        pct=pct, interval=interval, pvalue=pvalue, num=num, bounds=bounds, signed=signed, md=md, code=code
    )
    return environment


# --- cards


def model_card_metadata(ctx) -> str:
    """The model card's YAML front matter (Hugging Face's model card metadata), written by yaml so it parses."""
    cfg, tuned = ctx["cfg"], ctx["results"]["fine-tuned"]
    data_name = cfg["data"]["name"]
    meta = {
        "base_model": tuned["model_id"],
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": cfg["model"].get("license") or "other",
        "tags": ["nli", "natural-language-inference", "chain-of-thought", "lora", "qlora", "nlistral"],
        "model-index": [{
            "name": f"nlistral-{data_name}",
            "results": [model_index_result(data_name, "test", tuned)] + [
                model_index_result(name, s.get("split") or "test", s["models"]["fine-tuned"], s["source"])
                for name, s in ctx["test_sets"].items()],
        }],
    }  # fmt: skip
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


def model_index_result(name: str, split: str, metrics: dict, source: str | None = None) -> dict:
    """One `model-index` result: the fine-tuned model's accuracy and macro F1 on a test set."""
    return {
        "task": {"type": "text-classification", "name": "Natural language inference"},
        "dataset": {"name": name, "type": source or name, "split": split},
        "metrics": [
            {"type": "accuracy", "value": metrics["accuracy"], "name": "Accuracy"},
            {"type": "f1", "value": metrics["macro_f1"], "name": "Macro F1"},
        ],
    }


def dataset_card_metadata(ctx) -> str:
    cfg = ctx["cfg"]
    meta = {
        "license": cfg["data"].get("license") or "other",
        "language": ["en"],
        "task_categories": ["text-classification", "text-generation"],
        "task_ids": ["natural-language-inference"],
        "tags": ["chain-of-thought", "synthetic", "nlistral"],
        "pretty_name": f"NLIstral chain-of-thought fine-tuning set ({cfg['data']['name']})",
        "configs": [{
            "config_name": "default",
            "data_files": [{"split": split, "path": Path(paths.FINETUNE.format(split=split)).name}
                           for split in SPLITS],
        }],
    }  # fmt: skip
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


# --- the page: charts (matplotlib, as SVG data URIs) and the row browser's data


def svg_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def accuracy_chart(ctx):
    from matplotlib.figure import Figure

    results = ctx["results"]
    fig = Figure(figsize=(6, 0.5 + 0.5 * len(results)))
    ax = fig.subplots()
    names = list(results)[::-1]
    acc = [results[n]["accuracy"] * 100 for n in names]
    errors = [[a - results[n]["accuracy_ci95"][0] * 100 for n, a in zip(names, acc, strict=True)],
              [results[n]["accuracy_ci95"][1] * 100 - a for n, a in zip(names, acc, strict=True)]]  # fmt: skip
    ax.barh([MODEL_NAMES[n] for n in names], acc, xerr=errors, color="#4c78a8", capsize=4)
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy, % (bars: 95% Wilson CI)")
    return fig


def confusion_chart(ctx):
    from matplotlib.figure import Figure

    confusion = read_csv(paths.CONFUSION)
    predicted = ["0", "1", *sorted({r["predicted"] for r in confusion} - {"0", "1"})]
    counts = [[sum(r["actual"] == a and r["predicted"] == p for r in confusion) for p in predicted]
              for a in ("0", "1")]  # fmt: skip
    fig = Figure(figsize=(1.2 + 1.1 * len(predicted), 2.6))
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues")
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            dark = count > max(map(max, counts)) / 2
            ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(predicted)), predicted)
    ax.set_yticks([0, 1], ["0", "1"])
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("fine-tuned model, test split")
    return fig


def loss_chart(ctx):
    from matplotlib.figure import Figure

    history = read_csv(paths.TRAIN_HISTORY)
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    for column, label in (("loss", "train loss"), ("eval_loss", "dev loss")):
        points = [(int(r["step"]), float(r[column])) for r in history if r[column] not in ("", None)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if column == "eval_loss" else None, label=label)
    ax.axvline(ctx["train"]["best_step"], color="grey", linestyle="--", label="best step")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


def by_length_chart(ctx):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    width = 0.8 / (len(SPLITS) + 1)
    series = [(f"teacher, {split}", ctx["splits"][split]["teacher_by_length"]) for split in SPLITS]
    series.append(("fine-tuned, test", ctx["accuracy_by_length"]))
    buckets = [next(iter(row.values())) for row in series[0][1]]
    for k, (label, rows) in enumerate(series):
        unit = next(iter(rows[0])).removeprefix("rationale_")  # the CSV's bucket column: rationale_<unit>
        heights = [float(r["accuracy"]) * 100 if r["accuracy"] else 0 for r in rows]
        ax.bar([i + k * width for i in range(len(buckets))], heights, width, label=f"{label} ({unit})")
    ax.set_xticks([i + width for i in range(len(buckets))], buckets)
    ax.set_xlabel("rationale length")
    ax.set_ylabel("accuracy, %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    return fig


def test_sets_chart(ctx):
    """Accuracy with its CI per extra test set (rows) and model (bars); None without test sets."""
    from matplotlib.figure import Figure

    sets = list(ctx["test_sets"])[::-1]
    if not sets:
        return None
    fig = Figure(figsize=(6, 0.8 + 0.6 * len(sets)))
    ax = fig.subplots()
    height = 0.8 / len(MODEL_NAMES)
    for k, model in enumerate(MODEL_NAMES):
        cells = [ctx["test_sets"][s]["models"][model] for s in sets]
        acc = [c["accuracy"] * 100 for c in cells]
        errors = [[a - c["accuracy_ci95"][0] * 100 for a, c in zip(acc, cells, strict=True)],
                  [c["accuracy_ci95"][1] * 100 - a for a, c in zip(acc, cells, strict=True)]]  # fmt: skip
        ax.barh([i + k * height for i in range(len(sets))], acc, height, xerr=errors, capsize=3,
                label=MODEL_NAMES[model])  # fmt: skip
    ax.set_yticks([i + height for i in range(len(sets))], sets)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy, % (bars: 95% Wilson CI)")
    ax.legend(fontsize=7)
    return fig


def reliability_chart(ctx):
    """The fine-tuned model's reliability diagram (eval.json's calibration bins); None without probabilities."""
    from matplotlib.figure import Figure

    calibration = ctx["results"]["fine-tuned"].get("calibration")
    if not calibration:
        return None
    bins = calibration["reliability"]
    fig = Figure(figsize=(3.6, 3.4))
    ax = fig.subplots()
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle="--", label="calibrated")
    ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=[12 + 4 * b["rows"] for b in bins],
               color="#4c78a8", label="bins (area: rows)")  # fmt: skip
    ax.set_xlim(0.45, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("confidence of the predicted label")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {calibration['ece']:.3f}, n = {calibration['n']}")
    ax.legend(fontsize=7)
    return fig


CHARTS = {"accuracy": accuracy_chart, "confusion": confusion_chart, "loss": loss_chart, "by_length": by_length_chart,
          "test_sets": test_sets_chart, "reliability": reliability_chart}  # fmt: skip


def charts(ctx) -> dict[str, str]:
    """Name -> SVG data URI (None for a chart with nothing to draw). Images, not inline SVG: text in them (ids,
    labels) can never become markup."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "nlistral", "svg.fonttype": "none", "font.size": 9}):
        return {name: None if (fig := draw(ctx)) is None else svg_uri(fig) for name, draw in CHARTS.items()}


def prediction_view(row) -> dict:
    return {"label": row["predicted_label"], "correct": row["correct"], "parse_error": row["parse_error"],
            "output": row["output"]}  # fmt: skip


def views_by_id(path) -> dict[str, dict]:
    """A predictions file as id -> its prediction_view (what the browser shows of another model's row)."""
    return {str(r["id"]): prediction_view(r) for r in iter_jsonl(path)}


def test_rows() -> Iterator[dict]:
    """One entry per test row: the fine-tuned model's prediction and the baselines' for the same row."""
    others = {name: views_by_id(path)
              for name, path in (("base", paths.PREDICTIONS_BASE), ("teacher", paths.PREDICTIONS_TEACHER))
              if Path(path).is_file()}  # fmt: skip
    for row in iter_jsonl(paths.require(paths.PREDICTIONS)):
        key = str(row["id"])
        models = {"fine-tuned": prediction_view(row)}
        models |= {name: by_id[key] for name, by_id in others.items() if key in by_id}
        base = models.get("base")
        yield {
            "id": key, "premise": row["premise"], "hypothesis": row["hypothesis"], "gold": row["true_label"],
            "models": models,
            "wrong": not row["correct"],
            "parse_failure": row["predicted_label"] is None,
            "flipped": base is not None and base["correct"] != row["correct"],
        }  # fmt: skip


def test_set_rows(test_sets) -> Iterator[dict]:
    """One entry per row of each extra test set: the three models' predictions, and the row's tags."""
    for name in test_sets:
        tuned, _ = paths.SET_FILES["fine-tuned"]
        others = {model: views_by_id(paths.require(template, set_name=name))
                  for model, (template, _) in paths.SET_FILES.items() if model != "fine-tuned"}  # fmt: skip
        for row in iter_jsonl(paths.require(tuned, set_name=name)):
            key = str(row["id"])
            yield {
                "id": key, "set": name, "premise": row["premise"], "hypothesis": row["hypothesis"],
                "gold": row["true_label"], "tags": [f"{tag}={value}" for tag, value in row["tags"].items()],
                "models": {"fine-tuned": prediction_view(row)} | {model: by_id[key] for model, by_id in others.items()},
                "wrong": not row["correct"], "parse_failure": row["predicted_label"] is None,
            }  # fmt: skip


def training_rows() -> Iterator[dict]:
    """Train and dev rows as the teacher and the reflector saw them, and whether they reached the fine-tuning set.
    Only the reflections (the teacher's wrong rows) and each row's fine-tuning source are held; the thoughts stream."""
    for split in SPLITS:
        reflections = {str(r["id"]): {key: r[key] for key in ("error_analysis", "improved_thought_process",
                                                              "reflected_label", "verified")}
                       for r in iter_jsonl(paths.require(paths.REFLECTIONS, split))}  # fmt: skip
        sources = {str(r["id"]): r["source"] for r in iter_jsonl(paths.require(paths.FINETUNE, split))}
        for thought in iter_jsonl(paths.require(paths.THOUGHTS, split)):
            key = str(thought["id"])
            reflection = reflections.get(key)
            yield {
                "id": key, "split": split, "premise": thought["premise"], "hypothesis": thought["hypothesis"],
                "gold": thought["true_label"], "teacher_label": thought["predicted_label"],
                "rationale": thought["thought_process"],
                "error_analysis": reflection and reflection["error_analysis"],
                "improved": reflection and reflection["improved_thought_process"],
                "reflected_label": reflection and reflection["reflected_label"],
                "finetune": sources.get(key),
                "wrong": not thought["correct"],
                "reflected": reflection is not None,
                "unresolved": reflection is not None and not reflection["verified"],
            }  # fmt: skip


def browser_rows(test_sets) -> dict[str, Callable[[], Iterator[dict]]]:
    """The row browser's tabs (sorted, as `tojson` orders keys): tab -> a fresh stream of its rows."""
    return {"sets": lambda: test_set_rows(test_sets), "test": test_rows, "train": training_rows}


def browser_json(tabs) -> Iterator[Markup]:
    """The browser's data as `tojson` writes it ({"sets": [...], "test": [...], "train": [...]}), row by row."""
    for i, (tab, rows) in enumerate(tabs.items()):
        yield Markup(("{" if i == 0 else "], ") + htmlsafe_json_dumps(tab) + ": [")
        for k, row in enumerate(rows()):
            yield Markup(", " if k else "") + htmlsafe_json_dumps(row, sort_keys=True)
    yield Markup("]}")


def browser_summary(tabs) -> dict:
    """What the page shows above the rows: each tab's row count, the test sets' tags. This first pass over the rows
    reads every input, so a missing or malformed one stops the stage before the page is opened."""
    counts, tags = {}, set()
    for tab, rows in tabs.items():
        counts[tab] = 0
        for row in rows():
            counts[tab] += 1
            tags.update(row.get("tags", ()) if tab == "sets" else ())
    return {"counts": counts, "set_tags": sorted(tags)}


def render(ctx) -> dict[Path, str]:
    """Results and cards -> their text (small); the page is written by `write_page`, streaming its rows."""
    templates = env()
    ctx = {**ctx, "model_card_metadata": model_card_metadata(ctx), "dataset_card_metadata": dataset_card_metadata(ctx)}
    return {
        paths.REPORT_RESULTS: templates.get_template("results.md.j2").render(ctx),
        paths.REPORT_MODEL_CARD: templates.get_template("model_card.md.j2").render(ctx),
        paths.REPORT_DATASET_CARD: templates.get_template("dataset_card.md.j2").render(ctx),
    }


def write_page(ctx) -> None:
    """reports/index.html, its rows streamed from the stage outputs into the file (never held whole), atomically."""
    tabs = browser_rows(ctx["test_sets"])
    page = {**ctx, "charts": charts(ctx), "browser": browser_summary(tabs), "browser_json": browser_json(tabs)}
    with atomic_open(paths.REPORT_PAGE) as handle:
        handle.writelines(env().get_template("index.html.j2").generate(page))


def run(cfg) -> dict[Path, str]:
    ctx = collect(cfg)
    reports = render(ctx)  # nothing is written until every input has been read (here and in write_page)
    write_page(ctx)
    for path, text in reports.items():
        with atomic_open(path) as handle:
            handle.write(text)
    print(f"report: wrote {', '.join(str(p) for p in [*reports, paths.REPORT_PAGE])}")
    return reports
