"""The shipped YAML configurations, loaded by name (e.g. "train/vitl14").

Loading is deliberately plain here: this package sits at the bottom of the import layers, so
checking user overrides against the defaults is done one layer up, in dinov2.utils.config.
"""
import pathlib

from omegaconf import DictConfig, OmegaConf

CONFIGS_DIR = pathlib.Path(__file__).parent.resolve()


def load_config(name: str) -> DictConfig:
    """Load `<name>.yaml` from this package (name relative to it, without the suffix)."""
    return OmegaConf.load(CONFIGS_DIR / f"{name}.yaml")


dinov2_default_config = load_config("ssl_default_config")


def load_and_merge_config(name: str) -> DictConfig:
    """The default configuration overridden by the shipped configuration `name`."""
    return OmegaConf.merge(dinov2_default_config, load_config(name))
