"""The one config tree: conf/ (Hydra) composed into params.yaml, read by every stage.

`dvc exp run` composes conf/ into params.yaml itself (hydra.enabled in .dvc/config); `compose_params`
does the same with the same calls (OmegaConf.to_yaml of hydra's compose), so the two never differ.
"""

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path("conf")
PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    pass


def compose_params(overrides=(), conf_dir=CONF_DIR) -> str:
    """The params.yaml text that `dvc exp run -S <overrides>` would write."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def apply_override(cfg: DictConfig, override: str, conf_dir=CONF_DIR) -> None:
    """`group=option` swaps a whole subtree for conf/<group>/<option>.yaml; `a.b=value` sets one key.

    Keys must exist already (a typo is an error, not a silent new key); `+a.b=value` adds one.
    """
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not KEY=VALUE")
    if key == "experiment":  # deltas across groups: only a full composition applies them
        raise ConfigError(
            f"{override}: experiments change several groups; run `nlistral params {override}` "
            f"(rewrites params.yaml) or `dvc exp run -S {override}`"
        )
    group_file = Path(conf_dir) / key / f"{raw}.yaml"
    if "." not in key and (Path(conf_dir) / key).is_dir():
        if not group_file.is_file():
            options = sorted(p.stem for p in (Path(conf_dir) / key).glob("*.yaml"))
            raise ConfigError(f"no config {group_file}; options for '{key}': {', '.join(options)}")
        cfg[key] = OmegaConf.load(group_file)
        return
    adding = key.startswith("+")
    key = key.lstrip("+")
    current = OmegaConf.select(cfg, key, default=KeyError)
    if not adding and current is KeyError:
        raise ConfigError(f"unknown config key '{key}' (use +{key}=... to add a new one)")
    value = raw if isinstance(current, str) else yaml.safe_load(raw)  # a model named 2512 stays a string
    OmegaConf.update(cfg, key, value, merge=False, force_add=adding)


def load_config(overrides=(), params_file=PARAMS_FILE, conf_dir=CONF_DIR) -> DictConfig:
    if not Path(params_file).is_file():
        raise ConfigError(f"{params_file} not found: run from the repo root, or `make params` to compose it")
    cfg = OmegaConf.load(params_file)
    for override in overrides:
        apply_override(cfg, override, conf_dir)
    return cfg
