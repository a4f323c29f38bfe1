"""`nlistral <stage> [--split S] [KEY=VALUE ...]`: the one entry point; dvc.yaml calls it."""

import argparse
import importlib
import logging
import os
import signal
import sys

from omegaconf import OmegaConf

from nlistral.config import PARAMS_FILE, compose_params, load_config, validate
from nlistral.errors import ConfigError, DataError, StageError
from nlistral.formatting import terminal
from nlistral.paths import PREDICTIONS, SET_PREDICTIONS, MissingInput

SPLIT_STAGES = ("prepare", "thoughts", "reflections", "sft")
SET_STAGES = ("evaluate-set", "summarise-set")
STAGES = {
    "prepare": "stage 0: read a split of a public NLI dataset with `datasets` -> {data.dir}/{split}.csv",
    "thoughts": "stage 1: the teacher LLM reasons about and labels every row of a split",
    "reflections": "stage 2: a stronger LLM corrects the teacher's wrong rationales, given the true label",
    "sft": "stage 3: correct thoughts + verified reflections -> the fine-tuning set and its statistics",
    "base-model": "build the tiny model (embedded profile) or save the hub model's tokenizer -> models/base",
    "train": "LoRA fine-tuning on the (4-bit) base -> models/adapter, one MLflow run",
    "evaluate": "greedy generation on the test split, parsed and scored -> metrics/eval.json",
    "evaluate-base": "baseline: the base model without the adapter, zero-shot -> metrics/eval_base.json",
    "evaluate-teacher": "baseline: the teacher LLM prompted directly on the test split -> metrics/eval_teacher.json",
    "evaluate-set": "one model on an extra test set (eval.test_sets) -> metrics/test_sets/<set>/",
    "summarise-set": "the three models on an extra test set, per tag, compared -> metrics/test_sets/<set>.json",
    "report": "the metrics files -> reports/results.md, model and dataset cards, index.html (a row browser)",
}

# Exit codes: 2 = bad or missing input, or bad config (nothing written), 1 = the stage ran and failed.
EXIT_BAD_INPUT = 2
EXIT_STAGE_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (`dvc queue kill`, `docker stop`, schedulers) raised where the stage is, like Ctrl-C: every `finally`
    runs, so a model server the stage started is stopped and no half-written output stays."""


def _terminate(signum, frame):
    raise Terminated()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlistral", description="Run one NLIstral pipeline stage (dvc.yaml calls these) on params.yaml."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, summary in STAGES.items():
        cmd = sub.add_parser(stage, help=summary, description=summary)
        if stage in SPLIT_STAGES:
            splits = ("train", "dev", "test") if stage == "prepare" else ("train", "dev")
            cmd.add_argument("--split", required=True, choices=splits)
        if stage in SET_STAGES:
            cmd.add_argument("--set", required=True, dest="set_name", metavar="NAME", help="a name in eval.test_sets")
        if stage == "evaluate-set":
            cmd.add_argument("--model", required=True, choices=("fine-tuned", "base", "teacher"))
        cmd.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. teacher.max_concurrency=8 or teacher=offline"
        )
    report = sub.choices["report"]
    chosen = report.add_mutually_exclusive_group()
    chosen.add_argument(
        "--experiments",
        nargs="+",
        metavar="EXP",
        help="print the test table across these DVC experiments (names or git revisions) instead",
    )
    chosen.add_argument("--all", action="store_true", help="the same across every experiment of this commit")
    report.add_argument("--reference", metavar="EXP", help="compare each experiment against this one "
                        "(default: the first listed); with --group-by, a configuration (sft.format=cot) or an "
                        "experiment's")  # fmt: skip
    report.add_argument("--group-by", nargs="+", metavar="KEY", help="with --experiments/--all: experiments that "
                        "differ only in these params (e.g. train.seed) are one configuration: mean, sd, min, max "
                        "across them; each vs the reference by Welch's t on the per-seed accuracies")  # fmt: skip
    report.add_argument("--set", dest="set_name", metavar="NAME", help="with --experiments/--all: the table on the "
                        "extra test set NAME (eval.test_sets) instead of the test split")  # fmt: skip
    export = sub.add_parser("export", help="adapter + tokenizer + model card (as README.md) -> DIR, for the HF Hub")
    export.add_argument("dir", metavar="DIR", help="a new or empty folder")
    estimate = sub.add_parser("estimate", help="what stages 1-2 will send and cost (sends nothing)")
    estimate.add_argument("--split", action="append", choices=("train", "dev"), help="default: both")
    estimate.add_argument("--json", action="store_true", help="one JSON object")
    estimate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. teacher=mistral")
    sub.add_parser("summary", help="the test tables and where the outputs are (what `make run` ends on)")
    params = sub.add_parser("params", help="compose conf/ into params.yaml (what `dvc exp run` does)")
    params.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides: experiment=no_reflections")
    compare = sub.add_parser(
        "compare", help="paired comparison of two runs' test predictions: accuracy difference, CI, McNemar",
        description="Is B better than A? A and B: predictions files, git revisions or `dvc exp` names.",
    )  # fmt: skip
    compare.add_argument("a", metavar="A", help="baseline: a predictions file, a git revision or an experiment name")
    compare.add_argument("b", metavar="B", help="candidate, as A")
    compare.add_argument("--json", metavar="FILE", help="also write the comparison, flipped rows included, as JSON")
    where = compare.add_mutually_exclusive_group()
    where.add_argument("--path", default=PREDICTIONS, help=f"predictions file in a revision (default {PREDICTIONS})")
    where.add_argument("--set", dest="set_name", metavar="NAME", help="the fine-tuned model's predictions on the "
                       f"extra test set NAME ({SET_PREDICTIONS.format(set='NAME')}) in each revision")  # fmt: skip
    compare.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: eval.bootstrap)")
    compare.add_argument("--seed", type=int, help="bootstrap seed (default: eval.seed)")
    return parser


def _bootstrap_settings(args) -> tuple[int, int]:
    """--bootstrap/--seed, else eval.bootstrap/eval.seed from params.yaml (a NLIstral checkout), else the defaults."""
    defaults = (load_config().get("eval") if PARAMS_FILE.is_file() else None) or {"bootstrap": 10000, "seed": 42}
    resamples = args.bootstrap if getattr(args, "bootstrap", None) is not None else defaults["bootstrap"]
    seed = args.seed if getattr(args, "seed", None) is not None else defaults["seed"]
    return resamples, seed


def _compare(args) -> None:
    from nlistral import compare

    path = SET_PREDICTIONS.format(set=args.set_name) if args.set_name else args.path
    compare.run(args.a, args.b, args.json, path, *_bootstrap_settings(args))


# Nothing phones home: MLflow and the Hugging Face hub client send usage telemetry unless told not to.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1"}


def main(argv=None) -> int:
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    parser = _parser()
    args = parser.parse_args(argv)  # --help exits here: it imports nothing heavy (no pandas, scipy, torch)
    from nlistral.results import CompareError  # scipy

    for option in ("reference", "set_name", "group_by"):
        if args.command == "report" and getattr(args, option) and not (args.experiments or args.all):
            parser.error(f"--{option.removesuffix('_name').replace('_', '-')} needs --experiments or --all")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "params":
            params = compose_params(args.overrides)
            validate(OmegaConf.create(params))  # what a stage would refuse never reaches params.yaml
            PARAMS_FILE.write_text(params, encoding="utf-8")
            print(f"wrote {PARAMS_FILE}")
            return 0
        if args.command == "summary":
            importlib.import_module("nlistral.summary").run(load_config())
            return 0
        if args.command == "compare":
            _compare(args)
            return 0
        if args.command == "export":
            from nlistral.export import export

            export(args.dir)
            return 0
        if args.command == "report" and (args.experiments or args.all):
            from nlistral.experiments import compare_experiments

            compare_experiments(args.experiments, args.reference, *_bootstrap_settings(args), set_name=args.set_name,
                                group_by=args.group_by)  # fmt: skip
            return 0
        cfg = load_config(args.overrides)
        if args.command == "estimate":
            importlib.import_module("nlistral.estimate").run(cfg, args.split or ["train", "dev"], args.json)
            return 0
        stage = importlib.import_module(f"nlistral.stages.{args.command.replace('-', '_')}")
        if args.command in SPLIT_STAGES:
            stage.run(cfg, args.split)
        elif args.command == "evaluate-set":
            stage.run(cfg, args.set_name, args.model)
        elif args.command == "summarise-set":
            stage.run(cfg, args.set_name)
        else:
            stage.run(cfg)
    except (DataError, ConfigError, MissingInput, CompareError) as err:
        print(f"nlistral {args.command}: error: {terminal(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageError as err:
        print(f"nlistral {args.command}: failed: {terminal(err)}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt as err:
        how = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"nlistral {args.command}: {how}; a re-run resumes from the LLM cache", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    return 0
