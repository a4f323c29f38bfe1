"""The CLI's contract: bad input stops a stage with one clear message, exit 2, and no output left behind."""

import subprocess
import sys
from pathlib import Path

import pytest

OUTPUTS = ("data/original_thoughts", "metrics")
GOOD_ROW = "p-ok,A man is walking a dog.,A person is outside.,1\n"


def nlistral(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nlistral", *args], cwd=cwd, capture_output=True, text=True)


def write(path: Path, content: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize(
    ("content", "line", "column"),
    [
        ("id,premise,hypothesis,label\n" + GOOD_ROW + "p-2,A cat sleeps.,A cat is awake.,2\n", 3, "label"),
        ("id,premise,hypothesis,label\n" + GOOD_ROW + "p-2,A cat sleeps.,,0\n", 3, "hypothesis"),
        ("id,premise,hypothesis\n" + "p-1,A cat sleeps.,A cat is awake.\n", 1, "label"),
        ("id,premise,hypothesis,label\n" + GOOD_ROW + GOOD_ROW, 3, "id"),
        (b"id,premise,hypothesis,label\np-1,A caf\xe9 opens.,A shop opens.,1\n", 2, None),
        ("", None, None),
    ],
    ids=["label-outside-0-1", "empty-text", "missing-column", "duplicate-id", "undecodable", "empty-file"],
)
def test_bad_csv_exits_2_naming_file_line_column(workdir, content, line, column):
    write(workdir / "bad" / "train.csv", content)
    result = nlistral("thoughts", "--split", "train", "data.dir=bad", cwd=workdir)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "train.csv" in message
    if line is not None:
        assert f":{line}" in message
    if column is not None:
        assert column in message
    assert "Traceback" not in result.stderr
    for out in OUTPUTS:
        assert not (workdir / out).exists() or not any((workdir / out).iterdir())


def test_missing_file_exits_2(workdir):
    result = nlistral("thoughts", "--split", "dev", "data.dir=nowhere", cwd=workdir)
    assert result.returncode == 2
    assert "nowhere/dev.csv" in result.stderr


def test_bad_override_exits_2(workdir):
    result = nlistral("thoughts", "--split", "dev", "teacher.temprature=0.5", cwd=workdir)
    assert result.returncode == 2
    assert "unknown config key 'teacher.temprature'" in result.stderr


def test_params_command_writes_the_composition(workdir):
    (workdir / "params.yaml").unlink()
    result = nlistral("params", "experiment=no_reflections", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "include_reflections: false" in (workdir / "params.yaml").read_text()


def test_cli_overrides_reach_the_client_as_hydra_parses_them(workdir, monkeypatch):
    """`teacher.response_format=null` sends no response_format; a key override written before its group swap holds."""
    from llm_server import KEY, ROWS, LLMServer, stage_overrides, write_split

    from nlistral import cli

    write_split(workdir, ROWS)
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    with LLMServer() as server:
        overrides = stage_overrides("teacher", server.url, backend="openai")
        assert cli.main(["thoughts", "--split", "train", "teacher.response_format=null", *overrides]) == 0
        assert server.chat_bodies and all("response_format" not in body for body in server.chat_bodies)

    with LLMServer(api_key=KEY) as server:
        overrides = stage_overrides("teacher", server.url, backend="mistral")
        batch_first = ["teacher.mode=batch", *overrides[1:], overrides[0]]  # the group swap written last
        assert cli.main(["thoughts", "--split", "train", *batch_first]) == 0
        assert server.counts["jobs"] == 1 and server.counts["chat"] == 0
