"""The three evaluate stages on the tiny model (in-process), the teacher baseline over real HTTP, engine selection,
and the student served by a real model server process (eval.engine=server) that the stage starts and stops."""

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, paired_by_hand
from llm_server import ROWS, LLMServer, stage_overrides, write_split
from omegaconf import OmegaConf
from test_model_stages import FAST, make_cfg, write_inputs

from nlistral import cli
from nlistral.config import compose_params, load_config
from nlistral.errors import ConfigError, StageError
from nlistral.evaluation import VLLM_LORA_RANKS, generate, run_generation, student_prompts, vllm_lora_rank
from nlistral.io import read_jsonl, read_metrics, write_json
from nlistral.model import load_adapter_model, load_tokenizer
from nlistral.paths import SPEED_KEYS
from nlistral.scoring import eval_rows, score
from nlistral.stages import base_model, evaluate, evaluate_base, evaluate_teacher, train

METRIC_KEYS = {"model", "model_id", "n", "accuracy", "accuracy_ci95", "precision", "recall", "f1", "macro_precision",
               "macro_recall", "macro_f1", "macro_f1_ci95", "parse_failures", "parse_failure_rate",
               "parse_failures_by_reason", "accuracy_parsed", "confusion", "samples_per_s", "output_tokens_per_s",
               "wall_time_s"}  # fmt: skip
PREDICTION_KEYS = {"id", "premise", "hypothesis", "true_label", "predicted_label", "correct", "parse_method",
                   "parse_error", "finish_reason", "output_tokens", "output", "p_entailment"}  # fmt: skip
COMPARISON_KEYS = {"a", "b", "n", "accuracy_a", "accuracy_b", "difference", "difference_ci95", "mcnemar_p",
                   "mcnemar_midp", "macro_f1_difference", "macro_f1_difference_ci95", "a_right_b_wrong",
                   "a_wrong_b_right"}  # fmt: skip
PREDICTIONS_FILE = "metrics/predictions.jsonl"
FILES = {"base": ("metrics/eval_base.json", "metrics/predictions_base.jsonl"),
         "teacher": ("metrics/eval_teacher.json", "metrics/predictions_teacher.jsonl"),
         "fine-tuned": ("metrics/eval.json", "metrics/predictions.jsonl")}  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Tiny base + 6 training steps, then evaluate_base, evaluate_teacher (offline teacher) and evaluate.

    Not 4-bit: test_model_stages covers the QLoRA path; bitsandbytes on a CPU would only make this slower.
    """
    root = tmp_path_factory.mktemp("repo")
    write_inputs(root)
    cfg = make_cfg(**{**FAST, "model.load_in_4bit": False, "eval.max_new_tokens": 32})
    cfg.teacher = OmegaConf.create(compose_params(["teacher=offline"], conf_dir=REPO / "conf")).teacher
    cfg.llm_cache_dir = str(root / ".cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        base_model.run(cfg)
        train.run(cfg)
        results = {"base": evaluate_base.run(cfg), "teacher": evaluate_teacher.run(cfg)}
        results["fine-tuned"] = evaluate.run(cfg)
    return root, cfg, results


def test_every_evaluation_writes_the_same_format_on_the_same_rows(evaluated):
    root, _, results = evaluated
    ids = [f"test-{i}" for i in range(9)]
    for model, (metrics_path, predictions_path) in FILES.items():
        metrics = read_metrics(root / metrics_path)  # with its timings, from metrics/speed/
        assert metrics == results[model]
        assert METRIC_KEYS <= set(metrics) and metrics["model"] == model and metrics["n"] == 9
        predictions = read_jsonl(root / predictions_path)
        assert [p["id"] for p in predictions] == ids
        for p in predictions:
            assert set(p) == PREDICTION_KEYS
            assert p["correct"] == (p["predicted_label"] == p["true_label"])
            assert (p["predicted_label"] is None) == (p["parse_error"] is not None) == (p["parse_method"] is None)
        assert metrics["accuracy"] == round(sum(p["correct"] for p in predictions) / 9, 4)
        failures = Counter(p["parse_error"] for p in predictions if p["parse_error"])
        assert metrics["parse_failures_by_reason"] == dict(failures)
        low, high = metrics["accuracy_ci95"]
        assert low <= metrics["accuracy"] <= high
        assert sum(metrics["confusion"].values()) + metrics["parse_failures"] == 9


def test_the_untrained_base_is_the_honest_floor_and_the_teacher_is_accounted(evaluated):
    _, _, results = evaluated
    base, teacher = results["base"], results["teacher"]
    assert base["model_id"] == "models/base" and base["parse_failures"] >= 8  # random weights write no JSON
    assert teacher["model_id"] == "overlap-heuristic-v1" and teacher["parse_failures"] == 0
    assert teacher["requests"] == 9 and teacher["cost_usd"] == 0.0 and teacher["backend"] == "offline"
    assert teacher["completion_tokens"] > 0 and teacher["output_tokens_per_s"] > 0
    assert teacher["calibration"] is None  # the teacher has no probabilities: the report says so


def test_eval_json_pairs_the_adapter_with_each_baseline(evaluated):
    root, cfg, results = evaluated
    fine_tuned = read_jsonl(root / "metrics/predictions.jsonl")
    for name in ("base", "teacher"):
        comparison = results["fine-tuned"]["comparisons"][name]
        assert set(comparison) == COMPARISON_KEYS and (comparison["a"], comparison["b"]) == (name, "fine-tuned")
        baseline = read_jsonl(root / FILES[name][1])
        pairs = list(zip(baseline, fine_tuned, strict=True))
        assert comparison["a_right_b_wrong"] == sum(a["correct"] and not b["correct"] for a, b in pairs)
        assert comparison["a_wrong_b_right"] == sum(b["correct"] and not a["correct"] for a, b in pairs)
        assert comparison["difference"] == round(comparison["accuracy_b"] - comparison["accuracy_a"], 4)
        # by hand, not with compare_records (which the stage calls: it cannot check itself)
        assert comparison == paired_by_hand(baseline, fine_tuned, name, "fine-tuned", cfg.eval.bootstrap, cfg.eval.seed)


def test_accuracy_by_rationale_length_covers_every_row(evaluated):
    root, _, results = evaluated
    with open(root / "metrics/plots/accuracy_by_length.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["rationale_tokens"] for r in table] == ["0-100", "101-200", "201-300", "301+"]
    assert sum(int(r["rows"]) for r in table) == 9
    correct = sum(round(float(r["accuracy"]) * int(r["rows"])) for r in table if r["rows"] != "0")
    assert correct == round(results["fine-tuned"]["accuracy"] * 9)


def test_batched_generation_equals_one_row_at_a_time(evaluated):
    root, cfg, _ = evaluated
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        model, tokenizer = load_adapter_model(cfg), load_tokenizer("models/adapter")
        prompts = student_prompts(eval_rows(cfg), tokenizer)[:4]
        assert generate(model, tokenizer, prompts, 4, 12) == generate(model, tokenizer, prompts, 1, 12)


def test_scores_count_a_parse_failure_as_wrong_and_as_no_label():
    metrics = score([1, 0, 1, 0, 1], [None, None, 1, 0, 0])
    assert metrics["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 1}
    assert metrics["parse_failures"] == 2 and metrics["parse_failure_rate"] == 0.4
    assert metrics["accuracy"] == 0.4  # failures are wrong
    assert metrics["recall"] == round(1 / 3, 4)  # the failure on an entailment row is a miss
    assert metrics["precision"] == 1.0  # the failure on a non-entailment row is no positive prediction
    assert metrics["accuracy_parsed"] == round(2 / 3, 4)
    # class 0: precision 1/2 (tn / predicted 0), recall 1/2 (tn / actual 0); macro = means with class 1's
    assert metrics["macro_precision"] == 0.75 and metrics["macro_recall"] == round((1 / 3 + 1 / 2) / 2, 4)
    assert metrics["macro_f1"] == round((0.5 + 0.5) / 2, 4)


REPLIES = {  # hypothesis -> what the loopback teacher answers
    ROWS[0][1]: '```json\n{"thought_process": "Step 1: music.", "predicted_label": 1}\n```',
    ROWS[1][1]: "They are not asleep, so no entailment: label 0.",
    ROWS[2][1]: {"content": '{"thought_process": "Step 1: a woman reads', "finish_reason": "length"},
    ROWS[3][1]: '{"thought_process": "Step 1: three is a number.", "predicted_label": 1}',
}


def test_teacher_baseline_over_http_parses_accounts_and_caches(workdir, monkeypatch):
    write_split(workdir, ROWS, "test")
    monkeypatch.setenv("MISTRAL_API_KEY", "sk-test")
    hypothesis = lambda body: body["messages"][1]["content"].split("Hypothesis: ")[1]  # noqa: E731
    with LLMServer(lambda body: REPLIES[hypothesis(body)]) as server:
        cfg = load_config(stage_overrides("teacher", server.url, price_input_per_mtok=1.0e6, price_output_per_mtok=0))
        metrics = evaluate_teacher.run(cfg)
        again = evaluate_teacher.run(cfg)
        requests = server.counts["chat"]
    predictions = read_jsonl("metrics/predictions_teacher.jsonl")
    assert [(p["parse_method"], p["parse_error"], p["correct"]) for p in predictions] == [
        ("fenced_json", None, True),
        (None, "no_json", False),
        (None, "truncated", False),
        ("json", None, False),
    ]
    assert predictions[2]["finish_reason"] == "length" and predictions[1]["output"] == REPLIES[ROWS[1][1]]
    assert metrics["accuracy"] == 0.25 and metrics["parse_failures_by_reason"] == {"no_json": 1, "truncated": 1}
    assert metrics["model_id"] == "test-model" and metrics["requests"] == 4 and metrics["prompt_tokens"] > 0
    assert metrics["cost_usd"] == metrics["prompt_tokens"]  # $1 per input token, $0 per output token
    assert requests == 4 and again["cache_hits"] == 4 and again["requests"] == 0 and again["cost_usd"] == 0.0
    assert again["accuracy"] == metrics["accuracy"]


def test_teacher_request_failures_over_the_limit_write_nothing(workdir, monkeypatch):
    write_split(workdir, ROWS, "test")
    monkeypatch.setenv("MISTRAL_API_KEY", "sk-test")
    server = LLMServer()
    server.faults = [{"status": 400}]  # the first request is refused: that row gets no reply
    with server, pytest.raises(StageError, match=r"1 of 4 teacher requests failed \(http_400\)"):
        evaluate_teacher.run(load_config(stage_overrides("teacher", server.url)))
    assert not (workdir / "metrics").exists()


@pytest.mark.parametrize(
    ("engine", "message"),
    [("vllm", "eval.engine='vllm': choose from hf, server; vLLM runs as a server: eval.engine=server"),
     ("jax", "eval.engine='jax': choose from hf, server")],
)  # fmt: skip
@pytest.mark.parametrize("stage", ["evaluate", "evaluate-base"])
def test_engine_selection_fails_clearly_before_loading_anything(workdir, capsys, stage, engine, message):
    assert cli.main([stage, f"eval.engine={engine}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nlistral {stage}: error: {message}") and "Traceback" not in err
    assert not (workdir / "metrics").exists()


# --- eval.engine=server: the stage starts tests/model_server.py (the stand-in for `vllm serve`) -----------------------
SERVE = (f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).with_name('model_server.py')))} {{base}} "
         "--revision {revision} --tokenizer {tokenizer} --port {port}")  # fmt: skip
SERVE_LORA = SERVE + " --enable-lora --lora-modules {name}={adapter} --max-lora-rank {rank}"


@pytest.fixture
def served(evaluated, tmp_path, monkeypatch):
    """A copy of the evaluated repo (models, data, MLflow db, the teacher's predictions) whose params.yaml runs the
    student stages with eval.engine=server; returns (hf results, a function writing params.yaml with settings)."""
    root, cfg, results = evaluated
    for name in ("models", "data"):
        shutil.copytree(root / name, tmp_path / name)
    for path in root.glob("mlflow.db*"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "metrics").mkdir()
    shutil.copy(root / FILES["teacher"][1], tmp_path / FILES["teacher"][1])
    monkeypatch.chdir(tmp_path)

    def configure(**server):
        settings = OmegaConf.merge(cfg, {"llm_cache_dir": str(tmp_path / ".cache"), "eval": {"engine": "server"}})
        fast = {"max_concurrency": 1, "ready_timeout_s": 120, "backoff_base_s": 0.01, "max_retries": 1}
        settings.eval.server.update({"command": SERVE_LORA, "base_command": SERVE, **fast, **server})
        OmegaConf.save(settings, "params.yaml")

    return root, results, configure


def test_served_student_predictions_equal_hf_generation(served, capsys):
    root, results, configure = served
    configure()
    assert cli.main(["evaluate-base"]) == 0 and cli.main(["evaluate"]) == 0
    for model in ("base", "fine-tuned"):
        metrics_path, predictions_path = FILES[model]
        assert read_jsonl(predictions_path) == read_jsonl(root / predictions_path)  # ids, texts, labels, parse methods
        metrics = json.loads(Path(metrics_path).read_text())  # timings are in metrics/speed/
        assert metrics == {k: v for k, v in results[model].items() if k not in SPEED_KEYS}  # comparisons included
    # test rows 6-8 ask what rows 0-2 asked: sent once, the repeats answered from the reply cache
    assert "server: 9 rows from 'adapter': 6 requests, 3 from the cache, 0 without a reply" in capsys.readouterr().out


def test_a_server_that_dies_mid_run_leaves_failed_rows_a_rerun_resumes_and_a_new_adapter_is_asked_anew(
    served, capsys, monkeypatch
):
    root, _, configure = served
    configure()
    monkeypatch.setenv("MODEL_SERVER_DIE_AFTER", "4")
    assert cli.main(["evaluate"]) == 1
    # rows 0-3 answered, then the server exits: rows 4 and 5 fail; 6-8 repeat 0-2's prompts (the reply cache)
    assert "2 of 9 rows got no reply from the server (connection)" in capsys.readouterr().err
    predictions, metrics = read_jsonl(PREDICTIONS_FILE), json.loads(Path("metrics/eval.json").read_text())
    failed = [p for p in predictions if p["parse_error"] == "connection"]
    assert [p["id"] for p in failed] == ["test-4", "test-5"] and all(p["output"] is None for p in failed)
    assert metrics["n"] == 9 and metrics["parse_failures_by_reason"]["connection"] == 2
    assert sum(metrics["confusion"].values()) + metrics["parse_failures"] == 9
    monkeypatch.delenv("MODEL_SERVER_DIE_AFTER")
    monkeypatch.setenv("MODEL_SERVER_REQUESTS_LOG", "requests.log")
    assert cli.main(["evaluate"]) == 0
    assert Path("requests.log").read_text().split() == ["adapter"] * 2  # only the failed rows are asked again
    assert read_jsonl(PREDICTIONS_FILE) == read_jsonl(root / PREDICTIONS_FILE)
    with open("models/adapter/adapter_config.json", "a") as handle:  # another adapter: its content digest differs
        handle.write("\n")
    assert cli.main(["evaluate"]) == 0
    assert Path("requests.log").read_text().split() == ["adapter"] * 8  # all 6 distinct prompts asked again


def spawning(script: str) -> str:
    """A server command that starts a child of its own (as servers start workers), writes both pids to ./pids, then
    runs `script`: both processes must be gone when the stage has exited."""
    code = ("import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(600)']); open('pids', 'w').write('%d %d' % (os.getpid(), child.pid)); " + script)  # fmt: skip
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def assert_server_gone(leader: int, child: int) -> None:
    """No live process is left of the server's group: signalled processes take a moment to exit on a loaded machine,
    so wait for that (the 600 s sleepers of `spawning` would stay for good if nothing had signalled them)."""
    deadline = time.monotonic() + 60
    while _group_alive(leader) or child in _group_alive(os.getpgid(0)):
        assert time.monotonic() < deadline, f"still running: {_group_alive(leader)}, child {child}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("script", "timeout", "message"),
    [("print('loading weights', flush=True); time.sleep(600)", 3,
      r"did not list 'models/base' at http://127\.0\.0\.1:\d+/v1/models within eval\.server\.ready_timeout_s=3"),
     ("print('CUDA out of memory', flush=True); raise SystemExit(3)", 120, "exited with code 3 before serving")],
)  # fmt: skip
def test_a_server_command_that_never_serves_exits_2_with_its_log_and_leaves_no_process(served, capsys, script,
                                                                                       timeout, message):  # fmt: skip
    _, _, configure = served
    configure(base_command=spawning(script), ready_timeout_s=timeout)
    assert cli.main(["evaluate-base"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and ("loading weights" in err or "CUDA out of memory" in err)
    leader, child = map(int, Path("pids").read_text().split())
    assert_server_gone(leader, child)
    assert not Path(FILES["base"][1]).exists()


@pytest.mark.parametrize(("sent", "code", "said"), [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated")])  # fmt: skip
def test_ctrl_c_or_sigterm_while_the_server_loads_stops_it(served, sent, code, said):
    """SIGTERM is what `dvc queue kill`, `docker stop` and schedulers send: without its handler the stage died at once
    and the server (in its own process group) held the GPU on."""
    _, _, configure = served
    configure(base_command=spawning("time.sleep(600)"))
    stage = subprocess.Popen([sys.executable, "-m", "nlistral", "evaluate-base"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (Path("pids").is_file() and len(Path("pids").read_text().split()) == 2):
        assert time.monotonic() < deadline and stage.poll() is None
        time.sleep(0.2)
    stage.send_signal(sent)
    assert stage.wait(120) == code and said in stage.stderr.read()
    leader, child = map(int, Path("pids").read_text().split())
    assert_server_gone(leader, child)


def test_a_hand_run_evaluate_without_a_baseline_prints_why_and_leaves_that_comparison_out(
    evaluated, tmp_path, monkeypatch, capsys
):
    """README: "a hand-run `nlistral evaluate` without one of them prints why and leaves that comparison out" —
    through the CLI, with the teacher's predictions gone: exit 0, the reason printed, eval.json pairs the base only
    (catches a crash on the missing file, a silent skip, or a comparison made up from nothing)."""
    root, cfg, _ = evaluated
    shutil.copytree(root, tmp_path / "repo", ignore=shutil.ignore_patterns("mlflow.db*"))
    shutil.copytree(REPO / "conf", tmp_path / "repo" / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "repo" / "params.yaml")
    monkeypatch.chdir(tmp_path / "repo")
    Path(FILES["teacher"][1]).unlink()
    overrides = ["data.dir=data/unit", "model.load_in_4bit=false", f"eval.max_new_tokens={cfg.eval.max_new_tokens}",
                 "eval.allow_short_max_new_tokens=true",
                 f"model.max_seq_length={cfg.model.max_seq_length}"]  # fmt: skip
    assert cli.main(["evaluate", *overrides]) == 0
    out = capsys.readouterr().out
    assert ("evaluate: no metrics/predictions_teacher.jsonl, so no comparison with the teacher model "
            "(`nlistral evaluate-teacher`)") in out  # fmt: skip
    comparisons = json.loads(Path(FILES["fine-tuned"][0]).read_text())["comparisons"]
    assert list(comparisons) == ["base"]
    fine_tuned = read_jsonl(PREDICTIONS_FILE)
    assert comparisons["base"] == paired_by_hand(read_jsonl(FILES["base"][1]), fine_tuned, "base", "fine-tuned",
                                                 cfg.eval.bootstrap, cfg.eval.seed)  # fmt: skip


# --- what the GPU run's generation needs: a long enough budget, a LoRA rank vLLM takes, its flags -----------------
def test_evaluate_stops_before_generating_when_max_new_tokens_cannot_hold_the_longest_trained_answer(
    built_base, tmp_path, monkeypatch
):
    """eval.max_new_tokens=256 while the study configs train completions of up to ~400 tokens: the longer answers
    came back cut off, recorded as `truncated` parse failures, in both engines. Seen failing: generation ran.
    Checked before any model loads (load_model is never called), exit 2 naming both numbers; label-first formats
    check eval.label_max_new_tokens against their label prefix; the base model (not trained on these answers) and
    eval.allow_short_max_new_tokens (smoke runs) are not held."""
    write_inputs(tmp_path)
    shutil.copytree(built_base, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    write_json("metrics/sft_train.json", {"completion_tokens": {"min": 90, "median": 150, "p95": 290, "max": 300}})
    cfg = make_cfg(**{"eval.max_new_tokens": 256})
    rows, tokenizer = eval_rows(cfg), load_tokenizer()

    def loading():
        raise LookupError("the model loads")

    def generation(task="cot", adapter="models/adapter"):
        return run_generation(cfg, rows, loading, tokenizer, adapter, task)

    with pytest.raises(
        ConfigError,
        match=r"^eval.max_new_tokens=256 is shorter than the longest trained completion "
        r"\(metrics/sft_train.json\): 300 tokens; set eval.max_new_tokens=300",
    ):
        generation()
    cfg.eval.label_max_new_tokens = 2
    with pytest.raises(
        ConfigError,
        match=r"^eval.label_max_new_tokens=2 is shorter than the label prefix "
        r"'\{\"predicted_label\": 1,': \d+ tokens",
    ):
        generation("label_first")
    cfg.eval.max_new_tokens, cfg.eval.label_max_new_tokens = 300, 16
    for task in ("cot", "label_first", "label"):
        with pytest.raises(LookupError):  # past the check
            generation(task)
    cfg.eval.max_new_tokens = 8
    with pytest.raises(LookupError):
        generation(adapter=None)  # the base model
    cfg.eval.allow_short_max_new_tokens = True
    with pytest.raises(LookupError):
        generation()


@pytest.mark.parametrize(("r", "served"), [(1, 1), (2, 8), (4, 8), (8, 8), (12, 16), (24, 32), (32, 32), (100, 128),
                                           (300, 320), (512, 512)])  # fmt: skip
def test_the_adapters_rank_is_served_as_a_rank_vllm_accepts(r, served):
    """vLLM's `--max-lora-rank` takes only MaxLoRARanks (vllm/config/lora.py: 1, 8, 16, 32, 64, 128, 256, 320, 512):
    `{rank}` filled with adapter_config.json's r as is made r = 4, 12 or 24 fail at server start."""
    assert vllm_lora_rank(r) == served


def test_a_rank_above_vllms_largest_is_a_config_error():
    with pytest.raises(ConfigError, match="^train.lora_r=600: vLLM serves LoRA ranks up to 512"):
        vllm_lora_rank(600)


def test_the_rank_set_is_the_pinned_vllms():
    """Where .venv-vllm exists (a CUDA machine: `make vllm-env`), the list is vLLM's own."""
    python = REPO / ".venv-vllm/bin/python"
    if not python.exists():
        pytest.skip("no .venv-vllm (make vllm-env, on a CUDA machine)")
    code = "from typing import get_args; from vllm.config.lora import MaxLoRARanks; print(list(get_args(MaxLoRARanks)))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == list(VLLM_LORA_RANKS)


def test_an_adapter_of_rank_4_is_served(served, capsys):
    """The stand-in refuses a --max-lora-rank vLLM refuses: an r=4 adapter made the stage's server exit at start
    (exit 2). Seen failing before {rank} was rounded up. Its weights are random (peft's B matrices are zero)."""
    from peft import LoraConfig, get_peft_model

    from nlistral.model import load_base_model

    _, _, configure = served
    configure()
    cfg = load_config()
    model = get_peft_model(load_base_model(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    shutil.rmtree("models/adapter/")
    model.save_pretrained("models/adapter")
    load_tokenizer().save_pretrained("models/adapter")
    assert json.loads(Path("models/adapter/adapter_config.json").read_text())["r"] == 4
    assert cli.main(["evaluate"]) == 0, capsys.readouterr().err


def vllm_commands() -> list[tuple[str, str]]:
    """(file, command) for every vLLM command in conf/ and the docs: `vllm serve MODEL ...` and the vllm-openai
    image's arguments, a shell line continued with a backslash read whole, a quoted template up to its quote."""
    found = []
    for path in [*sorted((REPO / "conf").rglob("*.yaml")), REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
        for line in text.splitlines():
            for match in re.finditer(r"(vllm serve|vllm/vllm-openai:\S+) ([^\s<`]\S*)[^'#]*", line):
                docker = "docker run" in line
                found.append((path.relative_to(REPO).as_posix(), match.group(0).strip(), docker and line))
    return found


def test_every_vllm_command_serves_the_pinned_4bit_base_on_loopback_only():
    """conf/eval/default.yaml's template (the one users copy) lacked --revision and --quantization bitsandbytes, and
    vLLM listens on every interface, unauthenticated, unless told `--host`. Every student and base command: the
    pinned revision, config.json (not Mistral's native params.json), 4-bit weights as trained; the student's LoRA
    flags; loopback only: `--host 127.0.0.1`, or in a container `-p 127.0.0.1:...` (there `--host 127.0.0.1`
    would break `-p`). A teacher served with `vllm serve` listens on loopback too. And the stand-in the tests start,
    tests/model_server.py, takes every template's flags."""
    from model_server import argument_parser

    commands = vllm_commands()
    assert {path for path, _, _ in commands} >= {"conf/eval/default.yaml", "docs/evaluation.md", "docs/real-setup.md"}
    for path, command, docker_line in commands:
        where = f"{path}: {command}"
        student = "{base}" in command or docker_line
        if student:
            assert "--revision " in command and "--quantization bitsandbytes" in command, where
            assert "--config-format hf" in command, where
        if "--lora-modules" in command:
            assert "--enable-lora" in command and "--max-lora-rank" in command, where
        if docker_line:
            assert "-p 127.0.0.1:" in docker_line and "--host" not in command, where
        else:
            assert "--host 127.0.0.1" in command, where
        if "{base}" in command:
            fields = {"base": "B", "revision": "R", "tokenizer": "T", "name": "adapter", "adapter": "A", "rank": 8,
                      "port": 1}  # fmt: skip
            argument_parser().parse_args(shlex.split(command.format(**fields))[2:])
