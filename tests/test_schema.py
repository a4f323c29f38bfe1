"""A wrong config value stops the CLI with exit 2 and one line (key, value, what is allowed), before any work."""

import json
import shutil
import subprocess
import sys
import typing

import pytest
from conftest import REPO

from nlistral.schema import SCHEDULERS

# (command, bad override, what the line must say). Every stage would otherwise read data, load a model or call a
# server: the driver below records whether it imported one or opened a file or socket.
BAD = [
    (["train"], "train.learning_rate=abc", "train.learning_rate='abc': should be a valid number"),
    (["train"], "train.learning_rate=-0.1", "train.learning_rate=-0.1: should be greater than 0"),
    (["train"], "train.per_device_batch_size=-1", "train.per_device_batch_size=-1: should be greater than 0"),
    (["train"], "train.lora_r=0", "train.lora_r=0: should be greater than 0"),
    (["train"], "train.lora_dropout=1.5", "train.lora_dropout=1.5: should be less than 1"),
    (["train"], "train.lr_scheduler_type=cosinus", "train.lr_scheduler_type='cosinus': should be 'linear', "),
    (["train"], "train.max_steps=0", "train: max_steps=0: -1 (train for num_epochs) or a number of steps > 0"),
    (["base-model"], "model.dtype=float8", "model.dtype='float8': should be 'float32', 'bfloat16' or 'float16'"),
    (["base-model"], "model.bnb_4bit_quant_type=int4", "model.bnb_4bit_quant_type='int4': should be 'nf4' or"),
    (["evaluate"], "eval.engine=vllm", "eval.engine='vllm': choose from hf, server; vLLM runs as a server"),
    (["evaluate"], "eval.batch_size=0", "eval.batch_size=0: should be greater than 0"),
    (["evaluate"], "eval.server.max_failure_rate=2", "eval.server.max_failure_rate=2: should be less than or equal"),
    (["evaluate-teacher"], "teacher.backend=gpt", "teacher.backend='gpt': should be 'offline', 'mistral', "),
    (["thoughts", "--split", "train"], "teacher.temperature=-1", "teacher.temperature=-1: should be greater than"),
    (["thoughts", "--split", "train"], "teacher.max_failure_rate=0.5x", "teacher.max_failure_rate='0.5x': should"),
    (["thoughts", "--split", "train"], "teacher.n_samples=0", "teacher.n_samples=0: should be greater than 0"),
    (["thoughts", "--split", "train"], "teacher.mode=later", "teacher.mode='later': should be 'sync' or 'batch'"),
    (["reflections", "--split", "train"], "reflector.max_attempts=0", "reflector.max_attempts=0: should be greater"),
    (["sft", "--split", "train"], "sft.shuffle=maybe", "sft.shuffle='maybe': should be a valid boolean"),
    (["sft", "--split", "train"], "sft.format=rationale", "sft.format='rationale': should be 'cot', 'label_first', "),
    (["sft", "--split", "train"], "sft.label_rows=some", "sft.label_rows='some': should be 'verified' or 'all'"),
    (["evaluate"], "eval.label_max_new_tokens=0", "eval.label_max_new_tokens=0: should be greater than 0"),
    (["evaluate"], "eval.bootstrap=1", "eval.bootstrap=1: should be greater than or equal to 1000"),  # issue 32
    (["prepare", "--split", "train"], "data.prepare=[train,val]", "data.prepare.1='val': should be 'train', 'dev'"),
    (["estimate"], "teacher.tokenizer=gpt2", "teacher.tokenizer='gpt2': should be 'approx' or 'tekken'"),
    (["params"], "train.warmup_ratio=1", "train.warmup_ratio=1: should be less than 1"),
    (["params", "data=snli"], "data.dataset.sample_size.train=-5", "data.dataset.sample_size.train=-5: should be"),
]

# Runs each command in this process, one after another, and reports what each did beyond reading params.yaml and
# conf/: heavy modules imported (a model or data library), files opened in the work folder, sockets connected.
DRIVER = """
import json, os, sys
from pathlib import Path
from nlistral.cli import main
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "mlflow", "requests", "dvc")
root, touched = Path.cwd(), []
def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(args[0])).absolute()
        if path.is_relative_to(root) and path.relative_to(root).parts[0] not in ("conf", "params.yaml"):
            touched.append(str(path.relative_to(root)))
    elif event == "socket.connect":
        touched.append(f"socket {args[1]}")
sys.addaudithook(audit)
for argv in json.loads(sys.argv[1]):
    touched.clear()
    rc = main(argv)
    heavy = sorted(name for name in HEAVY if name in sys.modules)
    print(json.dumps({"rc": rc, "touched": touched, "heavy": heavy}), flush=True)
    sys.stderr.write("\\n")
"""


@pytest.fixture
def repo_copy(workdir):
    """conf/, params.yaml and the sample data: a stage that went on would open data/sample."""
    shutil.copytree(REPO / "data" / "sample", workdir / "data" / "sample")
    return workdir


def test_bad_values_exit_2_with_one_line_before_any_work(repo_copy):
    params = (repo_copy / "params.yaml").read_text()
    argvs = [[*command, override] for command, override, _ in BAD]
    # -X importtime is not needed: sys.modules after each command says what was imported
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=repo_copy, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    messages = proc.stderr.split("\n\n")
    assert len(results) == len(BAD), proc.stderr
    for (command, override, expected), result, message in zip(BAD, results, messages, strict=False):
        case = f"nlistral {' '.join(command)} {override}"
        assert result == {"rc": 2, "touched": [], "heavy": []}, f"{case}: {result}"
        lines = message.strip().splitlines()
        assert len(lines) == 1, f"{case}: {message}"
        assert lines[0].startswith(f"nlistral {command[0]}: error: {expected}"), f"{case}: {lines[0]}"
    assert (repo_copy / "params.yaml").read_text() == params, "`nlistral params` wrote a refused config"


def test_scheduler_choices_are_transformers_own():
    from transformers import SchedulerType

    assert set(typing.get_args(SCHEDULERS)) == {s.value for s in SchedulerType}
