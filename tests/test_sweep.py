"""The docs' format-and-seed sweep (Did the rationales help, beyond seed noise?) through `dvc queue start -j 2`, on the
pipeline's repo: what each experiment re-runs, its MLflow run, its diff and commit, the grouped report, and DVC's
queue as it behaves (treeverse/dvc#10427)."""

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import seeds
import test_pipeline
from test_pipeline import ROWS, build_pipeline, machine_env, readme_blocks, run

pytestmark = pytest.mark.slow
llm = test_pipeline.llm


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, llm):
    """The pipeline's repo with no extra test set, built for this module (so that on two pytest-xdist workers it is
    built beside test_pipeline's): what a new adapter re-runs for the sets is test_pipeline's two-machine test's."""
    return build_pipeline(tmp_path_factory.mktemp("repo"), llm.url, test_sets=False)


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


def docs_sweep() -> list[str]:
    """The docs' format-and-seed sweep: queue, start the workers, group the experiments, render the report."""
    return next(b for b in readme_blocks("Configuration and experiments") if any("sft.format=" in c for c in b))


@pytest.fixture(scope="module")
def sweep(pipeline) -> dict[str, dict]:
    """The docs' recipe on 2 formats x 2 seeds, queued and run with the docs' `dvc queue start`: {experiment name:
    its params}, every experiment a success."""
    import dvc.api

    queue, start, _, _ = docs_sweep()
    queue = queue.replace("cot,label_only,multitask", "cot,label_only").replace("train.seed=1,2,3", "train.seed=1,2")
    # 2 epochs of 32 rows teach the tiny model no answer (every accuracy 0): enough steps that seeds differ
    queue += " -S 'train.num_epochs=20' -S 'train.learning_rate=5.0e-3'"
    run("git", "add", "-A", cwd=pipeline)
    run("git", "commit", "-qm", "before the sweep", "--allow-empty", cwd=pipeline)  # `exp ls`: only these
    (pipeline / "mlflow.db").unlink()  # the two workers' first trainings meet a fresh store, as on a new clone
    before = queue_states(pipeline)
    run("bash", "-c", queue, cwd=pipeline)
    names = sorted(queue_states(pipeline).keys() - before.keys())
    assert len(names) == 4, names
    states = run_queue(pipeline, names, start)
    assert set(states.values()) == {"Success"}, queue_report(pipeline, states)
    return {name: dvc.api.params_show(repo=str(pipeline), rev=name) for name in names}


def test_each_queued_experiment_reruns_only_what_its_params_feed_and_logs_a_named_run(pipeline, sweep):
    """Each experiment re-runs only what its parameters feed (a seed: training on; a format: the fine-tuning set
    on), and is one MLflow run in the repo's own store, named after it, with its own seed, its eval metrics and the
    docs' share of the cores per worker."""
    assert sorted((p["sft"]["format"], p["train"]["seed"]) for p in sweep.values()) == [
        ("cot", 1), ("cot", 2), ("label_only", 1), ("label_only", 2)]  # fmt: skip
    for name, params in sweep.items():
        out = run("dvc", "queue", "logs", name, cwd=pipeline)
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        expected = {"train", "evaluate", "report"}
        if params["sft"]["format"] != "cot":  # the default format: its fine-tuning set is the workspace's
            expected |= {"sft@train", "sft@dev"}
        assert ran == expected, (name, out[-3000:])

    threads = str((int(run("env", "-u", "OMP_NUM_THREADS", "nproc", cwd=pipeline)) + 1) // 2)  # the docs' share
    mlflow_runs = (
        sqlite3.connect(pipeline / "mlflow.db")
        .execute(
            "SELECT r.name, p.value, t.value, m.value FROM runs r JOIN params p ON p.run_uuid = r.run_uuid "
            "AND p.key = 'train.seed' JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'torch_threads' "
            "JOIN latest_metrics m ON m.run_uuid = r.run_uuid AND m.key = 'test_accuracy'"
        )
        .fetchall()
    )
    logged = {name: (int(seed), threads) for name, seed, threads, _ in mlflow_runs}
    assert len(mlflow_runs) == len(sweep), mlflow_runs
    assert logged == {name: (params["train"]["seed"], threads) for name, params in sweep.items()}, mlflow_runs


def test_an_experiment_diffs_plots_and_compares_against_the_workspace(pipeline, sweep):
    """`dvc exp diff`, `dvc plots diff` and `nlistral compare` between the committed workspace and one experiment."""
    name = next(n for n, params in sweep.items() if params["sft"]["format"] == "cot")
    diff = run("dvc", "exp", "diff", "HEAD", name, "--md", cwd=pipeline)
    assert "metrics/train.json" in diff and "train.learning_rate" in diff  # another rate, another loss
    run("dvc", "plots", "diff", "HEAD", name, "-o", "plots", cwd=pipeline)
    html = (pipeline / "plots/index.html").read_text()
    assert "Fine-tuned accuracy on the test split by rationale length (tokens)" in html
    out = run(sys.executable, "-m", "nlistral", "compare", "HEAD", name, "--json", "cmp.json", cwd=pipeline)
    result = json.loads((pipeline / "cmp.json").read_text())
    assert (result["a"], result["b"], result["n"]) == ("HEAD", name, ROWS["test"])
    assert f"B - A = {result['difference']:+.4f}" in out


def test_the_grouped_report_equals_an_independent_computation(pipeline, sweep):
    """The docs' grouping of the sweep (seeds into configurations): each experiment trains its format, and the
    grouped report's means, sds and interval equal an independent computation from the experiments' predictions;
    results.md shows them."""
    import dvc.api

    _, _, grouped, render = docs_sweep()
    names = sorted(sweep)

    def read(name, path):
        return dvc.api.read(path, repo=str(pipeline), rev=name)

    correct = {}
    for name in names:
        task = {"cot": "cot", "label_only": "label"}[sweep[name]["sft"]["format"]]
        assert list(json.loads(read(name, "metrics/sft_train.json"))["rows_by_task"]) == [task]
        assert json.loads(read(name, "metrics/eval.json"))["task"] == task
        rows = [json.loads(line) for line in read(name, "metrics/predictions.jsonl").splitlines()]
        correct[name] = {r["id"]: r["correct"] for r in rows}
    ids = list(correct[names[0]])  # the test split's order, in every experiment
    groups = {f"sft.format={fmt}": [n for n in names if sweep[n]["sft"]["format"] == fmt]
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
        accuracies = {label: [round(sum(correct[m].values()) / len(ids), 4)
                              for m in result["configurations"][label]["experiments"]] for label in groups}  # fmt: skip
        welch = seeds.welch(accuracies["sft.format=cot"], accuracies["sft.format=label_only"])
        assert versus["difference_ci95"] == pytest.approx(welch["difference_ci95"], abs=1e-4)
        assert versus["p"] == pytest.approx(welch["p"], abs=1e-4) and result["family"] == 1
        assert "`sft.format=label_only`" in out
        run("bash", "-c", render, cwd=pipeline)
        results_md = (pipeline / "reports/results.md").read_text()
        assert "## Across seeds" in results_md and "| `sft.format=label_only` |" in results_md
    finally:  # the workspace as the pipeline left it
        (pipeline / "metrics/seeds.json").unlink(missing_ok=True)
        run("git", "checkout", "--", "reports", cwd=pipeline)


def added_to_git(root, new: str, old: str) -> dict[str, int]:
    """Path -> bytes of every blob commit `new` adds to git over `old` (trees and the commit itself: "")."""
    listed = [line.partition(" ") for line in run("git", "rev-list", "--objects", new, f"^{old}", cwd=root).split("\n")
              if line]  # fmt: skip
    sizes = subprocess.run(["git", "cat-file", "--batch-check=%(objectsize)"], cwd=root, capture_output=True, text=True,
                           input="".join(f"{sha}\n" for sha, _, _ in listed), check=True).stdout.split()  # fmt: skip
    added: dict[str, int] = {}
    for (_, _, path), size in zip(listed, sizes, strict=True):
        added[path] = added.get(path, 0) + int(size)
    return added


def test_an_experiment_commit_holds_small_text_and_the_page_comes_back_from_the_dvc_cache(pipeline, sweep):
    """Last: it applies an experiment. An experiment is a git commit of its own: the row browser is in the DVC cache,
    not in the commit, which adds only small text (metrics, dvc.lock, results.md, cards); `dvc exp apply` brings its
    page back."""
    assert "reports/index.html" not in run("git", "ls-files", "reports", cwd=pipeline).split()
    name = next(n for n, params in sweep.items() if params["sft"]["format"] == "cot")
    refs = run("git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps", cwd=pipeline).splitlines()
    commit = next(ref.split()[1] for ref in refs if ref.split()[0].endswith(f"/{name}"))
    tree = run("git", "ls-tree", "-r", "--name-only", commit, cwd=pipeline).split()
    assert {"reports/results.md", "reports/model_card.md", "metrics/eval.json"} <= set(tree)
    assert "reports/index.html" not in tree
    added = added_to_git(pipeline, commit, "HEAD")
    assert "reports/results.md" in added and "metrics/eval.json" in added  # the experiment's results are there
    assert sum(added.values()) < 250_000, added  # dvc.lock (~75 kB here) is the largest
    print(f"the experiment commit adds {sum(added.values()):,} bytes to git")

    run("dvc", "exp", "apply", name, cwd=pipeline)
    page = (pipeline / "reports/index.html").read_text()
    assert f"<title>NLIstral report: {name}</title>" in page and len(page) > 50_000
