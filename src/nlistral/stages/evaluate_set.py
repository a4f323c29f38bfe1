"""Stage: one model on one extra test set -> metrics/test_sets/<set>/predictions*.jsonl and eval*.json.

`nlistral evaluate-set --set NAME --model fine-tuned|base|teacher` evaluates `eval.test_sets.NAME`: a CSV in our
format (data.py; `tags` names its tag columns) or a `datasets` source read with the prepare stage's code (path,
config, revision, split, columns, labels). The model, prompt, engine (`eval.engine`), parser and metrics are those of
the main test split's evaluate stages; each prediction row also holds the row's `tags`, which `summarise-set` counts.
"""

import pandas as pd

from nlistral.data import DataError, read_csv
from nlistral.errors import ConfigError
from nlistral.io import write_jsonl, write_metrics
from nlistral.paths import ADAPTER_DIR, BASE_DIR, SET_FILES, require
from nlistral.scoring import eval_metrics, prediction

MODELS = tuple(SET_FILES)  # fine-tuned, base, teacher


def set_config(cfg, name: str):
    sets = cfg.eval.get("test_sets") or {}
    if name not in sets:
        raise ConfigError(f"eval.test_sets has no set {name!r} (has: {', '.join(sets) or 'none'})")
    return sets[name]


def set_rows(cfg, name: str) -> tuple[pd.DataFrame, dict]:
    """The set's rows (id, premise, hypothesis, label, *tags), the first `limit` if set, and where they came from."""
    spec, key = set_config(cfg, name), f"eval.test_sets.{name}"
    tags = list(spec.get("tags") or [])
    source = {"set": name, "source": str(spec.path), "tags": tags}
    if str(spec.path).endswith(".csv"):
        rows = read_csv(spec.path, tags)
    else:
        from nlistral.stages.prepare import load_source, rows_of

        where = f"{spec.path}[{spec.split}]"
        records, dropped, _ = rows_of(load_source(spec, str(spec.split), key), spec, where, tags, key)
        if not records:
            raise DataError(where, f"no labelled rows left (dropped: {dict(dropped)})")
        duplicated = pd.Series([r["id"] for r in records]).duplicated()
        if duplicated.any():
            raise DataError(where, f"duplicate id {records[duplicated.idxmax()]['id']!r}", column="id")
        rows = pd.DataFrame(records, columns=["id", "premise", "hypothesis", "label", *tags])
        source |= {"split": str(spec.split), "revision": spec.get("revision"), "dropped": dict(dropped)}
    limit = spec.get("limit")
    return (rows if limit is None else rows.head(limit)), source


def student(cfg, rows, tuned: bool) -> tuple[list[dict], dict, list]:
    """The fine-tuned model (base + adapter) or the base model zero-shot, as evaluate/evaluate_base run them.
    -> (prediction records, metrics, the generations: check_failures reads them once the files are written)."""
    from nlistral.evaluation import check_engine, check_scoring, eval_task, run_generation
    from nlistral.model import base_info, load_adapter_model, load_base_model, load_tokenizer

    check_engine(cfg)
    task = eval_task(cfg) if tuned else "cot"
    model_dir = require(ADAPTER_DIR if tuned else BASE_DIR)
    load = (lambda: load_adapter_model(cfg)) if tuned else (lambda: load_base_model(cfg).eval())
    scoring = check_scoring(cfg, task) if tuned else "generate"  # the base is asked cot: it generates
    outputs, wall = run_generation(cfg, rows, load, load_tokenizer(model_dir), ADAPTER_DIR if tuned else None, task,
                                   scoring)  # fmt: skip
    records = [prediction(row, g.text, g.finish_reason, g.output_tokens, g.answer(task), g.p_entailment)
               for row, g in zip(rows.itertuples(), outputs, strict=True)]  # fmt: skip
    metrics = eval_metrics(cfg, records, "fine-tuned" if tuned else "base", base_info()["name_or_path"], wall)
    return records, metrics, outputs


def run(cfg, name: str, model: str) -> dict:
    if model not in MODELS:
        raise ConfigError(f"--model {model!r}: choose from {', '.join(MODELS)}")
    rows, source = set_rows(cfg, name)
    if model == "teacher":
        from nlistral.stages.evaluate_teacher import predict

        records, metrics = predict(cfg, rows, desc=f"evaluate-set {name} teacher")
        outputs = None
    else:
        records, metrics, outputs = student(cfg, rows, tuned=model == "fine-tuned")
    for record, tags in zip(records, rows[source["tags"]].to_dict("records"), strict=True):
        record["tags"] = tags
    predictions_path, metrics_path = (template.format(set=name) for template in SET_FILES[model])
    metrics = source | metrics
    write_jsonl(predictions_path, records)
    write_metrics(metrics_path, metrics)
    print(f"evaluate-set {name} {model}: accuracy {metrics['accuracy']} (95% CI {metrics['accuracy_ci95']}), "
          f"{metrics['parse_failures']}/{metrics['n']} unparsed -> {metrics_path}")  # fmt: skip
    if outputs is not None:
        from nlistral.evaluation import check_failures

        check_failures(cfg, outputs)  # server engine: rows with no reply are recorded, then the stage fails
    return metrics
