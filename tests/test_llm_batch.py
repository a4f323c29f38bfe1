"""`mode: batch` against a loopback Mistral Batch API: rounds, reprompts, half price, resume after `kill -9`."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llm_server import KEY, ROWS, LLMServer, offline_reply, stage_overrides, write_split

from nlistral.config import load_config
from nlistral.errors import StageError
from nlistral.io import read_jsonl
from nlistral.stages import thoughts

OUT = "data/original_thoughts/train_thoughts.jsonl"
FAILED = "data/original_thoughts/train_failed.jsonl"
BAD = '{"thought_process": "Step 1: unsure.", "predicted_label": 0.5}'


def bad_first_answer_for_row_0(body):
    """The first question about ROWS[0] gets an invalid label; its reprompt (and everything else) a valid answer."""
    asked = body["messages"][1]["content"]
    if ROWS[0][0] in asked and len(body["messages"]) == 2:
        return BAD
    return offline_reply(body)


@pytest.fixture
def server(workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    write_split(workdir, ROWS)
    with LLMServer(bad_first_answer_for_row_0, api_key=KEY) as srv:
        yield srv


def run(server, **settings) -> dict:
    return thoughts.run(load_config(stage_overrides("teacher", server.url, mode="batch", **settings)), "train")


def test_batch_rounds_reprompt_and_bill_half(server):
    metrics = run(server)
    assert metrics["ok"] == len(ROWS) and metrics["reprompts_by_reason"] == {"bad_label": 1}
    assert server.counts["jobs"] == metrics["batch_jobs"] == 2  # round 2 carries the one reprompt
    assert metrics["requests"] == server.counts["batch_lines"] == len(ROWS) + 1 and server.counts["chat"] == 0
    purpose, upload = server.uploads[0]
    line = json.loads(upload.splitlines()[0])
    assert purpose == "batch" and len(upload.splitlines()) == len(ROWS)
    assert set(line) == {"custom_id", "body"} and "model" not in line["body"] and line["body"]["random_seed"] == 42
    full_price = (metrics["prompt_tokens"] * 0.15 + metrics["completion_tokens"] * 0.15) / 1e6
    assert metrics["cost_usd"] == pytest.approx(full_price / 2, abs=1e-6)
    assert [r["id"] for r in read_jsonl(OUT)] == ["0", "1", "2", "3"] and read_jsonl(OUT)[0]["reprompts"] == 1


def test_batch_rerun_sends_nothing_and_sync_reuses_batch_replies(server):
    run(server)
    sent = sum(server.counts.values())
    again = run(server)
    assert again["cache_hits"] == len(ROWS) + 1 and again["requests"] == 0 and sum(server.counts.values()) == sent
    sync = thoughts.run(load_config(stage_overrides("teacher", server.url)), "train")
    assert sync["requests"] == 0 and sync["cache_hits"] == len(ROWS) + 1


def test_failed_batch_lines_are_asked_again_in_the_next_round(server):
    server.reply = offline_reply
    server.batch_line_errors = 2  # the first two lines of the first job
    metrics = run(server)
    assert metrics["ok"] == len(ROWS) and metrics["batch_jobs"] == 2 and metrics["reprompts"] == 0
    assert server.counts["batch_lines"] == len(ROWS) + 2


def test_a_line_failing_every_round_fails_its_row(server, workdir):
    write_split(workdir, ROWS[1:2])
    server.batch_line_errors = 3
    metrics = run(server, max_retries=2, max_failure_rate=1.0)
    assert metrics["failures_by_reason"] == {"batch_failed": 1} and metrics["batch_jobs"] == 3
    failed = read_jsonl(FAILED)
    assert failed[0]["reason"] == "batch_failed"


def test_batch_api_failing_fails_the_rounds_rows_and_a_rerun_resumes_the_job(server):
    server.reply = offline_reply
    server.batch_faults = {"poll": [500, 500]}  # the job runs, but polling fails beyond max_retries
    with pytest.raises(StageError, match="4 of 4 rows failed"):
        run(server, max_retries=1)
    failed = read_jsonl(FAILED)
    assert {r["reason"] for r in failed} == {"batch_server_error"} and "HTTP 500" in failed[0]["error"]
    metrics = run(server, max_retries=1)
    assert metrics["ok"] == len(ROWS) and metrics["batch_jobs"] == 0  # the stored job was resumed, not paid again
    assert server.counts["jobs"] == 1 and server.counts["files"] == 1


def test_an_expired_stored_job_is_forgotten_and_a_new_one_started(server):
    server.reply = offline_reply
    server.batch_faults = {"poll": [500, 500]}
    with pytest.raises(StageError):
        run(server, max_retries=1)
    server.jobs.clear()  # the provider no longer knows the stored job: 404
    metrics = run(server, max_retries=1)
    assert metrics["ok"] == len(ROWS) and metrics["batch_jobs"] == 1 and server.counts["jobs"] == 2


def test_a_gone_output_file_sends_its_requests_into_the_next_round(server):
    server.reply = offline_reply
    server.batch_faults = {"download": [404]}
    metrics = run(server)
    assert metrics["ok"] == len(ROWS) and metrics["batch_jobs"] == 2 and metrics["failed"] == 0


def test_a_failed_line_echoing_the_key_leaks_it_nowhere(server, workdir, capsys, caplog):
    server.echo_auth = True  # the failed line's error carries the Authorization header
    server.batch_line_errors = 1
    metrics = run(server, max_retries=0, max_failure_rate=1.0)
    assert metrics["failures_by_reason"] == {"batch_failed": 1}
    assert "injected line error" in read_jsonl(FAILED)[0]["error"]
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err + caplog.text
    files = [p for p in Path(workdir).rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_kill_9_while_polling_resumes_the_same_job(server, workdir):
    server.batch_polls = 10**9  # the job runs until the test lets it finish
    cmd = [sys.executable, "-m", "nlistral", "thoughts", "--split", "train",
           *stage_overrides("teacher", server.url, mode="batch", batch_poll_s=0.05)]  # fmt: skip
    env = {**os.environ, "MISTRAL_API_KEY": KEY}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120  # a subprocess's imports alone take ~15 s on a busy box
    while server.counts["poll"] < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    server.batch_polls = 1
    rerun = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert server.counts["files"] == 2 and server.counts["jobs"] == 2  # round 1 resumed; round 2 is the reprompt
    assert len(read_jsonl(workdir / OUT)) == len(ROWS)
