"""conf/ is the source of truth: every config composes, and params.yaml is exactly its composition."""

import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from nlistral.config import compose_params, load_config, validate
from nlistral.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# The groups conf/config.yaml selects from (conf/llm/ holds the bases that backend options inherit, not a group).
GROUPS = sorted(next(iter(d)) for d in yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
                if isinstance(d, dict))  # fmt: skip


def test_params_yaml_is_the_composition_of_conf():
    assert (REPO / "params.yaml").read_text() == compose_params(conf_dir=CONF), "run `make params`"


@pytest.mark.parametrize(
    "override", [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
)
def test_every_config_composes(override):
    """... and passes the schema (nlistral.schema): no shipped option is refused."""
    text = compose_params([override], conf_dir=CONF)
    validate(OmegaConf.create(text))
    params = yaml.safe_load(text)
    for key in ("data", "teacher", "reflector", "model", "train", "eval", "sft", "mlflow"):
        assert key in params


def test_backend_options_compose_to_the_same_keys():
    for group in ("teacher", "reflector"):
        key_sets = {
            path.stem: set(yaml.safe_load(compose_params([f"{group}={path.stem}"], conf_dir=CONF))[group])
            for path in (CONF / group).glob("*.yaml")
        }
        first = next(iter(key_sets.values()))
        assert all(keys == first for keys in key_sets.values()), key_sets


def inherited(path: Path) -> dict:
    """What a config file's `defaults: [- base@_here_]` chain gives it, before its own values."""
    values = {}
    for entry in yaml.safe_load(path.read_text()).get("defaults", []):
        if isinstance(entry, str) and entry.endswith("@_here_"):
            name = entry.removesuffix("@_here_")
            base = CONF / f"{name.lstrip('/')}.yaml" if name.startswith("/") else path.parent / f"{name}.yaml"
            values |= inherited(base) | {k: v for k, v in yaml.safe_load(base.read_text()).items() if k != "defaults"}
    return values


@pytest.mark.parametrize("group", ["teacher", "reflector", "llm", "model"])
def test_options_and_bases_hold_only_what_differs_from_what_they_inherit(group):
    for path in (CONF / group).glob("*.yaml"):
        option, base = yaml.safe_load(path.read_text()) or {}, inherited(path)
        repeated = {k for k, v in option.items() if k != "defaults" and base.get(k, KeyError) == v}
        assert not repeated, f"{path} repeats {repeated} from what it inherits"


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
    with pytest.raises(ConfigError, match="Could not find 'teacher/nonexistent'"):
        load_config(["teacher=nonexistent"])
    with pytest.raises(ConfigError, match="sweep"):
        load_config(["train.lora_r=8,16"])
    assert load_config(["+teacher.extra=1"]).teacher.extra == 1
    with pytest.raises(ConfigError, match="dvc exp run -S experiment=no_reflections"):
        load_config(["experiment=no_reflections"])


def test_experiment_is_a_delta():
    params = yaml.safe_load(compose_params(["experiment=no_reflections"], conf_dir=CONF))
    default = yaml.safe_load(compose_params(conf_dir=CONF))
    assert params["sft"]["include_reflections"] is False
    assert {k: v for k, v in params.items() if k != "sft"} == {k: v for k, v in default.items() if k != "sft"}


# The same override list through both paths must give the same config: `dvc exp run -S` (Hydra composes params.yaml)
# and `nlistral <stage> ...` (overrides on the committed params.yaml).
OVERRIDE_LISTS = [
    ["teacher.response_format=null", "teacher.base_url=null", "teacher.api_key_env=null"],
    ["teacher.model=2512", "model.revision=1234567"],
    ["train.lora_target_modules=[q_proj,v_proj]", "train.learning_rate=1.0e-4", "eval.limit=10"],
    ["teacher.mode=batch", "teacher=mistral"],
    ["reflector=openai", "reflector.max_tokens=1024", "teacher=mistral", "teacher.model='mistral-large-latest'"],
    ["+teacher.extra=1", "~sft.balance_labels", "data.name='2512'"],
]


@pytest.mark.parametrize("overrides", OVERRIDE_LISTS, ids=[" ".join(o)[:40] for o in OVERRIDE_LISTS])
def test_cli_overrides_equal_dvc_composition(workdir, overrides):
    (workdir / "composed.yaml").write_text(compose_params(overrides, conf_dir=CONF))
    via_dvc = load_config(params_file=workdir / "composed.yaml")
    via_cli = load_config(overrides)
    assert OmegaConf.to_container(via_cli) == OmegaConf.to_container(via_dvc)


def test_override_values_mean_what_they_say(workdir):
    cfg = load_config(["teacher.response_format=null", "teacher.base_url=null",
                       "train.lora_target_modules=[q_proj,v_proj]", "teacher.model=2512"])  # fmt: skip
    assert cfg.teacher.response_format is None and cfg.teacher.base_url is None
    assert list(cfg.train.lora_target_modules) == ["q_proj", "v_proj"]
    assert cfg.teacher.model == "2512"
    batch = load_config(["teacher.mode=batch", "teacher=mistral"])
    assert (batch.teacher.backend, batch.teacher.mode) == ("mistral", "batch")


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested mapping (lists are values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _leaves(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_hold_only_what_differs(tmp_path, name):
    """Each value an experiment sets differs from what its defaults (parent experiment, group swaps) already give."""
    shutil.copytree(CONF, tmp_path / "conf")
    path = tmp_path / "conf" / "experiment" / f"{name}.yaml"
    delta = yaml.safe_load(path.read_text())
    header = [line for line in path.read_text().splitlines() if line.startswith("# @package")]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump({"defaults": delta.pop("defaults", ["_self_"])}))
    without = _leaves(yaml.safe_load(compose_params([f"experiment={name}"], tmp_path / "conf")))
    repeated = {k: v for k, v in _leaves(delta).items() if without.get(k, KeyError) == v}
    assert not repeated, f"conf/experiment/{name}.yaml repeats what its defaults give: {repeated}"
