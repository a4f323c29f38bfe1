"""MLflow set-up shared by train and evaluate (nlistral.tracking): parallel stages on one fresh SQLite store, runs
named after their DVC experiment, a tracking server that does not answer."""

import os
import shutil
import socket
import subprocess
import sys

import mlflow
import pytest
from conftest import REPO
from omegaconf import OmegaConf

from nlistral import cli, tracking
from nlistral.config import ConfigError

# Each process waits for the go file, then opens the same fresh store, as `dvc queue start -j 3` workers do.
OPEN_AND_LOG = """
import os, sys, time
from omegaconf import OmegaConf
import mlflow
from nlistral import tracking
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
cfg = OmegaConf.create({"mlflow": {"tracking_uri": sys.argv[1], "experiment": "sweep"}})
tracking.connect(cfg)
with tracking.start_run("train") as run:
    run.log(mlflow.log_metric, "learning_rate", float(os.environ["DVC_EXP_NAME"].split("-")[1]))
assert run.lost is None, run.lost
"""


def test_parallel_stages_create_one_fresh_sqlite_store_without_a_race(tmp_path):
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", OPEN_AND_LOG, uri, str(go)], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "DVC_EXP_NAME": f"lr-{i}"}) for i in range(3)]  # fmt: skip
    go.touch()
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], errors
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sweep"], output_format="list")
    assert sorted((r.info.run_name, r.data.metrics["learning_rate"]) for r in runs) == [
        ("lr-0", 0.0), ("lr-1", 1.0), ("lr-2", 2.0)]  # fmt: skip
    assert {r.data.tags["dvc_exp_name"] for r in runs} == {"lr-0", "lr-1", "lr-2"}


def test_a_run_outside_an_experiment_is_named_after_the_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking.run_name() == "train"  # no git repository here
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tracking.run_name() == f"train {commit}"
    assert tracking.provenance_tags()["git_commit"].startswith(commit)


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens there


def test_a_tracking_server_that_does_not_answer_is_a_config_error_naming_it():
    url = _dead_url()
    cfg = OmegaConf.create({"mlflow": {"tracking_uri": url, "experiment": "x"}})
    with pytest.raises(ConfigError, match=f"MLflow tracking server {url} does not answer"):
        tracking.connect(cfg)


def test_train_with_the_tracking_server_down_exits_2_before_loading_a_model(built_base, tmp_path, monkeypatch, capsys):
    """One line naming the URI, before the model or the data is read: the empty fine-tuning files here would be an
    error of their own if the stage got that far."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(built_base, tmp_path / "models" / "base")
    (tmp_path / "data" / "finetune").mkdir(parents=True)
    for split in ("train", "dev"):
        (tmp_path / "data" / "finetune" / f"{split}_ft.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    url = _dead_url()
    assert cli.main(["train", f"mlflow.tracking_uri={url}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"nlistral train: error: MLflow tracking server {url} does not answer"), err
    assert not (tmp_path / "models" / "adapter").exists()
