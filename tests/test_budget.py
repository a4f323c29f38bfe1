"""A hard budget (`teacher.budget_usd`): checked against the loopback server's log of billed tokens."""

import json

import pytest
from llm_server import KEY, LLMServer, many_rows, stage_overrides, write_split

from nlistral.config import load_config
from nlistral.errors import StageError
from nlistral.io import read_jsonl
from nlistral.stages import thoughts

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


def test_a_timed_out_request_keeps_its_worst_case_in_the_budget(server, capsys):
    """README: "A timed-out request keeps its worst case (the provider may have billed it)" — through the CLI. The
    budget fits one request's worst case, not two; the first request hangs past timeout_s, so the second must not be
    sent (catches a timeout that releases its reservation: the second would be sent and answered)."""
    from nlistral import cli
    from nlistral.llm.budget import worst_prompt_tokens

    server.faults = [{"hang": 60}]
    overrides = stage_overrides("teacher", server.url, price_input_per_mtok=PRICE, price_output_per_mtok=PRICE,
                                max_tokens=100000, budget_usd=150, timeout_s=3)  # fmt: skip
    assert cli.main(["thoughts", "--split", "train", *overrides]) == 1
    [first] = server.chat_bodies  # the one that hung: nothing after it was sent, not even its retry
    worst = (worst_prompt_tokens(first["messages"]) + first["max_tokens"]) * PRICE / 1e6
    assert 100 < worst <= 150 < 2 * worst  # one worst case fits the cap, two do not
    assert "teacher.budget_usd=150 reached" in capsys.readouterr().err
    # the hung row's retry did not fit either: every row is unsent for the budget
    assert [r["reason"] for r in read_jsonl(FAILED)] == ["budget"] * ROWS
