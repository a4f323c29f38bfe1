"""`nlistral compare A B`: two prediction files, and two `dvc exp run` experiments in a temporary git + DVC repo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlistral import cli
from nlistral.io import write_jsonl

GIT_IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "nlistral-tests"), ("EMAIL", "tests@nlistral.invalid"))}  # fmt: skip
KEYS = {"a", "b", "n", "accuracy_a", "accuracy_b", "difference", "difference_ci95", "mcnemar_p", "mcnemar_midp",
        "macro_f1_difference", "macro_f1_difference_ci95", "a_right_b_wrong", "a_wrong_b_right", "flipped",
        "calibration"}  # fmt: skip


def predictions(correct, labels=None):
    """Prediction rows r0, r1, ... whose `correct` is given; true labels 1, 0, 1, ... unless given."""
    labels = labels or [1 - i % 2 for i in range(len(correct))]
    return [{"id": f"r{i}", "premise": f"P{i}", "hypothesis": f"H{i}", "true_label": true,
             "predicted_label": true if ok else 1 - true, "correct": ok}
            for i, (ok, true) in enumerate(zip(correct, labels, strict=True))]  # fmt: skip


def test_compare_two_files_prints_and_writes_the_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl("a.jsonl", predictions([True] * 6 + [False] * 2 + [True] * 4))
    write_jsonl("b.jsonl", predictions([False] * 6 + [True] * 2 + [True] * 4)[::-1])  # matched by id, not order
    assert cli.main(["compare", "a.jsonl", "b.jsonl", "--json", "out/cmp.json", "--bootstrap", "10000"]) == 0
    result = json.loads(Path("out/cmp.json").read_text())
    assert set(result) == KEYS and (result["a"], result["b"]) == ("a.jsonl", "b.jsonl")
    assert (result["n"], result["accuracy_a"], result["accuracy_b"]) == (12, 0.8333, 0.5)
    assert result["difference"] == -0.3333 and result["difference_ci95"] == [-0.75, 0.0833]  # see test_stats
    assert result["mcnemar_p"] == 74 / 256 and (result["a_right_b_wrong"], result["a_wrong_b_right"]) == (6, 2)
    assert result["flipped"] == [{"id": f"r{i}", "a_correct": i < 6, "b_correct": i >= 6} for i in range(8)]
    out = capsys.readouterr().out
    assert "B - A = -0.3333, 95% CI [-0.7500, +0.0833]" in out and "McNemar exact p = 0.289, mid-p = 0.18" in out
    assert f"macro F1: B - A = {result['macro_f1_difference']:+.4f}, 95% CI [" in out
    assert "r0 (right->wrong)" in out and "r7 (wrong->right)" in out


@pytest.mark.parametrize(
    ("b_rows", "message"),
    [
        (predictions([True] * 3), "a.jsonl and b.jsonl hold different test rows: 4 vs 3 rows; "
                                  "only in a.jsonl: r3; only in b.jsonl: none"),
        (predictions([True] * 4, labels=[1, 0, 0, 0]), "row id r2: true_label differs between a.jsonl and b.jsonl"),
        (predictions([True] * 4) + predictions([True]), "b.jsonl: id r0 appears more than once"),
    ],
)  # fmt: skip
def test_mismatched_test_sets_are_an_error_that_says_what_differs(tmp_path, monkeypatch, capsys, b_rows, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl("a.jsonl", predictions([True] * 4))
    write_jsonl("b.jsonl", b_rows)
    assert cli.main(["compare", "a.jsonl", "b.jsonl", "--json", "cmp.json"]) == 2
    assert capsys.readouterr().err.startswith(f"nlistral compare: error: {message}")
    assert not Path("cmp.json").exists()


def test_an_unknown_name_is_neither_file_nor_revision(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    write_jsonl("a.jsonl", predictions([True]))
    assert cli.main(["compare", "a.jsonl", "no-such-exp"]) == 2
    assert "'no-such-exp' is neither a file nor a revision/experiment holding metrics/predictions.jsonl" in (
        capsys.readouterr().err)  # fmt: skip


WRITER = """import json, yaml
wrong = yaml.safe_load(open("params.yaml"))["wrong"]
with open("metrics/predictions.jsonl", "w") as f:
    for i in range(20):
        f.write(json.dumps({"id": str(i), "true_label": i % 2, "correct": i not in wrong}) + "\\n")
"""
STAGE = """stages:
  predict:
    cmd: python write.py
    deps: [write.py]
    params: [wrong]
    outs: [metrics/predictions.jsonl]
"""


def _run(*cmd, cwd):
    env = {**GIT_IDENTITY, **os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_compare_reads_git_revisions_and_dvc_experiments(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "write.py").write_text(WRITER)
    (repo / "dvc.yaml").write_text(STAGE)
    (repo / "params.yaml").write_text("wrong: [0, 1, 2, 3, 4, 5]\n")  # main: 14/20 right
    _run("git", "init", "-q", "-b", "main", cwd=repo)
    _run(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    _run(sys.executable, "-m", "dvc", "repro", "-q", cwd=repo)
    _run("git", "add", "-A", cwd=repo)
    _run("git", "commit", "-qm", "baseline", cwd=repo)
    _run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", "fewer-errors", "-S", "wrong=[4, 5]", cwd=repo)
    _run(sys.executable, "-m", "dvc", "exp", "run", "-q", "-n", "other-errors", "-S", "wrong=[10, 11, 12]", cwd=repo)
    monkeypatch.chdir(repo)

    assert cli.main(["compare", "main", "fewer-errors", "--json", "main.json"]) == 0
    result = json.loads(Path("main.json").read_text())
    assert (result["accuracy_a"], result["accuracy_b"], result["a_wrong_b_right"], result["a_right_b_wrong"]) == (
        0.7, 0.9, 4, 0)  # fmt: skip
    assert [f["id"] for f in result["flipped"]] == ["0", "1", "2", "3"]
    assert result["mcnemar_p"] == 2 / 2**4

    assert cli.main(["compare", "fewer-errors", "other-errors", "--json", "exps.json"]) == 0
    result = json.loads(Path("exps.json").read_text())
    assert (result["a"], result["b"], result["a_right_b_wrong"], result["a_wrong_b_right"]) == (
        "fewer-errors", "other-errors", 3, 2)  # fmt: skip
    assert "A = fewer-errors: accuracy 0.9000" in capsys.readouterr().out


@pytest.mark.parametrize(("damage", "message"), [
    (lambda text: text[:-20], "a.jsonl:4: not JSON (Expecting value at column 87)"),  # cut short by a kill
    (lambda text: text.replace('"P1"', '"P\xff1"'), "a.jsonl:2: not valid UTF-8 (byte 0xff)"),
    (lambda text: text + "[1, 2]\n", "a.jsonl:5: not a JSON object (a list)"),
])  # fmt: skip
def test_a_damaged_predictions_file_is_an_error_naming_its_line(tmp_path, monkeypatch, capsys, damage, message):
    """On main a JSONL line cut short (or not UTF-8) was a JSONDecodeError / UnicodeDecodeError traceback."""
    monkeypatch.chdir(tmp_path)
    write_jsonl("a.jsonl", predictions([True] * 4))
    write_jsonl("b.jsonl", predictions([False] * 4))
    text = Path("a.jsonl").read_text(encoding="utf-8")
    Path("a.jsonl").write_bytes(damage(text).encode("utf-8").replace("\xff".encode(), b"\xff"))
    assert cli.main(["compare", "a.jsonl", "b.jsonl", "--json", "cmp.json"]) == 2
    assert capsys.readouterr().err.startswith(f"nlistral compare: error: {message}")
    assert not Path("cmp.json").exists()


def test_a_line_separator_in_data_does_not_split_a_revisions_predictions(tmp_path, monkeypatch, capsys):
    """json.dumps(ensure_ascii=False) writes U+2028 / U+0085 raw inside a string; on main a revision's predictions
    were split with str.splitlines, which also breaks there: a JSONDecodeError traceback for a premise holding one."""
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    rows = predictions([True] * 4)
    rows[1]["premise"] = "one\u2028two\x85three"
    write_jsonl(repo / "metrics" / "predictions.jsonl", rows)
    write_jsonl(repo / "b.jsonl", rows[:3] + [{**rows[3], "correct": False}])
    _run("git", "init", "-q", "-b", "main", cwd=repo)
    _run(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    _run("git", "add", "-A", cwd=repo)
    _run("git", "commit", "-qm", "baseline", cwd=repo)
    monkeypatch.chdir(repo)
    assert cli.main(["compare", "main", "b.jsonl"]) == 0
    assert "r3 (right->wrong)" in capsys.readouterr().out


HOSTILE_ID = "r0\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\x9b31m\u202egnp.exe\r"  # clipboard write, clear, bidi, CR


def test_ids_from_data_cannot_drive_the_terminal(tmp_path):
    """An id is whatever the data's id column holds: on main `nlistral compare` printed it raw, so an OSC 52 sequence
    wrote the reader's clipboard, CSI cleared the screen, U+202E reversed the text, a CR overwrote the line; the
    CompareError naming ids did the same on stderr."""
    rows_a, rows_b = predictions([True, True]), predictions([False, True])
    rows_a[0]["id"] = rows_b[0]["id"] = HOSTILE_ID
    write_jsonl(tmp_path / "a.jsonl", rows_a)
    write_jsonl(tmp_path / "b.jsonl", rows_b)
    write_jsonl(tmp_path / "c.jsonl", predictions([True, True, True])[1:])  # the hostile id is only in a.jsonl
    for b, code in (("b.jsonl", 0), ("c.jsonl", 2)):
        done = subprocess.run([sys.executable, "-m", "nlistral", "compare", "a.jsonl", b], cwd=tmp_path,
                              capture_output=True)  # fmt: skip
        shown = (done.stdout + done.stderr).decode("utf-8")
        assert done.returncode == code, shown
        assert not any(ch in shown for ch in "\x1b\x07\x9b\u202e\r"), repr(shown)
        assert "r0\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\x1b[2J\\x9b31m\\u202egnp.exe\\r" in shown
