"""sft.format end to end on the tiny model: each format's rows train an adapter whose evaluation asks the format's task,
parses its labels and counts its output tokens; generation stops at the label when the label comes first."""

import json
import shutil
from pathlib import Path

import pytest
from test_model_stages import FAST, PAIRS, make_cfg, write_inputs

from nlistral.io import read_jsonl, read_metrics, write_jsonl
from nlistral.prompts import student_prompt
from nlistral.stages import base_model, evaluate, train
from nlistral.stages.sft import in_format

FORMATS = ("cot", "label_first", "label_only", "multitask")
TASKS = {
    "cot": ("cot",),
    "label_first": ("label_first",),
    "label_only": ("label",),
    "multitask": ("label", "rationale"),
}
LABEL_TOKENS = 12  # `{"predicted_label": 1,` and its stop: a handful of tokens in any tokenizer
# Enough steps for the tiny model to learn each format's shape: every output parses.
TRAINED = {**FAST, "train.max_steps": 100, "train.learning_rate": 5.0e-3, "model.load_in_4bit": False,
           "model.max_seq_length": 256, "eval.max_new_tokens": 96, "eval.batch_size": 9}  # fmt: skip


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The tiny base built once; per format, its fine-tuning rows written from the same cot rows, trained, evaluated.
    -> {format: (root, the train rows, eval metrics, predictions)}"""
    built = tmp_path_factory.mktemp("base")
    write_inputs(built)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(built)
        base_model.run(make_cfg(**TRAINED))
    results = {}
    for name in FORMATS:
        root = tmp_path_factory.mktemp(name)
        write_inputs(root)
        shutil.copytree(built / "models" / "base", root / "models" / "base")
        for split in ("train", "dev"):
            path = root / "data" / "finetune" / f"{split}_ft.jsonl"
            cot = [row | {"task": "cot", "teacher_model": None, "reflector_model": None} for row in read_jsonl(path)]
            cot = [row | {"premise": p, "hypothesis": h} for row, (p, h, _) in zip(cot, PAIRS * 5, strict=False)]
            write_jsonl(path, in_format(cot, TASKS[name]))
        cfg = make_cfg(**TRAINED, **{"sft.format": name})
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            train.run(cfg)
            metrics = evaluate.run(cfg)
        results[name] = (root, read_jsonl(root / "data/finetune/train_ft.jsonl"), metrics,
                         read_jsonl(root / "metrics/predictions.jsonl"))  # fmt: skip
    return results


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_and_its_evaluation_reads_the_labels(formats, name):
    root, rows, metrics, predictions = formats[name]
    assert {r["task"] for r in rows} == set(TASKS[name]) and len(rows) == 30 * len(TASKS[name])
    assert read_metrics(root / "metrics/eval.json") == metrics
    assert metrics["task"] == {"cot": "cot", "label_first": "label_first"}.get(name, "label")
    assert metrics["n"] == 9 and metrics["parse_failures"] == 0, [p["output"] for p in predictions]
    assert all(p["predicted_label"] in (0, 1) and p["correct"] == (p["predicted_label"] == p["true_label"])
               for p in predictions)  # fmt: skip
    assert metrics["accuracy"] == round(sum(p["correct"] for p in predictions) / 9, 4)
    assert metrics["output_tokens_per_row"] == round(sum(p["output_tokens"] for p in predictions) / 9, 2)


def test_generation_stops_at_the_label_when_it_comes_first(formats):
    tokens = {name: [p["output_tokens"] for p in formats[name][3]] for name in FORMATS}
    for name in ("label_first", "label_only", "multitask"):
        assert max(tokens[name]) <= LABEL_TOKENS, (name, tokens[name])
        assert all(p["output"].lstrip().startswith('{"predicted_label"') for p in formats[name][3])
    assert min(tokens["cot"]) > 3 * LABEL_TOKENS  # cot writes its rationale before the label
    label_first = formats["label_first"][3]
    assert {p["parse_method"] for p in label_first} == {"label_prefix"} and '"thought_process"' not in str(
        [p["output"] for p in label_first]
    )


def test_the_server_engine_asks_a_label_first_task_to_stop_at_the_label(workdir):
    """eval.engine=server: a label-first task's requests carry `stop` and eval.label_max_new_tokens; cot's do not."""
    from llm_server import LLMServer

    from nlistral.config import load_config
    from nlistral.evaluation import Generation, server_backend
    from nlistral.llm.engine import Accept, Task, generate

    cfg = load_config(["eval.label_max_new_tokens=7"])
    rows = [("A man cooks.", "A person cooks."), ("A cat naps.", "A dog barks.")]
    with LLMServer(reply=lambda body: {"content": '{"predicted_label": 1', "finish_reason": "stop"}) as server:
        for task in ("cot", "label"):
            backend = server_backend(cfg, "test-model", f"student {task}", task)
            backend.base_url = server.url
            replies = []

            def keep(reply, replies=replies):
                replies.append(reply)
                return Accept({})

            tasks = [Task(str(i), [{"role": "user", "content": student_prompt(p, h, task)}], keep, 0)
                     for i, (p, h) in enumerate(rows)]  # fmt: skip
            generate(backend, tasks, desc=task, cache_dir=str(workdir / ".cache"))
            answers = [Generation(r.text, r.finish_reason, r.completion_tokens).answer(task) for r in replies]
            if task == "label":
                assert [(a.label, a.method) for a in answers] == [(1, "label_prefix")] * 2
    asked = [(body.get("stop"), body["max_tokens"]) for body in server.chat_bodies]
    assert asked == [(None, 256)] * 2 + [([",", "}"], 7)] * 2


def evaluate_copy(formats, name, tmp_path, monkeypatch, **eval_settings) -> dict:
    """`nlistral evaluate` of format `name`'s adapter in a copy of its repo with `eval_settings` (the server engine:
    tests/model_server.py, started by the stage) -> metrics/eval.json, with exit code 0 asserted."""
    from omegaconf import OmegaConf
    from test_evaluate import SERVE, SERVE_LORA

    from nlistral import cli

    root = formats[name][0]
    for folder in ("models", "data"):
        shutil.copytree(root / folder, tmp_path / folder)
    for path in root.glob("mlflow.db*"):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.chdir(tmp_path)
    settings = OmegaConf.merge(make_cfg(**TRAINED, **{"sft.format": name}),
                               {"llm_cache_dir": str(tmp_path / ".cache"), "eval": eval_settings})  # fmt: skip
    settings.eval.server.update({"command": SERVE_LORA, "base_command": SERVE, "max_concurrency": 1,
                                 "ready_timeout_s": 120, "backoff_base_s": 0.01, "max_retries": 1})  # fmt: skip
    OmegaConf.save(settings, "params.yaml")
    assert cli.main(["evaluate"]) == 0
    return json.loads(Path("metrics/eval.json").read_text())


def without_p(records) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "p_entailment"} for r in records]


def p_of(records) -> list[float]:
    return [r["p_entailment"] for r in records]


def test_served_label_first_predictions_equal_hf_generation(formats, tmp_path, monkeypatch):
    """eval.engine=server on the label_first adapter: the model server stops at the label as the hf engine does, and
    its `top_logprobs` give the label's probability the hf engine read off generate's scores."""
    _, _, metrics, predictions = formats["label_first"]
    served = evaluate_copy(formats, "label_first", tmp_path, monkeypatch, engine="server")
    records = read_jsonl("metrics/predictions.jsonl")
    assert without_p(records) == without_p(predictions)  # texts, tokens, labels, parse methods
    assert p_of(records) == pytest.approx(p_of(predictions), abs=1e-3) and None not in p_of(records)  # top 20
    assert served["output_tokens_per_row"] == metrics["output_tokens_per_row"] <= LABEL_TOKENS
    assert served["calibration"]["n"] == metrics["calibration"]["n"] == 9


@pytest.mark.parametrize("name", ["label_first", "label_only", "multitask"])
def test_likelihood_scoring_gives_greedy_generations_labels_from_one_forward_pass(formats, tmp_path, monkeypatch, name):
    """eval.scoring=likelihood (hf): on every row whose greedy output starts with the scored prefix (all of them, for
    these trained adapters) the label is greedy generation's, and its probability the one generation read at the
    label's step; no token is generated. Seen failing for all three formats when the scored prefix lacked its last
    token (the label read off another context)."""
    _, _, generated, predictions = formats[name]
    scored = evaluate_copy(formats, name, tmp_path, monkeypatch, scoring="likelihood")
    records = read_jsonl("metrics/predictions.jsonl")
    prefix = records[0]["output"][: records[0]["output"].index(":") + 1]
    matched = [i for i, p in enumerate(predictions) if p["output"].startswith(prefix)]
    assert len(matched) == len(predictions) == 9
    assert [records[i]["predicted_label"] for i in matched] == [predictions[i]["predicted_label"] for i in matched]
    assert p_of(records) == pytest.approx(p_of(predictions), abs=1e-4)
    assert scored["scoring"] == "likelihood" and scored["output_tokens_per_row"] == 0
    assert scored["accuracy"] == generated["accuracy"] and scored["calibration"]["n"] == 9


def test_served_likelihood_scoring_equals_the_hf_engines(formats, tmp_path, monkeypatch):
    """eval.scoring=likelihood on a server: a greedy request that stops at the label, its label step's
    `top_logprobs`; the labels and probabilities of the hf engine's forward pass."""
    _, _, _, predictions = formats["label_only"]
    served = evaluate_copy(formats, "label_only", tmp_path, monkeypatch, engine="server", scoring="likelihood")
    records = read_jsonl("metrics/predictions.jsonl")
    assert [r["predicted_label"] for r in records] == [p["predicted_label"] for p in predictions]
    # the server's probability lacks the other digit when it falls below its top 20 (then 0 or 1): ~1e-4 here
    assert p_of(records) == pytest.approx(p_of(predictions), abs=1e-3)
    assert served["scoring"] == "likelihood"


def test_likelihood_scoring_of_a_cot_answer_is_a_config_error(formats, tmp_path, monkeypatch, capsys):
    from nlistral import cli

    with pytest.raises(AssertionError):
        evaluate_copy(formats, "cot", tmp_path, monkeypatch, scoring="likelihood")
    assert cli.main(["evaluate"]) == 2
    assert "eval.scoring=likelihood needs an answer that starts with the label" in capsys.readouterr().err
    assert not Path("metrics/eval.json").exists()
