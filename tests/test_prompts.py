"""The prompt texts every stage sends, pinned whole (nlistral.prompts): a change to one changes what the teacher,
the reflector or the student sees, so it must be deliberate (survivors of `make mutation` changed these unnoticed).
"""

import pytest

from nlistral import prompts


def test_teacher_and_reflector_messages_are_the_system_prompt_and_the_pair():
    assert prompts.teacher_messages("A man naps.", "A man sleeps.") == [
        {"role": "system", "content": prompts.TEACHER_SYSTEM},
        {"role": "user", "content": "Premise: A man naps.\nHypothesis: A man sleeps."},
    ]
    assert prompts.reflector_messages("A man naps.", "A man sleeps.", "Step 1: naps.", 0, 1) == [
        {"role": "system", "content": prompts.REFLECTOR_SYSTEM},
        {"role": "user", "content": "Premise: A man naps.\nHypothesis: A man sleeps.\nInitial reasoning: Step 1: "
                                    "naps.\nInitial predicted label: 0\nTrue label: 1"},
    ]  # fmt: skip


def test_the_pair_reads_back_from_either_prompt_and_a_prompt_without_one_is_named():
    user = prompts.reflector_messages("Two\nlines.", "H.", "R", 0, 1)[1]["content"]
    assert prompts.read_pair_text(user) == ("Two\nlines.", "H.")
    assert prompts.read_pair_text(prompts.pair_text("P.", "H.")) == ("P.", "H.")
    with pytest.raises(ValueError) as err:
        prompts.read_pair_text("no pair here")
    assert str(err.value) == "the prompt has no 'Premise: ...\nHypothesis: ...' block"


def test_student_prompt_completion_and_training_text():
    assert prompts.student_prompt("P.", "H.") == f"Premise: P.\nHypothesis: H.\n\n{prompts.STUDENT_INSTRUCTION}"
    assert prompts.completion_json("Un café, 1.", True) == '{"thought_process": "Un café, 1.", "predicted_label": 1}'
    assert prompts.sft_text("Q", "A") == "<s>[INST] Q [/INST] A</s>"


def test_label_mismatch_feedback_is_the_reflectors_reprompt():
    assert prompts.label_mismatch_feedback(0, 1) == (
        "Your improved reasoning concludes with predicted_label 0, but the true label is 1. Re-examine the premise "
        "and hypothesis and answer again in the same JSON format, with an improved thought_process whose argument "
        "actually reaches predicted_label 1."
    )
