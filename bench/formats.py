"""Output tokens per row and samples/s of evaluation for sft.format cot vs label_first vs label_only, on the tiny model.

Run from the repo root with the venv active:
    python bench/formats.py [--rows 128] [--epochs 10] [--learning-rate 5.0e-3]
In a temporary copy of conf/, params.yaml and data/sample (cut to --rows training rows) it runs the embedded
pipeline's stages in this process: thoughts and reflections (offline teacher), the tiny base once, then per format
sft, train and evaluate, and prints each format's eval.json figures side by side: output_tokens_per_row,
samples_per_s (generation only), accuracy and parse failures. A label-first format stops generating at the label.
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from nlistral import cli
from nlistral.io import read_metrics
from nlistral.paths import EVAL_METRICS

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("cot", "label_first", "label_only")


def stage(*argv) -> None:
    if cli.main(list(argv)) != 0:
        raise SystemExit(f"nlistral {' '.join(argv)} failed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="training rows of data/sample")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", default="5.0e-3", help="the tiny model learns each format's shape")
    args = parser.parse_args()
    results = {}
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
            stage("train", *overrides)
            stage("evaluate", *overrides)
            results[name] = read_metrics(EVAL_METRICS)  # with its timings (metrics/speed/eval.json)
    print(f"\n{'format':<12} {'task':<12} {'tokens/row':>10} {'samples/s':>10} {'accuracy':>9} {'unparsed':>9}")
    for name, m in results.items():
        print(f"{name:<12} {m['task']:<12} {m['output_tokens_per_row']:>10} {m['samples_per_s']:>10} "
              f"{m['accuracy']:>9} {m['parse_failures']:>5}/{m['n']}")  # fmt: skip


if __name__ == "__main__":
    main()
