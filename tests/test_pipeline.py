"""End to end: `dvc repro` of the whole DAG in a temporary git copy of the repo, on a cut-down sample."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.exceptions
import mlflow
import pytest
from conftest import copy_checkout, doc_section, free_port, serving
from llm_server import KEY, LLMServer

from nlistral.formatting import pvalue
from nlistral.io import read_jsonl

pytestmark = pytest.mark.slow
# `git commit` and `dvc exp run` need an identity; CI machines may have none configured.
GIT_IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "nlistral-tests"), ("EMAIL", "tests@nlistral.invalid"))}  # fmt: skip
# moto accepts any credentials; these keep boto3/dvc-s3 from looking for real ones.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
ROWS = {"train": 32, "dev": 12, "test": 12}
METRIC_KEYS = {
    "metrics/thoughts_train.json": {"rows", "ok", "failed", "correct", "accuracy", "requests", "cost_usd"},
    "metrics/reflections_train.json": {"rows", "ok", "failed", "verified", "unresolved", "success_rate"},
    "metrics/sft_train.json": {
        "rows",
        "rows_by_source",
        "label_counts",
        "teacher_accuracy",
        "dropped",
        "reflection_success_rate",
        "prompt_tokens",
        "completion_tokens",
    },  # fmt: skip
    "metrics/train.json": {"train_loss"},
    "metrics/eval.json": {
        "accuracy",
        "accuracy_ci95",
        "precision",
        "recall",
        "f1",
        "macro_f1",
        "parse_failures",
        "confusion",
        "comparisons",
    },
    "metrics/eval_base.json": {"accuracy", "accuracy_ci95", "parse_failures_by_reason"},
    "metrics/eval_teacher.json": {"accuracy", "accuracy_ci95", "cost_usd", "requests"},
}


def machine_env(cwd) -> dict:
    """What commands run with here: a git identity, this venv first, the loopback LLM's key, and an LLM reply cache
    of the clone's own (each clone stands for a machine, so a stage that re-ran would have to ask the server again;
    .cache/ is git-ignored)."""
    return {**GIT_IDENTITY, **os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MISTRAL_API_KEY": KEY, "NLISTRAL_CACHE_DIR": str(Path(cwd) / ".cache" / "llm")}  # fmt: skip


def run(*cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, env=machine_env(cwd), capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


HANS_LIKE = {
    "premise": ["The doctor paid the actor.", "The judge near the lawyer slept.", "Maybe the poet danced.",
                "The banker saw the tourist."],
    "hypothesis": ["The actor paid the doctor.", "The lawyer slept.", "The poet danced.", "The banker saw someone."],
    "label": [1, 1, 1, 0],
    "heuristic": ["lexical_overlap", "subsequence", "constituent", "lexical_overlap"],
}  # fmt: skip


def add_dataset_test_set(root):
    """A second extra test set: a `datasets` folder (save_to_disk, HANS's two-class ClassLabel) with a label map."""
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "non-entailment"]),
                                  "heuristic": datasets.Value("string")})  # fmt: skip
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(HANS_LIKE, features=features)}).save_to_disk(
        root / "data" / "hanslike"
    )
    (root / "conf" / "test_set" / "hanslike.yaml").write_text(
        "path: data/hanslike\nwatch: data/hanslike\nconfig: null\nrevision: null\nsplit: validation\n"
        "columns: {premise: premise, hypothesis: hypothesis, label: label, id: null}\n"
        "labels: {entailment: 1, non-entailment: 0}\ntags: [heuristic]\nlimit: null\n"
    )
    eval_conf = root / "conf" / "eval" / "default.yaml"
    eval_conf.write_text(eval_conf.read_text().replace(
        "  - _self_", "  - /test_set@test_sets.hanslike: hanslike\n  - _self_", 1))  # fmt: skip


SET_STAGES = {f"{stage}@{name}" for stage in ("evaluate_set", "evaluate_set_base", "evaluate_set_teacher",
              "summarise_set") for name in ("diagnostic", "hanslike")}  # fmt: skip
TUNED_SET_STAGES = {s for s in SET_STAGES if s.startswith(("evaluate_set@", "summarise_set@"))}  # the adapter's


# The teacher and reflector of the pipeline below: Mistral's protocol, against the `llm` server.
LOOPBACK_LLM = """defaults:
  - /{role}/mistral@_here_
  - _self_

base_url: {url}
model: test-model
requests_per_second: 0
tokens_per_minute: 0
"""


@pytest.fixture(scope="module")
def llm():
    """The LLM API of the module's pipeline: a real HTTP server on 127.0.0.1 that counts the requests it gets."""
    with LLMServer(api_key=KEY) as server:
        yield server


def use_loopback_llm(root, url):
    """conf/{teacher,reflector}/loopback.yaml (the mistral backend at `url`), made the default of both roles."""
    for role in ("teacher", "reflector"):
        (root / "conf" / role / "loopback.yaml").write_text(LOOPBACK_LLM.format(role=role, url=url))
    config = root / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("- teacher: offline", "- teacher: loopback")
                      .replace("- reflector: offline", "- reflector: loopback"))  # fmt: skip


def build_pipeline(root: Path, llm_url: str, test_sets=True) -> Path:
    """A git copy of the repo in `root` with a small sample, short training and LLM stages served at `llm_url`, after
    one `dvc repro`. `test_sets`: the diagnostic CSV set (every 3rd row) and a `datasets` one; else none."""
    copy_checkout(root)
    for split, n in ROWS.items():
        path = root / "data" / "sample" / f"{split}.csv"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[: n + 1]))
    if test_sets:
        diagnostic = root / "data" / "sample" / "diagnostic.csv"  # the default tagged CSV set
        lines = diagnostic.read_text().splitlines(keepends=True)
        diagnostic.write_text("".join([lines[0], *lines[1::3]]))
        add_dataset_test_set(root)
    else:
        eval_conf = root / "conf" / "eval" / "default.yaml"
        eval_conf.write_text(eval_conf.read_text().replace("  - /test_set@test_sets.diagnostic: diagnostic\n", ""))
    train_conf = root / "conf" / "train" / "default.yaml"
    train_conf.write_text(train_conf.read_text().replace("num_epochs: 10", "num_epochs: 2"))
    use_loopback_llm(root, llm_url)
    run(sys.executable, "-m", "nlistral", "params", cwd=root)
    run("git", "init", "-q", cwd=root)
    run("git", "add", "-A", cwd=root)
    run("git", "commit", "-qm", "copy", cwd=root)
    REPRO_OUTPUT[root] = run("dvc", "repro", cwd=root)
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, llm):
    """The pipeline's repo (build_pipeline), with both extra test sets."""
    return build_pipeline(tmp_path_factory.mktemp("repo"), llm.url)


REPRO_OUTPUT: dict[Path, str] = {}  # the pipeline's `dvc repro` output, stages' included
# What a warning looks like in it: Python's warnings, a library's WARNING log line, DVC's "is empty"
WARNING = re.compile(r"Warning\b|\bWARNING\b|is empty\.|pip install ")


def test_a_clean_run_prints_no_warning(pipeline):
    warnings = [line for line in REPRO_OUTPUT[pipeline].splitlines() if WARNING.search(line)]
    assert not warnings, "\n".join(warnings)


def test_the_run_ends_on_the_tables_within_80_columns(pipeline):
    """`make run`'s last command: the three models on the test split and on each extra set, and where things are."""
    out = run(sys.executable, "-m", "nlistral", "summary", cwd=pipeline)
    assert max(len(line) for line in out.splitlines()) <= 80, out
    test_table = out.split("\n\n")[0].splitlines()
    assert [line.split("  ")[0] for line in test_table[2:]] == ["fine-tuned", "base zero-shot", "teacher"], out
    eval_json = json.loads((pipeline / "metrics/eval.json").read_text())
    assert f"{eval_json['accuracy'] * 100:.1f}" in test_table[2]
    assert pvalue(eval_json["comparisons"]["base"]["mcnemar_midp"], 2) in test_table[3]
    assert "Holm family: " in out
    for name in ("diagnostic", "hanslike"):
        assert f"Extra test set {name}, " in out
    for where in ("reports/results.md", "reports/index.html", "dvc metrics show", "dvc plots show", "mlflow ui"):
        assert where in out


def test_counts_add_up(pipeline):
    for split in ("train", "dev"):
        thoughts = read_jsonl(pipeline / f"data/original_thoughts/{split}_thoughts.jsonl")
        failed = read_jsonl(pipeline / f"data/original_thoughts/{split}_failed.jsonl")
        reflections = read_jsonl(pipeline / f"data/reflected_thoughts/{split}_reflections.jsonl")
        finetune = read_jsonl(pipeline / f"data/finetune/{split}_ft.jsonl")
        assert len(thoughts) + len(failed) == ROWS[split]
        assert len(reflections) == sum(not t["correct"] for t in thoughts)
        assert len(finetune) == sum(t["correct"] for t in thoughts) + sum(r["verified"] for r in reflections)
    predictions = read_jsonl(pipeline / "metrics/predictions.jsonl")
    assert len(predictions) == ROWS["test"]
    assert (pipeline / "models/adapter/adapter_config.json").is_file()


def test_metrics_hold_the_documented_keys(pipeline):
    for path, keys in METRIC_KEYS.items():
        metrics = json.loads((pipeline / path).read_text())
        assert keys <= set(metrics), f"{path} lacks {keys - set(metrics)}"
    shown = run("dvc", "metrics", "show", "--json", cwd=pipeline)
    assert "eval.json" in shown and "sft_dev.json" in shown


def test_every_model_is_evaluated_on_both_extra_test_sets(pipeline):
    for name, n, tag in (("diagnostic", 12, "phenomenon"), ("hanslike", 4, "heuristic")):
        summary = json.loads((pipeline / f"metrics/test_sets/{name}.json").read_text())
        assert set(summary["models"]) == {"fine-tuned", "base", "teacher"} and summary["n"] == n
        for model in summary["models"].values():
            assert {"accuracy", "accuracy_ci95", "macro_f1", "parse_failure_rate", "by_tag"} <= set(model)
            assert sum(cell["n"] for cell in model["by_tag"][tag].values()) == n
        assert set(summary["comparisons"]) == {"base", "teacher"}
        for suffix in ("", "_base", "_teacher"):
            assert len(read_jsonl(pipeline / f"metrics/test_sets/{name}/predictions{suffix}.jsonl")) == n
        assert f"| {name} | fine-tuned |" in (pipeline / "reports/results.md").read_text()
    hans = read_jsonl(pipeline / "metrics/test_sets/hanslike/predictions_teacher.jsonl")
    assert [r["true_label"] for r in hans] == [0, 0, 0, 1]  # ClassLabel entailment (0) -> 1, non-entailment -> 0


def test_second_repro_reruns_nothing(pipeline):
    out = run("dvc", "repro", cwd=pipeline)
    assert "Running stage" not in out


@pytest.fixture
def s3_remote(tmp_path):
    """A real S3 API (moto's server) on 127.0.0.1 with an empty bucket; yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # wait for moto to answer: its imports are slow on a busy box
        while True:
            try:
                boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="nlistral")
                break
            except botocore.exceptions.EndpointConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def readme_blocks(heading: str) -> list[list[str]]:
    """The ```bash blocks of a README or docs/ section, one command per line, end-of-line comments removed."""
    section = doc_section(heading)
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [[re.sub(r"\s+#.*", "", line) for line in block.splitlines() if line.strip()] for block in blocks]


def run_readme_block(commands, cwd, **placeholders):
    """Runs README commands as a user pastes them, placeholders filled in; returns each command's output."""
    outputs = {}
    for command in commands:
        command = fill(command, **placeholders)
        outputs[command] = run("bash", "-c", command, cwd=cwd)
    return outputs


def fill(command: str, **placeholders) -> str:
    """A README command with its `<name>` placeholders filled in."""
    for name, value in placeholders.items():
        command = command.replace(f"<{name}>", value)
    assert "<" not in command, f"unfilled placeholder in README command: {command}"
    return command


def test_readme_sharing_commands_push_to_s3_and_a_collaborator_pulls_a_clean_pipeline(pipeline, s3_remote, tmp_path):
    setup, generate, collaborate = readme_blocks("Sharing generated data")
    # The project's git host: a bare repository the copy pushes to, holding the code but no results yet.
    run("git", "init", "-q", "--bare", str(tmp_path / "origin.git"), cwd=tmp_path)
    run("git", "remote", "add", "origin", str(tmp_path / "origin.git"), cwd=pipeline)
    run("git", "push", "-qu", "origin", "HEAD", cwd=pipeline)
    run("git", "clone", "-q", str(tmp_path / "origin.git"), "earlier", cwd=tmp_path)  # a teammate's existing clone

    run_readme_block(setup, pipeline, bucket="nlistral", **{"endpoint-url": s3_remote})
    pushed = run_readme_block(generate, pipeline)
    assert "pushed" in pushed["dvc push"]
    assert run("git", "status", "--porcelain", cwd=pipeline) == "", "the README's commit step leaves files behind"

    run("git", "clone", "-q", str(tmp_path / "origin.git"), "fresh", cwd=tmp_path)
    assert not (tmp_path / "fresh/data/finetune/train_ft.jsonl").exists()
    pulled = [
        "data/finetune/train_ft.jsonl",
        "data/original_thoughts/dev_thoughts.jsonl",
        "metrics/eval.json",
        "metrics/plots/lengths_train.csv",
        "metrics/predictions.jsonl",
        "models/adapter/adapter_model.safetensors",
        "reports/index.html",  # the row browser: DVC cache, not git
    ]
    for clone in (tmp_path / "earlier", tmp_path / "fresh"):
        out = run_readme_block(collaborate, clone)
        assert "Data and pipelines are up to date." in out["dvc status"], (clone.name, out["dvc status"])
        assert "Running stage" not in out["dvc repro"], (clone.name, out["dvc repro"])
        for path in pulled:
            assert (clone / path).read_bytes() == (pipeline / path).read_bytes(), (clone.name, path)
        assert run("git", "status", "--porcelain", cwd=clone) == "", clone.name


@pytest.fixture
def tracking_server(tmp_path):
    """README's `mlflow server` command on a free loopback port; yields its URL."""
    (server_block,) = readme_blocks("Run experiments on several machines")[:1]
    port = free_port()
    command = server_block[0].replace("<host>", "127.0.0.1").replace("<port>", str(port))
    (tmp_path / "tracking").mkdir()
    with serving(["bash", "-c", f"exec {command}"], f"http://127.0.0.1:{port}", "mlflow server",
                 cwd=tmp_path / "tracking", env=machine_env(tmp_path)) as url:  # fmt: skip
        yield url


def use_remotes(clone, origin, s3_url) -> None:
    """This clone's git `origin` and DVC default remote: the shared bare repo and the moto bucket (--local: test
    plumbing, the committed .dvc/config may name another endpoint)."""
    if "origin" in run("git", "remote", cwd=clone).split():
        run("git", "remote", "set-url", "origin", str(origin), cwd=clone)
    else:
        run("git", "remote", "add", "origin", str(origin), cwd=clone)
    run("dvc", "remote", "add", "--local", "-f", "-d", "team", "s3://nlistral/team", cwd=clone)
    run("dvc", "remote", "modify", "--local", "team", "endpointurl", s3_url, cwd=clone)


def start(command, cwd) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", command], cwd=cwd, env=machine_env(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_two_machines_run_experiments_at_once_share_them_and_ask_no_llm(
    pipeline, llm, s3_remote, tracking_server, tmp_path
):
    """README "Run experiments on several machines", verbatim: A (the pipeline's repo) and B (a fresh clone) each
    run a train experiment at the same time, logging to one `mlflow server`; each pulls the other's and reports
    both. No stage of either asks the LLM server anything."""
    _, on_each, compare = readme_blocks("Run experiments on several machines")
    origin = tmp_path / "team.git"
    run("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    a = pipeline
    use_remotes(a, origin, s3_remote)
    run("git", "add", "-A", cwd=a)
    run("git", "commit", "-qm", "generated data", "--allow-empty", cwd=a)
    run("git", "push", "-qu", "origin", "HEAD", cwd=a)
    run("dvc", "push", cwd=a)  # what "Sharing generated data" pushes
    run("git", "clone", "-q", str(origin), "b", cwd=tmp_path)
    b = tmp_path / "b"
    use_remotes(b, origin, s3_remote)
    asked = llm.counts["chat"]

    names = {a: "on-a", b: "on-b"}
    rates = {a: "0.0015", b: "0.0025"}
    values = {clone: {"name": names[clone], "lr": rates[clone], "tracking-url": tracking_server,
                      "other-name": names[b if clone == a else a]} for clone in (a, b)}  # fmt: skip

    pull, experiment, push = on_each
    for clone in (a, b):
        run_readme_block([pull], clone, **values[clone])
    running = {clone: start(fill(experiment, **values[clone]), clone) for clone in (a, b)}  # both at once
    for clone, proc in running.items():
        out = proc.communicate()[0]
        assert proc.returncode == 0, (names[clone], [line for line in out.splitlines() if "rror" in line])
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert ran == {"train", "evaluate", "report"} | TUNED_SET_STAGES, out[-3000:]  # what a new adapter feeds
    for clone in (a, b):
        run_readme_block([push], clone, **values[clone])
    for clone in (a, b):
        table = run_readme_block(compare, clone, **values[clone])[fill(compare[1], **values[clone])]
        assert f"`{names[a]}`" in table and f"`{names[b]}`" in table and "reference" in table, table

    runs = mlflow.MlflowClient(tracking_server).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_server).search_experiments()]
    )
    assert sorted(r.info.run_name for r in runs) == ["on-a", "on-b"]
    assert {r.info.run_name: r.data.params["train.learning_rate"] for r in runs} == {"on-a": "0.0015",
                                                                                      "on-b": "0.0025"}  # fmt: skip
    assert all("test_accuracy" in r.data.metrics for r in runs)

    assert llm.counts["chat"] == asked, "a machine asked the LLM server"


def test_a_change_to_one_test_set_reruns_only_its_stages(pipeline):
    """Last: it changes the workspace. A label fixed in the diagnostic CSV: its four stages and the report, no other."""
    path = pipeline / "data" / "sample" / "diagnostic.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(",0,lexical_overlap", ",1,lexical_overlap")
    path.write_text("".join(lines))
    out = run("dvc", "status", cwd=pipeline)
    status = {line[:-1] for line in out.splitlines() if line.endswith(":") and not line[0].isspace()}
    assert status == {f"{stage}@diagnostic" for stage in ("evaluate_set", "evaluate_set_base",
                                                               "evaluate_set_teacher")}, status  # fmt: skip
    out = run("dvc", "repro", cwd=pipeline)  # for real: a dry run cannot know which outputs would change
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {s for s in SET_STAGES if s.endswith("@diagnostic")} | {"report"}, out
