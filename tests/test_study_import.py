"""The README's "Start from the study's data" path, for real: its `dvc import-url` commands fetch the study's files
over HTTP from a loopback server laid out like the hub dataset, then `dvc repro` rebuilds the fine-tuning set from the
study's own rationales with teacher=replay reflector=replay, and `dvc update` re-runs only what a changed file feeds.

The server holds ../shared/data/mistral_sample (the study's real outputs for 100 rows) as the train split; the
sample has no dev or test rows, so dev.csv and test.csv are two hand-written rows each (sharing no pair with train)
and the dev recordings are empty. Only `sft@train` and what it needs are reproduced.
"""

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import copy_checkout, doc_section
from dvc.cli import main as dvc_main

from nlistral.config import compose_params
from nlistral.io import read_jsonl

pytestmark = pytest.mark.slow  # a DVC repo, real imports over HTTP, four stages
HUB = "https://huggingface.co/datasets/jd0g/Mistral-NLI-Thoughts/resolve/main"
GIT_IDENTITY = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "nlistral-tests"), ("EMAIL", "tests@nlistral.invalid"))}  # fmt: skip
HELD_OUT = "premise,hypothesis,label\nA {0} premise.,A {0} hypothesis.,1\nAnother {0} premise.,Another {0} one.,0\n"


class FileHandler(SimpleHTTPRequestHandler):
    """Static files with an ETag (the content's md5), as the hub serves them; no request log."""

    def end_headers(self):
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("ETag", f'"{hashlib.md5(path.read_bytes()).hexdigest()}"')
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(shared_data, tmp_path):
    """A loopback HTTP server holding the sample in the dataset's layout; yields (base URL, served root)."""
    sample, root = shared_data / "mistral_sample", tmp_path / "hub"
    for folder in ("original_data", "original_thoughts", "reflected_thoughts"):
        (root / "data" / folder).mkdir(parents=True)
    shutil.copy(sample / "sample.csv", root / "data/original_data/train.csv")
    for split in ("dev", "test"):
        (root / f"data/original_data/{split}.csv").write_text(HELD_OUT.format(split))
    shutil.copy(sample / "sample_thoughts.jsonl", root / "data/original_thoughts/train_thoughts.json")  # JSON Lines
    reflections = json.dumps(read_jsonl(sample / "sample_reflections.jsonl"), indent=1)  # a JSON array
    (root / "data/reflected_thoughts/train_reflections.json").write_text(reflections)
    (root / "data/original_thoughts/dev_thoughts.json").write_text("[]")
    (root / "data/reflected_thoughts/dev_reflections.json").write_text("[]")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(FileHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dvc(caplog, *args) -> str:
    """`dvc ARGS` in this process (each `dvc` process costs seconds of imports); what it logged. Stages still run
    `nlistral` as subprocesses, as `dvc repro` always does."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dvc"):
        code = dvc_main(list(args))
    assert code == 0, f"dvc {' '.join(args)} failed:\n{caplog.text[-3000:]}"
    return caplog.text


def run_block(block: str, caplog) -> None:
    """A README shell block, line by line: `dvc ...` in process, anything else (mkdir, git) in bash."""
    for line in filter(None, block.splitlines()):
        if line.startswith("dvc "):
            dvc(caplog, *shlex.split(line)[1:])
        else:
            subprocess.run(["bash", "-ec", line], check=True, capture_output=True)


def readme_imports() -> str:
    """The first shell block of the README's "Start from the study's data" section: the imports, as written."""
    section = doc_section("Start from the study's data")
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_import_replay_and_update(hub, tmp_path, monkeypatch, caplog):
    base_url, served = hub
    repo = tmp_path / "repo"
    for name, value in GIT_IDENTITY.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # `nlistral`
    copy_checkout(repo, skip=("data/", "tests/", "bench/"))
    params = compose_params(["data=study", "teacher=replay", "reflector=replay"], conf_dir=repo / "conf")
    (repo / "params.yaml").write_text(params)
    monkeypatch.chdir(repo)
    run_block("git init -q\ngit add -A\ngit commit -qm NLIstral", caplog)
    commands = readme_imports()
    assert commands.count(f"dvc import-url {HUB}/data/") == 7
    run_block(commands.replace(HUB, base_url), caplog)  # ends with `git add` + `git commit`
    assert len(list((repo / "data/study").rglob("*.dvc"))) == 7

    first = dvc(caplog, "repro", "sft@train")
    assert ran(first) == {"thoughts@train", "reflections@train", "base_model", "sft@train"}
    metrics = {name: json.loads((repo / f"metrics/{name}_train.json").read_text())
               for name in ("thoughts", "reflections", "sft")}  # fmt: skip
    assert (metrics["thoughts"]["rows"], metrics["thoughts"]["correct"]) == (100, 67)
    assert (metrics["reflections"]["rows"], metrics["reflections"]["verified"]) == (33, 32)
    assert metrics["thoughts"]["requests"] == metrics["reflections"]["requests"] == 0
    rows = read_jsonl(repo / "data/finetune/train_ft.jsonl")
    assert len(rows) == 99 and "90" not in {r["id"] for r in rows}

    # The study's files change on the server: a reflection for id 90 that does reach its gold label.
    path = served / "data/reflected_thoughts/train_reflections.json"
    records = json.loads(path.read_text())
    for record in records:
        if record["id"] == 90:
            record["predicted_label"] = record["true_label"]
    path.write_text(json.dumps(records, indent=1))
    assert not ran(dvc(caplog, "repro", "sft@train"))  # the imports are pinned: nothing changed until `dvc update`
    dvc(caplog, "update", "data/study/reflected_thoughts/train_reflections.json.dvc")
    second = dvc(caplog, "repro", "sft@train")
    assert ran(second) == {"reflections@train", "sft@train"}
    rows = read_jsonl(repo / "data/finetune/train_ft.jsonl")
    assert len(rows) == 100 and "90" in {r["id"] for r in rows}
