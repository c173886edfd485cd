"""The shipped YAML configurations, loaded by name (e.g. "train/vitl14").

Loading is deliberately plain here: this package sits at the bottom of the import layers, so
checking user overrides against the defaults is done one layer up, in dinov2.utils.config.
"""
import pathlib

from omegaconf import DictConfig, OmegaConf

from dinov2.extensions import load_extensions

CONFIGS_DIR = pathlib.Path(__file__).parent.resolve()


def load_config(name: str) -> DictConfig:
    """Load `<name>.yaml` from this package (name relative to it, without the suffix)."""
    return OmegaConf.load(CONFIGS_DIR / f"{name}.yaml")


dinov2_default_config = load_config("ssl_default_config")

_extension_defaults: list[tuple[str, DictConfig]] = []


def register_config_defaults(owner: str, defaults: dict | DictConfig) -> None:
    """Let an extension add keys (with their defaults) that its own code reads.

    Only new keys are accepted: an installed extension must never change what a plain DINOv2
    run does, so redefining an existing key is an error naming the key and the extension.
    """
    defaults = OmegaConf.create(defaults)
    base = get_default_config()
    for key in _leaf_keys(defaults):
        if OmegaConf.select(base, key, default=_MISSING) is not _MISSING:
            raise ValueError(f"extension '{owner}' redefines existing config key '{key}'")
    _extension_defaults.append((owner, defaults))


_MISSING = object()


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        value = node._get_node(key)
        full = f"{prefix}{key}"
        keys += _leaf_keys(value, f"{full}.") if isinstance(value, DictConfig) else [full]
    return keys


def get_default_config() -> DictConfig:
    """Every key a run may set: the shipped defaults plus those registered by extensions.

    The installed extensions are loaded first (once per process), so no caller can get a default
    config that lacks a plug-in's keys for having asked too early.
    """
    load_extensions()
    return OmegaConf.merge(dinov2_default_config, *(defaults for _, defaults in _extension_defaults))


def load_and_merge_config(name: str) -> DictConfig:
    """The default configuration overridden by the shipped configuration `name`."""
    return OmegaConf.merge(get_default_config(), load_config(name))
