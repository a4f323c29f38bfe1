"""Each dvc.yaml stage lists the params its code reads, so a change re-runs what it can change (README: "every stage
lists the params it reads").

The reads are not written down by hand: every stage runs for real (in-process, embedded profile, tiny and short)
with a read-tracking config, which records the full key of every value (or list) the stage's `run` reads, whether
by attribute, `get`, `in` or `OmegaConf.to_container`. A read is covered when dvc.yaml lists the key or a parent of
it. Keys that decide how a result is obtained but not what it is (rate limits, retries, timeouts, where MLflow
logs) are read and deliberately not listed: they are OPERATIONAL below, each with why.
"""

import json
import re
import shutil
import sys
from contextlib import contextmanager

import datasets
import pytest
import yaml
from conftest import REPO
from omegaconf import DictConfig, ListConfig, OmegaConf

from nlistral.config import load_config

OPERATIONAL = {  # read, never a dvc.yaml param: changing one must re-run nothing (README)
    **{f"{llm}.{key}": "how requests are sent, not what they ask" for llm in ("teacher", "reflector")
       for key in ("max_retries", "backoff_base_s", "backoff_max_s", "batch_poll_s", "max_concurrency",
                   "requests_per_second", "tokens_per_minute", "timeout_s", "api_key_env")},
    **{f"{llm}.{key}": "the bill and when to give up: a run's recorded cost is what it paid at the time"
       for llm in ("teacher", "reflector")
       for key in ("budget_usd", "max_failure_rate", "price_input_per_mtok", "price_output_per_mtok")},
    **{f"eval.server.{key}": "how the model server is reached, not which model answers"
       for key in ("base_url", "api_key_env", "max_concurrency", "requests_per_second", "timeout_s", "max_retries",
                   "backoff_base_s", "backoff_max_s", "max_failure_rate", "port", "ready_timeout_s")},
    "mlflow.tracking_uri": "where the run is logged", "mlflow.experiment": "where the run is logged",
    "llm_cache_dir": "where answers are cached (a cached answer is the answer a request gives)",
    "train.resume": "whether a crashed run continues: the same run either way (train.fingerprint leaves it out)",
}  # fmt: skip
FAST = ["model.load_in_4bit=false", "train.max_steps=2", "train.eval_steps=2", "train.save_steps=2",
        "train.logging_steps=1", "eval.limit=4", "eval.bootstrap=1000", "eval.max_new_tokens=16", "eval.batch_size=4",
        "eval.test_sets.diagnostic.limit=4"]  # fmt: skip
SET = "diagnostic"  # the profile's extra test set


RECORD_ONLY = {"flat_params", "redacted_params"}  # train: what it logs to its MLflow run, a record and no DVC output


class TrackedDict(dict):
    """A plain copy of the whole config (`OmegaConf.to_container(cfg)`, e.g. for the report's templates) whose key
    reads are recorded as the config's would be."""

    def __init__(self, data, prefix, read):
        super().__init__({k: TrackedDict(v, f"{prefix}{k}.", read) if isinstance(v, dict) else v
                          for k, v in data.items()})  # fmt: skip
        self.prefix, self.read = prefix, read

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if not isinstance(value, dict):
            self.read.add(f"{self.prefix}{key}")
        return value

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


def recording_only() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in RECORD_ONLY:
            return True
        frame = frame.f_back
    return False


@contextmanager
def tracking(cfg: DictConfig):
    """Records the full key of each value or list of `cfg` read while inside (list indices dropped)."""
    read, get_node, to_container, inside = set(), DictConfig._get_node, OmegaConf.to_container, []

    def tracked_get_node(self, key, *args, **kwargs):
        node = get_node(self, key, *args, **kwargs)
        if not inside and node is not None and not isinstance(node, DictConfig):
            inside.append(True)  # finding the key reads nodes too: those are not the stage's reads
            try:
                if self._get_root() is cfg and not recording_only():
                    read.add(re.sub(r"\[\d+\]", "", self._get_full_key(key)))
            finally:
                inside.pop()
        return node

    def tracked_to_container(conf, *args, **kwargs):
        if conf is not cfg:
            return to_container(conf, *args, **kwargs)
        inside.append(True)  # the copy's reads are what counts, not the copying
        try:
            data = to_container(conf, *args, **kwargs)
        finally:
            inside.pop()
        return data if recording_only() else TrackedDict(data, "", read)

    DictConfig._get_node, OmegaConf.to_container = tracked_get_node, tracked_to_container
    try:
        yield read
    finally:
        DictConfig._get_node, OmegaConf.to_container = get_node, to_container


def stage_runs():
    """(dvc.yaml stage, item, run): in pipeline order, each `run` the stage's command for that item."""
    from nlistral.stages import (
        base_model,
        evaluate,
        evaluate_base,
        evaluate_set,
        evaluate_teacher,
        reflections,
        report,
        sft,
        summarise_set,
        thoughts,
        train,
    )

    for split in ("train", "dev"):
        yield "thoughts", split, lambda cfg, split=split: thoughts.run(cfg, split)
        yield "reflections", split, lambda cfg, split=split: reflections.run(cfg, split)
    yield "base_model", None, base_model.run
    for split in ("train", "dev"):
        yield "sft", split, lambda cfg, split=split: sft.run(cfg, split)
    yield "train", None, train.run
    yield "evaluate_base", None, evaluate_base.run
    yield "evaluate_teacher", None, evaluate_teacher.run
    yield "evaluate", None, evaluate.run
    for stage, model in (("evaluate_set", "fine-tuned"), ("evaluate_set_base", "base"),
                         ("evaluate_set_teacher", "teacher")):  # fmt: skip
        yield stage, SET, lambda cfg, model=model: evaluate_set.run(cfg, SET, model)
    yield "summarise_set", SET, lambda cfg: summarise_set.run(cfg, SET)
    yield "report", None, report.run


@pytest.fixture(scope="module")
def reads(tmp_path_factory) -> dict[str, set[str]]:
    """dvc.yaml stage -> the keys its runs read, every stage run once (each item) on the embedded profile."""
    root = tmp_path_factory.mktemp("params")
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "data" / "sample", root / "data" / "sample")
    found: dict[str, set[str]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("NLISTRAL_CACHE_DIR", str(root / ".cache" / "llm"))
        for stage, _, run in stage_runs():
            cfg = load_config(FAST)
            with tracking(cfg) as read:
                run(cfg)
            found.setdefault(stage, set()).update(read)
    return found


def listed_params(stage: str, item: str | None) -> set[str]:
    """The stage's `params:`, and the keys its definition interpolates (`${data.dir}/test.csv`, `foreach:`): a
    change to one of those changes the stage itself, so DVC re-runs it."""
    body = STAGES[stage].get("do", STAGES[stage])
    listed = {str(p).replace("${key}", item or "").replace("${item}", item or "") for p in body.get("params", [])}
    interpolated = re.findall(r"\$\{([\w.]+)\}", json.dumps(STAGES[stage]))
    return listed | {key for key in interpolated if key not in ("item", "key") and not key.startswith("item.")}


def uncovered(read: set[str], listed: set[str]) -> list[str]:
    return sorted(k for k in read - OPERATIONAL.keys() if not any(k == p or k.startswith(f"{p}.") for p in listed))


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
ITEMS = {stage: item for stage, item, _ in stage_runs()}


@pytest.mark.parametrize("stage", list(ITEMS))
def test_a_stage_lists_every_param_it_reads(reads, stage):
    """Catches a key a stage's code reads that its dvc.yaml `params:` miss: `dvc repro` would call the stage up to
    date after a change to it and keep the stale outputs."""
    missing = uncovered(reads[stage], listed_params(stage, ITEMS[stage]))
    assert not missing, f"dvc.yaml stage {stage} reads params it does not list: {missing}"


def test_the_prepare_stage_lists_every_param_it_reads(tmp_path, monkeypatch):
    """The same for `prepare` (a `datasets` source: the sample profile is a CSV folder, with nothing to prepare)."""
    from nlistral.stages import prepare

    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / ".cache" / "datasets"))
    rows = {"premise": ["A man sleeps.", "A dog runs."], "hypothesis": ["A man rests.", "A cat flies."],
            "label": [0, 2]}  # fmt: skip
    labels = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": labels})  # fmt: skip
    datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in ("train", "validation")}
                         ).save_to_disk(tmp_path / "snli_like")  # fmt: skip
    cfg = load_config(["data=snli", f"data.dataset.path={tmp_path / 'snli_like'}", "data.dir=data/prepared"])
    with tracking(cfg) as read:
        prepare.run(cfg, "train")
    assert {"data.dir", "data.dataset.path"} <= read  # the tracking sees what it must
    missing = uncovered(read, listed_params("prepare", "train"))
    assert not missing, f"dvc.yaml stage prepare reads params it does not list: {missing}"


def test_the_llm_stages_over_the_api_list_every_param_they_read(workdir, monkeypatch):
    """thoughts, reflections and evaluate-teacher through the Mistral API client (a loopback server): the request
    settings the offline backend never reads are listed too."""
    from llm_server import KEY, ROWS, LLMServer, stage_overrides, write_split

    from nlistral.stages import evaluate_teacher, reflections, thoughts

    for split in ("train", "test"):
        write_split(workdir, ROWS, split)
    monkeypatch.setenv("MISTRAL_API_KEY", KEY)
    with LLMServer(api_key=KEY) as server:
        reflector = [o for o in stage_overrides("reflector", server.url) if o != "data.dir=data"]
        overrides = [*stage_overrides("teacher", server.url), *reflector]
        for stage, run in (("thoughts", lambda cfg: thoughts.run(cfg, "train")),
                           ("reflections", lambda cfg: reflections.run(cfg, "train")),
                           ("evaluate_teacher", evaluate_teacher.run)):  # fmt: skip
            cfg = load_config(overrides)
            with tracking(cfg) as read:
                run(cfg)
            assert {"temperature", "max_tokens", "response_format"} <= {k.split(".")[-1] for k in read}, stage
            missing = uncovered(read, listed_params(stage, "train"))
            assert not missing, f"dvc.yaml stage {stage} reads params it does not list: {missing}"


def test_tracking_records_every_kind_of_read():
    """The tracker itself: attribute, item, get, `in`, to_container and list reads are recorded; unread keys not."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": {"x": 1, "y": 2}, "b": {"z": [1, 2]}, "c": {"w": 3}, "d": 4, "e": {"v": 5}})
    with tracking(cfg) as read:
        assert cfg.a.x == 1 and cfg["d"] == 4 and cfg.c.get("w") == 3 and "v" in cfg.e
        assert OmegaConf.to_container(cfg.b) == {"z": [1, 2]} and isinstance(cfg.b.z, ListConfig)
    assert read == {"a.x", "d", "c.w", "e.v", "b.z"}
    assert uncovered(read, {"a", "b.z", "c", "d"}) == ["e.v"]
