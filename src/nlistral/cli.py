"""`nlistral <stage> [--split S] [KEY=VALUE ...]`: the one entry point; dvc.yaml calls it."""

import argparse
import importlib
import logging
import os
import sys

from nlistral.config import PARAMS_FILE, ConfigError, compose_params, load_config
from nlistral.data import DataError
from nlistral.paths import MissingInput
from nlistral.stages import StageError

SPLIT_STAGES = ("thoughts", "reflections", "sft")
STAGES = {
    "thoughts": "stage 1: the teacher LLM reasons about and labels every row of a split",
    "reflections": "stage 2: a stronger LLM corrects the teacher's wrong rationales, given the true label",
    "sft": "stage 3: correct thoughts + verified reflections -> the fine-tuning set and its statistics",
    "base-model": "build the tiny model (embedded profile) or save the hub model's tokenizer -> models/base",
    "train": "LoRA fine-tuning on the (4-bit) base -> models/adapter, one MLflow run",
    "evaluate": "greedy generation on the test split, parsed and scored -> metrics/eval.json",
}

# Exit codes: 2 = bad or missing input, or bad config (nothing written), 1 = the stage ran and failed.
EXIT_BAD_INPUT = 2
EXIT_STAGE_FAILED = 1
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlistral", description="Run one NLIstral pipeline stage (dvc.yaml calls these) on params.yaml."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, summary in STAGES.items():
        cmd = sub.add_parser(stage, help=summary, description=summary)
        if stage in SPLIT_STAGES:
            cmd.add_argument("--split", required=True, choices=("train", "dev"))
        cmd.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. teacher.max_concurrency=8 or teacher=offline"
        )
    estimate = sub.add_parser("estimate", help="what stages 1-2 will send and cost (sends nothing)")
    estimate.add_argument("--split", action="append", choices=("train", "dev"), help="default: both")
    estimate.add_argument("--json", action="store_true", help="one JSON object")
    estimate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. teacher=mistral")
    params = sub.add_parser("params", help="compose conf/ into params.yaml (what `dvc exp run` does)")
    params.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides: experiment=no_reflections")
    return parser


# Nothing phones home: MLflow and the Hugging Face hub client send usage telemetry unless told not to.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1"}


def main(argv=None) -> int:
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "params":
            PARAMS_FILE.write_text(compose_params(args.overrides), encoding="utf-8")
            print(f"wrote {PARAMS_FILE}")
            return 0
        cfg = load_config(args.overrides)
        if args.command == "estimate":
            importlib.import_module("nlistral.estimate").run(cfg, args.split or ["train", "dev"], args.json)
            return 0
        stage = importlib.import_module(f"nlistral.stages.{args.command.replace('-', '_')}")
        if args.command in SPLIT_STAGES:
            stage.run(cfg, args.split)
        else:
            stage.run(cfg)
    except (DataError, ConfigError, MissingInput) as err:
        print(f"nlistral {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageError as err:
        print(f"nlistral {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt:
        print(f"nlistral {args.command}: interrupted; a re-run resumes from the LLM cache", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
