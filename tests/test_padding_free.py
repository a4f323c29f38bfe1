"""Padding-free training (train.padding_free) is the padded training, minus the pads: a batch's rows concatenated into
one row with their own position_ids give the same per-row losses and the same gradient as the padded batch, for sdpa
and eager, because transformers' masking_utils turns the position_ids into a block-diagonal mask (no row sees
another). The negative control drops the position_ids: the rows then attend to the rows before them (TRL #3910) and
the losses change, which is the failure this test exists for (seen: the same assertions fail without position_ids).

The same check runs on SmolLM2-135M in tests/test_real_model.py (assert_padding_free_matches_padded).
"""

import itertools

import mlflow
import pytest
import torch
from test_model_stages import FAST, make_cfg, write_inputs
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from nlistral.errors import ConfigError
from nlistral.io import read_metrics
from nlistral.stages import base_model, train
from nlistral.trainer import build_trainer, use_padding_free

FP32 = {**FAST, "model.load_in_4bit": False, "train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2}


def collated(trainer, rows):
    pad = trainer.processing_class.pad_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(rows)
    free = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(rows)
    return padded, free


def padded_row_losses(model, batch) -> list[torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return [torch.nn.functional.cross_entropy(logits[i, :-1], batch["labels"][i, 1:]) for i in range(len(logits))]


def free_row_losses(model, batch) -> list[torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, labels = model(**inputs).logits[0], batch["labels"][0]
    bounds = batch["cu_seq_lens_q"].tolist()
    loss = torch.nn.functional.cross_entropy
    return [loss(logits[a : b - 1], labels[a + 1 : b]) for a, b in itertools.pairwise(bounds)]


def gradient(trainer, batch) -> dict[str, torch.Tensor]:
    """The LoRA gradient of TRL's own loss (SFTTrainer.compute_loss: the fused LM head) on `batch`."""
    model = trainer.model
    model.zero_grad()
    trainer.compute_loss(model, dict(batch)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_padding_free_matches_padded(trainer, indexes, attention: str) -> None:
    """Per-row losses and one step's gradient, padded vs padding-free, on the trainer's rows `indexes` (of different
    lengths); without position_ids (rows attending to the rows before them) the same comparison fails."""
    trainer.model.base_model.model.set_attn_implementation(attention)
    trainer.model.eval()  # LoRA dropout off: the same function in both layouts
    rows = [trainer.train_dataset[i] for i in indexes]
    assert len({len(row["input_ids"]) for row in rows}) > 1  # the padded batch has pads
    padded, free = collated(trainer, rows)
    assert "attention_mask" not in free and free["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    with torch.no_grad():
        expected = padded_row_losses(trainer.model, padded)
        torch.testing.assert_close(free_row_losses(trainer.model, free), expected, rtol=1e-4, atol=1e-5)
        mixed = free_row_losses(trainer.model, {k: v for k, v in free.items() if k != "position_ids"})
    assert mixed[0] == pytest.approx(expected[0].item(), rel=1e-4)  # the first row has no row before it
    with pytest.raises(AssertionError, match="not close"):
        torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-5)
    padded_grad, free_grad = gradient(trainer, padded), gradient(trainer, free)
    assert padded_grad.keys() == free_grad.keys() and padded_grad
    torch.testing.assert_close(free_grad, padded_grad, rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("padding_free")
    write_inputs(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        base_model.run(make_cfg(**FP32))
    return root


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_losses_and_gradient_equal_the_padded_batch(root, monkeypatch, attention):
    monkeypatch.chdir(root)
    trainer = build_trainer(make_cfg(**FP32), root / "scratch")
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    indexes = [lengths.index(n) for n in sorted(set(lengths))][:4]
    assert_padding_free_matches_padded(trainer, indexes, attention)


def test_auto_trains_padding_free_with_no_pads_and_the_padded_run_reports_its_share(root, monkeypatch):
    """metrics/train.json and MLflow: the default (auto, sdpa) processes no pad; padding_free=false pads every batch
    to its longest row and says how much of what it processed was padding."""
    monkeypatch.chdir(root)
    runs = {}
    for setting in ("auto", False):
        runs[setting] = train.run(make_cfg(**FP32, **{"train.padding_free": setting}))
        assert read_metrics("metrics/train.json") == runs[setting]
    free, padded = runs["auto"], runs[False]
    assert free["padding_free"] is True and padded["padding_free"] is False
    assert free["tokens_processed"] == padded["tokens_processed"] > 0  # the same seed: the same rows in each batch
    assert free["positions_processed"] == free["tokens_processed"] and free["pad_token_share"] == 0.0
    assert padded["positions_processed"] > padded["tokens_processed"]
    assert padded["pad_token_share"] == round(1 - padded["tokens_processed"] / padded["positions_processed"], 4)
    client = mlflow.MlflowClient("sqlite:///mlflow.db")
    logged = client.search_runs([client.get_experiment_by_name("unit").experiment_id], order_by=["start_time ASC"])
    assert [run.data.metrics["pad_token_share"] for run in logged[-2:]] == [0.0, padded["pad_token_share"]]


def test_padding_free_true_on_an_attention_that_mixes_rows_is_a_config_error(root, monkeypatch):
    monkeypatch.chdir(root)
    trainer = build_trainer(make_cfg(**FP32), root / "scratch")
    config = trainer.model.config
    config._attn_implementation = "kernels-community/unknown"  # an implementation we have not proved
    assert use_padding_free("auto", trainer.model) is False
    with pytest.raises(ConfigError, match="train.padding_free=true"):
        use_padding_free(True, trainer.model)
