"""Replay the study's real Mistral replies (../shared/data/mistral_sample) through stages 1 and 2 over HTTP.

The loopback server finds the row by the premise and hypothesis in the prompt and answers what `open-mistral-7b`
(stage 1) and the study's reflector (stage 2) answered. For the 2 rows the study had to re-prompt, the first answer
is the invalid one it got (predicted_label 0.5, kept in chat_history) and the reprompt gets the accepted one.
"""

import json
import re
import shutil

import pytest
from llm_server import KEY, LLMServer, stage_overrides, write_split

from nlistral.config import load_config
from nlistral.io import read_jsonl
from nlistral.stages import base_model, reflections, sft, thoughts


def _load(path) -> dict:
    return {(r["premise"], r["hypothesis"]): r for r in read_jsonl(path)}


@pytest.fixture
def replay(shared_data, workdir, monkeypatch):
    sample = shared_data / "mistral_sample"
    (workdir / "data").mkdir()
    shutil.copy(sample / "sample.csv", workdir / "data" / "train.csv")
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    thought_rows, reflection_rows = _load(sample / "sample_thoughts.jsonl"), _load(sample / "sample_reflections.jsonl")

    def reply(body):
        messages = body["messages"]
        prompt = messages[1]["content"]
        pair = re.search(r"^Premise: (.*)\nHypothesis: (.*)$", prompt, re.MULTILINE).groups()
        if "\nTrue label: " in prompt:
            r = reflection_rows[pair]
            keys = ("error_analysis", "improved_thought_process", "predicted_label")
            return json.dumps({k: r[k] for k in keys})
        r = thought_rows[pair]
        if r["reprompt_counts"] and len(messages) == 2:
            return next(m["content"] for m in r["chat_history"] if m["role"] == "assistant")
        return json.dumps({"thought_process": r["thought_process"], "predicted_label": r["predicted_label"]})

    with LLMServer(reply, api_key=KEY) as server:
        yield server, thought_rows


def test_stage_1_reproduces_the_studys_labels(replay):
    server, originals = replay
    metrics = thoughts.run(load_config(stage_overrides("teacher", server.url, max_concurrency=8)), "train")
    assert metrics["ok"] == 100 and metrics["correct"] == 67 and metrics["accuracy"] == 0.67
    assert metrics["reprompts_by_reason"] == {"bad_label": 2} and metrics["requests"] == 102
    records = read_jsonl("data/original_thoughts/train_thoughts.jsonl")
    for record in records:
        original = originals[(record["premise"], record["hypothesis"])]
        assert (record["id"], record["predicted_label"]) == (str(original["id"]), original["predicted_label"])
        assert record["reprompts"] == original["reprompt_counts"]


def test_stage_2_verifies_32_of_33_and_keeps_id_90_unresolved(replay):
    server, _ = replay
    overrides = stage_overrides("teacher", server.url, max_concurrency=8)
    thoughts.run(load_config(overrides), "train")
    overrides += stage_overrides("reflector", server.url, max_concurrency=8)
    metrics = reflections.run(load_config(overrides), "train")
    assert metrics["rows"] == metrics["ok"] == 33 and metrics["verified"] == 32 and metrics["unresolved"] == 1
    records = read_jsonl("data/reflected_thoughts/train_reflections.jsonl")
    (unresolved,) = [r for r in records if not r["verified"]]
    assert unresolved["id"] == "90" and unresolved["reflected_label"] != unresolved["true_label"]
    assert unresolved["attempts"] == 2 and metrics["reprompts_by_reason"] == {"label_mismatch": 1}


def test_fine_tuning_set_holds_67_original_and_32_reflected_rows(replay, workdir):
    server, _ = replay
    overrides = stage_overrides("teacher", server.url, max_concurrency=8)
    overrides += stage_overrides("reflector", server.url, max_concurrency=8)
    for split in ("dev", "test"):  # held-out splits that share no pair with the sample
        write_split(workdir, [(f"A {split} premise.", f"A {split} hypothesis.", 1)], split)
    cfg = load_config([*overrides, "model.max_seq_length=4096"])
    for stage in (thoughts, reflections):
        stage.run(cfg, "train")
    base_model.run(cfg)
    metrics = sft.run(cfg, "train")
    rows = read_jsonl("data/finetune/train_ft.jsonl")
    assert metrics["rows_by_source"] == {"original": 67, "reflected": 32} and len(rows) == 99
    assert "90" not in {r["id"] for r in rows}
    assert metrics["dropped"] == {} and metrics["unresolved"] == 1 and metrics["teacher_accuracy"] == 0.67
