import pytest

from nlistral.parsing import REFLECTION_FIELDS, ReplyError, parse_reply


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
