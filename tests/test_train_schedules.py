"""The five schedules the trainer builds from the default config, against upstream's values."""
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from dinov2.configs import dinov2_default_config
from dinov2.train.schedules import build_schedules

FIXTURES = Path(__file__).parent / "fixtures" / "dinov2_reference"


def test_default_config_schedules_match_upstream():
    reference = json.loads((FIXTURES / "schedules.json").read_text())["default_config_schedules_bs64_1gpu"]
    cfg = OmegaConf.create(dinov2_default_config)
    cfg.optim.lr = reference["lr"]["kwargs"]["base_value"]  # what the sqrt scaling gives for batch 64 on 1 GPU
    schedules = build_schedules(cfg)
    by_name = {"lr": schedules.lr, "wd": schedules.wd, "momentum": schedules.momentum,
               "teacher_temp": schedules.teacher_temp, "last_layer_lr": schedules.last_layer_lr}
    for name, expected in reference.items():
        for iteration, value in expected["samples"].items():
            got = by_name[name][int(iteration)]
            assert math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-18), (name, iteration, got, value)
