"""teacher=replay / reflector=replay: the study's recorded outputs answer through the same seam, re-verified by our
stages, with no request sent."""

import json
import shutil

import pytest
from llm_server import write_split

from nlistral.config import load_config
from nlistral.data import DataError
from nlistral.io import read_jsonl, write_jsonl
from nlistral.stages import base_model, reflections, sft, thoughts


@pytest.fixture
def study(shared_data, workdir):
    """The sample's 100 rows as train, its thoughts as JSON Lines and its reflections as a JSON array (the study's
    full files are arrays), plus held-out dev/test splits that share no pair with it."""
    sample = shared_data / "mistral_sample"
    (workdir / "data").mkdir()
    shutil.copy(sample / "sample.csv", workdir / "data" / "train.csv")
    recorded = workdir / "recorded"
    (recorded / "thoughts").mkdir(parents=True)
    (recorded / "reflections").mkdir()
    shutil.copy(sample / "sample_thoughts.jsonl", recorded / "thoughts" / "train_thoughts.jsonl")
    array = json.dumps(read_jsonl(sample / "sample_reflections.jsonl"), indent=2)
    (recorded / "reflections" / "train_reflections.json").write_text(array)
    for split in ("dev", "test"):
        write_split(workdir, [(f"A {split} premise.", f"A {split} hypothesis.", 1)], split)
    return [
        "data.dir=data", "teacher=replay", "reflector=replay", f"teacher.replay_from={recorded / 'thoughts'}",
        f"reflector.replay_from={recorded / 'reflections'}", "model.max_seq_length=4096",
    ]  # fmt: skip


def test_the_studys_rationales_rebuild_its_fine_tuning_set_without_id_90_and_without_requests(study):
    cfg = load_config(study)
    stage1 = thoughts.run(cfg, "train")
    assert (stage1["ok"], stage1["correct"], stage1["requests"], stage1["cost_usd"]) == (100, 67, 0, 0.0)
    assert stage1["backend"] == "replay" and stage1["prompt_tokens"] == 0
    stage2 = reflections.run(cfg, "train")
    assert (stage2["ok"], stage2["verified"], stage2["unresolved"], stage2["requests"]) == (33, 32, 1, 0)
    assert stage2["reprompts_by_reason"] == {"label_mismatch": 1}  # asked again, same recorded answer
    base_model.run(cfg)
    metrics = sft.run(cfg, "train")
    rows = read_jsonl("data/finetune/train_ft.jsonl")
    assert len(rows) == 99 and metrics["rows_by_source"] == {"original": 67, "reflected": 32}
    assert "90" not in {r["id"] for r in rows}


def test_a_row_with_no_recorded_answer_fails_as_not_recorded(study, workdir):
    with open(workdir / "data" / "train.csv", "a", encoding="utf-8") as csv:
        csv.write("A premise nobody recorded.,A hypothesis nobody recorded.,0\n")
    metrics = thoughts.run(load_config(study), "train")
    assert (metrics["rows"], metrics["ok"], metrics["failures_by_reason"]) == (101, 100, {"not_recorded": 1})
    (failed,) = read_jsonl("data/original_thoughts/train_failed.jsonl")
    assert failed["id"] == "100" and failed["reason"] == "not_recorded"


def test_our_own_outputs_replay_to_the_same_records(workdir):
    """Stage 1 with the offline stand-in, then replayed from a copy of its own output: the same records."""
    write_split(workdir, [("Two dogs run in a park.", "Dogs are running.", 1),
                          ("A man sleeps on a bench.", "A woman is cooking dinner.", 0)], "train")  # fmt: skip
    thoughts.run(load_config(["data.dir=data"]), "train")
    original = read_jsonl("data/original_thoughts/train_thoughts.jsonl")
    shutil.copy("data/original_thoughts/train_thoughts.jsonl", workdir / "mine.jsonl")
    metrics = thoughts.run(load_config(["data.dir=data", "teacher=replay", "teacher.replay_from=mine.jsonl"]), "train")
    content = ("id", "premise", "hypothesis", "thought_process", "predicted_label", "true_label", "correct")
    replayed = read_jsonl("data/original_thoughts/train_thoughts.jsonl")
    # the same records; only the accounting differs (a replayed reply costs and counts nothing)
    assert [{k: r[k] for k in content} for r in replayed] == [{k: r[k] for k in content} for r in original]
    assert metrics["requests"] == 0 and all(r["cost_usd"] == 0 for r in replayed)


def test_a_malformed_recording_names_its_file_and_line(workdir):
    write_split(workdir, [("A premise.", "A hypothesis.", 1)], "train")
    write_jsonl(workdir / "rec.jsonl", [{"premise": "A premise.", "hypothesis": "A hypothesis.",
                                         "thought_process": "Step 1 ...", "predicted_label": 1}])  # fmt: skip
    with open(workdir / "rec.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"premise": "cut off\n')
    with pytest.raises(DataError, match=r"rec.jsonl:2: not a JSON object per line"):
        thoughts.run(load_config(["data.dir=data", "teacher=replay", "teacher.replay_from=rec.jsonl"]), "train")


def test_a_line_separator_in_a_premise_replays(workdir):
    """Our outputs hold U+2028 / U+0085 as they are (ensure_ascii=False): on main the replay backend split its file
    with str.splitlines, so replaying our own output was a DataError at the row holding one."""
    write_split(workdir, [("Two dogs\u2028run in a park.", "Dogs are running.", 1),
                          ("A man sleeps\x85on a bench.", "A woman is cooking dinner.", 0)], "train")  # fmt: skip
    thoughts.run(load_config(["data.dir=data"]), "train")
    shutil.copy("data/original_thoughts/train_thoughts.jsonl", workdir / "mine.jsonl")
    metrics = thoughts.run(load_config(["data.dir=data", "teacher=replay", "teacher.replay_from=mine.jsonl"]), "train")
    assert metrics["ok"] == 2
