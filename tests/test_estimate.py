"""`nlistral estimate`: sends nothing, and is close to what the run then bills (the loopback server's log)."""

import json

import pytest
from llm_server import KEY, LLMServer, many_rows, stage_overrides, write_split

from nlistral import estimate
from nlistral.cli import main
from nlistral.config import load_config
from nlistral.stages import thoughts

# The stated tolerance: prompt tokens within 10% (the count is exact here; the estimate adds the expected 3%
# reprompts, which these replies never need), completion tokens and cost within 25% (a mean of earlier replies).
PROMPT_TOLERANCE, COMPLETION_TOLERANCE = 0.10, 0.25


@pytest.fixture
def server(workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    write_split(workdir, many_rows(8), "dev")
    write_split(workdir, [(f"A cyclist {i} rides up the old hill road.", f"Cyclist {i} rides.", 1) for i in range(12)])
    with LLMServer(api_key=KEY) as srv:
        yield srv


def test_estimate_sends_nothing_and_is_close_to_what_the_run_bills(server, capsys):
    settings = {"tokenizer": "approx", "price_input_per_mtok": 0.5, "price_output_per_mtok": 1.5,
                "requests_per_second": 4, "expected_latency_s": 0.1}  # fmt: skip
    cfg = load_config(stage_overrides("teacher", server.url, **settings))
    thoughts.run(cfg, "dev")  # the cache now holds replies of this model: the estimate takes their mean length
    sent, billed_before = dict(server.counts), len(server.billed)
    before = estimate.estimate(cfg, ["train"])
    assert server.counts == sent  # not a request, not even GET /models
    guess = before["thoughts@train"]
    assert guess["rows"] == 12 and guess["cached_rows"] == 0 and guess["requests"] == 12
    assert (
        guess["completion_tokens_from"] == "mean of 8 cached replies" and guess["wall_s"] == 3
    )  # 12 at 4/s, slower than 0.1 s each

    metrics = thoughts.run(cfg, "train")
    billed = server.billed[billed_before:]
    assert guess["prompt_tokens"] == pytest.approx(sum(u["prompt_tokens"] for u in billed), rel=PROMPT_TOLERANCE)
    completion = sum(u["completion_tokens"] for u in billed)
    assert guess["completion_tokens"] == pytest.approx(completion, rel=COMPLETION_TOLERANCE)
    assert guess["cost_usd"] == pytest.approx(metrics["cost_usd"], rel=COMPLETION_TOLERANCE)
    assert guess["cost_usd_batch"] == pytest.approx(guess["cost_usd"] / 2, abs=1e-4)

    after = estimate.estimate(cfg, ["train"])["thoughts@train"]
    assert after["cached_rows"] == 12 and after["requests"] == 0 and after["cost_usd"] == 0  # paid already


def test_reflections_before_stage_1_use_the_expected_error_rate_and_the_cli_prints_json(server, capsys):
    overrides = [*stage_overrides("reflector", server.url), "estimate.teacher_error_rate=0.5"]
    overrides = ["--split", "train", "--json", *overrides]
    assert main(["estimate", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)
    part = result["reflections@train"]
    assert part["rows"] == 6 and "teacher_error_rate=0.5 of the rows (stage 1 has not run)" in part["rows_from"]
    assert set(result["total"]) == set(estimate.FIELDS)
    assert result["total"]["rows"] == result["thoughts@train"]["rows"] + part["rows"]
    assert sum(server.counts.values()) == 0
