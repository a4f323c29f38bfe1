import json

import pytest

from nlistral.io import read_jsonl
from nlistral.parsing import (
    REFLECTION_FIELDS,
    THOUGHT_FIELDS,
    Answer,
    ReplyError,
    parse_label,
    parse_reply,
    read_answer,
)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ('{"thought_process": "Step 1: A. Step 2: B. Step 3: C.", "predicted_label": 1}', 1),
        ('```json\n{"thought_process": "Step 1: X", "predicted_label": "0"}\n```', 0),
        ('Sure! Here it is: {"thought_process": "S", "predicted_label": 1.0} Hope that helps.', 1),
        ('{"thought_process": "S", "predicted_label": false}', 0),
        ('{"thought_process": "S", "predicted_label": " 1 "}', 1),
    ],
)
def test_accepts_labels_and_wrappers(text, label):
    assert parse_reply(text)["predicted_label"] == label


def test_keeps_text_as_written():
    text = '{"thought_process": "Step 1: The Dog RAN.", "predicted_label": 0}'
    assert parse_reply(text)["thought_process"] == "Step 1: The Dog RAN."


@pytest.mark.parametrize(
    ("text", "finish_reason", "reason"),
    [
        ('{"thought_process": "S", "predicted_label": 0.5}', "stop", "bad_label"),
        ('{"thought_process": "S", "predicted_label": "maybe"}', "stop", "bad_label"),
        ('{"thought_process": "S"}', "stop", "missing_predicted_label"),
        ('{"predicted_label": 1}', "stop", "missing_thought_process"),
        ('{"thought_process": "  ", "predicted_label": 1}', "stop", "missing_thought_process"),
        ("The hypothesis is entailed.", "stop", "no_json"),
        ('{"thought_process": "S", "predicted_label": 1}', "length", "truncated"),
    ],
)
def test_rejects_with_a_reason_and_feedback(text, finish_reason, reason):
    with pytest.raises(ReplyError) as err:
        parse_reply(text, finish_reason=finish_reason)
    assert err.value.reason == reason
    assert err.value.feedback


def test_feedback_names_the_right_key():
    with pytest.raises(ReplyError) as err:
        parse_reply('{"thought_process": "S", "label": 1}')
    assert '"predicted_label"' in err.value.feedback


def test_reflection_fields():
    text = '{"error_analysis": "E", "improved_thought_process": "I", "predicted_label": 1}'
    assert parse_reply(text, REFLECTION_FIELDS) == {"error_analysis": "E", "improved_thought_process": "I",
                                                     "predicted_label": 1}  # fmt: skip
    with pytest.raises(ReplyError, match="improved_thought_process"):
        parse_reply('{"error_analysis": "E", "predicted_label": 1}', REFLECTION_FIELDS)


# --- read_answer: how the evaluate stages read a generation -------------------------------------------------------
VALID = '{"thought_process": "Step 1: A. Step 2: B. Step 3: C.", "predicted_label": 1}'


@pytest.mark.parametrize(
    ("text", "finish_reason", "label", "method", "error"),
    [
        (VALID, "stop", 1, "json", None),
        (" " + VALID + "\n", "stop", 1, "json", None),  # the fine-tuned model's leading space
        ("```json\n" + VALID + "\n```", "stop", 1, "fenced_json", None),
        ("Here you go:\n```\n" + VALID + "\n```\nDone.", "stop", 1, "fenced_json", None),
        ("Sure! " + VALID + " Hope that helps.", "stop", 1, "embedded_json", None),
        (VALID + " and then the model rambled on", "stop", 1, "embedded_json", None),
        # broken JSON (an unescaped quote in the reasoning) that still names its label under the key
        ('{"thought_process": "He said "no" here.", "predicted_label": 0}', "stop", 0, "label_key", None),
        ('{"thought_process": "He said "no".", "predicted_label": "1"}', "stop", 1, "label_key", None),
        ('{"thought_process": "He said "no".", "predicted_label": 0.5}', "stop", None, None, "no_json"),
        ("The hypothesis is entailed, so the label is 1.", "stop", None, None, "no_json"),  # prose: never a label
        ("I think it is entailment, label 1.", "stop", None, None, "no_json"),
        (VALID, "length", None, None, "truncated"),  # cut off by max_new_tokens, even with a label in it
        ('{"thought_process": "Step 1: the premise', "length", None, None, "truncated"),
        ("}{ ::: ]] garbage \x00 {", "stop", None, None, "no_json"),
        ("", "stop", None, None, "no_json"),
        ('{"thought_process": "yes", "predicted_label": "maybe"}', "stop", None, None, "bad_label"),
        ('{"predicted_label": 1}', "stop", None, None, "missing_thought_process"),
        ('{"thought_process": "S"}', "stop", None, None, "missing_predicted_label"),
    ],
)  # fmt: skip
def test_read_answer_names_the_method_or_the_failure(text, finish_reason, label, method, error):
    answer = read_answer(text, finish_reason)
    assert (answer.label, answer.method, answer.error) == (label, method, error)


def test_thoughts_keep_their_rules_broken_json_is_still_reprompted():
    with pytest.raises(ReplyError) as err:  # label_key is an evaluation fallback only
        parse_reply('{"thought_process": "He said "no" here.", "predicted_label": 0}')
    assert err.value.reason == "no_json"


def _real_completions(sample):
    for row in read_jsonl(sample / "sample_ft.jsonl"):
        completion = row["text"].split("[/INST]", 1)[1].removesuffix("</s>")
        yield row["id"], completion


def test_the_studys_real_outputs_parse(shared_data):
    sample = shared_data / "mistral_sample"
    completions = dict(_real_completions(sample))
    assert len(completions) == 100
    for row_id, completion in completions.items():
        answer = read_answer(completion, "stop")
        assert answer.method == "json", row_id
        assert answer.label == int(json.loads(completion)["predicted_label"]), row_id
        assert answer.thought_process == json.loads(completion)["thought_process"]
    # The two real replies the study had to re-prompt (predicted_label 0.5) are failures, not labels.
    invalid = [m["content"] for r in read_jsonl(sample / "sample_thoughts.jsonl") for m in r["chat_history"]
               if m["role"] == "assistant"]  # fmt: skip
    assert len(invalid) == 2
    assert [read_answer(text, "stop").error for text in invalid] == ["bad_label", "bad_label"]


REPLY = '{"thought_process": "Step 1: x.", "predicted_label": 1}'


@pytest.mark.parametrize(
    ("text", "fields", "finish", "reason", "feedback"),
    [
        (REPLY, THOUGHT_FIELDS, "model_length", "truncated",
         "Your reply was cut off by the length limit. Answer again, more concisely."),
        ("No JSON.", THOUGHT_FIELDS, "stop", "no_json",
         'Your reply held no JSON object. Answer with one JSON object with keys "thought_process", "predicted_label".'),
        ("No JSON.", REFLECTION_FIELDS, "stop", "no_json", 'Your reply held no JSON object. Answer with one JSON '
         'object with keys "error_analysis", "improved_thought_process", "predicted_label".'),
        ('{"predicted_label": 1}', THOUGHT_FIELDS, "stop", "missing_thought_process",
         'The key "thought_process" was missing; it must hold your reasoning as a non-empty string.'),
        ('{"thought_process": " ", "predicted_label": 1}', THOUGHT_FIELDS, "stop", "missing_thought_process",
         'The key "thought_process" was empty or not a string; it must hold your reasoning as a non-empty string.'),
        ('{"thought_process": "x"}', THOUGHT_FIELDS, "stop", "missing_predicted_label",
         'The key "predicted_label" was missing; it must be the number 0 (no entailment) or 1 (entailment).'),
        ('{"thought_process": "x", "predicted_label": "maybe"}', THOUGHT_FIELDS, "stop", "bad_label",
         'predicted_label was "maybe"; it must be the number 0 (no entailment) or 1 (entailment).'),
    ],
)  # fmt: skip
def test_each_failure_has_its_exact_reprompt(text, fields, finish, reason, feedback):
    """The feedback is the reprompt the LLM reads (it changes what the teacher answers next): pinned word for word,
    for both length finish reasons (survivors of `make mutation` changed these texts unnoticed)."""
    with pytest.raises(ReplyError) as err:
        parse_reply(text, fields, finish)
    assert (err.value.reason, err.value.feedback) == (reason, feedback)


def test_labels_objects_and_fences_at_their_edges():
    """parse_label's float and case handling; a `{` that is not JSON before the object; an object ending exactly at
    its fence's end; a fence elsewhere in the reply does not make an object in prose `fenced_json`."""
    assert [parse_label(v) for v in (0.0, 1.0, " TRUE ", "False", "1")] == [0, 1, 1, 0, 1]
    for bad in (2.0, 0.5, "yes"):
        with pytest.raises(ReplyError):
            parse_label(bad)
    assert read_answer("Set {a, b} first. " + REPLY, "stop") == Answer(1, "embedded_json", None, "Step 1: x.")
    assert read_answer("Here:\n```json\n" + REPLY + "```", "stop").method == "fenced_json"
    assert read_answer("```\nscratch\n```\nSo: " + REPLY, "stop").method == "embedded_json"
    assert read_answer(REPLY, "stop").thought_process == "Step 1: x."
