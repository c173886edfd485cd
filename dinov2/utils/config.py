"""Build the run configuration from the defaults, a config file and command-line overrides.

Upstream DINOv2 accepts unknown keys silently, so `optim.base_lr=...` misspelt as
`optim.baselr=...` trains with the default and nobody notices. Here every override is checked
against the keys of `ssl_default_config.yaml` and an unknown one is a UserError naming it.
"""
import math
import os
import pathlib
from argparse import Namespace
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2 import distributed
from dinov2.configs import get_default_config
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write_text
from dinov2.utils.utils import fix_random_seeds


def _first_leaf_key(node: Any, full_key: str) -> str:
    """'a.b.c' rather than 'a' when a whole unknown section was given."""
    while isinstance(node, DictConfig) and len(node) > 0:
        key = next(iter(node.keys()))
        full_key, node = f"{full_key}.{key}", node._get_node(key)
    return full_key


def _check_known_keys(base: DictConfig, override: DictConfig, source: str, prefix: str = "") -> None:
    for key in override.keys():
        full_key = f"{prefix}{key}"
        given = override._get_node(key)
        if key not in base.keys():
            raise UserError(f"unknown config key '{_first_leaf_key(given, full_key)}' ({source})")
        known = base._get_node(key)
        if isinstance(known, DictConfig) != isinstance(given, DictConfig):
            expected = "a section of keys" if isinstance(known, DictConfig) else "a single value"
            raise UserError(f"config key '{full_key}' must be {expected} ({source})")
        if isinstance(known, DictConfig):
            _check_known_keys(known, given, source, prefix=f"{full_key}.")


def merge_strict(base: DictConfig, override: DictConfig, source: str) -> DictConfig:
    """`base` overridden by `override`, refusing keys that `base` does not have.

    `source` ("from FILE", "from command line") ends up in the error message so the user knows
    where to look.
    """
    _check_known_keys(base, override, source)
    return OmegaConf.merge(base, override)


def _load_config_file(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path}: a config file must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


def _parse_opts(opts: Sequence[str]) -> DictConfig:
    for opt in opts:
        if "=" not in opt:
            raise UserError(f"command-line override '{opt}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(opts))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise UserError(f"invalid command-line override: {exc}") from exc


def get_cfg(config_file: str | os.PathLike | None = None, opts: Sequence[str] = ()) -> DictConfig:
    """Defaults (incl. installed extensions') <- `config_file` (if any) <- `opts` ("key=value").

    Every command, test and bench builds its configuration here, so a key is checked the same way
    wherever it is given.
    """
    cfg = get_default_config()
    if config_file:
        cfg = merge_strict(cfg, _load_config_file(str(config_file)), f"from {config_file}")
    if opts:
        cfg = merge_strict(cfg, _parse_opts(opts), "from command line")
    return cfg


def get_cfg_from_args(args: Namespace) -> DictConfig:
    """`get_cfg` for upstream's argparse flags (`--config-file`, trailing `key=value` opts)."""
    return get_cfg(getattr(args, "config_file", None), getattr(args, "opts", None) or ())


def apply_scaling_rules_to_cfg(cfg: DictConfig) -> DictConfig:
    """Set `optim.lr` from `optim.base_lr`, which is stated for a total batch of 1024 images."""
    rule = cfg.optim.scaling_rule
    if rule != "sqrt_wrt_1024":
        raise UserError(f"unknown optim.scaling_rule '{rule}'; known: sqrt_wrt_1024")
    total_batch = cfg.train.batch_size_per_gpu * distributed.get_global_size()
    cfg.optim.lr = cfg.optim.base_lr * math.sqrt(total_batch / 1024.0)
    return cfg


def write_config(cfg: DictConfig, output_dir: str | os.PathLike, name: str = "config.yaml") -> pathlib.Path:
    """Save the effective configuration atomically, so a crash never leaves half a config.yaml."""
    return atomic_write_text(pathlib.Path(output_dir) / name, OmegaConf.to_yaml(cfg))


def setup_run(
    config_file: str | os.PathLike | None = None, opts: Sequence[str] = (), output_dir: str | os.PathLike | None = None
) -> DictConfig:
    """Everything a training run needs before building models: config, output directory (default
    `train.output_dir`), seeds, learning rate scaled to the batch, config.yaml."""
    cfg = get_cfg(config_file, opts)
    resolved = pathlib.Path(output_dir or cfg.train.output_dir).resolve()
    resolved.mkdir(parents=True, exist_ok=True)
    cfg.train.output_dir = str(resolved)
    fix_random_seeds(cfg.train.seed + distributed.get_global_rank())  # ranks must not draw the same numbers
    apply_scaling_rules_to_cfg(cfg)
    if distributed.is_main_process():
        write_config(cfg, resolved)
    return cfg


def setup(args: Namespace) -> DictConfig:
    """`setup_run` for upstream's argparse flags (`--config-file`, `--output-dir`, trailing opts)."""
    return setup_run(
        getattr(args, "config_file", None), getattr(args, "opts", None) or (), getattr(args, "output_dir", None)
    )
