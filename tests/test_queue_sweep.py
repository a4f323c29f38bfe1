"""A sweep through `dvc queue start -j 2` as the docs run one, on the pipeline's repo: what each experiment re-runs,
its MLflow run, and DVC's queue as it behaves (treeverse/dvc#10427)."""

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import test_pipeline
from test_pipeline import ROWS, machine_env, readme_blocks, run

pytestmark = pytest.mark.slow
# The pipeline's own repo (a module fixture: this module gets one of its own, so that on two pytest-xdist workers it
# is built beside test_pipeline's rather than after it).
llm, pipeline = test_pipeline.llm, test_pipeline.pipeline

SWEEP = {"lr-a": 0.001, "lr-b": 0.003, "lr-c": 0.004}  # the default is 0.002


def queue_states(root) -> dict[str, str]:
    """`dvc queue status` as {experiment name: Queued | Running | Success | Failed}, every entry."""
    lines = run("dvc", "queue", "status", cwd=root).splitlines()[1:]
    return {line.split()[1]: line.split()[-1] for line in lines if len(line.split()) > 2 and ":" not in line.split()[1]}


CELERY = Path(".dvc/tmp/exps/celery")  # dvc's queue: its broker, and dvc-task's dvc-exp-worker-N.{json,out} per worker


def worker_pids(root) -> dict[Path, int]:
    """Each queue worker's record (rewritten when the worker starts and when it exits) and the pid it names."""
    return {path: json.loads(path.read_text())["pid"] for path in (root / CELERY).glob("dvc-exp-worker-*.json")}


def worker_alive(record: Path) -> bool:
    """Whether the worker a record names still runs (psutil comes with dvc; an exited one may linger as a zombie)."""
    info = json.loads(record.read_text())
    try:
        return info["returncode"] is None and psutil.Process(info["pid"]).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def queue_report(root, states) -> str:
    """What a queue that stopped short shows: its status, each worker's celery log, each started experiment's log."""
    parts = [run("dvc", "queue", "status", cwd=root)]
    parts += [f"--- {out.name}\n{out.read_text()[-3000:]}" for out in sorted((root / CELERY).glob("*.out"))]
    for name in (n for n, state in states.items() if state not in ("Queued", None)):
        logs = subprocess.run(["dvc", "queue", "logs", name], cwd=root, env=machine_env(root), capture_output=True,
                              text=True)  # fmt: skip
        parts.append(f"--- dvc queue logs {name}\n{(logs.stdout + logs.stderr)[-2000:]}")
    return "\n".join(parts)


def run_queue(root, names, start: str, timeout=3600) -> dict[str, str]:
    """Runs the queued experiments `names` with the docs' `dvc queue start` command, as a user pastes it into a
    shell without OMP_NUM_THREADS (conftest sets it; nproc reads it), and waits until none is Queued or Running: their
    states. The workers exit by themselves once the queue is empty; `dvc queue stop` only for a queue given up on.
    Fails at once, with the workers' logs, when entries wait and no worker is alive (one died, or was told to stop)."""

    def states() -> dict[str, str | None]:
        found = queue_states(root)
        return {name: found.get(name) for name in names}

    waiting = {"Queued", "Running", None}
    # treeverse/dvc#10427: a `dvc queue stop` that found a worker gone waits in the broker and stops the next one
    run("dvc", "exp", "clean", cwd=root)
    before = worker_pids(root)
    try:
        out = run("bash", "-c", f"unset OMP_NUM_THREADS; {start}", cwd=root)
        started = int(re.search(r"Started '(\d+)'", out).group(1))
        deadline = time.monotonic() + timeout
        while waiting & set((now := states()).values()):
            assert time.monotonic() < deadline, queue_report(root, now)
            workers = worker_pids(root)
            launched = sum(pid != before.get(path) for path, pid in workers.items())  # a new worker writes its pid
            if launched >= started and not any(worker_alive(path) for path in workers):
                now = states()  # a worker records its last task's state before it exits
                assert not waiting & set(now.values()), queue_report(root, now)
            time.sleep(2)
    except BaseException:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=root, env=machine_env(root), capture_output=True)
        raise
    return now


def test_a_sweep_on_two_queue_workers_reruns_only_training_and_logs_a_named_run_per_experiment(pipeline):
    """Three train experiments through `dvc queue start -j 2`, as the docs run a sweep: each succeeds, re-runs
    only what training feeds, and is one MLflow run in the repo's own store, named after it, with its own learning
    rate, its eval metrics, and the docs' share of the cores per worker."""
    run("git", "add", "-A", cwd=pipeline)
    run("git", "commit", "-qm", "before the sweep", "--allow-empty", cwd=pipeline)
    (pipeline / "mlflow.db").unlink()  # the two workers' first trainings meet a fresh store, as on a new clone
    for name, lr in SWEEP.items():
        run("dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.learning_rate={lr}", cwd=pipeline)
    start = next(c for block in readme_blocks("Configuration and experiments") for c in block if "queue start" in c)
    threads = str((int(run("env", "-u", "OMP_NUM_THREADS", "nproc", cwd=pipeline)) + 1) // 2)  # the docs' share
    states = run_queue(pipeline, SWEEP, start)
    logs = {name: run("dvc", "queue", "logs", name, cwd=pipeline) for name in SWEEP}
    assert set(states.values()) == {"Success"}, {name: logs[name][-2000:] for name, state in states.items()}
    tuned = {f"{stage}@{name}" for stage in ("evaluate_set", "summarise_set") for name in ("diagnostic", "hanslike")}
    for name, out in logs.items():
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert ran == {"train", "evaluate", "report"} | tuned, (name, out[-3000:])

    mlflow_runs = (
        sqlite3.connect(pipeline / "mlflow.db")
        .execute(
            "SELECT r.name, p.value, t.value, m.value FROM runs r JOIN params p ON p.run_uuid = r.run_uuid "
            "AND p.key = 'train.learning_rate' JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'torch_threads' "
            "JOIN latest_metrics m ON m.run_uuid = r.run_uuid AND m.key = 'test_accuracy'"
        )
        .fetchall()
    )
    swept = {name: (float(lr), threads) for name, lr, threads, _ in mlflow_runs}
    assert len(mlflow_runs) == len(SWEEP) and swept == {name: (lr, threads) for name, lr in SWEEP.items()}, mlflow_runs

    diff = run("dvc", "exp", "diff", "HEAD", "lr-a", "--md", cwd=pipeline)
    assert "metrics/train.json" in diff and "train.learning_rate" in diff  # another rate, another loss
    run("dvc", "plots", "diff", "HEAD", "lr-a", "-o", "plots", cwd=pipeline)
    html = (pipeline / "plots/index.html").read_text()
    assert "Fine-tuned accuracy on the test split by rationale length (tokens)" in html
    out = run(sys.executable, "-m", "nlistral", "compare", "HEAD", "lr-a", "--json", "cmp.json", cwd=pipeline)
    result = json.loads((pipeline / "cmp.json").read_text())
    assert (result["a"], result["b"], result["n"]) == ("HEAD", "lr-a", ROWS["test"])
    assert f"B - A = {result['difference']:+.4f}" in out
