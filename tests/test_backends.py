"""Every backend option in conf/teacher and conf/reflector runs `nlistral estimate` and both generation stages.

In-process (`cli.main`), on 4 rows a split: offline; replay from a recording of the offline stand-in's own outputs;
mistral and openai against the loopback server (real HTTP, real chat JSON).
"""

import json
import shutil
from pathlib import Path

import pytest
from llm_server import KEY, ROWS, LLMServer, write_split

from nlistral import paths
from nlistral.cli import main
from nlistral.io import read_jsonl

CONF = Path(__file__).resolve().parents[1] / "conf"
BACKENDS = sorted(p.stem for p in (CONF / "teacher").glob("*.yaml"))
HTTP = {"mistral", "openai"}
SPLITS = ("train", "dev")


def test_every_backend_option_is_tested():
    assert BACKENDS == sorted(p.stem for p in (CONF / "reflector").glob("*.yaml")) == [
        "mistral", "offline", "openai", "replay"
    ]  # fmt: skip


@pytest.fixture
def rows(workdir, monkeypatch):
    """4 rows a split; the offline stand-in gets the first wrong, so stage 2 has a row to reflect on."""
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    monkeypatch.setenv("LOCAL_LLM_KEY", KEY)  # the openai profile sends none unless api_key_env names one
    for split in SPLITS:
        write_split(workdir, ROWS, split)
    return workdir


def recording(workdir) -> Path:
    """Run both stages offline and keep their outputs as a recording (a folder of *.jsonl); remove the outputs."""
    for stage in ("thoughts", "reflections"):
        assert main([stage, "--split", "train", "data.dir=data"]) == 0
    folder = workdir / "recorded"
    folder.mkdir()
    for path in (paths.THOUGHTS, paths.REFLECTIONS):
        shutil.copy(path.format(split="train"), folder)
    for path in ("data/original_thoughts", "data/reflected_thoughts", "metrics"):
        shutil.rmtree(path)
    return folder


def overrides(backend: str, url: str | None, replay_from: Path | None) -> list[str]:
    args = ["data.dir=data"]
    for role in ("teacher", "reflector"):
        args.append(f"{role}={backend}")
        if backend in HTTP:
            args += [f"{role}.base_url={url}", f"{role}.model=test-model", f"{role}.backoff_base_s=0.01"]
            args += [f"{role}.api_key_env=LOCAL_LLM_KEY"] if backend == "openai" else []
        if backend == "replay":
            args.append(f"{role}.replay_from={replay_from}")
    return args


def estimate(args, capsys) -> dict:
    assert main(["estimate", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_estimate_and_both_stages_run_with_every_backend(backend, rows, capsys):
    replay_from = recording(rows) if backend == "replay" else None
    with LLMServer(api_key=KEY) as server:
        args = overrides(backend, server.url, replay_from)
        before = estimate(args, capsys)
        assert server.counts["chat"] == 0  # the estimate sends nothing
        for split in SPLITS:
            part = before[f"thoughts@{split}"]
            assert part["rows"] == 4 and part["prompt_tokens"] >= 0 and part["cost_usd"] >= 0
            if backend == "replay":  # every answer is recorded: nothing to send or pay
                assert (part["requests"], part["cost_usd"], part["cached_rows"]) == (0, 0, 4)
            else:
                assert part["requests"] >= 4 and part["cached_rows"] == 0 and part["prompt_tokens"] > 0
        assert before["total"]["requests"] == sum(before[k]["requests"] for k in before if k != "total")

        for stage in ("thoughts", "reflections"):
            assert main([stage, "--split", "train", *args]) == 0
        thoughts = json.loads(Path(paths.THOUGHTS_METRICS.format(split="train")).read_text())
        reflections = json.loads(Path(paths.REFLECTIONS_METRICS.format(split="train")).read_text())
        assert (thoughts["rows"], thoughts["ok"], thoughts["backend"]) == (4, 4, backend)
        wrong = sum(not t["correct"] for t in read_jsonl(paths.THOUGHTS.format(split="train")))
        assert wrong >= 1 and (reflections["rows"], reflections["ok"]) == (wrong, wrong)
        sent = thoughts["requests"] + reflections["requests"]
        if backend == "replay":
            assert sent == 0 and thoughts["cost_usd"] == reflections["cost_usd"] == 0
        elif backend in HTTP:
            assert sent == server.counts["chat"] >= 4 + wrong
        else:
            assert thoughts["requests"] >= 4 and reflections["requests"] >= wrong
        if backend in HTTP:  # now in the reply cache: the estimate prices nothing for train
            after = estimate(args, capsys)["thoughts@train"]
            assert (after["cached_rows"], after["requests"], after["cost_usd"]) == (4, 0, 0)


def test_estimate_with_a_replayed_reflector_reports_nothing_sent_and_nothing_paid(rows, capsys):
    """The done-when check: `nlistral estimate reflector=replay reflector.replay_from=<file>`."""
    recorded = recording(rows) / Path(paths.REFLECTIONS).name.format(split="train")
    result = estimate(["data.dir=data", "reflector=replay", f"reflector.replay_from={recorded}"], capsys)
    for split in SPLITS:
        part = result[f"reflections@{split}"]
        assert (part["requests"], part["cost_usd"], part["cost_usd_batch"]) == (0, 0, 0)
        assert part["model"] == "replay:recorded"
