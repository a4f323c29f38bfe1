"""The fine-tuning set: split hygiene, length policy, balance, ablation, and the statistics behind them."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from nlistral.config import load_config
from nlistral.errors import ConfigError, StageError
from nlistral.io import read_jsonl, write_jsonl
from nlistral.model import load_tokenizer
from nlistral.stages import sft


def thought(id_, premise, hypothesis, label, correct=True):
    return {"id": id_, "premise": premise, "hypothesis": hypothesis, "thought_process": f"Step 1: {id_}.",
            "predicted_label": label if correct else 1 - label, "true_label": label, "correct": correct}  # fmt: skip


def reflection(id_, premise, hypothesis, label, verified):
    return {**thought(id_, premise, hypothesis, label, correct=False), "error_analysis": "E",
            "improved_thought_process": f"Step 1: better {id_}.", "reflected_label": label if verified else 1 - label,
            "verified": verified, "attempts": 2 if not verified else 1}  # fmt: skip


@pytest.fixture
def stage(workdir, built_base):
    """A repo root with the built base and three CSVs; returns a function that runs sft on given thoughts."""
    shutil.copytree(built_base, workdir / "models" / "base")
    data = workdir / "data" / "tiny"
    data.mkdir(parents=True)
    (data / "dev.csv").write_text("premise,hypothesis,label\nA dog runs.,An animal runs.,1\n")
    (data / "test.csv").write_text("premise,hypothesis,label\nA girl sings.,A child sings.,1\n")

    def run(thoughts, reflections, *overrides):
        write_jsonl("data/original_thoughts/train_thoughts.jsonl", thoughts)
        write_jsonl("data/reflected_thoughts/train_reflections.jsonl", reflections)
        metrics = sft.run(load_config(["data.dir=data/tiny", *overrides]), "train")
        return read_jsonl("data/finetune/train_ft.jsonl"), metrics

    return run


def test_duplicates_and_leaks_are_removed_and_counted(stage):
    rows, metrics = stage(
        [
            thought("1", "A man cooks.", "A person cooks.", 1),
            thought("2", "A  man cooks.", "a person cooks.", 1),  # same pair after case/space folding
            thought("3", "A dog runs.", "An animal runs.", 1),  # in dev
            thought("4", "A girl sings.", "A child sings.", 1),  # in test
            thought("5", "A cat sleeps.", "A cat is awake.", 0),
        ],
        [reflection("6", "A bird flies.", "A bird is flying.", 1, verified=True)],
    )
    assert sorted(r["id"] for r in rows) == ["1", "5", "6"]
    assert metrics["dropped"] == {"duplicate": 1, "leak_dev": 1, "leak_test": 1}
    assert metrics["candidates"] == 6 and metrics["rows"] == 3


def test_unverified_reflections_never_enter_and_ablation_drops_all(stage):
    reflections = [reflection("2", "A bird flies.", "A bird is flying.", 1, verified=True),
                   reflection("3", "A boy eats.", "A boy is hungry.", 0, verified=False)]  # fmt: skip
    wrong = [thought(r["id"], r["premise"], r["hypothesis"], r["true_label"], correct=False) for r in reflections]
    thoughts = [thought("1", "A man cooks.", "A person cooks.", 1), *wrong]
    rows, metrics = stage(thoughts, reflections)
    assert {r["id"]: r["source"] for r in rows} == {"1": "original", "2": "reflected"}
    assert metrics["unresolved"] == 1 and metrics["reflection_success_rate"] == 0.5
    reflected = next(r for r in rows if r["id"] == "2")
    assert json.loads(reflected["completion"]) == {"thought_process": "Step 1: better 2.", "predicted_label": 1}
    rows, metrics = stage(thoughts, reflections, "sft.include_reflections=false")
    assert [r["id"] for r in rows] == ["1"] and metrics["rows_by_source"] == {"original": 1, "reflected": 0}


def test_length_policy_drops_or_keeps_but_never_truncates(stage):
    long = thought("2", "A man cooks. " * 80, "A person cooks.", 1)
    thoughts = [thought("1", "A man cooks.", "A person cooks.", 1), long]
    rows, metrics = stage(thoughts, [], "model.max_seq_length=200")
    assert [r["id"] for r in rows] == ["1"] and metrics["dropped"] == {"too_long": 1}
    rows, metrics = stage(thoughts, [], "model.max_seq_length=200", "sft.drop_too_long=false")
    assert metrics["over_length_kept"] == 1 and metrics["prompt_tokens"]["max"] > 200
    assert next(r for r in rows if r["id"] == "2")["premise"] == long["premise"]


def test_balance_and_shuffle_are_seeded(stage):
    """Shuffling changes the source order, the same seed gives the same order and another seed another one, and
    `sft.shuffle=false` keeps the source order: catches a shuffle that does nothing or ignores `sft.seed`."""
    thoughts = [thought(str(i), f"Scene {i} happens.", f"Claim {i}.", int(i < 6)) for i in range(8)]
    rows, metrics = stage(thoughts, [], "sft.balance_labels=true")
    assert metrics["label_counts"] == {"0": 2, "1": 2} and metrics["dropped"] == {"balance": 4}
    again, _ = stage(thoughts, [], "sft.balance_labels=true")
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    source = [t["id"] for t in thoughts]
    kept, _ = stage(thoughts, [], "sft.shuffle=false")
    assert [r["id"] for r in kept] == source
    orders = [[r["id"] for r in stage(thoughts, [], f"sft.seed={seed}")[0]] for seed in (42, 42, 7)]
    assert sorted(orders[0]) == sorted(source) and orders[0] != source
    assert orders[0] == orders[1] and orders[2] != orders[0]


def test_plot_data_comes_from_the_outputs(stage):
    # 30 words but over 100 tokens: the study's buckets are in tokens of the configured tokenizer, not words.
    wordy = {**thought("3", "A bird sings.", "An animal sings.", 1), "thought_process": "quixotic " * 30}
    stage([thought("1", "A man cooks.", "A person cooks.", 1), thought("2", "A cat naps.", "A dog.", 0, False),
           wordy], [])  # fmt: skip
    tokens = len(load_tokenizer("models/base")(wordy["thought_process"], add_special_tokens=False).input_ids)
    assert len(wordy["thought_process"].split()) == 30 and 100 < tokens <= 200
    lines = Path("metrics/plots/teacher_accuracy_by_length_train.csv").read_text().splitlines()
    assert lines[:3] == ["rationale_tokens,rows,accuracy", "0-100,2,0.5", "101-200,1,1.0"]
    assert lines[3:] == ["201-300,0,", "301+,0,"]
    lengths = Path("metrics/plots/lengths_train.csv").read_text().splitlines()
    assert sorted(line.split(",")[:2] for line in lengths[1:]) == [["1", "original"], ["3", "original"]]


def test_a_pair_dropped_as_too_long_does_not_shadow_its_shorter_duplicate(stage):
    long = {**thought("1", "A man cooks.", "A person cooks.", 1), "thought_process": "Step 1: cooking. " * 100}
    rows, metrics = stage([long, thought("2", "A man cooks.", "A person cooks.", 1)], [], "model.max_seq_length=300")
    assert [r["id"] for r in rows] == ["2"] and metrics["dropped"] == {"too_long": 1}


def test_balancing_a_one_label_set_is_an_error_not_an_empty_set(stage):
    with pytest.raises(StageError, match="no row has label 0"):
        stage([thought("1", "A man cooks.", "A person cooks.", 1)], [], "sft.balance_labels=true")


def test_the_audit_keeps_the_whole_evidence_of_exactly_the_suspects():
    """sft.audit on test_audit's constructed rows, without a stage run: every evidence field of a suspect, the
    min_agreement edge (>=), a single sample counting whatever its agreement, ids matched as strings (survivors of
    `make mutation` in audit())."""
    from test_audit import REFLECTIONS, THOUGHTS

    suspects = sft.audit(THOUGHTS, REFLECTIONS, 0.8)
    assert [s["id"] for s in suspects] == ["2", "3"]
    t, r = THOUGHTS[1], REFLECTIONS[0]
    assert suspects[0] == {
        "id": "2", "premise": t["premise"], "hypothesis": t["hypothesis"], "gold_label": 0, "teacher_label": 1,
        "votes": t["votes"], "agreement": 1.0, "n_samples": 3, "teacher_rationale": "Step 1: teacher 2.",
        "teacher_model": "teacher-model", "reflection_error_analysis": "E", "reflection_rationale": r[
            "improved_thought_process"], "reflected_label": 0, "verified": True, "attempts": 2,
        "reflector_model": "reflector-model"}  # fmt: skip
    assert (suspects[1]["verified"], suspects[1]["reflected_label"]) == (False, 0)
    assert [s["id"] for s in sft.audit(THOUGHTS, REFLECTIONS, 2 / 3)] == ["2", "3", "4"]
    single = [{**t, "n_samples": 1, "agreement": 0.5} for t in THOUGHTS]
    assert [s["id"] for s in sft.audit(single, REFLECTIONS, 0.8)] == ["2", "3", "4"]
    as_ints = [{**r, "id": int(r["id"])} for r in REFLECTIONS]
    assert [s["id"] for s in sft.audit(THOUGHTS, as_ints, 0.8)] == ["2", "3"]
    orphan = {**REFLECTIONS[0], "id": "99"}  # no thought of that id (nor a right one): skipped, not the end
    assert [s["id"] for s in sft.audit(THOUGHTS, [orphan, REFLECTIONS[0]], 0.8)] == ["2"]
    unsampled = [{k: v for k, v in t.items() if k not in ("n_samples", "agreement")} for t in THOUGHTS]
    old_rows = sft.audit(unsampled, REFLECTIONS, 0.8)  # rows written before sampling: one sample each
    assert [(s["id"], s["n_samples"], s["agreement"]) for s in old_rows] == [("2", 1, None), ("3", 1, None),
                                                                          ("4", 1, None)]  # fmt: skip


def test_rows_candidates_and_metrics_by_hand():
    """One fine-tuning row whole; which thoughts and reflections are candidates; the metrics object for known
    inputs, the length summaries (min, median, p95, max) and an empty split (survivors of `make mutation`)."""
    from omegaconf import OmegaConf
    from test_audit import REFLECTIONS, THOUGHTS

    from nlistral.prompts import completion_json, sft_text, student_prompt

    row = sft.sft_row("reflected", REFLECTIONS[0], "Better.", "teacher-model", "reflector-model")
    prompt, completion = student_prompt(REFLECTIONS[0]["premise"], "Hypothesis 2."), completion_json("Better.", 0)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    assert row == {"id": "2", "source": "reflected", "teacher_model": "teacher-model",
                   "reflector_model": "reflector-model", "label": 0, "premise": REFLECTIONS[0]["premise"],
                   "hypothesis": "Hypothesis 2.", "prompt": prompt, "completion": completion,
                   "text": sft_text(prompt, completion), "messages": messages, "task": "cot"}  # fmt: skip
    both = sft.candidates(THOUGHTS, REFLECTIONS, True)
    assert [(r["id"], r["source"], r["teacher_model"], r["reflector_model"]) for r in both] == [
        ("1", "original", "teacher-model", None),
        ("2", "reflected", "teacher-model", "reflector-model"),
        ("4", "reflected", "teacher-model", "reflector-model"),
        ("5", "reflected", "teacher-model", "reflector-model"),
    ]
    assert [r["id"] for r in sft.candidates(THOUGHTS, REFLECTIONS, False)] == ["1"]  # fmt: skip

    cfg = OmegaConf.create({"audit": {"min_agreement": 0.8}, "sft": {"format": "cot", "label_rows": "verified"}})
    suspects = sft.audit(THOUGHTS, REFLECTIONS, 0.8)
    lengths = [{"prompt_tokens": p, "completion_tokens": c} for p, c in zip(range(21, 0, -1), [4, 2, 8, 6] * 5 + [9],
                                                                            strict=True)]  # fmt: skip
    metrics = sft.sft_metrics(cfg, THOUGHTS[:4], REFLECTIONS[:3], suspects[:1], 4, both[:3], lengths,
                              Counter({"suspect": 2, "duplicate": 1}), 1)  # fmt: skip
    assert metrics == {
        "candidates": 4, "rows": 3, "rows_by_source": {"original": 1, "reflected": 2},
        "format": "cot", "examples": 3, "rows_by_task": {"cot": 3},
        "label_counts": {"0": 2, "1": 1}, "dropped": {"suspect": 2, "duplicate": 1}, "over_length_kept": 1,
        "teacher_accuracy": 0.25, "reflected": 3, "verified_reflections": 2, "unresolved": 1,
        "reflection_success_rate": 0.6667,  # 2 verified of the 3 rows the teacher got wrong
        "audit": {"suspect": 1, "suspect_unresolved": 0, "suspect_verified_after_retries": 1, "min_agreement": 0.8,
                  "dropped": 2},
        "prompt_tokens": {"min": 1, "median": 11, "p95": 20, "max": 21},
        "completion_tokens": {"min": 2, "median": 6, "p95": 8, "max": 9},
    }  # fmt: skip
    assert sft._describe([3, 1]) == {"min": 1, "median": 2, "p95": 3, "max": 3}
    empty = sft.sft_metrics(cfg, [], [], [], 0, [], [], Counter(), 0)
    assert (empty["teacher_accuracy"], empty["reflection_success_rate"], empty["prompt_tokens"]) == (0.0, 0.0, {})


FORMAT_ROWS = {  # sft.format -> (task, completion keys in order) of each row an example gives
    "cot": [("cot", ["thought_process", "predicted_label"])],
    "label_first": [("label_first", ["predicted_label", "thought_process"])],
    "label_only": [("label", ["predicted_label"])],
    "multitask": [("label", ["predicted_label"]), ("rationale", ["thought_process"])],
}


@pytest.mark.parametrize("name", FORMAT_ROWS)
def test_every_format_is_written_from_the_same_verified_rows(stage, name):
    thoughts = [thought("1", "A man cooks.", "A person cooks.", 1), thought("2", "A cat naps.", "A dog.", 0, False),
                thought("3", "A dog runs.", "An animal runs.", 1)]  # "3" leaks into dev  # fmt: skip
    reflections = [reflection("2", "A cat naps.", "A dog.", 0, verified=True)]
    rows, metrics = stage(thoughts, reflections, f"sft.format={name}")
    expected = FORMAT_ROWS[name]
    assert sorted((r["id"], r["source"], r["task"]) for r in rows) == sorted(
        (i, source, task) for i, source in (("1", "original"), ("2", "reflected")) for task, _ in expected
    )
    assert metrics["rows"] == 2 * len(expected) and metrics["examples"] == 2 and metrics["format"] == name
    assert metrics["rows_by_task"] == {task: 2 for task, _ in expected} and metrics["dropped"] == {"leak_dev": 1}
    instructions = set()
    for row in rows:
        keys = dict(expected)[row["task"]]
        completion = json.loads(row["completion"])
        assert list(completion) == keys, row
        assert completion.get("predicted_label", row["label"]) == row["label"]
        assert completion.get("thought_process") in (None, "Step 1: 1.", "Step 1: better 2.")
        instructions.add(row["prompt"].split("\n\n", 1)[1])
        assert row["messages"][1]["content"] == row["completion"] and row["text"].endswith(row["completion"] + "</s>")
        assert ('"thought_process"' in row["prompt"]) == ("thought_process" in keys)  # says which answer it expects
    assert len(instructions) == len(expected)  # multitask: the two tasks differ by their instruction
    lengths = Path("metrics/plots/lengths_train.csv").read_text().splitlines()
    assert len(lengths) == 1 + len(rows) and {line.split(",")[2] for line in lengths[1:]} == dict(expected).keys()


def test_label_only_can_train_on_every_gold_labelled_row(stage):
    Path("data/tiny/train.csv").write_text("premise,hypothesis,label\nA man cooks.,A person cooks.,1\n"
                                           "A cat naps.,A dog.,0\nA boy eats.,A boy is hungry.,0\n")  # fmt: skip
    thoughts = [thought("0", "A man cooks.", "A person cooks.", 1), thought("1", "A cat naps.", "A dog.", 0, False)]
    rows, metrics = stage(thoughts, [], "sft.format=label_only", "sft.label_rows=all")
    assert sorted((r["id"], r["source"], r["task"], r["label"]) for r in rows) == [
        ("0", "original", "label", 1),
        ("1", "gold", "label", 0),
        ("2", "gold", "label", 0),
    ]
    assert metrics["rows_by_source"] == {"original": 1, "reflected": 0, "gold": 2}
    with pytest.raises(ConfigError, match="sft.label_rows"):
        stage(thoughts, [], "sft.label_rows=all")  # cot cannot train on a row without a rationale
