"""Configuration: upstream's defaults and shipped files, project keys, strict overrides."""
import json
import math
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.configs import CONFIGS_DIR, dinov2_default_config, load_and_merge_config
from dinov2.utils.config import apply_scaling_rules_to_cfg, get_cfg, get_cfg_from_args, setup, setup_run, write_config
from dinov2.utils.errors import UserError

PROJECT_KEYS = {
    "train.pipeline": "dino",
    "train.device": "auto",
    "train.checkpoint_period_iterations": 0,
    "train.max_to_keep": 3,
    "train.log_period_iterations": 10,
    "train.max_consecutive_nonfinite": 5,
    "train.head_warmup_iterations": 0,
    "train.distributed_strategy": "auto",
    "train.compile": False,
    "train.collapse_warning_iterations": 100,
    "optim.fused_adamw": "auto",
    "compute_precision.precision": None,
    "crops.mean": [0.485, 0.456, 0.406],
    "crops.std": [0.229, 0.224, 0.225],
}


@pytest.fixture
def reference(fixtures_dir):
    return json.loads((fixtures_dir / "configs.json").read_text())


def _leaves(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _assert_contains(ours: dict, upstream: dict) -> None:
    ours_flat = _leaves(ours)
    for key, expected in _leaves(upstream).items():
        assert key in ours_flat, f"missing upstream key {key}"
        assert ours_flat[key] == expected and type(ours_flat[key]) is type(expected), (key, ours_flat[key], expected)


def test_default_config_has_every_upstream_key_with_its_value(reference):
    _assert_contains(OmegaConf.to_container(dinov2_default_config), reference["ssl_default_config"])


def test_default_config_adds_exactly_the_project_keys(reference):
    ours = _leaves(OmegaConf.to_container(dinov2_default_config))
    extra = {key: ours[key] for key in ours.keys() - _leaves(reference["ssl_default_config"]).keys()}
    assert extra == PROJECT_KEYS


def test_every_project_key_is_documented_by_a_comment():
    lines = (CONFIGS_DIR / "ssl_default_config.yaml").read_text().splitlines()
    for dotted in PROJECT_KEYS:
        leaf = dotted.split(".")[-1]
        line = next(line for line in lines if line.strip().startswith(f"{leaf}:"))
        assert "#" in line and line.split("#", 1)[1].strip(), f"{dotted} has no comment"


@pytest.mark.parametrize(
    "name",
    [
        "train/vitg14.yaml",
        "train/vitl14.yaml",
        "train/vitl16_short.yaml",
        *[f"eval/vit{s}14{r}_pretrain.yaml" for s in "sblg" for r in ("", "_reg4")],
    ],
)
def test_shipped_upstream_configs_merge_to_upstream_result(reference, name, monkeypatch):
    from dinov2 import configs, extensions

    monkeypatch.setattr(extensions, "_loaded", True)  # upstream's keys only, whatever is installed
    monkeypatch.setattr(configs, "_extension_defaults", [])
    merged = load_and_merge_config(name.removesuffix(".yaml"))
    _assert_contains(OmegaConf.to_container(merged), reference[name]["merged"])
    # the file's own keys must also pass the strict check of user-given files
    strict = get_cfg(CONFIGS_DIR / name)
    assert strict == merged


def test_smoke_config_is_small_and_strictly_valid():
    cfg = get_cfg(CONFIGS_DIR / "train/vits14_cpu_smoke.yaml")
    assert cfg.student.arch == "vit_small" and cfg.student.patch_size == 14
    assert cfg.crops.global_crops_size % cfg.student.patch_size == 0
    assert cfg.crops.local_crops_size % cfg.student.patch_size == 0
    assert cfg.train.dataset_path == "Synthetic:n=256"
    assert cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH == 10
    assert cfg.dino.head_n_prototypes == 1024 and cfg.train.num_workers == 0


def test_command_line_overrides_parse_values_and_win_over_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("optim:\n  base_lr: 0.5\ntrain:\n  seed: 3\n")
    cfg = get_cfg(config_file, ["train.seed=7", "crops.global_crops_scale=[0.5,1.0]"])
    assert cfg.optim.base_lr == 0.5
    assert cfg.train.seed == 7
    assert list(cfg.crops.global_crops_scale) == [0.5, 1.0]


def test_unknown_section_is_reported_by_its_full_key(tmp_path):
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(UserError, match=r"unknown config key 'optimizer\.lr' \(from "):
        get_cfg(config_file)
    with pytest.raises(UserError, match=r"unknown config key 'a\.b\.c' \(from command line\)"):
        get_cfg(opts=["a.b.c=1"])


@pytest.mark.parametrize(
    "opt, message",
    [
        ("optim.baselr=0.1", r"unknown config key 'optim\.baselr' \(from command line\)"),
        ("train.seed.offset=1", "'train.seed' must be a single value"),  # a value cannot become a section
        ("MODEL=3", "'MODEL' must be a section"),  # nor a section a value
        ("train.seed", "train.seed"),  # no equals sign
    ],
)
def test_bad_override_is_refused_naming_it(opt, message):
    with pytest.raises(UserError, match=message):
        get_cfg(opts=[opt])


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "{file}"),
        ("train:\n  seed: [1, 2\n", "{file}"),
        ("student:\n  arch: vit_small\n  drop_path: 0.1\n", r"unknown config key 'student\.drop_path' \(from {file}\)"),
    ],
    ids=["missing", "yaml syntax error", "unknown key"],
)
def test_bad_config_file_is_refused_naming_it(tmp_path, text, message):
    config_file = tmp_path / "run.yaml"
    if text is not None:
        config_file.write_text(text)
    with pytest.raises(UserError, match=message.format(file=re.escape(str(config_file)))):
        get_cfg(config_file)


def test_sqrt_scaling_rule():
    cfg = OmegaConf.create(dinov2_default_config)
    cfg.train.batch_size_per_gpu = 256
    apply_scaling_rules_to_cfg(cfg)
    assert math.isclose(cfg.optim.lr, 0.004 * 0.5, rel_tol=1e-12)


def test_unknown_scaling_rule_is_a_user_error():
    cfg = OmegaConf.create(dinov2_default_config)
    cfg.optim.scaling_rule = "linear_wrt_256"
    with pytest.raises(UserError, match="linear_wrt_256"):
        apply_scaling_rules_to_cfg(cfg)


def test_write_config_round_trips_and_leaves_no_temporary_file(tmp_path):
    cfg = OmegaConf.create(dinov2_default_config)
    path = write_config(cfg, tmp_path)
    assert OmegaConf.load(path) == cfg
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_setup_creates_output_dir_scales_lr_and_saves_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = setup_run(opts=["train.batch_size_per_gpu=16", "train.seed=5"], output_dir="out/run1")
    output_dir = tmp_path / "out" / "run1"
    assert cfg.train.output_dir == str(output_dir)
    assert math.isclose(cfg.optim.lr, 0.004 * math.sqrt(16 / 1024), rel_tol=1e-12)
    assert OmegaConf.load(output_dir / "config.yaml") == cfg
    assert torch.initial_seed() == 5  # train.seed + rank 0


def test_upstream_argparse_helpers_build_what_the_typed_functions_build(tmp_path):
    from dinov2.train.train import get_args_parser

    smoke, opts = CONFIGS_DIR / "train/vits14_cpu_smoke.yaml", ["train.seed=5", "optim.epochs=3"]
    args = get_args_parser().parse_args(["--config-file", str(smoke), "--output-dir", str(tmp_path), *opts])
    assert get_cfg_from_args(args) == get_cfg(smoke, opts)
    assert setup(args) == setup_run(smoke, opts, tmp_path)


def test_extension_config_defaults_add_keys_but_never_change_existing_ones(monkeypatch):
    from dinov2 import configs, extensions

    monkeypatch.setattr(extensions, "_loaded", True)  # only this test's registration counts
    monkeypatch.setattr(configs, "_extension_defaults", [])
    configs.register_config_defaults("vet", {"crops": {"min_views_per_study": 1}})
    assert get_cfg(opts=["crops.min_views_per_study=2"]).crops.min_views_per_study == 2
    assert get_cfg().crops.min_views_per_study == 1
    with pytest.raises(ValueError, match="'vet2' redefines existing config key 'crops.local_crops_number'"):
        configs.register_config_defaults("vet2", {"crops": {"local_crops_number": 3}})
