"""The offline stand-in teacher/reflector: deterministic, cue-based, answering real chat messages."""

import json

import pytest

from nlistral.llm.offline import OfflineClient
from nlistral.parsing import REFLECTION_FIELDS, parse_reply
from nlistral.prompts import reflector_messages, teacher_messages


def teach(premise, hypothesis):
    return parse_reply(OfflineClient().chat(teacher_messages(premise, hypothesis)).text)


@pytest.mark.parametrize(
    ("premise", "hypothesis", "label", "cited"),
    [
        ("A man is playing a guitar on stage.", "A man plays a guitar.", 1, "'guitar'"),
        ("A man is playing a guitar on stage.", "A man is not playing a guitar.", 0, "Negation"),
        ("Three dogs run in a field.", "Five dogs run in a field.", 0, "'five'"),
        ("A woman reads a book.", "A chef cooks pasta in a kitchen.", 0, "'chef'"),
    ],
)
def test_cues_decide_the_label_and_the_rationale_cites_them(premise, hypothesis, label, cited):
    answer = teach(premise, hypothesis)
    assert answer["predicted_label"] == label
    assert answer["thought_process"].startswith("Step 1:") and "Step 3:" in answer["thought_process"]
    assert cited in answer["thought_process"]


def test_deterministic_and_reads_multi_line_text():
    messages = teacher_messages("A dog\nsleeps on a red sofa.", "A dog sleeps on a sofa.")
    first = OfflineClient().chat(messages).text
    assert first == OfflineClient().chat(messages).text
    assert json.loads(first)["predicted_label"] == 1 and "'sofa'" in json.loads(first)["thought_process"]


@pytest.mark.parametrize("true_label", [0, 1])
def test_reflector_argues_for_the_true_label(true_label):
    messages = reflector_messages("A man cooks.", "A person cooks dinner.", "Step 1: x.", 1 - true_label, true_label)
    answer = parse_reply(OfflineClient().chat(messages).text, REFLECTION_FIELDS)
    assert answer["predicted_label"] == true_label and answer["error_analysis"]
