"""conf/ is the source of truth: every config composes, and params.yaml is exactly its composition."""

from pathlib import Path

import pytest
import yaml

from nlistral.config import ConfigError, compose_params, load_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def test_params_yaml_is_the_composition_of_conf():
    assert (REPO / "params.yaml").read_text() == compose_params(conf_dir=CONF), "run `make params`"


@pytest.mark.parametrize(
    "override", [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
)
def test_every_config_composes(override):
    params = yaml.safe_load(compose_params([override], conf_dir=CONF))
    for key in ("data", "teacher", "reflector", "model", "train", "eval", "sft", "mlflow"):
        assert key in params


def test_backend_groups_share_their_keys():
    for group in ("teacher", "reflector"):
        key_sets = {path.stem: set(yaml.safe_load(path.read_text())) for path in (CONF / group).glob("*.yaml")}
        first = next(iter(key_sets.values()))
        assert all(keys == first for keys in key_sets.values()), key_sets


def test_no_secret_values_in_conf():
    for path in CONF.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            assert "api_key:" not in line, f"{path}: keys are read from the env var named by api_key_env"


def test_overrides_dotted_and_group_swap(workdir):
    cfg = load_config(["teacher.max_concurrency=8", "sft.include_reflections=false"])
    assert cfg.teacher.max_concurrency == 8
    assert load_config(["teacher.model=2512"]).teacher.model == "2512"
    assert cfg.sft.include_reflections is False
    swapped = load_config(["teacher=offline"])
    assert swapped.teacher.backend == "offline"


def test_unknown_key_and_group_option_are_errors(workdir):
    with pytest.raises(ConfigError, match="unknown config key 'teacher.max_concurency'"):
        load_config(["teacher.max_concurency=8"])
    with pytest.raises(ConfigError, match="options for 'teacher'"):
        load_config(["teacher=nonexistent"])
    assert load_config(["+teacher.extra=1"]).teacher.extra == 1
    with pytest.raises(ConfigError, match="dvc exp run -S experiment=no_reflections"):
        load_config(["experiment=no_reflections"])


def test_experiment_is_a_delta():
    params = yaml.safe_load(compose_params(["experiment=no_reflections"], conf_dir=CONF))
    default = yaml.safe_load(compose_params(conf_dir=CONF))
    assert params["sft"]["include_reflections"] is False
    assert {k: v for k, v in params.items() if k != "sft"} == {k: v for k, v in default.items() if k != "sft"}
