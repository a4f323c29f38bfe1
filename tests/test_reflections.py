"""Reflection budgets over HTTP: invalid replies and label disagreements are counted separately."""

import json

import pytest
from llm_server import KEY, LLMServer, stage_overrides

from nlistral.config import load_config
from nlistral.io import read_jsonl, write_jsonl
from nlistral.stages import reflections

WRONG = {"id": "7", "premise": "A dog sleeps.", "hypothesis": "An animal rests.", "thought_process": "Step 1: x.",
         "predicted_label": 0, "true_label": 1, "correct": False}  # fmt: skip
INVALID = "I think it is entailed."


def reflection(label):
    return json.dumps({"error_analysis": "E", "improved_thought_process": "Step 1: y.", "predicted_label": label})


def run_with_replies(replies, *overrides):
    """Reflect one wrong thought against a server that answers `replies` in order (the last one repeats)."""
    write_jsonl("data/original_thoughts/train_thoughts.jsonl", [WRONG])
    answers = iter(replies)
    last = [None]

    def reply(body):
        last[0] = next(answers, last[0])
        return last[0]

    with LLMServer(reply, api_key=KEY) as server:
        cfg = load_config([*stage_overrides("reflector", server.url), *overrides])
        metrics = reflections.run(cfg, "train")
    return metrics, read_jsonl("data/reflected_thoughts/train_reflections.jsonl"), server


@pytest.fixture(autouse=True)
def api_key(workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)


def test_invalid_replies_do_not_use_up_reflection_attempts():
    metrics, rows, server = run_with_replies([INVALID, INVALID, reflection(0), reflection(1)])
    assert metrics["verified"] == 1 and rows[0]["attempts"] == 2 and rows[0]["reflected_label"] == 1
    assert metrics["reprompts_by_reason"] == {"no_json": 2, "label_mismatch": 1}
    assert server.counts["chat"] == 4


def test_a_valid_disagreeing_reflection_is_kept_unresolved_not_failed():
    metrics, rows, _ = run_with_replies([INVALID, reflection(0)], "reflector.max_attempts=1")
    assert metrics["ok"] == 1 and metrics["failed"] == 0 and metrics["unresolved"] == 1
    assert rows[0]["verified"] is False and rows[0]["predicted_label"] == 0 and rows[0]["reflected_label"] == 0


def test_too_many_invalid_replies_fail_the_row_with_its_reason():
    metrics, rows, server = run_with_replies([INVALID], "reflector.max_failure_rate=1.0")
    assert rows == [] and metrics["failed"] == 1 and metrics["failures_by_reason"] == {"no_json": 1}
    assert server.counts["chat"] == 3  # the first reply + max_reprompts (2), not + max_attempts
    (failed,) = read_jsonl("data/reflected_thoughts/train_failed.jsonl")
    assert failed["id"] == "7" and failed["raw"] == INVALID
