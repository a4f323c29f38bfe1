"""MLflow set-up shared by train and evaluate (nlistral.tracking): parallel stages on one fresh SQLite store, runs
named after their DVC experiment, a tracking server that does not answer, and the runs table the README sends users
to in `mlflow ui`."""

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, doc_pages, free_port, serving
from omegaconf import OmegaConf

from nlistral import cli, tracking
from nlistral.errors import ConfigError

# Each process waits for the go file, then opens the same fresh store, as `dvc queue start -j 3` workers do.
OPEN_AND_LOG = """
import os, sys, time
import requests
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
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


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


CHROMIUM_HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run"]  # fmt: skip
UI_URL = re.compile(r"http://127\.0\.0\.1:5000(/#/experiments/\d+/runs\?[\w=&]+)")


def runs_url_path() -> str:
    """The path of the runs-table URL in README's MLflow section, the same one `make run` prints at its end
    (`nlistral summary`)."""
    [path] = set(UI_URL.findall("".join(page.read_text() for page in doc_pages())))
    printed = (REPO / "src" / "nlistral" / "summary.py").read_text()
    assert UI_URL.findall(printed) == [path], "`nlistral summary` (make run) names another MLflow URL than README"
    return path


def mlflow_ui(store_uri: str):
    """`mlflow ui --backend-store-uri <store>` (README's command; one worker) on a free port -> its URL."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return serving(cmd, f"http://127.0.0.1:{port}", "mlflow ui", env=env)


def chromium_dom(chromium: str, url: str, expected: str, tmp_path: Path) -> str:
    """The DOM of `url` once its scripts ran (and a screenshot, tmp_path/mlflow.png), in a fresh browser profile:
    again until it contains `expected` (the UI fetches its data after loading) or a generous deadline passes."""
    deadline = time.monotonic() + 180
    for attempt in itertools.count():
        dom = subprocess.run(
            [chromium, *CHROMIUM_HEADLESS, f"--user-data-dir={tmp_path / f'profile{attempt}'}",
             "--virtual-time-budget=15000", "--window-size=1400,900", f"--screenshot={tmp_path / 'mlflow.png'}",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        if expected in dom or time.monotonic() > deadline:
            return dom


def test_the_readme_url_opens_mlflow_ui_on_the_runs_table(tmp_path, monkeypatch):
    """MLflow 3.17 opens an experiment on its GenAI "Overview" (traces, "No data") unless the URL asks for the
    machine-learning view, and nothing server-side changes that (README "MLflow"). The URL README and `make run`
    give shows a fresh browser the run in the runs table."""
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("needs Debian's chromium package: `make browser` (apt-get install -y chromium)")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-lark")
    experiment = tracking.connect(OmegaConf.create({"mlflow": {"tracking_uri": store, "experiment": "nlistral"}}))
    with tracking.start_run("train") as run:
        run.log(mlflow.log_param, "train.learning_rate", 2.0e-4)
        run.log(mlflow.log_metric, "eval_loss", 0.43, step=2)
    assert run.lost is None and experiment.experiment_id == "1"  # the first experiment of a fresh store
    with mlflow_ui(store) as url:
        dom = chromium_dom(chromium, url + runs_url_path(), ">tidy-lark<", tmp_path)
    assert f'href="#/experiments/1/runs/{run.info.run_id}">' in dom and ">tidy-lark<" in dom, dom[-3000:]
    assert "No data" not in dom and "Overview" not in dom  # not the GenAI landing page
    assert (tmp_path / "mlflow.png").read_bytes().startswith(b"\x89PNG")
