"""Stage 1 against a loopback Mistral/OpenAI server: every fault leads to its documented outcome and is counted."""

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from llm_server import KEY, ROWS, LLMServer, many_rows, stage_overrides, write_split

from nlistral.config import load_config
from nlistral.errors import ConfigError, StageError
from nlistral.io import read_jsonl
from nlistral.llm.engine import Outcome
from nlistral.stages import thoughts

OUT = "data/original_thoughts/train_thoughts.jsonl"
FAILED = "data/original_thoughts/train_failed.jsonl"


@pytest.fixture
def server(workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    write_split(workdir, ROWS)
    with LLMServer(api_key=KEY) as srv:
        yield srv


def run(server, backend="mistral", **settings) -> dict:
    return thoughts.run(load_config(stage_overrides("teacher", server.url, backend, **settings)), "train")


def test_request_carries_model_params_and_bearer_key(server):
    metrics = run(server, max_concurrency=3)
    assert metrics["ok"] == len(read_jsonl(OUT)) == len(ROWS) and metrics["failed"] == 0
    assert metrics["requests"] == server.counts["chat"] == len(ROWS) and metrics["retries"] == 0
    body = server.chat_bodies[0]
    assert body["model"] == "test-model" and body["random_seed"] == 42 and "seed" not in body
    assert body["response_format"] == {"type": "json_object"} and body["temperature"] == 0.0
    assert body["max_tokens"] == 512 and body["messages"][0]["role"] == "system"
    assert set(server.auth) == {f"Bearer {KEY}"}
    assert metrics["prompt_tokens"] > 0 and metrics["cost_usd"] > 0


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ({"status": 429, "headers": {"Retry-After": "1"}}, "retries_rate_limited"),
        ({"status": 429, "headers": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20ms"}},
         "retries_rate_limited"),
        ({"status": 500}, "retries_server_error"),
        ({"status": 503}, "retries_server_error"),
        ({"hang": 60}, "retries_timeout"),
        ({"reset": True}, "retries_connection"),
        ({"body": "<html>502 Bad Gateway</html>"}, "retries_bad_response"),
    ],
)  # fmt: skip
def test_transient_fault_is_retried_and_uses_no_reprompt(server, fault, cause):
    server.faults = [fault]
    metrics = run(server, timeout_s=3 if "hang" in fault else 30)  # a loopback answer within 3 s, a hang never
    assert metrics["ok"] == len(ROWS) and metrics["failed"] == 0
    assert metrics[cause] == metrics["retries"] == 1 and metrics["reprompts"] == 0
    assert metrics["requests"] == server.counts["chat"] == len(ROWS) + 1
    assert metrics["http_429"] == (1 if fault.get("status") == 429 else 0)


def test_429_pauses_every_thread_for_retry_after(server, workdir):
    server.latency = 0.05
    server.faults = [{"status": 429, "headers": {"Retry-After": "1"}}]
    write_split(workdir, many_rows(8))
    metrics = run(server, max_concurrency=4)
    assert metrics["ok"] == 8 and metrics["http_429"] == 1
    first, later = server.arrivals[0], sorted(server.arrivals)[4:]
    assert all(t - first >= 0.9 for t in later)  # the 3 already in flight finish; nothing new starts for 1 s


def test_client_limit_paces_requests_instead_of_bursting(server, workdir):
    write_split(workdir, many_rows(12))
    server.rate = 10  # at most 10 requests in any 1 s window, else 429
    metrics = run(server, max_concurrency=8, requests_per_second=5)  # 8 threads would send 12 at once unpaced
    assert metrics["ok"] == 12 and metrics["http_429"] == 0 and metrics["retries"] == 0
    # 11 requests spaced >= 1/5 s apart span 2 s: only a delay of over 1 s could squeeze them into one 1 s window


@pytest.mark.parametrize(
    ("content", "finish_reason", "reason", "feedback"),
    [
        ('{"thought_process": "Step 1: x.", "predicted_label": 0.5}', "stop", "bad_label", "predicted_label was 0.5"),
        ('{"thought_process": "Step 1: x.", "predicted_label": "maybe"}', "stop", "bad_label", '"maybe"'),
        ('{"predicted_label": 1}', "stop", "missing_thought_process", '"thought_process" was missing'),
        ('{"thought_process": "Step 1: the premise', "length", "truncated", "cut off"),
    ],
)
def test_invalid_reply_is_reprompted_with_precise_feedback(server, content, finish_reason, reason, feedback):
    server.faults = [{"content": content, "finish_reason": finish_reason}]
    metrics = run(server)
    assert metrics["ok"] == len(ROWS) and metrics["reprompts_by_reason"] == {reason: 1} and metrics["retries"] == 0
    reprompt = server.chat_bodies[1]["messages"]
    assert reprompt[-2] == {"role": "assistant", "content": content}
    assert reprompt[-1]["role"] == "user" and feedback in reprompt[-1]["content"]
    assert read_jsonl(OUT)[0]["reprompts"] == 1


def test_fenced_json_with_prose_is_accepted_as_written(server):
    reply = 'Sure!\n```json\n{"thought_process": "Step 1: A Man PLAYS.", "predicted_label": "1"}\n```\nDone.'
    server.faults = [{"content": reply}]
    metrics = run(server)
    assert metrics["reprompts"] == 0 and metrics["requests"] == len(ROWS)
    first = read_jsonl(OUT)[0]
    assert first["thought_process"] == "Step 1: A Man PLAYS." and first["predicted_label"] == 1


def test_row_failing_all_reprompts_goes_to_failed_file_and_fails_the_stage(server):
    bad = {"content": '{"thought_process": "Step 1: x.", "predicted_label": 0.5}'}
    server.faults = [bad, bad, bad]  # max_reprompts: 2
    with pytest.raises(StageError, match="1 of 4 rows failed"):
        run(server)
    failed, ok = read_jsonl(FAILED), read_jsonl(OUT)
    assert [r["id"] for r in ok] == ["1", "2", "3"] and len(failed) == 1
    assert failed[0]["id"] == "0" and failed[0]["reason"] == "bad_label" and "0.5" in failed[0]["raw"]
    metrics = json.loads(Path("metrics/thoughts_train.json").read_text())
    assert metrics["ok"] + metrics["failed"] == metrics["rows"] and metrics["failures_by_reason"] == {"bad_label": 1}


def test_retries_run_out_row_fails_with_the_cause(server):
    server.faults = [{"status": 500}] * 3
    metrics = run(server, max_retries=2, max_failure_rate=0.5)
    assert metrics["failed"] == 1 and metrics["failures_by_reason"] == {"server_error": 1}
    assert metrics["retries_server_error"] == 2 and metrics["requests"] == len(ROWS) + 2
    assert read_jsonl(FAILED)[0]["reason"] == "server_error"


@pytest.mark.parametrize("status", [400, 403, 404])
def test_client_errors_are_not_retried(server, status):
    server.faults = [{"status": status}]
    metrics = run(server, max_failure_rate=0.5)
    assert metrics["failures_by_reason"] == {f"http_{status}": 1} and metrics["retries"] == 0
    assert metrics["requests"] == server.counts["chat"] == len(ROWS)


def test_401_stops_the_stage_naming_the_variable_not_the_key(server, workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", "sk-wrong-key-also-secret")
    with pytest.raises(ConfigError) as err:
        run(server)
    text = "".join(traceback.format_exception(err.value))
    assert "MISTRAL_API_KEY" in str(err.value) and "401" in str(err.value)
    assert "sk-wrong-key-also-secret" not in text and KEY not in text
    assert server.counts["chat"] == 0  # GET /models got the 401 first
    assert not workdir.joinpath(OUT).exists()


def test_401_mid_stage_stops_every_thread(server, workdir):
    write_split(workdir, many_rows(12))
    server.latency = 0.2  # the other two requests are still in flight when the 401 comes back
    server.faults = [{"status": 401}]
    with pytest.raises(ConfigError, match="MISTRAL_API_KEY"):
        run(server, max_concurrency=3)
    assert server.counts["chat"] <= 3 and not workdir.joinpath(OUT).exists()


def test_401_wakes_threads_waiting_in_the_limiter_and_they_send_nothing(server, workdir):
    write_split(workdir, many_rows(8))
    server.faults = [{"status": 401}]
    with pytest.raises(ConfigError, match="MISTRAL_API_KEY"):
        run(server, max_concurrency=4, requests_per_second=0.5)  # three threads queue 2 s apart behind the 401
    assert server.counts["chat"] == 1


def test_ctrl_c_exits_at_once_with_one_request_in_flight_and_one_paused(server, workdir):
    """One request hangs for a minute, the other waits out a 30 s Retry-After: Ctrl-C still ends the stage at once."""
    server.faults = [{"status": 429, "headers": {"Retry-After": "30"}}, {"hang": 60}]
    overrides = stage_overrides("teacher", server.url, max_concurrency=2, timeout_s=120)
    cmd = [sys.executable, "-m", "nlistral", "thoughts", "--split", "train", *overrides]
    proc = subprocess.Popen(cmd, cwd=workdir, env={**os.environ, "MISTRAL_API_KEY": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while server.counts["chat"] < 2:  # both requests arrived: one got its 429, the other hangs
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=25)  # a guard: waiting for the hang or the pause takes 30-60 s
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    assert server.counts["chat"] == 2  # nothing more was sent
    with sqlite3.connect(workdir / ".cache" / "llm" / "replies.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM replies").fetchone() == (0,)  # no reply, no half-written one


@pytest.mark.parametrize("value", ["sk-5ec4e7-pasted-key", "AbCdEf0123456789xYzSecret"])
def test_api_key_env_holding_a_key_is_refused_without_echoing_it(server, value):
    with pytest.raises(ConfigError, match="api_key_env must name an environment variable") as err:
        run(server, api_key_env=value)
    assert value not in "".join(traceback.format_exception(err.value))
    assert sum(server.counts.values()) == 0


def test_missing_key_is_a_config_error_before_any_request(server, monkeypatch):
    monkeypatch.delenv("MISTRAL_API_KEY")
    with pytest.raises(ConfigError, match="MISTRAL_API_KEY is not set"):
        run(server)
    assert sum(server.counts.values()) == 0


def test_key_is_read_from_dotenv(server, workdir, monkeypatch):
    monkeypatch.delenv("MISTRAL_API_KEY")  # monkeypatch also undoes what .env sets, as the fixture set it first
    workdir.joinpath(".env").write_text(f"MISTRAL_API_KEY={KEY}\n")
    assert run(server)["ok"] == len(ROWS)


def test_unknown_model_stops_listing_the_served_ones(server):
    server.models = ["ministral-8b-latest", "mistral-small-latest"]
    with pytest.raises(ConfigError, match="'test-model' is not served.*ministral-8b-latest, mistral-small-latest"):
        run(server)
    assert server.counts["chat"] == 0


def test_openai_backend_sends_seed_and_no_key_when_unset(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.api_key = None
    metrics = run(server, backend="openai")
    assert metrics["ok"] == len(ROWS) and metrics["backend"] == "openai"
    body = server.chat_bodies[0]
    assert body["seed"] == 42 and "random_seed" not in body and set(server.auth) == {None}


def test_openai_backend_401_with_its_key_unset_says_so(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="requires an API key .*OPENAI_API_KEY is not set"):
        run(server, backend="openai")


def test_ollama_tagged_model_id_serves_the_untagged_name(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.api_key = None
    server.models = ["mistral:latest", "llama3:8b"]
    assert run(server, backend="openai", model="mistral")["ok"] == len(ROWS)
    with pytest.raises(ConfigError, match="'llama3' is not served"):
        run(server, backend="openai", model="llama3")


def test_batch_mode_needs_mistral(server):
    with pytest.raises(ConfigError, match="batch"):
        run(server, backend="openai", mode="batch")


def test_benchmark_counts_rows_not_recorded_exactly_once_as_lost():
    path = Path(__file__).resolve().parents[1] / "bench" / "generation.py"
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    outcomes = [Outcome("0", value={}), Outcome("0", value={}), Outcome("2", reason="bad_label"), Outcome("3")]
    assert bench.lost_rows(["0", "1", "2", "3"], outcomes) == 3  # "0" twice, "1" missing, "3" neither ok nor failed
    assert bench.lost_rows(["0", "2"], outcomes[1:3]) == 0
