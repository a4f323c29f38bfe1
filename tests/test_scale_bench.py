"""bench/scale.py: the CSVs it builds at a size, and a whole run at a tiny size (every stage measured)."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO

from nlistral.data import read_csv


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_splits_have_the_studys_shape_and_distinct_ids_and_pairs_past_the_source(tmp_path):
    bench = load_bench()
    pool = bench.source_rows(REPO / "data" / "sample")  # every CSV there, diagnostic.csv too
    sizes = bench.write_splits(tmp_path, pool, 1000)
    assert sizes == {"train": 1000, "dev": 56, "test": 55}  # 35,597 : 1,977 : 1,972
    frames = {split: read_csv(tmp_path / f"{split}.csv") for split in sizes}  # the pipeline's CSV contract holds
    assert {split: len(frame) for split, frame in frames.items()} == sizes
    ids = [i for frame in frames.values() for i in frame["id"]]
    pairs = [(p, h) for frame in frames.values() for p, h in zip(frame["premise"], frame["hypothesis"], strict=True)]
    assert len(set(ids)) == len(ids) and len(set(pairs)) == len(pairs) > len(pool)
    assert frames["train"]["premise"].iloc[len(pool)] == pool[0]["premise"] + " (copy 1)"


@pytest.mark.slow
def test_a_tiny_run_measures_every_stage_and_keeps_the_page_out_of_git(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--steps", "1", "--eval-rows", "4",
                           "--json", str(out), "60"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    assert result["sizes"] == {"train": 60, "dev": 3, "test": 3}
    stages = {row.pop("stage"): row for row in result["stages"]}
    assert {"thoughts@train", "reflections@dev", "base_model", "sft@train", "train", "evaluate", "evaluate_base",
            "evaluate_teacher", "summarise_set@diagnostic", "report", "other"} <= set(stages)  # fmt: skip
    for name, row in stages.items():
        if name != "other":
            assert row["wall_s"] > 0 and row["peak_rss_mb"] > 10 and row["output_bytes"] > 0, (name, row)
            assert f"| {name} | {row['wall_s']:.1f} | {row['peak_rss_mb']:.0f} |" in done.stdout
    # the experiment re-ran what training feeds, and nothing before it
    # (its text outputs may come out byte for byte the same after one step: 0 bytes, but a number, not None)
    assert stages["train"]["git_bytes_experiment"] is not None and stages["report"]["git_bytes_experiment"] is not None
    assert stages["other"]["git_bytes_experiment"] > 0  # params.yaml and dvc.lock: the new learning rate
    assert stages["thoughts@train"]["git_bytes_experiment"] is stages["sft@train"]["git_bytes_experiment"] is None
    # the report's outs in git are its text files: the page (most of its bytes) is in the DVC cache
    assert 0 < stages["report"]["git_bytes_result"] < stages["report"]["output_bytes"] / 2
    assert result["git_bytes_experiment"] == sum(row["git_bytes_experiment"] or 0 for row in stages.values())
