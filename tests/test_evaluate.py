"""The three evaluate stages on the tiny model (in-process), the teacher baseline over real HTTP, engine selection."""

import csv
import json
import sys
from collections import Counter

import pytest
from conftest import REPO
from llm_server import ROWS, LLMServer, stage_overrides, write_split
from omegaconf import OmegaConf
from test_model_stages import FAST, make_cfg, write_inputs

from nlistral import cli
from nlistral.compare import compare_records
from nlistral.config import compose_params, load_config
from nlistral.evaluation import generate, student_prompts
from nlistral.io import read_jsonl
from nlistral.model import load_adapter_model, load_tokenizer
from nlistral.scoring import eval_rows, score
from nlistral.stages import StageError, base_model, evaluate, evaluate_base, evaluate_teacher, train

METRIC_KEYS = {"model", "model_id", "n", "accuracy", "accuracy_ci95", "precision", "recall", "f1", "macro_precision",
               "macro_recall", "macro_f1", "parse_failures", "parse_failure_rate", "parse_failures_by_reason",
               "accuracy_parsed", "confusion", "samples_per_s", "output_tokens_per_s", "wall_time_s"}  # fmt: skip
PREDICTION_KEYS = {"id", "premise", "hypothesis", "true_label", "predicted_label", "correct", "parse_method",
                   "parse_error", "finish_reason", "output_tokens", "output"}  # fmt: skip
COMPARISON_KEYS = {"a", "b", "n", "accuracy_a", "accuracy_b", "difference", "difference_ci95", "mcnemar_p",
                   "a_right_b_wrong", "a_wrong_b_right"}  # fmt: skip
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
        metrics = json.loads((root / metrics_path).read_text())
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
        expected = compare_records(baseline, fine_tuned, name, "fine-tuned", cfg.eval.bootstrap, cfg.eval.seed)
        assert comparison == {k: v for k, v in expected.items() if k != "flipped"}


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
    [("vllm", "eval.engine=vllm needs vLLM, which is not installed: `pip install vllm`"),
     ("jax", "eval.engine='jax': choose from hf, vllm")],
)  # fmt: skip
@pytest.mark.parametrize("stage", ["evaluate", "evaluate-base"])
def test_engine_selection_fails_clearly_before_loading_anything(workdir, monkeypatch, capsys, stage, engine, message):
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM absent, as on every CPU install
    assert cli.main([stage, f"eval.engine={engine}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nlistral {stage}: error: {message}") and "Traceback" not in err
    assert not (workdir / "metrics").exists()
