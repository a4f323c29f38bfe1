"""Stages 1-3 on the embedded profile (offline teacher/reflector, bundled sample data)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from nlistral.config import load_config
from nlistral.io import read_jsonl, read_metrics
from nlistral.stages import base_model, reflections, sft, thoughts

THOUGHT_KEYS = {"id", "premise", "hypothesis", "thought_process", "predicted_label", "true_label", "correct"}
REFLECTION_KEYS = {"id", "premise", "hypothesis", "thought_process", "predicted_label", "true_label",
                   "error_analysis", "improved_thought_process", "reflected_label", "verified", "attempts"}  # fmt: skip
FT_KEYS = {"id", "source", "label", "prompt", "completion", "text", "messages"}


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["id,premise,hypothesis,label"] + [f"{i},{p},{h},{label}" for i, p, h, label in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def sample(workdir):
    shutil.copytree(REPO / "data" / "sample", workdir / "data" / "sample")
    return load_config()


def test_thoughts_cover_every_row(sample):
    metrics = thoughts.run(sample, "dev")
    rows = read_jsonl("data/original_thoughts/dev_thoughts.jsonl")
    assert metrics["rows"] == 44 and metrics["ok"] + metrics["failed"] == 44
    assert len(rows) == metrics["ok"] == 44
    assert read_jsonl("data/original_thoughts/dev_failed.jsonl") == []
    assert all(THOUGHT_KEYS <= set(r) for r in rows)
    assert [r["id"] for r in rows] == [f"dv-{i:03d}" for i in range(1, 45)]
    assert all(r["correct"] == (r["predicted_label"] == r["true_label"]) for r in rows)
    assert all(r["thought_process"].startswith("Step 1:") and "Step 3:" in r["thought_process"] for r in rows)
    assert metrics["correct"] + metrics["incorrect"] == 44
    assert read_metrics("metrics/thoughts_dev.json") == metrics
    assert "wall_s" not in json.loads(Path("metrics/thoughts_dev.json").read_text())  # metrics/speed/thoughts_dev.json


def test_reflections_cover_every_wrong_thought_and_keep_the_teacher_label(sample):
    thoughts.run(sample, "dev")
    wrong = [t for t in read_jsonl("data/original_thoughts/dev_thoughts.jsonl") if not t["correct"]]
    metrics = reflections.run(sample, "dev")
    rows = read_jsonl("data/reflected_thoughts/dev_reflections.jsonl")
    assert len(wrong) > 0 and metrics["rows"] == len(wrong) == len(rows)
    assert all(REFLECTION_KEYS <= set(r) for r in rows)
    for thought, reflection in zip(wrong, rows, strict=True):
        assert reflection["predicted_label"] == thought["predicted_label"] != thought["true_label"]
        assert reflection["verified"] == (reflection["reflected_label"] == reflection["true_label"])
    assert metrics["verified"] + metrics["unresolved"] == metrics["ok"]


def test_sft_rows_are_correct_thoughts_plus_verified_reflections(sample):
    base_model.run(sample)
    for stage in (thoughts, reflections, sft):
        metrics = stage.run(sample, "dev")
    correct = [t for t in read_jsonl("data/original_thoughts/dev_thoughts.jsonl") if t["correct"]]
    verified = [r for r in read_jsonl("data/reflected_thoughts/dev_reflections.jsonl") if r["verified"]]
    rows = read_jsonl("data/finetune/dev_ft.jsonl")
    assert len(rows) == len(correct) + len(verified) == metrics["rows"]
    assert metrics["rows_by_source"] == {"original": len(correct), "reflected": len(verified)}
    for row in rows:
        assert FT_KEYS <= set(row)
        assert row["text"].count("<s>") == 1 and row["text"].startswith("<s>[INST] ")
        assert row["text"] == f"<s>[INST] {row['prompt']} [/INST] {row['completion']}</s>"
        assert json.loads(row["completion"])["predicted_label"] == row["label"]
        assert row["messages"][1]["content"] == row["completion"]
    for key in ("teacher_accuracy", "reflection_success_rate", "unresolved", "label_counts", "dropped"):
        assert key in metrics
    assert set(metrics["prompt_tokens"]) == {"min", "median", "p95", "max"}
