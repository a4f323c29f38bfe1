"""Stage 0 (datasets only): read one split of an NLI dataset with `datasets`, write `{data.dir}/{split}.csv`.

`data.dataset` says what to read: a hub id (or a folder of data files, or a `save_to_disk` folder), its config and
revision, which of its splits is our train/dev/test, its text and label columns, and a label map (class name or
value -> 0/1). Rows are dropped, and counted by reason in metrics/prepare_{split}.json:
- `unlabelled`: no gold label (-1, empty or "-", as SNLI/MultiNLI mark pairs the annotators disagreed on);
- `empty_text`: an empty or whitespace-only premise or hypothesis (the CSV contract rejects them);
- `sampled_out`: beyond `sample_size[split]` rows, drawn at random with `seed` (kept in source order).
A label outside the map is an error, never a guess. ids are the row's index in the source split unless `columns.id`
names an id column. The CSV is checked with the same contract every stage reads it with before it replaces the old.
"""

import csv
import io
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

from nlistral import paths
from nlistral.data import DataError, load_split
from nlistral.errors import ConfigError
from nlistral.io import write_json

UNLABELLED = (-1, "-1", None, "", "-")


def load_source(ds_cfg, source_split: str, key="data.dataset"):
    """The source split as a `datasets.Dataset`; ConfigError if it cannot be read."""
    import datasets

    path = str(ds_cfg.path)
    try:
        if (Path(path) / "dataset_dict.json").is_file():  # written by DatasetDict.save_to_disk
            saved = datasets.load_from_disk(path)
            if source_split not in saved:
                raise ValueError(f"no split {source_split!r} (has: {', '.join(saved)})")
            return saved[source_split]
        return datasets.load_dataset(path, ds_cfg.config, split=source_split, revision=ds_cfg.revision)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{key}: cannot read split {source_split!r} of {path!r}: {err}") from None


def label_names(dataset, column: str) -> list:
    """The label column's values, as class names where it is a ClassLabel (-1 stays -1: no gold label)."""
    import datasets

    feature = dataset.features[column]
    values = dataset[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else v for v in values]
    return values


def rows_of(dataset, ds_cfg, where: str, tags=(), key="data.dataset") -> tuple[list[dict], Counter, Counter]:
    """Mapped rows, the reasons rows were dropped, and the source label counts. `tags`: source columns kept as
    strings (a test set's tag columns, e.g. HANS's heuristic); `key`: the config key errors name."""
    cols = ds_cfg.columns
    wanted = {name: cols[name] for name in ("id", "premise", "hypothesis", "label") if cols.get(name)}
    missing = [column for column in [*wanted.values(), *tags] if column not in dataset.column_names]
    if missing:
        raise ConfigError(f"{key}.columns: {where} has no column {missing[0]!r} "
                          f"(has: {', '.join(dataset.column_names)})")  # fmt: skip
    label_map = {str(name): int(value) for name, value in ds_cfg.labels.items()}
    if set(label_map.values()) - {0, 1}:
        raise ConfigError(f"{key}.labels: map every class to 1 (entailment) or 0 (not entailment)")
    labels = label_names(dataset, wanted["label"])
    ids = dataset[wanted["id"]] if "id" in wanted else range(len(dataset))
    tag_values = {tag: label_names(dataset, tag) for tag in tags}
    rows, dropped, source_labels = [], Counter(), Counter()
    for index, (row_id, premise, hypothesis, label) in enumerate(
        zip(ids, dataset[wanted["premise"]], dataset[wanted["hypothesis"]], labels, strict=True)
    ):
        if label in UNLABELLED:
            dropped["unlabelled"] += 1
            continue
        if str(label) not in label_map:
            raise DataError(where, f"row {index}: label {label!r} is not in {key}.labels "
                                   f"({', '.join(label_map)})", column=wanted["label"])  # fmt: skip
        if not (premise or "").strip() or not (hypothesis or "").strip():
            dropped["empty_text"] += 1
            continue
        source_labels[str(label)] += 1
        rows.append({"id": str(row_id), "premise": premise, "hypothesis": hypothesis, "label": label_map[str(label)],
                     **{tag: str(values[index]) for tag, values in tag_values.items()}})  # fmt: skip
    return rows, dropped, source_labels


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["id", "premise", "hypothesis", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_checked(data_dir: Path, split: str, text: str) -> None:
    """Write `{data_dir}/{split}.csv` only if the CSV contract accepts it (errors name the source split)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".prepare-") as staging:
        (Path(staging) / f"{split}.csv").write_text(text, encoding="utf-8")
        load_split(staging, split)
        os.replace(Path(staging) / f"{split}.csv", data_dir / f"{split}.csv")


def run(cfg, split: str) -> dict:
    ds_cfg = cfg.data.get("dataset")
    if not ds_cfg or split not in cfg.data.get("prepare", []):
        raise ConfigError(f"data={cfg.data.name} reads the CSV folder {cfg.data.dir}: there is nothing to prepare "
                          "(choose a dataset config such as data=snli)")  # fmt: skip
    source_split = str(ds_cfg.splits[split])
    dataset = load_source(ds_cfg, source_split)
    rows, dropped, source_labels = rows_of(dataset, ds_cfg, f"{ds_cfg.path}[{source_split}]")
    if not rows:
        raise DataError(f"{ds_cfg.path}[{source_split}]", f"no labelled rows left (dropped: {dict(dropped)})")
    size = ds_cfg.sample_size.get(split)
    if size is not None and size < len(rows):
        keep = sorted(random.Random(ds_cfg.seed).sample(range(len(rows)), size))
        dropped["sampled_out"] = len(rows) - size
        rows = [rows[i] for i in keep]
    write_checked(Path(cfg.data.dir), split, csv_text(rows))
    metrics = {
        "source": str(ds_cfg.path),
        "config": ds_cfg.config,
        "revision": ds_cfg.revision,
        "source_split": source_split,
        "rows_read": len(dataset),
        "rows": len(rows),
        "dropped": dict(dropped),
        "label_counts": {str(label): sum(r["label"] == label for r in rows) for label in (0, 1)},
        "source_labels": dict(source_labels),  # before sampling
    }
    write_json(paths.PREPARE_METRICS.format(split=split), metrics)
    return metrics
