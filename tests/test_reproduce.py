"""The committed results are reproducible: on a fresh copy of the repository, what `make run` runs after its set-up
(`dvc repro`, `nlistral summary`) leaves `git status` clean, so every committed file (dvc.lock, metrics/, reports/)
came out byte for byte the same, and prints no warning (docs/experiments.md: Committed results)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_checkout
from test_pipeline import GIT_IDENTITY, WARNING

pytestmark = pytest.mark.slow


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone would have them, committed in a new git repo."""
    copy_checkout(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "fresh clone"]):
        subprocess.run(cmd, cwd=dest, env={**os.environ, **GIT_IDENTITY}, check=True)
    return dest


def test_a_fresh_run_of_the_embedded_profile_reproduces_the_committed_results(tmp_path):
    root = fresh_copy(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "NLISTRAL_CACHE_DIR": str(tmp_path / ".cache" / "llm")}  # fmt: skip
    output = ""
    for cmd in (["dvc", "repro"], ["nlistral", "summary"]):
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        output += done.stdout + done.stderr
        assert done.returncode == 0, f"{cmd}:\n{output[-3000:]}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    diff = subprocess.run(["git", "diff", "--stat"], cwd=root, capture_output=True, text=True).stdout
    assert status == "", (
        f"the embedded run changed committed files: `make run`, then commit dvc.lock, metrics/ and reports/\n"
        f"{status}\n{diff}"
    )
    warnings = [line for line in output.splitlines() if WARNING.search(line)]
    assert not warnings, "\n".join(warnings)
