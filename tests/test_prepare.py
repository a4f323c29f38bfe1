"""The prepare stage reads a dataset with `datasets` exactly as it would from the hub (the same call with a hub id)
and writes CSVs every later stage accepts: labels mapped, unlabelled rows dropped and counted, seeded samples."""

import json

import datasets
import pytest

from nlistral import cli
from nlistral.config import load_config
from nlistral.data import DataError, load_split
from nlistral.errors import ConfigError
from nlistral.stages import prepare

LABELS = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
FEATURES = datasets.Features(
    {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"), "label": LABELS}
)


def snli_like(n: int, offset: int = 0) -> dict:
    """n rows cycling through the three classes, every fifth without a gold label (-1) as SNLI marks them."""
    return {
        "premise": [f"Premise {offset + i}." for i in range(n)],
        "hypothesis": [f"Hypothesis {offset + i}." for i in range(n)],
        "label": [-1 if i % 5 == 4 else i % 3 for i in range(n)],
    }


@pytest.fixture
def on_disk(workdir, monkeypatch):
    """A DatasetDict saved with save_to_disk (SNLI's columns and ClassLabel), and its config overrides."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(workdir / ".cache" / "datasets"))
    train = snli_like(40)
    train["hypothesis"][0] = "   "  # empty text: dropped, not an error
    splits = {"train": train, "validation": snli_like(10, 100), "test": snli_like(10, 200)}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(rows, features=FEATURES) for name, rows in splits.items()}
    ).save_to_disk(workdir / "snli_like")
    return ["data=snli", f"data.dataset.path={workdir / 'snli_like'}", "data.dir=data/prepared/test"]


def test_splits_are_mapped_to_binary_labels_with_unlabelled_rows_dropped_and_counted(on_disk, workdir):
    cfg = load_config(on_disk)
    metrics = {split: prepare.run(cfg, split) for split in ("train", "dev", "test")}
    train = load_split("data/prepared/test", "train")
    # 40 rows: 8 unlabelled (every fifth), 1 empty hypothesis; ids are the rows' indices in the source split
    assert len(train) == 31 and "0" not in set(train.id) and "4" not in set(train.id)
    assert metrics["train"]["dropped"] == {"unlabelled": 8, "empty_text": 1}
    assert metrics["train"]["rows_read"] == 40 and metrics["train"]["rows"] == 31
    source = snli_like(40)
    for row in train.itertuples():
        assert row.label == int(source["label"][int(row.id)] == 0)  # entailment -> 1; neutral, contradiction -> 0
        assert row.premise == source["premise"][int(row.id)]
    assert metrics["train"]["label_counts"] == {"0": sum(train.label == 0), "1": sum(train.label == 1)}
    assert metrics["dev"]["source_split"] == "validation" and metrics["dev"]["rows"] == 8
    assert len(load_split("data/prepared/test", "test")) == 8
    assert json.loads((workdir / "metrics/prepare_train.json").read_text()) == metrics["train"]


def test_a_seeded_sample_is_the_same_rows_every_time_and_differs_by_seed(on_disk):
    sampled = on_disk + ["data.dataset.sample_size.train=10"]
    first = prepare.run(load_config(sampled), "train")
    ids = list(load_split("data/prepared/test", "train").id)
    prepare.run(load_config(sampled), "train")
    assert list(load_split("data/prepared/test", "train").id) == ids
    assert first["rows"] == 10 and first["dropped"]["sampled_out"] == 21
    assert ids == sorted(ids, key=int)  # kept in source order
    prepare.run(load_config([*sampled, "data.dataset.seed=7"]), "train")
    assert list(load_split("data/prepared/test", "train").id) != ids


def test_a_label_outside_the_map_is_an_error_and_nothing_is_written(on_disk, workdir):
    cfg = load_config([*on_disk, "~data.dataset.labels.neutral"])
    with pytest.raises(DataError, match=r"row 1: label 'neutral' is not in data.dataset.labels"):
        prepare.run(cfg, "train")
    assert not (workdir / "data/prepared/test/train.csv").exists()


def test_a_csv_folder_has_nothing_to_prepare_and_a_missing_split_is_named(on_disk, capsys):
    assert cli.main(["prepare", "--split", "train"]) == 2  # params.yaml: data=sample
    assert "data=sample reads the CSV folder data/sample: there is nothing to prepare" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"cannot read split 'valid' .*no split 'valid' \(has: train, validation"):
        prepare.run(load_config([*on_disk, "data.dataset.splits.dev=valid"]), "dev")


def test_the_hub_path_is_the_same_call_and_fails_clearly_offline(workdir, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(workdir / ".cache" / "datasets"))  # HF_HUB_OFFLINE=1 (conftest)
    assert cli.main(["prepare", "--split", "dev", "data=snli"]) == 2
    err = capsys.readouterr().err
    assert "cannot read split 'validation' of 'stanfordnlp/snli'" in err and "Traceback" not in err


def test_esnli_three_way_labels_map_to_its_binary_labels(shared_data, workdir, monkeypatch):
    """Real SNLI text from a local data-files dataset (dev.csv/test.csv): label3 mapped must equal its `label`."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(workdir / ".cache" / "datasets"))
    cfg = load_config([
        "data=snli", f"data.dataset.path={shared_data / 'esnli'}", "data.dir=data/prepared/esnli",
        "data.dataset.splits.dev=validation", "data.dataset.columns.label=label3", "data.dataset.columns.id=id",
    ])  # fmt: skip
    metrics = {split: prepare.run(cfg, split) for split in ("dev", "test")}
    for split, rows in (("dev", 9842), ("test", 9824)):
        prepared = load_split("data/prepared/esnli", split)
        original = load_split(shared_data / "esnli", split)
        assert len(prepared) == rows and metrics[split]["dropped"] == {}
        assert prepared.equals(original)  # same ids, text and binary labels
    assert set(metrics["dev"]["source_labels"]) == {"entailment", "neutral", "contradiction"}
