"""Every stage input and output, named once. dvc.yaml repeats them (DVC needs literal paths); a test checks the two
agree. `{split}` is train or dev (test too for prepare), `{set}` a name in eval.test_sets. Inputs under `data.dir`
come from the config, not from here.

`require` is how a stage checks its inputs before doing any work: a missing one is a clear error naming the file
and the stage that writes it.
"""

from pathlib import Path

# stage 0: prepare (datasets read with `datasets`; it writes `{data.dir}/{split}.csv`)
PREPARE_METRICS = "metrics/prepare_{split}.json"
# stage 1: thoughts
THOUGHTS = "data/original_thoughts/{split}_thoughts.jsonl"
THOUGHTS_FAILED = "data/original_thoughts/{split}_failed.jsonl"
THOUGHTS_METRICS = "metrics/thoughts_{split}.json"
PLOT_AGREEMENT = "metrics/plots/teacher_agreement_{split}.csv"
# stage 2: reflections
REFLECTIONS = "data/reflected_thoughts/{split}_reflections.jsonl"
REFLECTIONS_FAILED = "data/reflected_thoughts/{split}_failed.jsonl"
REFLECTIONS_METRICS = "metrics/reflections_{split}.json"
# base_model
BASE_DIR = Path("models/base")
BASE_INFO = BASE_DIR / "base_model.json"
# stage 3: sft
FINETUNE = "data/finetune/{split}_ft.jsonl"
AUDIT_SUSPECT = "data/audit/{split}_suspect.jsonl"
SFT_METRICS = "metrics/sft_{split}.json"
PLOT_TEACHER_ACCURACY = "metrics/plots/teacher_accuracy_by_length_{split}.csv"
PLOT_LENGTHS = "metrics/plots/lengths_{split}.csv"
# train
ADAPTER_DIR = Path("models/adapter")
TRAIN_METRICS = "metrics/train.json"
TRAIN_HISTORY = "metrics/train_history.csv"  # loss, dev loss, learning rate, grad norm by step
# evaluate
EVAL_METRICS = "metrics/eval.json"
PREDICTIONS = "metrics/predictions.jsonl"
CONFUSION = "metrics/confusion.csv"
PLOT_ACCURACY_BY_LENGTH = "metrics/plots/accuracy_by_length.csv"
PLOT_RELIABILITY = "metrics/plots/reliability.csv"  # the fine-tuned model's reliability diagram (eval.json's bins)
# evaluate_base, evaluate_teacher: the baselines, same rows and format
EVAL_BASE_METRICS = "metrics/eval_base.json"
PREDICTIONS_BASE = "metrics/predictions_base.jsonl"
EVAL_TEACHER_METRICS = "metrics/eval_teacher.json"
PREDICTIONS_TEACHER = "metrics/predictions_teacher.jsonl"
# evaluate_set*@{set}: each model on an extra test set; summarise_set@{set}: the three side by side
SET_PREDICTIONS = "metrics/test_sets/{set}/predictions.jsonl"
SET_PREDICTIONS_BASE = "metrics/test_sets/{set}/predictions_base.jsonl"
SET_PREDICTIONS_TEACHER = "metrics/test_sets/{set}/predictions_teacher.jsonl"
SET_EVAL = "metrics/test_sets/{set}/eval.json"
SET_EVAL_BASE = "metrics/test_sets/{set}/eval_base.json"
SET_EVAL_TEACHER = "metrics/test_sets/{set}/eval_teacher.json"
SET_METRICS = "metrics/test_sets/{set}.json"
PLOT_SET_ACCURACY = "metrics/plots/test_sets/{set}.csv"
SET_FILES = {  # model -> (predictions, metrics)
    "fine-tuned": (SET_PREDICTIONS, SET_EVAL),
    "base": (SET_PREDICTIONS_BASE, SET_EVAL_BASE),
    "teacher": (SET_PREDICTIONS_TEACHER, SET_EVAL_TEACHER),
}
# How long each stage took (io.write_metrics moves the SPEED_KEYS of a metrics file metrics/X.json here, to
# metrics/speed/X.json): timings differ on every run, so they stay out of the stage outputs that git and dvc.lock
# hold, which a run of the same inputs then reproduces byte for byte. Git-ignored; `dvc metrics show` lists them.
SPEED_DIR = Path("metrics/speed")
SPEED_KEYS = frozenset(
    {"wall_s", "wall_time_s", "samples_per_s", "output_tokens_per_s", "steps_per_second", "tokens_per_second"}
)
# `nlistral report --experiments ... --group-by KEY`: configurations across seeds (the report shows it when present)
SEEDS = "metrics/seeds.json"
# report: read only the files above; the cards are its own outs (a stage cannot write into another's out folder)
REPORT_RESULTS = Path("reports/results.md")  # results.md and the cards: git (small text, reads on a code host)
REPORT_MODEL_CARD = Path("reports/model_card.md")
REPORT_DATASET_CARD = Path("reports/dataset_card.md")
REPORT_PAGE = Path("reports/index.html")  # the row browser, every row: DVC cache

# Which command writes each stage output that another stage reads: (CLI command, dvc.yaml stage).
PRODUCERS = {
    THOUGHTS: ("thoughts --split {split}", "thoughts@{split}"),
    REFLECTIONS: ("reflections --split {split}", "reflections@{split}"),
    str(BASE_DIR): ("base-model", "base_model"),
    FINETUNE: ("sft --split {split}", "sft@{split}"),
    SFT_METRICS: ("sft --split {split}", "sft@{split}"),
    str(ADAPTER_DIR): ("train", "train"),
    TRAIN_METRICS: ("train", "train"),
    TRAIN_HISTORY: ("train", "train"),
    EVAL_METRICS: ("evaluate", "evaluate"),
    PREDICTIONS: ("evaluate", "evaluate"),
    CONFUSION: ("evaluate", "evaluate"),
    PLOT_ACCURACY_BY_LENGTH: ("evaluate", "evaluate"),
    THOUGHTS_METRICS: ("thoughts --split {split}", "thoughts@{split}"),
    REFLECTIONS_METRICS: ("reflections --split {split}", "reflections@{split}"),
    PLOT_TEACHER_ACCURACY: ("sft --split {split}", "sft@{split}"),
    str(REPORT_MODEL_CARD): ("report", "report"),
    SET_PREDICTIONS: ("evaluate-set --set {set} --model fine-tuned", "evaluate_set@{set}"),
    SET_EVAL: ("evaluate-set --set {set} --model fine-tuned", "evaluate_set@{set}"),
    SET_PREDICTIONS_BASE: ("evaluate-set --set {set} --model base", "evaluate_set_base@{set}"),
    SET_EVAL_BASE: ("evaluate-set --set {set} --model base", "evaluate_set_base@{set}"),
    SET_PREDICTIONS_TEACHER: ("evaluate-set --set {set} --model teacher", "evaluate_set_teacher@{set}"),
    SET_EVAL_TEACHER: ("evaluate-set --set {set} --model teacher", "evaluate_set_teacher@{set}"),
    SET_METRICS: ("summarise-set --set {set}", "summarise_set@{set}"),
}


class MissingInput(FileNotFoundError):
    """A stage's input is not there yet: the message names the file and what writes it."""


def require(template, split: str | None = None, set_name: str | None = None) -> Path:
    """The input path (`{split}`, `{set}` filled in), or MissingInput saying which stage to run first."""
    path = Path(str(template).format(split=split, set=set_name))
    if path.exists():
        return path
    if str(template) not in PRODUCERS:
        raise MissingInput(f"{path} not found")
    command, stage = (part.format(split=split, set=set_name) for part in PRODUCERS[str(template)])
    raise MissingInput(f"{path} not found: run `nlistral {command}` or `dvc repro {stage}` first")
