"""base_model -> train -> evaluate on the tiny embedded profile (4-bit QLoRA on CPU), in a temporary repo root."""

import csv
import hashlib
import json

import bitsandbytes as bnb
import mlflow
import pytest
from conftest import REPO
from omegaconf import OmegaConf

from nlistral import prompts
from nlistral.config import compose_params
from nlistral.io import content_digest, read_jsonl, read_metrics, write_json, write_jsonl
from nlistral.model import load_base_model, load_tokenizer
from nlistral.stages import base_model, evaluate, train
from nlistral.trainer import build_trainer

PAIRS = [
    ("A man in a red jacket is walking his dog on the beach.", "A man is outside with an animal.", 1),
    ("Two children are playing football in a park.", "The children are asleep indoors.", 0),
    ("A woman is slicing tomatoes in a small kitchen.", "Someone is preparing food.", 1),
    ("An old car is parked next to a bakery.", "The car is racing on a track.", 0),
    ("Three musicians play guitars on a stage at night.", "People are performing music.", 1),
    ("A cyclist rides up a steep mountain road.", "The cyclist is sitting on a sofa.", 0),
]
EVAL_KEYS = {"n", "accuracy", "precision", "recall", "f1", "parse_failures", "parse_failure_rate", "confusion"}
TRAIN_KEYS = {"train_loss", "eval_loss", "steps", "epochs", "train_rows", "trainable_params", "wall_time_s",
              "rows_over_max_seq_length"}  # fmt: skip


def adapter_run_id(tracking_uri, root) -> str:
    """The one MLflow run tagged with the content digest of root's adapter: the run that trained it."""
    client = mlflow.MlflowClient(tracking_uri)
    digest = content_digest(root / "models/adapter")
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.adapter_sha256 = '{digest}'"
    )
    return run.info.run_id


def make_cfg(**overrides):
    conf = REPO / "conf"
    backends = OmegaConf.create(compose_params(["teacher=mistral"], conf_dir=conf))
    cfg = OmegaConf.create({
        "data": {"name": "unit", "dir": "data/unit"},
        "model": backends.model,  # tiny, with what conf/model/base gives it
        "train": OmegaConf.load(conf / "train" / "default.yaml"),
        "eval": OmegaConf.load(conf / "eval" / "default.yaml"),
        "sft": {"include_reflections": True, "balance_labels": False, "shuffle": True, "seed": 42,
                "drop_too_long": False, "format": "cot", "label_rows": "verified"},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "unit"},
        "teacher": backends.teacher,
        "reflector": backends.reflector,
    })  # fmt: skip
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def ft_row(i, premise, hypothesis, label):
    prompt = prompts.student_prompt(premise, hypothesis)
    thought = f"Step 1: The premise says: {premise} Step 2: The hypothesis says: {hypothesis} Step 3: Done."
    completion = prompts.completion_json(thought, label)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return {"id": str(i), "source": "original", "label": label, "prompt": prompt, "completion": completion,
            "text": prompts.sft_text(prompt, completion), "messages": messages}  # fmt: skip


def write_inputs(root):
    data = root / "data" / "unit"
    data.mkdir(parents=True)
    for split, pairs in (("train", PAIRS * 5), ("test", PAIRS + PAIRS[:3])):
        with open(data / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "premise", "hypothesis", "label"])
            writer.writerows([f"{split}-{i}", *pair] for i, pair in enumerate(pairs))
    rows = [ft_row(i, *pair) for i, pair in enumerate(PAIRS * 5)]  # 30 rows
    write_jsonl(root / "data" / "finetune" / "train_ft.jsonl", rows)
    write_jsonl(root / "data" / "finetune" / "dev_ft.jsonl", rows[:6])
    for split, n in (("train", 30), ("dev", 6)):
        stats = {"rows": n, "rows_by_source": {"original": n}, "dropped": {}}
        write_json(root / "metrics" / f"sft_{split}.json", stats)


# max_seq_length 140 sits inside the rows' range (138-152 tokens), so some rows are over it: kept whole, counted.
FAST = {"train.max_steps": 6, "train.per_device_batch_size": 4, "train.logging_steps": 2, "model.max_seq_length": 140,
        "eval.max_new_tokens": 48, "eval.allow_short_max_new_tokens": True, "eval.batch_size": 4}  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One base build + 6 training steps + evaluation, shared by the tests below; returns (root, results)."""
    root = tmp_path_factory.mktemp("repo")
    write_inputs(root)
    cfg = make_cfg(**FAST)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        results = {"base": base_model.run(cfg), "train": train.run(cfg), "eval": evaluate.run(cfg)}
    return root, cfg, results


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_base_is_deterministic_with_a_mistral_tokenizer(pipeline, tmp_path, monkeypatch):
    root, cfg, results = pipeline
    info = json.loads((root / "models/base/base_model.json").read_text())
    assert info == results["base"]
    assert info["name_or_path"] == "models/base" and info["built_tiny"] is True
    assert 300_000 < info["parameters"] < 2_000_000

    (tmp_path / "data").symlink_to(root / "data")
    monkeypatch.chdir(tmp_path)
    base_model.run(cfg)
    for name in ("model.safetensors", "tokenizer.json"):
        assert digest(tmp_path / "models/base" / name) == digest(root / "models/base" / name)

    tokenizer = load_tokenizer()
    ids = tokenizer("Premise: a dog.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    messages = [{"role": "user", "content": "P"}, {"role": "assistant", "content": "C"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == prompts.sft_text("P", "C")


def test_training_example_has_one_bos_ends_with_eos_and_masks_the_prompt(pipeline, tmp_path, monkeypatch):
    root, cfg, _ = pipeline
    monkeypatch.chdir(root)
    trainer = build_trainer(cfg, tmp_path)
    tokenizer = trainer.processing_class
    row = read_jsonl("data/finetune/train_ft.jsonl")[0]
    example = trainer.train_dataset[0]
    ids, labels = example["input_ids"], example["labels"]

    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    prompt_len = len(tokenizer(prompts.inst_prompt(row["prompt"]))["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:]) == " " + row["completion"] + "</s>"
    assert tokenizer.decode(ids) == prompts.sft_text(row["prompt"], row["completion"])
    # Nothing is cut: rows over model.max_seq_length keep every token.
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    rows = read_jsonl("data/finetune/train_ft.jsonl")
    full = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert lengths == full and max(lengths) > cfg.model.max_seq_length

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert (batch["labels"] != -100).sum().item() == sum(
        sum(label != -100 for label in trainer.train_dataset[i]["labels"]) for i in range(2)
    )


def test_train_writes_adapter_metrics_and_one_mlflow_run(pipeline):
    root, cfg, results = pipeline
    metrics = results["train"]
    assert read_metrics(root / "metrics/train.json") == metrics
    assert "wall_time_s" not in json.loads((root / "metrics/train.json").read_text())  # in metrics/speed/train.json
    assert TRAIN_KEYS <= set(metrics)
    assert metrics["steps"] == 6 and metrics["train_rows"] == 30 and metrics["trainable_params"] > 0
    tokenizer = load_tokenizer(root / "models/base")
    lengths = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"])
               for r in read_jsonl(root / "data/finetune/train_ft.jsonl")]  # fmt: skip
    over = sum(n > cfg.model.max_seq_length for n in lengths)
    assert 0 < over < len(lengths)
    assert metrics["rows_over_max_seq_length"] == over and metrics["max_row_tokens"] == max(lengths)

    adapter = root / "models/adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    run_id = adapter_run_id(f"sqlite:///{root / 'mlflow.db'}", root)

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    assert run.data.params["train.lora_r"] == str(cfg.train.lora_r)
    assert run.data.params["model.load_in_4bit"] == "True"
    assert run.data.params["teacher.model"] == cfg.teacher.model and run.data.params["data.dir"] == "data/unit"
    no_api_settings = {"teacher.backend", "teacher.model", "reflector.backend", "reflector.model"}
    assert {k for k in run.data.params if k.startswith(("teacher", "reflector", "mlflow"))} == no_api_settings
    assert run.data.metrics["sft_train.rows"] == 30 and run.data.metrics["sft_dev.rows_by_source.original"] == 6
    assert run.data.metrics["train_loss"] == metrics["train_loss"]
    assert len(client.get_metric_history(run_id, "loss")) == 3  # logging_steps 2 of 6 steps
    assert run.data.metrics["test_accuracy"] == results["eval"]["accuracy"]  # evaluate logged into the same run
    if calibration := results["eval"]["calibration"]:  # rows with a probability: ECE and its interval too
        assert run.data.metrics["test_ece"] == calibration["ece"]
        assert run.data.metrics["test_ece_ci95_low"] == calibration["ece_ci95"][0]
    assert run.data.metrics["pad_token_share"] == metrics["pad_token_share"] == 0.0  # padding-free by default
    artifacts = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts


def test_evaluate_counts_add_up(pipeline):
    root, _, results = pipeline
    metrics = results["eval"]
    assert read_metrics(root / "metrics/eval.json") == metrics
    assert EVAL_KEYS <= set(metrics)
    n = 9
    confusion = metrics["confusion"]
    assert metrics["n"] == n
    assert sum(confusion.values()) + metrics["parse_failures"] == n
    assert sum(metrics["parse_failures_by_reason"].values()) == metrics["parse_failures"]

    predictions = read_jsonl(root / "metrics/predictions.jsonl")
    assert [p["id"] for p in predictions] == [f"test-{i}" for i in range(n)]
    assert all((p["predicted_label"] is None) == (p["parse_error"] is not None) for p in predictions)
    with open(root / "metrics/confusion.csv", newline="") as handle:
        plot = list(csv.DictReader(handle))
    assert [(r["actual"], r["predicted"]) for r in plot] == [
        (str(p["true_label"]), "unparsed" if p["predicted_label"] is None else str(p["predicted_label"]))
        for p in predictions
    ]


def test_4bit_base_is_quantized_by_bitsandbytes(pipeline, monkeypatch):
    root, cfg, results = pipeline
    monkeypatch.chdir(root)
    quantized = load_base_model(cfg, for_training=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    plain = load_base_model(make_cfg(**{"model.load_in_4bit": False}))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    assert results["train"]["steps"] >= 1  # the pipeline fixture trained this 4-bit model


def test_evaluate_logs_to_a_new_linked_run_when_the_training_run_is_unknown(pipeline, tmp_path, monkeypatch):
    root, cfg, _ = pipeline
    for name in ("data", "models"):
        (tmp_path / name).symlink_to(root / name)
    monkeypatch.chdir(tmp_path)
    evaluate.run(make_cfg(**FAST, **{"eval.limit": 2, "mlflow.tracking_uri": "sqlite:///other.db"}))
    client = mlflow.MlflowClient("sqlite:///other.db")
    [run] = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert run.data.tags["adapter_sha256"] == content_digest(root / "models/adapter")
    assert run.data.metrics["test_n"] == 2


def test_hub_profile_saves_only_the_tokenizer_and_loads_weights_by_name(pipeline, tmp_path, monkeypatch):
    root, _, _ = pipeline
    cfg = make_cfg()
    cfg.model = OmegaConf.create(compose_params(["model=mistral7b"], conf_dir=REPO / "conf")).model
    cfg.model.name_or_path, cfg.model.revision = str(root / "models/base"), None  # a local stand-in for the hub id
    cfg.model.allow_cpu = True  # the 7B profile requires CUDA
    monkeypatch.chdir(tmp_path)
    info = base_model.run(cfg)

    assert info["name_or_path"] == cfg.model.name_or_path and info["built_tiny"] is False
    assert json.loads((tmp_path / "models/base/base_model.json").read_text()) == info
    saved = {p.name for p in (tmp_path / "models/base").iterdir()}
    assert "tokenizer.json" in saved and not any(name.endswith(".safetensors") for name in saved)
    model = load_base_model(cfg)  # nf4 + double quant + bfloat16 compute, as configured for Mistral-7B
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.config.vocab_size == len(load_tokenizer())


def write_gguf(path, tokenizer_dir, hidden=64, heads=4, kv_heads=2, ff=128):
    """A one-layer llama GGUF with random float32 weights and the byte-level BPE of tokenizer_dir, written by the
    `gguf` package as llama.cpp's converters write one, with BOS, EOS and <unk> ids and no `padding_token_id`."""
    import gguf
    import numpy as np

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [token for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    specials = {added["content"]: added["id"] for added in spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    writer.add_token_types([3 if token in specials else 1 for token in tokens])
    writer.add_bos_token_id(specials["<s>"])
    writer.add_eos_token_id(specials["</s>"])
    writer.add_unk_token_id(specials["<unk>"])
    writer.add_chat_template(base_model.MISTRAL_TEMPLATE)
    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd": (len(tokens), hidden), "output": (len(tokens), hidden), "blk.0.attn_q": (hidden, hidden),
              "blk.0.attn_k": (kv, hidden), "blk.0.attn_v": (kv, hidden), "blk.0.attn_output": (hidden, hidden),
              "blk.0.ffn_gate": (ff, hidden), "blk.0.ffn_up": (ff, hidden), "blk.0.ffn_down": (hidden, ff)}  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        writer.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_base_without_a_pad_token_gets_one_and_generates_in_batches(built_base, tmp_path, monkeypatch):
    """transformers leaves the tokenizer's pad token None when the GGUF has no `padding_token_id`
    (transformers/integrations/gguf/gguf_tokenizer_mapping.py reads the special ids the file states), and base_model's
    GGUF branch never set one (the hub branch did): batched generation then failed at the first padded batch.
    SmolLM2's GGUF has a pad id, which hid it. Seen failing: models/base's tokenizer had no pad token (and
    `tokenizer(..., padding=True)` raises without one)."""
    from nlistral.evaluation import generate

    source = tmp_path / "gguf"
    source.mkdir()
    write_gguf(source / "tiny.gguf", built_base)
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(**{"model.build_tiny": False, "model.name_or_path": str(source), "model.gguf_file": "tiny.gguf",
                      "model.load_in_4bit": False})  # fmt: skip
    base_model.run(cfg)
    tokenizer = load_tokenizer()
    assert tokenizer.pad_token == "<unk>" != tokenizer.eos_token  # as the hub branch picks it
    outputs = generate(load_base_model(cfg), tokenizer, ["A dog.", "A man walks his dog on a long beach."], 2, 3)
    assert [g.output_tokens for g in outputs] == [3, 3]
