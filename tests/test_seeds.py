"""`nlistral report --experiments ... --group-by KEY`: experiments that differ only in a seed are one configuration,
summarised across seeds, and compared by Welch's t on the per-seed accuracies, Holm-adjusted over the table; a
configuration with one seed gets no seed statement (real DVC experiments, in-process)."""

import json
import sys

import pytest
import seeds
import yaml
from test_report import GIT_IDENTITY, git

from nlistral import cli, experiments
from nlistral.formatting import interval, pct, pvalue

# A stand-in evaluate stage: the first `right` of 20 rows are right, and each seed flips rows of its own.
STAGE = """
import json
import yaml
params = yaml.safe_load(open("params.yaml"))
right, seed = params["right"], params["train"]["seed"]
correct = [(i < right) != (i % 7 == seed) for i in range(20)]
with open("metrics/predictions.jsonl", "w") as f:
    f.writelines(json.dumps({"id": str(i), "true_label": i % 2, "correct": c}) + "\\n" for i, c in enumerate(correct))
acc = sum(correct) / 20
json.dump({"n": 20, "accuracy": acc, "accuracy_ci95": [0, 1], "macro_f1": acc, "parse_failure_rate": 0.0},
          open("metrics/eval.json", "w"))
"""
RUNS = {"a1": (10, 1), "a2": (10, 2), "a3": (10, 3), "b1": (14, 1), "b2": (14, 4), "c1": (12, 5)}  # (right, seed)


def test_group_by_seed_summarises_configurations_and_compares_them_over_seeds_and_rows(tmp_path, monkeypatch, capsys):
    from dvc.repo import Repo

    root = tmp_path / "exp"
    (root / "metrics").mkdir(parents=True)
    (root / "stage.py").write_text(STAGE)
    (root / "params.yaml").write_text("right: 10\ntrain:\n  seed: 0\n  lr: 0.1\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "params": ["right", "train.seed"],
        "outs": ["metrics/predictions.jsonl", {"metrics/eval.json": {"cache": False}}]}}}))  # fmt: skip
    monkeypatch.chdir(root)
    for name, value in GIT_IDENTITY.items():
        monkeypatch.setenv(name, value)
    git("git", "init", "-q", cwd=root)
    repo = Repo.init(str(root))
    repo.reproduce()
    git("git", "add", "-A", cwd=root)
    git("git", "commit", "-qm", "baseline", cwd=root)
    for name, (right, seed) in RUNS.items():
        repo.experiments.run(name=name, params=[f"right={right}", f"train.seed={seed}"])
    repo.close()
    capsys.readouterr()

    assert cli.main(["report", "--experiments", *RUNS, "--group-by", "train.seed"]) == 0
    out = capsys.readouterr().out
    result = json.loads((root / "metrics/seeds.json").read_text())
    correct = {name: [(i < right) != (i % 7 == seed) for i in range(20)] for name, (right, seed) in RUNS.items()}
    groups = {"right=10": ["a1", "a2", "a3"], "right=14": ["b1", "b2"], "right=12": ["c1"]}
    assert {label: c["experiments"] for label, c in result["configurations"].items()} == groups
    accuracies = {label: [sum(correct[m]) / 20 for m in members] for label, members in groups.items()}
    for label in groups:
        expected = seeds.summary(accuracies[label])
        assert {k: result["configurations"][label][k] for k in expected} == expected
    versus = result["configurations"]["right=14"]["versus_reference"]
    welch = seeds.welch(accuracies["right=10"], accuracies["right=14"])
    assert versus["difference_ci95"] == pytest.approx(welch.pop("difference_ci95"), abs=1e-4)
    assert {k: versus[k] for k in welch} == pytest.approx(welch, abs=1e-4)
    # one family of one comparison (right=12 has one seed: no statement), so Holm leaves p as it is
    assert result["family"] == 1 and versus["holm_p"] == pytest.approx(welch["p"], abs=1e-6)
    assert "versus_reference" not in result["configurations"]["right=12"]
    assert "exceeds_seed_spread" not in versus  # issue 32: |difference| > sd fired 33% of the time with no difference
    row = next(line for line in out.splitlines() if line.startswith("| `right=14`"))
    assert f"{pct(versus['difference'], True)} pp {interval(versus['difference_ci95'], True)}" in row
    assert row.rstrip(" |").endswith(f"| {pvalue(welch['p'])} | {pvalue(versus['holm_p'])}") and "| 2 |" in row
    single = next(line for line in out.splitlines() if line.startswith("| `right=12`"))
    assert "no statement: one seed" in single and "| – | – | – |" in single
    assert "Holm family: 1 comparisons" in out
    assert cli.main(["report", "--experiments", *RUNS, "--group-by", "train.seed", "--reference", "right=14"]) == 0
    flipped = json.loads((root / "metrics/seeds.json").read_text())["configurations"]
    assert list(flipped) == ["right=14", "right=10", "right=12"]
    assert flipped["right=10"]["versus_reference"]["difference"] == -versus["difference"]


def test_group_by_needs_experiments(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "--group-by", "train.seed"])
    assert exit_.value.code == 2 and "--group-by needs --experiments or --all" in capsys.readouterr().err


def test_configurations_whose_seeds_agree_exactly_get_no_statement():
    """Review r3: two seeds per side, each side's accuracies equal (0.9, 0.9 vs 0.925, 0.925 on 40 rows) made Welch
    report a point interval and p = 0, "significant" in the table. Now: no statement, saying why, and out of the
    Holm family."""
    runs = {name: {"eval": {"accuracy": right / 40}, "correct": {str(i): i < right for i in range(40)}}
            for name, right in (("a1", 36), ("a2", 36), ("b1", 37), ("b2", 37))}  # fmt: skip
    summary = experiments.seed_groups(runs, {"x=a": ["a1", "a2"], "x=b": ["b1", "b2"]}, "x=a")
    assert summary["family"] == 0 and "versus_reference" not in summary["configurations"]["x=b"]
    row = next(line for line in experiments.seed_table(summary).splitlines() if line.startswith("| `x=b`"))
    assert "no statement: no spread across seeds | – | – | – |" in row
    # review r4: the footer said "each configuration with 2+ seeds" over a family of 0 beside this 2-seed row
    assert "Holm family: 0 comparisons (each configuration with a seed statement vs `x=a`)." in (
        experiments.seed_table(summary)
    )
