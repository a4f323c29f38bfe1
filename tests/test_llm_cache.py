"""Nothing lost, nothing re-paid: the reply cache across re-runs, key changes, parameter changes and `kill -9`."""

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from llm_server import KEY, ROWS, LLMServer, many_rows, stage_overrides, write_split

from nlistral.config import load_config
from nlistral.io import read_jsonl
from nlistral.llm.cache import cache_location
from nlistral.stages import thoughts

OUT = "data/original_thoughts/train_thoughts.jsonl"


@pytest.fixture
def server(workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    write_split(workdir, ROWS)
    with LLMServer() as srv:
        yield srv


def run(server, **settings) -> dict:
    return thoughts.run(load_config(stage_overrides("teacher", server.url, **settings)), "train")


def test_rerun_of_a_finished_stage_sends_nothing_and_needs_no_key(server, workdir, monkeypatch):
    first = run(server, max_concurrency=2)
    output = (workdir / OUT).read_bytes()
    sent = sum(server.counts.values())
    monkeypatch.delenv("MISTRAL_API_KEY")
    again = run(server, max_concurrency=2)
    assert sum(server.counts.values()) == sent and again["requests"] == 0
    assert again["cache_hits"] == first["requests"] == len(ROWS) and again["cost_usd"] == 0
    assert again["saved_usd"] == first["cost_usd"] and again["cached_prompt_tokens"] == first["prompt_tokens"]
    assert (workdir / OUT).read_bytes() == output


def test_cache_ignores_the_api_key_but_not_the_generation_params(server, monkeypatch):
    run(server)
    monkeypatch.setenv("MISTRAL_API_KEY", "sk-another-key")
    assert run(server)["requests"] == 0
    assert run(server, temperature=0.7)["requests"] == len(ROWS)
    server.models.append("other-model")
    assert run(server, model="other-model")["requests"] == len(ROWS)


def _cli(workdir, server, **settings) -> subprocess.Popen:
    """`nlistral thoughts --split train` in `workdir`, as DVC would run it, pointed at `server`."""
    cmd = [sys.executable, "-m", "nlistral", "thoughts", "--split", "train",
           *stage_overrides("teacher", server.url, **settings)]  # fmt: skip
    env = {**os.environ, "MISTRAL_API_KEY": KEY}
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_kill_9_mid_stage_resends_only_what_was_in_flight(workdir):
    rows, concurrency = 30, 3
    write_split(workdir, many_rows(rows))
    with LLMServer() as server:
        server.faults = [{}] * 10 + [{"hang": 120}] * rows  # 10 answers, then every request hangs until the kill
        proc = _cli(workdir, server, max_concurrency=concurrency)
        _wait_for(lambda: server.counts["chat"] >= 10 + concurrency)
        proc.kill()
        proc.wait()
        sent_before = server.counts["chat"]
        assert sent_before == 10 + concurrency and not (workdir / OUT).exists()
        server.faults = []
        rerun = _cli(workdir, server, max_concurrency=concurrency)
        out, err = rerun.communicate(timeout=60)
        assert rerun.returncode == 0, err
        resent = server.counts["chat"] - sent_before
    assert sent_before + resent <= rows + concurrency  # at most the requests in flight at the kill, again
    records = read_jsonl(workdir / OUT)
    assert [r["id"] for r in records] == [str(i) for i in range(rows)]
    metrics = json.loads((workdir / "metrics/thoughts_train.json").read_text())
    assert metrics["cache_hits"] + metrics["requests"] == rows and metrics["requests"] == resent


def test_two_stages_at_once_share_the_cache_and_pay_each_reply_once(workdir):
    """Two parallel experiments' thoughts stages (own workspaces, one machine's cache) ask for the same 40 replies
    at once: both finish with every row, and each distinct request reaches the server exactly once."""
    rows = 40
    spaces = [workdir / "exp-a", workdir / "exp-b"]
    with LLMServer(latency=0.2) as server:
        procs = []
        for space in spaces:
            shutil.copytree(workdir / "conf", space / "conf")
            shutil.copy(workdir / "params.yaml", space / "params.yaml")
            write_split(space, many_rows(rows))
            procs.append(_cli(space, server, max_concurrency=3))
        errors = [proc.communicate(timeout=600)[1] for proc in procs]
    for proc, err in zip(procs, errors, strict=True):
        assert proc.returncode == 0, err
    asked = Counter(json.dumps(body, sort_keys=True) for body in server.chat_bodies)
    assert len(asked) == rows and set(asked.values()) == {1}, "a reply was paid for twice"
    outputs = [(space / OUT).read_bytes() for space in spaces]
    assert outputs[0] == outputs[1] and len(read_jsonl(spaces[0] / OUT)) == rows
    metrics = [json.loads((space / "metrics/thoughts_train.json").read_text()) for space in spaces]
    assert sum(m["requests"] for m in metrics) == rows
    assert all(m["requests"] + m["cache_hits"] == rows for m in metrics)


def test_api_key_appears_in_no_output_log_metrics_or_cache(workdir):
    """A full run, a 401 run and a 400 row through the CLI: the key shows up nowhere a user or a file can see."""
    write_split(workdir, ROWS)
    with LLMServer(api_key=KEY) as server:
        server.echo_auth = True  # the 400's body carries the Authorization header back
        server.faults = [{"status": 400}]
        ok = _cli(workdir, server, max_failure_rate=0.5)
        ok_out, ok_err = ok.communicate(timeout=60)
        assert ok.returncode == 0, ok_err
        server.faults = [{"status": 401}]
        refused = _cli(workdir, server, temperature=0.5)  # new requests, so the chat call meets the 401
        refused_out, refused_err = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "MISTRAL_API_KEY" in refused_err and "401" in refused_err
    assert "injected 400" in read_jsonl(workdir / "data/original_thoughts/train_failed.jsonl")[0]["error"]
    for text in (ok_out, ok_err, refused_out, refused_err):
        assert KEY not in text
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files) and any(p.name == "train_failed.jsonl" for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def test_cache_location_defaults_to_the_user_cache_shared_by_clones(monkeypatch, tmp_path):
    monkeypatch.delenv("NLISTRAL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_location(None) == tmp_path / "xdg" / "nlistral" / "llm"
    monkeypatch.setenv("NLISTRAL_CACHE_DIR", str(tmp_path / "env"))
    assert cache_location(None) == tmp_path / "env"
    assert cache_location("/abs/dir") == Path("/abs/dir")
