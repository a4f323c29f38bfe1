"""The docs' format-and-seed sweep (Did the rationales help, beyond seed noise?) through `dvc queue`, on the pipeline's
repo: the grouped report equals an independent computation."""

import json

import pytest
import seeds
import test_pipeline
from test_pipeline import ROWS, readme_blocks, run
from test_queue_sweep import queue_report, queue_states, run_queue

pytestmark = pytest.mark.slow
# The pipeline's own repo (a module fixture: this module gets one of its own, so that on two pytest-xdist workers it
# is built beside test_pipeline's rather than after it).
llm, pipeline = test_pipeline.llm, test_pipeline.pipeline


def test_the_readme_format_and_seed_sweep_groups_seeds_into_configurations(pipeline):
    """The docs' recipe on 2 formats x 2 seeds: each experiment trains its format, and the grouped report's means,
    sds and interval equal an independent computation from the experiments' predictions; results.md shows them."""
    import dvc.api

    block = next(b for b in readme_blocks("Configuration and experiments") if any("sft.format=" in c for c in b))
    block = [c.replace("cot,label_only,multitask", "cot,label_only").replace("train.seed=1,2,3", "train.seed=1,2")
             for c in block]  # fmt: skip
    queue, start, grouped, render = block
    # 2 epochs of 32 rows teach the tiny model no answer (every accuracy 0): enough steps that seeds differ
    queue += " -S 'train.num_epochs=20' -S 'train.learning_rate=5.0e-3'"
    run("git", "add", "-A", cwd=pipeline)
    run("git", "commit", "-qm", "before the format sweep", "--allow-empty", cwd=pipeline)  # `exp ls`: only these
    before = queue_states(pipeline)
    run("bash", "-c", queue, cwd=pipeline)
    names = sorted(queue_states(pipeline).keys() - before.keys())
    assert len(names) == 4, names
    states = run_queue(pipeline, names, start)
    assert set(states.values()) == {"Success"}, queue_report(pipeline, states)

    def read(name, path):
        return dvc.api.read(path, repo=str(pipeline), rev=name)

    params = {n: dvc.api.params_show(repo=str(pipeline), rev=n) for n in names}
    assert sorted((p["sft"]["format"], p["train"]["seed"]) for p in params.values()) == [
        ("cot", 1), ("cot", 2), ("label_only", 1), ("label_only", 2)]  # fmt: skip
    correct = {}
    for name in names:
        fmt = params[name]["sft"]["format"]
        task = {"cot": "cot", "label_only": "label"}[fmt]
        assert list(json.loads(read(name, "metrics/sft_train.json"))["rows_by_task"]) == [task]
        assert json.loads(read(name, "metrics/eval.json"))["task"] == task
        rows = [json.loads(line) for line in read(name, "metrics/predictions.jsonl").splitlines()]
        correct[name] = {r["id"]: r["correct"] for r in rows}
    ids = list(correct[names[0]])  # the test split's order, in every experiment
    groups = {f"sft.format={fmt}": [n for n in names if params[n]["sft"]["format"] == fmt]
              for fmt in ("cot", "label_only")}  # fmt: skip

    try:
        out = run("bash", "-c", grouped, cwd=pipeline)
        result = json.loads((pipeline / "metrics/seeds.json").read_text())
        assert list(result["configurations"]) == list(groups) and result["rows"] == ROWS["test"]
        for label, members in groups.items():
            found = result["configurations"][label]
            assert sorted(found["experiments"]) == sorted(members)
            expected = seeds.summary([round(sum(correct[m].values()) / len(ids), 4) for m in members])
            assert {k: found[k] for k in expected} == pytest.approx(expected, abs=1e-4), (label, found)
        assert any(c["mean"] > 0 for c in result["configurations"].values()), result  # not a comparison of zeros
        versus = result["configurations"]["sft.format=label_only"]["versus_reference"]
        matrices = {label: [[correct[m][i] for i in ids] for m in result["configurations"][label]["experiments"]]
                    for label in groups}  # fmt: skip
        assert versus["difference_ci95"] == pytest.approx(seeds.interval(
            matrices["sft.format=cot"], matrices["sft.format=label_only"], result["bootstrap"], result["seed"]),
            abs=1e-4)  # fmt: skip
        assert "`sft.format=label_only`" in out
        run("bash", "-c", render, cwd=pipeline)
        results_md = (pipeline / "reports/results.md").read_text()
        assert "## Across seeds" in results_md and "| `sft.format=label_only` |" in results_md
    finally:  # the next test reads the workspace as the pipeline left it
        (pipeline / "metrics/seeds.json").unlink(missing_ok=True)
        run("git", "checkout", "--", "reports", cwd=pipeline)
