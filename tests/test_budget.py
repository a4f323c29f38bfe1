"""A hard budget (`teacher.budget_usd`): checked against the loopback server's log of billed tokens."""

import json

import pytest
from llm_server import KEY, LLMServer, many_rows, stage_overrides, write_split

from nlistral.config import load_config
from nlistral.io import read_jsonl
from nlistral.stages import StageError, thoughts

OUT = "data/original_thoughts/train_thoughts.jsonl"
FAILED = "data/original_thoughts/train_failed.jsonl"
PRICE = 1000.0  # USD per million tokens: $0.001 a token, so each request costs tenths of a dollar
ROWS = 10


@pytest.fixture
def server(workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    write_split(workdir, many_rows(ROWS))
    with LLMServer(api_key=KEY) as srv:
        yield srv


def run(server, **settings) -> dict:
    settings = {"price_input_per_mtok": PRICE, "price_output_per_mtok": PRICE, **settings}
    return thoughts.run(load_config(stage_overrides("teacher", server.url, **settings)), "train")


def billed_usd(server, factor=1.0) -> float:
    return sum(u["prompt_tokens"] + u["completion_tokens"] for u in server.billed) * PRICE / 1e6 * factor


@pytest.mark.parametrize(("mode", "factor"), [("sync", 1.0), ("batch", 0.5)])
def test_budget_stops_at_or_under_the_cap_and_a_larger_one_finishes_paying_nothing_twice(server, mode, factor):
    with pytest.raises(StageError, match=r"teacher\.budget_usd=3 reached: this run spent \$[0-9.]+ .*higher") as err:
        run(server, mode=mode, budget_usd=3, max_concurrency=3)
    assert "unsent" in str(err.value)
    paid = billed_usd(server, factor)
    assert 0 < paid <= 3.0
    ok, failed = read_jsonl(OUT), read_jsonl(FAILED)
    assert ok and failed and len(ok) + len(failed) == ROWS
    assert {r["reason"] for r in failed} == {"budget"} and len(server.billed) == len(ok)  # unsent rows: never sent
    assert sum(r["cost_usd"] for r in ok) == pytest.approx(paid)  # each row's cost, as the server billed it

    metrics = run(server, mode=mode, budget_usd=100, max_concurrency=3)
    assert metrics["ok"] == ROWS and metrics["cache_hits"] == len(ok) and len(server.billed) == ROWS
    if mode == "sync":
        asked = [json.dumps(body, sort_keys=True) for body in server.chat_bodies]
        assert len(asked) == len(set(asked)) == ROWS  # nothing already paid was sent again
    assert billed_usd(server, factor) - paid == pytest.approx(metrics["cost_usd"], abs=1e-6)


def test_a_budget_too_small_for_one_request_sends_nothing(server):
    with pytest.raises(StageError, match="budget_usd=0.01 reached: this run spent \\$0.0000"):
        run(server, budget_usd=0.01)
    assert server.counts["chat"] == 0 and len(read_jsonl(FAILED)) == ROWS
