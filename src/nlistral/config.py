"""The one config tree: conf/ (Hydra) composed into params.yaml, read by every stage.

`dvc exp run` composes conf/ into params.yaml itself (hydra.enabled in .dvc/config); `compose_params` does the
same with the same calls (OmegaConf.to_yaml of hydra's compose), so the two never differ. A stage run by hand
(`nlistral <stage> KEY=VALUE ...`) starts from the committed params.yaml and applies its overrides with Hydra's
own grammar and semantics, group swaps first, so an override means the same in both paths.
"""

from pathlib import Path

import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from nlistral.errors import ConfigError

CONF_DIR = Path("conf")
PARAMS_FILE = Path("params.yaml")

# Keys that hold names, never numbers: `teacher.model=2512` or a numeric revision stays a string in both paths.
STRING_KEYS = (
    "data.name", "data.dir", "teacher.model", "reflector.model", "teacher.base_url", "reflector.base_url",
    "teacher.api_key_env", "reflector.api_key_env", "model.name_or_path", "model.revision", "mlflow.experiment",
)  # fmt: skip


def compose_params(overrides=(), conf_dir=CONF_DIR) -> str:
    """The params.yaml text that `dvc exp run -S <overrides>` would write."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as err:
        raise ConfigError(str(err)) from None
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def groups(conf_dir=CONF_DIR) -> list[str]:
    """The config groups conf/config.yaml selects from (teacher, model, ...)."""
    defaults = yaml.safe_load((Path(conf_dir) / "config.yaml").read_text(encoding="utf-8"))["defaults"]
    return [next(iter(entry)) for entry in defaults if isinstance(entry, dict)]


def apply_overrides(cfg: DictConfig, overrides, conf_dir=CONF_DIR) -> None:
    """Hydra overrides on a composed config: group swaps (`teacher=mistral`, composed as Hydra composes them),
    then keys (`a.b=value`, `+a.b=value` to add, `~a.b` to delete), whatever order they were written in."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(str(err)) from None
    group_names = groups(conf_dir) if any("." not in o.key_or_group for o in parsed) else []
    swaps, keys = [], []
    for override in parsed:
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line}: a sweep runs several stages; use `dvc exp run --queue -S`")
        if override.key_or_group == "experiment":  # deltas across groups: only a full composition applies them
            raise ConfigError(
                f"{override.input_line}: experiments change several groups; run `nlistral params "
                f"{override.input_line}` (rewrites params.yaml) or `dvc exp run -S {override.input_line}`"
            )
        is_swap = override.key_or_group in group_names and not (override.is_add() or override.is_delete())
        (swaps if is_swap else keys).append(override)
    if swaps:
        composed = OmegaConf.create(compose_params([o.input_line for o in swaps], conf_dir))
        for override in swaps:
            cfg[override.key_or_group] = composed[override.key_or_group]
    for override in keys:
        missing = OmegaConf.select(cfg, override.key_or_group, default=KeyError) is KeyError
        if missing and not (override.is_add() or override.is_force_add()):
            raise ConfigError(
                f"unknown config key '{override.key_or_group}' (use +{override.input_line} to add a new one)"
            )
    OmegaConf.set_struct(cfg, True)
    try:
        ConfigLoaderImpl._apply_overrides_to_config(keys, cfg)  # Hydra's own semantics (private API, pinned 1.3.8)
    except HydraException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    finally:
        OmegaConf.set_struct(cfg, False)


def load_config(overrides=(), params_file=PARAMS_FILE, conf_dir=CONF_DIR) -> DictConfig:
    if not Path(params_file).is_file():
        raise ConfigError(f"{params_file} not found: run from the repo root, or `make params` to compose it")
    cfg = OmegaConf.load(params_file)
    apply_overrides(cfg, overrides, conf_dir)
    for key in STRING_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not isinstance(value, str):
            OmegaConf.update(cfg, key, str(value))
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Types, ranges and choices (nlistral.schema): ConfigError naming the first wrong key and value."""
    from nlistral.schema import check

    params = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in STRING_KEYS:  # as load_config reads them
        value = OmegaConf.select(params, key)
        if value is not None and not isinstance(value, str):
            OmegaConf.update(params, key, str(value))
    check(OmegaConf.to_container(params))
