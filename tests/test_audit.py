"""The label-noise audit: exactly the rows constructed to be suspicious, and experiment=drop_suspect drops them."""

import shutil

import pytest

from nlistral.config import compose_params, load_config
from nlistral.io import read_jsonl, write_jsonl
from nlistral.stages import sft


def thought(id_, label, correct, agreement=1.0, n=3):
    votes = {str(label if correct else 1 - label): round(agreement * n), str(label if not correct else 1 - label):
             n - round(agreement * n)}  # fmt: skip
    return {"id": id_, "premise": f"Premise {id_} about a dog.", "hypothesis": f"Hypothesis {id_}.",
            "thought_process": f"Step 1: teacher {id_}.", "predicted_label": label if correct else 1 - label,
            "true_label": label, "correct": correct, "votes": votes, "agreement": agreement, "n_samples": n,
            "model": "teacher-model"}  # fmt: skip


def reflection(t, verified, attempts):
    return {**{k: t[k] for k in ("id", "premise", "hypothesis", "thought_process", "predicted_label", "true_label")},
            "error_analysis": "E", "improved_thought_process": f"Step 1: better {t['id']}.",
            "reflected_label": t["true_label"] if verified else 1 - t["true_label"], "verified": verified,
            "attempts": attempts, "teacher_model": "teacher-model", "model": "reflector-model"}  # fmt: skip


THOUGHTS = [
    thought("1", 1, True),  # right: never suspect
    thought("2", 0, False),  # unanimous against gold, reflector needed 2 attempts: SUSPECT
    thought("3", 1, False),  # unanimous against gold, reflector never got there: SUSPECT
    thought("4", 0, False, agreement=2 / 3),  # the teacher was unsure (< audit.min_agreement 0.8)
    thought("5", 1, False),  # unanimous, but the reflector agreed with gold at once
    thought("6", 0, False),  # its reflection failed: no evidence from the reflector
]
REFLECTIONS = [reflection(THOUGHTS[1], True, 2), reflection(THOUGHTS[2], False, 2),
               reflection(THOUGHTS[3], True, 2), reflection(THOUGHTS[4], True, 1)]  # fmt: skip


@pytest.fixture
def stage(workdir, built_base):
    shutil.copytree(built_base, workdir / "models" / "base")
    data = workdir / "data" / "tiny"
    data.mkdir(parents=True)
    (data / "dev.csv").write_text("premise,hypothesis,label\nA cat naps.,An animal naps.,1\n")
    (data / "test.csv").write_text("premise,hypothesis,label\nA girl sings.,A child sings.,1\n")
    write_jsonl("data/original_thoughts/train_thoughts.jsonl", THOUGHTS)
    write_jsonl("data/reflected_thoughts/train_reflections.jsonl", REFLECTIONS)
    return workdir


def test_audit_lists_exactly_the_suspicious_rows_with_their_evidence(stage):
    metrics = sft.run(load_config(["data.dir=data/tiny"]), "train")
    suspects = read_jsonl("data/audit/train_suspect.jsonl")
    assert [s["id"] for s in suspects] == ["2", "3"]
    assert suspects[1]["votes"] == {"0": 3, "1": 0} and suspects[1]["attempts"] == 2 and not suspects[1]["verified"]
    assert suspects[0]["teacher_rationale"] == "Step 1: teacher 2." and suspects[0]["reflection_rationale"]
    assert metrics["audit"]["suspect"] == 2 and metrics["audit"]["suspect_unresolved"] == 1
    rows = {r["id"]: r for r in read_jsonl("data/finetune/train_ft.jsonl")}
    assert set(rows) == {"1", "2", "4", "5"}  # by default the audit only reports
    assert rows["2"]["source"] == "reflected" and rows["2"]["reflector_model"] == "reflector-model"
    assert rows["1"]["teacher_model"] == "teacher-model" and rows["1"]["reflector_model"] is None


def test_experiment_drop_suspect_removes_them_from_the_fine_tuning_set(stage):
    (stage / "params.yaml").write_text(compose_params(["experiment=drop_suspect"]))  # `nlistral params experiment=...`
    metrics = sft.run(load_config(["data.dir=data/tiny"]), "train")
    assert {r["id"] for r in read_jsonl("data/finetune/train_ft.jsonl")} == {"1", "4", "5"}
    assert metrics["dropped"]["suspect"] == 1 and metrics["audit"]["dropped"] == 1  # "3" was never in: unresolved


def test_with_one_sample_any_disagreement_counts(stage):
    write_jsonl("data/original_thoughts/train_thoughts.jsonl", [thought("4", 0, False, agreement=1.0, n=1)])
    write_jsonl("data/reflected_thoughts/train_reflections.jsonl", [reflection(THOUGHTS[3], True, 2)])
    sft.run(load_config(["data.dir=data/tiny"]), "train")
    assert [s["id"] for s in read_jsonl("data/audit/train_suspect.jsonl")] == ["4"]
