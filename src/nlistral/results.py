"""What the evaluate stages wrote, paired or read back: below the stages that write it and the commands that show it.

`compare_records` pairs two runs' prediction records by id (evaluate, summarise-set, `nlistral compare`); the
readers return the metrics files the report and `nlistral summary` show, and `headline_family` the Holm adjustment
of the one family of comparisons their headline tables make (docs/evaluation.md: Which figure decides).
"""

import json
from pathlib import Path

from nlistral import paths
from nlistral.stats import holm, macro_f1_difference, paired_comparison

MODEL_NAMES = {"fine-tuned": "fine-tuned", "base": "base zero-shot", "teacher": "teacher"}


class CompareError(ValueError):
    """The two prediction sets cannot be paired (different rows), or one cannot be read."""


def _by_id(rows, name: str) -> dict:
    by_id = {}
    for row in rows:
        key = str(row["id"])
        if key in by_id:
            raise CompareError(f"{name}: id {key} appears more than once")
        by_id[key] = row
    return by_id


def _sample(ids) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def compare_records(a_rows, b_rows, a_name: str, b_name: str, resamples: int, seed: int) -> dict:
    """The comparison object (docs/evaluation.md: Comparing runs) of B against A, matched by id, in A's order."""
    a, b = _by_id(a_rows, a_name), _by_id(b_rows, b_name)
    if a.keys() != b.keys():
        raise CompareError(
            f"{a_name} and {b_name} hold different test rows: {len(a)} vs {len(b)} rows; "
            f"only in {a_name}: {_sample(a.keys() - b.keys()) or 'none'}; "
            f"only in {b_name}: {_sample(b.keys() - a.keys()) or 'none'}"
        )
    for key in a:
        for field in ("true_label", "premise", "hypothesis"):
            if field in a[key] and field in b[key] and a[key][field] != b[key][field]:
                raise CompareError(f"row id {key}: {field} differs between {a_name} and {b_name}, "
                                   "so they are not the same test rows")  # fmt: skip
    ids = list(a)
    a_correct = [bool(a[i]["correct"]) for i in ids]
    b_correct = [bool(b[i]["correct"]) for i in ids]
    result = {"a": a_name, "b": b_name, **paired_comparison(a_correct, b_correct, resamples, seed)}
    if all("predicted_label" in a[i] and "predicted_label" in b[i] and "true_label" in a[i] for i in ids):
        result |= macro_f1_difference([a[i]["true_label"] for i in ids], [a[i]["predicted_label"] for i in ids],
                                      [b[i]["predicted_label"] for i in ids], resamples, seed)  # fmt: skip
    result["flipped"] = [{"id": i, "a_correct": x, "b_correct": y}
                         for i, x, y in zip(ids, a_correct, b_correct, strict=True) if x != y]  # fmt: skip
    return result


def read_json(template, split=None) -> dict:
    return json.loads(paths.require(template, split).read_text(encoding="utf-8"))


def optional_json(path) -> dict | None:
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None


def is_embedded(cfg) -> bool:
    """The embedded profile: stand-in LLMs or the tiny model, whose numbers only show that the code runs."""
    return cfg.model.name == "tiny" or "offline" in (cfg.teacher.backend, cfg.reflector.backend)


def test_results() -> dict:
    """Model -> its eval metrics, fine-tuned first; a missing baseline is left out."""
    results = {"fine-tuned": read_json(paths.EVAL_METRICS)}
    for name, path in (("base", paths.EVAL_BASE_METRICS), ("teacher", paths.EVAL_TEACHER_METRICS)):
        if (metrics := optional_json(path)) is not None:
            results[name] = metrics
    return results


def test_set_results(cfg) -> dict:
    """Set name -> its summary (metrics/test_sets/<set>.json), for every set in eval.test_sets."""
    return {name: read_json(paths.SET_METRICS.format(set=name)) for name in cfg.eval.get("test_sets") or {}}


def headline_family(comparisons: dict, test_sets: dict) -> dict:
    """The fine-tuned model against each baseline on the test split and on every extra set: one family, 2 x (1 +
    sets) McNemar mid-p values when every baseline was evaluated. {"size": m, "holm": {"test" or set: {baseline:
    Holm-adjusted p}}}. The one figure of the report computed here rather than read: it needs every file at once."""
    tables = {"test": comparisons} | {name: s.get("comparisons", {}) for name, s in test_sets.items()}
    family = {(table, baseline): c["mcnemar_midp"] for table, found in tables.items() for baseline, c in found.items()}
    adjusted = holm(family)
    return {"size": len(family),
            "holm": {table: {b: adjusted[(table, b)] for b in found} for table, found in tables.items()}}  # fmt: skip
