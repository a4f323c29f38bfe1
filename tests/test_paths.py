"""Paths are named once (nlistral.paths) and dvc.yaml agrees; a stage run before its producer says what to run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nlistral import cli, paths

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "dev")
PREPARED_SPLITS = ("train", "dev", "test")  # prepare's `foreach: ${data.prepare}` lists at most these


TEST_SETS = tuple(yaml.safe_load((REPO / "params.yaml").read_text())["eval"]["test_sets"])  # the default sets
FOREACH = {"${data.prepare}": PREPARED_SPLITS, "${eval.test_sets}": TEST_SETS}  # dvc.yaml foreach: what it lists


def expand(entries, item=None) -> set[str]:
    """dvc.yaml deps/outs entries (strings or {path: options}) with ${item} (${key} of a dict) filled in."""
    names = set()
    for entry in entries:
        name = next(iter(entry)) if isinstance(entry, dict) else entry
        names.add(name.replace("${item}", item).replace("${key}", item) if item else name)
    return names


def dvc_stages() -> dict[str, dict]:
    """Stage name -> {"deps", "outs"}, foreach stages expanded per item."""
    stages = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        items = stage.get("foreach") or [None]
        for item in FOREACH[items] if isinstance(items, str) else items:
            body = stage.get("do", stage)
            stages[f"{name}@{item}" if item else name] = {
                "deps": expand(body.get("deps", []), item),
                "outs": expand(body.get("outs", []) + body.get("metrics", []), item),
            }
    return stages


def declared_paths() -> set[str]:
    """Every path constant in nlistral.paths, per split and test set; files inside an output folder are not outs."""
    # SEEDS: written by `nlistral report --group-by`, a command; SPEED_DIR: timings, kept out of the outs on purpose
    command_outputs = {"SEEDS", "SPEED_DIR"}
    values = {str(v) for k, v in vars(paths).items()
              if k.isupper() and isinstance(v, str | Path) and k not in command_outputs}  # fmt: skip
    expanded = {v.format(split=split, set=name) for v in values for split in SPLITS for name in TEST_SETS}
    expanded |= {paths.PREPARE_METRICS.format(split=split) for split in PREPARED_SPLITS}
    return {p for p in expanded if not any(p.startswith(f"{other}/") for other in expanded)}


@pytest.fixture
def sample_workdir(workdir):
    shutil.copytree(REPO / "data" / "sample", workdir / "data" / "sample")
    return workdir


def test_dvc_yaml_outs_are_the_paths_module():
    outs = set().union(*(stage["outs"] for stage in dvc_stages().values()))
    assert {o for o in outs if not o.startswith("${data.dir}/")} == declared_paths()  # data.dir: from the config
    assert str(paths.SPEED_DIR) in yaml.safe_load((REPO / "dvc.yaml").read_text())["metrics"]  # `dvc metrics show`


def test_dvc_yaml_deps_on_stage_outputs_are_in_the_paths_module():
    """Every dep is a stage output named in nlistral.paths (or a folder of them), a file in the repo (code,
    templates, configs) or a path from params (`${...}`): catches a typo such as `data/finetune/dev_tf.jsonl` or
    `…_thougths.jsonl`, which DVC would take as an input nothing writes."""
    produced = declared_paths()
    for name, stage in dvc_stages().items():
        for dep in sorted(stage["deps"]):
            if "$" in dep:  # a path from params.yaml (data.dir, a test set's file): the config's, not ours
                continue
            if dep.split("/")[0] in ("metrics", "models", "data", "reports"):
                folder = any(p.startswith(f"{dep}/") for p in produced)  # e.g. report: metrics/test_sets
                assert dep in produced or folder, f"dvc.yaml stage {name}: dep {dep} is no stage's output"
            else:
                assert (REPO / dep).exists(), f"dvc.yaml stage {name}: dep {dep} does not exist"


def test_importing_a_stage_imports_no_other_stage():
    code = (
        "import sys, nlistral.stages.evaluate, nlistral.stages.sft; "
        "print(sorted(m for m in sys.modules if m.startswith('nlistral.stages.') or m.startswith('nlistral.llm')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['nlistral.stages.evaluate', 'nlistral.stages.sft']"


@pytest.mark.parametrize(
    ("args", "missing", "command", "stage"),
    [
        (("reflections", "--split", "dev"), "data/original_thoughts/dev_thoughts.jsonl", "thoughts --split dev",
         "thoughts@dev"),
        (("sft", "--split", "train"), "data/original_thoughts/train_thoughts.jsonl", "thoughts --split train",
         "thoughts@train"),
        (("train",), "models/base", "base-model", "base_model"),
        (("evaluate",), "models/adapter", "train", "train"),
    ],
)  # fmt: skip
def test_a_stage_run_before_its_producer_names_what_to_run(sample_workdir, capsys, args, missing, command, stage):
    assert cli.main(list(args)) == 2  # in-process: the same exit code and message as `nlistral ...`, without ~15 s
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # of imports per call
        f"nlistral {args[0]}: error: {missing} not found: run `nlistral {command}` or `dvc repro {stage}` first"
    )
    assert not (sample_workdir / "mlflow.db").exists()


def test_sft_before_base_model_names_base_model_not_the_hub(sample_workdir, capsys):
    for stage in ("thoughts", "reflections"):
        assert cli.main([stage, "--split", "dev"]) == 0
    capsys.readouterr()
    assert cli.main(["sft", "--split", "dev"]) == 2
    err = capsys.readouterr().err
    assert "models/base not found: run `nlistral base-model` or `dvc repro base_model` first" in err
    assert "huggingface" not in err.lower()
