"""Training you can leave running: dev evaluation, early stopping and the best checkpoint, kill -9 and resume,
live MLflow curves, run metadata in sqlite and in a real `mlflow server` (and one that goes away mid-training), the
study's experiments, ChatML, DDP.

Everything runs on the tiny model; fp32 (no 4-bit) where 4-bit is not what is tested, because it is faster.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import requests
import yaml
from conftest import REPO, free_port, serving
from omegaconf import OmegaConf
from test_model_stages import FAST, PAIRS, adapter_run_id, ft_row, make_cfg, write_inputs

from nlistral import prompts
from nlistral.config import compose_params, load_config
from nlistral.errors import ConfigError
from nlistral.io import read_jsonl, read_metrics, write_jsonl
from nlistral.stages import base_model, evaluate, train
from nlistral.trainer import EvaluateAtEnd, build_trainer, training_args

FP32 = {**FAST, "model.load_in_4bit": False, "train.eval_steps": 2, "train.save_steps": 2}
HISTORY_HEADER = "step,epoch,loss,eval_loss,learning_rate,grad_norm"


def wait_for(condition, timeout=300, what="condition"):
    """Poll `condition` until it returns something truthy (a wait on an event, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def repo_copy(root, dest):
    """A repo root sharing `root`'s inputs: models/base, data/, metrics/sft_*.json, plus params.yaml and conf/."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("data", "models"):
        (dest / name).mkdir(exist_ok=True)
    (dest / "data" / "finetune").symlink_to(root / "data" / "finetune")
    (dest / "models" / "base").symlink_to(root / "models" / "base")
    (dest / "metrics").mkdir(exist_ok=True)
    for split in ("train", "dev"):
        (dest / "metrics" / f"sft_{split}.json").write_text((root / "metrics" / f"sft_{split}.json").read_text())
    (dest / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (dest / "conf").symlink_to(REPO / "conf")
    return dest


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A repo root with the fine-tuning set and the tiny (Mistral-template) base model."""
    root = tmp_path_factory.mktemp("train")
    write_inputs(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        base_model.run(make_cfg(**FAST))
    return root


@pytest.fixture(scope="module")
def early_stopped(base, tmp_path_factory):
    """Training whose dev loss turns up: the dev rows pair the train prompts with other rationales, opposite labels."""
    root = repo_copy(base, tmp_path_factory.mktemp("early"))
    (root / "data" / "finetune").unlink()
    train_rows = read_jsonl(base / "data" / "finetune" / "train_ft.jsonl")
    dev = [ft_row(i, "Nothing at all.", "Nothing.", 1 - label) | {"prompt": prompts.student_prompt(p, h)}
           for i, (p, h, label) in enumerate(PAIRS)]  # fmt: skip
    write_jsonl(root / "data" / "finetune" / "train_ft.jsonl", train_rows)
    write_jsonl(root / "data" / "finetune" / "dev_ft.jsonl", dev)
    cfg = make_cfg(**{**FP32, "train.max_steps": 40, "train.learning_rate": 1.0e-2, "train.logging_steps": 1,
                      "train.early_stopping_patience": 2})  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        return root, cfg, train.run(cfg)


def test_early_stopping_keeps_the_checkpoint_with_the_lowest_dev_loss(early_stopped):
    root, cfg, metrics = early_stopped
    assert read_metrics(root / "metrics/train.json") == metrics
    assert (root / "metrics/train_history.csv").read_text().splitlines()[0] == HISTORY_HEADER
    with open(root / "metrics/train_history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    evals = {int(r["step"]): float(r["eval_loss"]) for r in rows if r["eval_loss"]}
    assert list(evals) == list(range(2, metrics["steps"] + 1, 2))  # every eval_steps
    best_step = min(evals, key=evals.get)
    assert metrics["stopped_early"] is True and metrics["total_steps"] == 40 and metrics["steps"] < 40
    assert metrics["best_step"] == best_step < metrics["steps"]
    assert metrics["best_eval_loss"] == metrics["eval_loss"] == round(evals[best_step], 4)
    # patience 2: two evaluations after the best one, none lower
    assert metrics["steps"] == best_step + 2 * cfg.train.eval_steps
    assert all(r["loss"] and r["learning_rate"] and r["grad_norm"] for r in rows)
    assert not list((root / "checkpoints").iterdir())  # finished: nothing left to resume

    # the adapter is the best checkpoint's: its dev loss is the best one, not the last one
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        trainer = build_trainer(cfg, root / "scratch")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(trainer.model, load_file(root / "models/adapter/adapter_model.safetensors"))
        assert round(trainer.evaluate()["eval_loss"], 4) == metrics["best_eval_loss"]


def test_mlflow_run_explains_itself(early_stopped):
    root, cfg, metrics = early_stopped
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(adapter_run_id(f"sqlite:///{root / 'mlflow.db'}", root))
    check_run(client, run, root, metrics)


def check_run(client, run, root, metrics):
    """Tags, params, curves and artifacts a user finds in the MLflow UI (any store)."""
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["train_ft_md5"] == train.md5(root / "data/finetune/train_ft.jsonl")
    assert tags["dev_ft_md5"] == train.md5(root / "data/finetune/dev_ft.jsonl")
    assert tags["base_model"] == "tiny (tiny)"
    assert run.data.params["train.eval_steps"] == "2" and run.data.params["teacher.model"]
    assert not any("api_key" in key or "base_url" in key for key in run.data.params)
    assert run.data.metrics["best_step"] == metrics["best_step"]
    losses = client.get_metric_history(run.info.run_id, "eval_loss")
    assert {m.step for m in losses} >= {metrics["best_step"]}
    assert client.get_metric_history(run.info.run_id, "tokens_per_s")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "params.yaml", "sft"} <= artifacts
    sft = {a.path for a in client.list_artifacts(run.info.run_id, "sft")}
    assert sft == {"sft/sft_train.json", "sft/sft_dev.json"}
    params_yaml = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "params.yaml")).read_text())
    assert params_yaml["train"]["max_steps"] == metrics["total_steps"]


def test_warmup_ratio_and_steps_together_are_an_error(base, monkeypatch):
    monkeypatch.chdir(base)
    cfg = make_cfg(**{**FP32, "train.warmup_steps": 10})
    with pytest.raises(ConfigError, match="warmup_ratio .* and train.warmup_steps .* are both set"):
        training_args(cfg, "unused")
    cfg.train.warmup_ratio = None
    assert training_args(cfg, "unused").warmup_steps == 10
    cfg = make_cfg(**{**FP32, "train.save_steps": 3})
    with pytest.raises(ConfigError, match="round multiple of the evaluation steps"):
        training_args(cfg, "unused")


class Killed(Exception):
    """The crash injected right after a checkpoint is saved (a deterministic stand-in for kill -9 mid-training)."""


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_checkpoint_of_another_run_is_never_resumed(base, tmp_path, monkeypatch):
    """A training killed after its first checkpoint, then a run with another config: it starts at step 0 and leaves
    the first run's checkpoints byte for byte (catches a fingerprint that misses a train.* key, or a run that
    clears checkpoints/ wholesale); then the first config with `train.resume=never` starts over instead of resuming
    (catches `resume` being ignored) and in a new MLflow run."""
    root = repo_copy(base, tmp_path)
    monkeypatch.chdir(root)
    cfg = make_cfg(**FP32)
    same = train.fingerprint(cfg)
    assert train.fingerprint(make_cfg(**{**FP32, "train.resume": "never"})) == same

    def crash(self, args, state, control, **kwargs):
        raise Killed(state.global_step)

    with monkeypatch.context() as mp:
        mp.setattr(EvaluateAtEnd, "on_save", crash, raising=False)
        with pytest.raises(Killed):
            train.run(cfg)
    killed = root / train.CHECKPOINTS / same
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"]
    left = files(killed)
    killed_run = json.loads((killed / train.CHECKPOINT_RUN).read_text())["run_id"]

    other = make_cfg(**{**FP32, "train.learning_rate": 1.0e-4})
    assert train.fingerprint(other) != same
    metrics = train.run(other)
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 6
    assert files(killed) == left  # still there, untouched: a rerun of the first config could resume it

    metrics = train.run(make_cfg(**{**FP32, "train.resume": "never"}))
    assert metrics["resumed_from_step"] is None and metrics["steps"] == 6
    assert adapter_run_id(f"sqlite:///{root / 'mlflow.db'}", root) != killed_run
    assert not killed.exists()  # finished: nothing left to resume

    (root / "data" / "finetune").unlink()
    (root / "data" / "finetune").mkdir()
    rows = read_jsonl(base / "data/finetune/train_ft.jsonl")
    write_jsonl(root / "data/finetune/train_ft.jsonl", rows[:-1])
    write_jsonl(root / "data/finetune/dev_ft.jsonl", read_jsonl(base / "data/finetune/dev_ft.jsonl"))
    assert train.fingerprint(cfg) != same  # other fine-tuning data


KILL_RUN = ["model.load_in_4bit=false", "train.max_steps=40", "train.per_device_batch_size=4", "train.eval_steps=10",
            "train.save_steps=10", "train.logging_steps=5", "train.early_stopping_patience=0",
            "mlflow.experiment=kill"]  # fmt: skip


def test_kill_9_then_rerun_resumes_the_same_run_from_its_checkpoint(base, tmp_path):
    root = repo_copy(base, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nlistral", "train", *KILL_RUN], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        state = wait_for(lambda: next(root.glob("checkpoints/*/checkpoint-*/trainer_state.json"), None),
                         what="the first checkpoint")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (root / "metrics/train.json").exists() and not (root / "models/adapter").exists()
    run_id = json.loads((state.parent.parent / "mlflow_run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    curve = client.get_metric_history(run_id, "loss")  # logged live: the crash left it
    assert curve and client.get_run(run_id).info.status == "RUNNING"

    os.chdir(root)
    try:
        metrics = train.run(load_config(KILL_RUN))
    finally:
        os.chdir(REPO)
    checkpointed = train.checkpoint_step(state.parent)
    assert metrics["resumed_from_step"] is not None and checkpointed <= metrics["resumed_from_step"] < 40
    assert metrics["steps"] == metrics["total_steps"] == 40
    assert adapter_run_id(f"sqlite:///{root / 'mlflow.db'}", root) == run_id
    [run] = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert {5, 40} <= steps  # the curve spans the crash
    with open(root / "metrics/train_history.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle) if r["loss"]] == list(range(5, 41, 5))


@pytest.mark.parametrize("experiment", ["ablation0", "ablation1", "ablation2"])
def test_study_experiment_composes_and_trains_two_steps(experiment, base, tmp_path, monkeypatch):
    cfg = OmegaConf.create(yaml.safe_load(compose_params([f"experiment={experiment}"], conf_dir=REPO / "conf")))
    assert cfg.model.name == "mistral7b" and cfg.train.optim == "paged_adamw_8bit" and cfg.train.eval_steps == 250
    assert cfg.train.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg.model = OmegaConf.create(compose_params(["model=tiny"], conf_dir=REPO / "conf")).model
    cfg.train.max_steps = 2
    cfg.mlflow.tracking_uri = "sqlite:///mlflow.db"
    root = repo_copy(base, tmp_path)
    monkeypatch.chdir(root)
    metrics = train.run(cfg)
    assert metrics["steps"] == metrics["total_steps"] == metrics["best_step"] == 2
    assert (root / "models/adapter/adapter_model.safetensors").is_file()


def test_chatml_model_trains_on_the_completion_only_and_evaluates(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(**{**FP32, "model.tiny.chat_format": "chatml", "train.max_steps": 4, "eval.limit": 3,
                      "eval.max_new_tokens": 8})  # fmt: skip
    base_model.run(cfg)
    trainer = build_trainer(cfg, tmp_path / "scratch")
    tokenizer = trainer.processing_class
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == trainer.model.config.vocab_size
    row = read_jsonl("data/finetune/train_ft.jsonl")[0]
    prompt = prompts.student_chat_prompt(tokenizer, row["prompt"])
    assert prompt == f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    example = trainer.train_dataset[0]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["input_ids"][:n_prompt] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert tokenizer.decode(example["input_ids"][n_prompt:]) == row["completion"] + "<|im_end|>\n"
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]

    assert train.run(cfg)["steps"] == 4
    assert (tmp_path / "models/adapter/tokenizer_config.json").is_file()
    assert evaluate.run(cfg)["n"] == 3


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifacts), stopped after the test."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serving(cmd, f"http://127.0.0.1:{port}", "mlflow server", cwd=tmp_path, env=env) as url:
        yield url


def test_training_logs_to_a_real_mlflow_server(base, tmp_path, mlflow_server, monkeypatch):
    root = repo_copy(base, tmp_path / "repo")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    metrics = train.run(make_cfg(**{**FP32, "train.max_steps": 4, "mlflow.tracking_uri": mlflow_server}))
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(adapter_run_id(mlflow_server, root))
    assert run.info.status == "FINISHED" and not (root / "mlflow.db").exists()
    check_run(client, run, root, metrics)


def logs_metric(path: str, body: bytes, key: str) -> bool:
    """Whether a REST request to MLflow logs metric `key` (log-metric, or log-batch as `mlflow.log_metrics` does)."""
    if path.endswith("/mlflow/runs/log-metric"):
        return json.loads(body)["key"] == key
    if path.endswith("/mlflow/runs/log-batch"):
        return any(metric["key"] == key for metric in json.loads(body).get("metrics", []))
    return False


class ServerThatGoesAway(ThreadingHTTPServer):
    """A loopback proxy to `upstream` (a real MLflow server) that goes away once it has forwarded the first request
    logging `metric`: later connections are closed unanswered, then its port stops listening."""

    daemon_threads = True

    def __init__(self, upstream: str, metric: str):
        super().__init__(("127.0.0.1", 0), ForwardUntilGone)
        self.upstream, self.metric = upstream, metric
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.gone = threading.Event()

    def go_away(self) -> None:
        self.shutdown()  # serving stops; connections still queued are reset when the socket closes
        self.socket.close()


class ForwardUntilGone(BaseHTTPRequestHandler):
    def forward(self):
        server = self.server
        if server.gone.is_set():
            self.close_connection = True
            return  # no answer: the client sees the connection closed
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "user-agent")}
        reply = requests.request(self.command, server.upstream + self.path, data=body, headers=headers, timeout=60)
        if logs_metric(self.path, body, server.metric):
            server.gone.set()  # before the answer goes out: no later request can reach the upstream
            threading.Thread(target=server.go_away).start()
        self.send_response(reply.status_code)
        self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def log_message(self, *args):
        pass


@contextmanager
def server_that_goes_away(upstream: str, metric: str):
    server = ServerThatGoesAway(upstream, metric)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server
    finally:
        server.go_away()
        thread.join()
        server.server_close()


def test_a_tracking_server_gone_mid_training_loses_no_training(base, tmp_path, mlflow_server, monkeypatch, capsys):
    """The server takes the first loss point, then answers nothing: training runs to its end, the metrics files are
    complete, and the stage ends with a warning naming the URI and what MLflow missed."""
    root = repo_copy(base, tmp_path / "repo")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with server_that_goes_away(mlflow_server, metric="loss") as server:
        cfg = make_cfg(**{**FP32, "train.max_steps": 4, "train.logging_steps": 1, "mlflow.tracking_uri": server.url})
        metrics = train.run(cfg)
        assert server.gone.is_set()
    assert metrics["steps"] == 4 and read_metrics(root / "metrics/train.json") == metrics
    assert (root / "models/adapter/adapter_model.safetensors").is_file()
    with open(root / "metrics/train_history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows if r["loss"]] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in rows if r["eval_loss"]] == [2, 4]
    warning = capsys.readouterr().err.strip().splitlines()[-1]
    said = re.fullmatch(rf"train: warning: MLflow \({re.escape(server.url)}\) missed \d+ write\(s\) of run (\w+) "
                        r"after: .+\. The stage's metrics files are complete\.", warning)  # fmt: skip
    assert said, warning
    run_id = said.group(1)
    client = mlflow.MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]  # the last write it took
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing reached it after that, not even the run's end


def test_two_process_ddp_on_cpu_writes_one_adapter_and_one_run(base, tmp_path):
    root = repo_copy(base, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    result = subprocess.run(
        [accelerate, "launch", "--config_file", str(REPO / "accelerate/ddp_cpu.yaml"), "-m", "nlistral", "train",
         "model.load_in_4bit=false", "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2",
         "train.per_device_batch_size=4", "mlflow.experiment=ddp"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 4
    assert metrics["epochs"] == 1.0  # each process reads half the 30 rows: 4 batches of 4 (one process: 8)
    assert (root / "models/adapter/adapter_model.safetensors").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED"
    assert adapter_run_id(f"sqlite:///{root / 'mlflow.db'}", root) == run.info.run_id
