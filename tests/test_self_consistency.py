"""Self-consistency (`teacher.n_samples`): n seeded replies per row, each cached; majority label, votes, agreement."""

import csv
import json
import re
import sqlite3

import pytest
from llm_server import KEY, ROWS, LLMServer, stage_overrides, write_split

from nlistral.config import load_config
from nlistral.io import read_jsonl
from nlistral.stages import thoughts

OUT = "data/original_thoughts/train_thoughts.jsonl"
# the label each sample (seed 42, 43, 44) gives each row of ROWS (gold labels 1, 0, 1, 0)
LABELS = {0: [1, 1, 0], 1: [0, 0, 0], 2: [0, 1, 1], 3: [1, 1, 1]}


def by_seed(body):
    pair = re.search(r"^Premise: (.*)$", body["messages"][1]["content"], re.MULTILINE).group(1)
    row = next(i for i, r in enumerate(ROWS) if r[0] == pair)
    sample = body["random_seed"] - 42
    return json.dumps({"thought_process": f"Step 1: row {row} sample {sample}.",
                       "predicted_label": LABELS[row][sample]})  # fmt: skip


@pytest.fixture
def server(workdir, monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    write_split(workdir, ROWS)
    with LLMServer(by_seed, api_key=KEY) as srv:
        yield srv


def run(server, **settings) -> dict:
    return thoughts.run(load_config(stage_overrides("teacher", server.url, temperature=0.7, **settings)), "train")


def test_three_samples_vote_and_a_rerun_is_free(server, workdir):
    metrics = run(server, n_samples=3, max_concurrency=3)
    assert metrics["requests"] == server.counts["chat"] == 12 and metrics["ok"] == 4
    with sqlite3.connect(workdir / ".cache" / "llm" / "replies.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM replies").fetchone() == (12,)  # 3 cached replies a row
    records = {r["id"]: r for r in read_jsonl(OUT)}
    assert [records[str(i)]["predicted_label"] for i in range(4)] == [1, 0, 1, 1]
    assert records["0"]["votes"] == {"0": 1, "1": 2} and records["0"]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert records["1"]["agreement"] == 1.0 and records["1"]["n_samples"] == 3
    assert records["2"]["thought_process"] == "Step 1: row 2 sample 1."  # the first sample reaching the majority
    assert metrics["agreement_histogram"] == {"0.6667": 2, "1.0": 2}
    assert metrics["accuracy_by_agreement"] == {"0.6667": 1.0, "1.0": 0.5}  # rows 0, 2 right; 1 right, 3 wrong
    with open("metrics/plots/teacher_agreement_train.csv", newline="") as handle:
        assert [row["rows"] for row in csv.DictReader(handle)] == ["2", "2"]

    again = run(server, n_samples=3, max_concurrency=3)
    assert again["requests"] == 0 and again["cost_usd"] == 0 and server.counts["chat"] == 12
    assert read_jsonl(OUT) == list(records.values())


def test_a_tie_goes_to_the_first_samples_label(server):
    run(server, n_samples=2)
    records = {r["id"]: r for r in read_jsonl(OUT)}
    assert records["2"]["votes"] == {"0": 1, "1": 1} and records["2"]["predicted_label"] == 0
    assert records["2"]["agreement"] == 0.5 and records["2"]["thought_process"] == "Step 1: row 2 sample 0."


def test_rows_carry_their_provenance(server):
    run(server, n_samples=3, price_input_per_mtok=1.0, price_output_per_mtok=2.0)
    row = read_jsonl(OUT)[0]
    assert {k: row[k] for k in ("model", "temperature", "seed", "n_samples")} == {
        "model": "test-model", "temperature": 0.7, "seed": 42, "n_samples": 3}  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{8}", row["prompt_version"])
    billed = [u for u, body in zip(server.billed, server.chat_bodies, strict=True) if ROWS[0][0] in json.dumps(body)]
    assert row["prompt_tokens"] == sum(u["prompt_tokens"] for u in billed)
    assert row["cost_usd"] == pytest.approx((row["prompt_tokens"] + 2 * row["completion_tokens"]) / 1e6)
