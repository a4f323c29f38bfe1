"""Output tokens per row, samples/s and calibration of evaluation for sft.format cot vs label_first vs label_only, and
label_only by label scoring (eval.scoring=likelihood) against its generation, on the tiny model.

Run from the repo root with the venv active:
    python bench/formats.py [--rows 128] [--epochs 10] [--learning-rate 5.0e-3] [--out FILE.json]
In a temporary copy of conf/, params.yaml and data/sample (cut to --rows training rows) it runs the embedded
pipeline's stages in this process: thoughts and reflections (offline teacher), the tiny base once, then per format
sft, train and evaluate (label_only evaluated twice: generation, then label scoring on the same adapter and rows),
and prints each run's eval.json figures side by side: output_tokens_per_row, samples_per_s (generation or scoring
only), accuracy, parse failures, ECE with its interval, Brier, AUROC, the training's pad_token_share, and for label
scoring the share of rows whose label equals generation's. A label-first format stops generating at the label.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from nlistral import cli
from nlistral.io import read_jsonl, read_metrics
from nlistral.paths import EVAL_METRICS, PREDICTIONS, TRAIN_METRICS

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("cot", "label_first", "label_only")
TRAIN_FIGURES = ("padding_free", "pad_token_share", "tokens_processed", "positions_processed", "tokens_per_second")


def stage(*argv) -> None:
    if cli.main(list(argv)) != 0:
        raise SystemExit(f"nlistral {' '.join(argv)} failed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="training rows of data/sample")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", default="5.0e-3", help="the tiny model learns each format's shape")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    out = args.out.resolve() if args.out else None  # the runs below chdir into a temporary copy
    results, padded = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "conf", root / "conf")
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        shutil.copytree(REPO / "data" / "sample", root / "data" / "sample")
        train_csv = root / "data" / "sample" / "train.csv"
        train_csv.write_text("".join(train_csv.read_text().splitlines(keepends=True)[: args.rows + 1]))
        os.chdir(root)
        os.environ["NLISTRAL_CACHE_DIR"] = str(root / ".cache")
        for split in ("train", "dev"):
            stage("thoughts", "--split", split)
            stage("reflections", "--split", split)
        stage("base-model")
        for name in FORMATS:
            overrides = [
                f"sft.format={name}",
                f"train.num_epochs={args.epochs}",
                f"train.learning_rate={args.learning_rate}",
            ]
            for split in ("train", "dev"):
                stage("sft", "--split", split, *overrides)
            if name == "cot":  # the same training with padded batches first, for its pad share and speed
                stage("train", *overrides, "train.padding_free=false")
                padded = {k: read_metrics(TRAIN_METRICS)[k] for k in TRAIN_FIGURES}
            stage("train", *overrides)
            training = {k: read_metrics(TRAIN_METRICS)[k] for k in TRAIN_FIGURES}
            pad_share = training["pad_token_share"]
            stage("evaluate", *overrides)
            results[name] = read_metrics(EVAL_METRICS) | {"pad_token_share": pad_share, "train": training}
            if name == "label_only":
                generated = [r["predicted_label"] for r in read_jsonl(PREDICTIONS)]
                stage("evaluate", *overrides, "eval.scoring=likelihood")
                scored = [r["predicted_label"] for r in read_jsonl(PREDICTIONS)]
                agree = sum(a == b for a, b in zip(generated, scored, strict=True)) / len(scored)
                results["label_only (likelihood)"] = read_metrics(EVAL_METRICS) | {
                    "pad_token_share": pad_share, "train": training,
                    "labels_equal_generation": round(agree, 4)}  # fmt: skip
    head = (f"{'run':<24} {'task':<12} {'tokens/row':>10} {'samples/s':>10} {'accuracy':>9} {'unparsed':>9} "
            f"{'ECE [95% CI]':>24} {'Brier':>7} {'AUROC':>7} {'pad share':>9} {'= gen.':>7}")  # fmt: skip
    print("\n" + head)
    for name, m in results.items():
        k = m["calibration"] or {}
        ece = f"{k['ece']} {k['ece_ci95']}" if k else "none"
        agree = m.get("labels_equal_generation", "")
        print(f"{name:<24} {m['task']:<12} {m['output_tokens_per_row']:>10} {m['samples_per_s']:>10} "
              f"{m['accuracy']:>9} {m['parse_failures']:>5}/{m['n']:<3} {ece:>24} {k.get('brier', '-')!s:>7} "
              f"{k.get('auroc', '-')!s:>7} {m['pad_token_share']!s:>9} {agree!s:>7}")  # fmt: skip
    generated, scored = results["label_first"]["samples_per_s"], results["label_only (likelihood)"]["samples_per_s"]
    print(
        f"label scoring: {scored / generated:.1f}x label_first generation's samples/s on the same rows, "
        f"{scored / results['label_only']['samples_per_s']:.1f}x label_only generation's (the same adapter)"
    )
    print(f"cot training, padded batches: {padded}; padding-free: {results['cot']['train']}")
    if out:
        out.write_text(json.dumps({"command": "python bench/formats.py " + " ".join(sys.argv[1:]),
                                   "padded_cot_training": padded, "results": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
