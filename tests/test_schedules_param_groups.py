"""CosineScheduler and optimiser parameter groups against upstream DINOv2's numbers."""
import json
import math

import pytest

from dinov2.layers.dino_head import DINOHead
from dinov2.models.vision_transformer import vit_small
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
from dinov2.utils.utils import CosineScheduler


@pytest.fixture
def schedules(fixtures_dir):
    return json.loads((fixtures_dir / "schedules.json").read_text())


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def test_cosine_scheduler_cases(schedules):
    for name, case in schedules["cosine_scheduler"].items():
        scheduler = CosineScheduler(**case["kwargs"])
        values = [scheduler[i] for i in range(len(case["values"]))]
        assert all(_close(ours, ref) for ours, ref in zip(values, case["values"])), name
        total = case["kwargs"]["total_iters"]
        assert scheduler[total] == case["value_at_total_iters"], name
        assert scheduler[total + 5] == case["value_at_total_iters_plus_5"], name


def test_default_config_schedules(schedules):
    cases = schedules["default_config_schedules_bs64_1gpu"]
    for name in ("lr", "wd", "momentum", "teacher_temp"):
        scheduler = CosineScheduler(**cases[name]["kwargs"])
        for iteration, expected in cases[name]["samples"].items():
            assert _close(scheduler[int(iteration)], expected), (name, iteration)


def test_scheduler_rejects_warmup_longer_than_schedule():
    with pytest.raises(ValueError, match="exceed total_iters"):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)


def _per_param(groups) -> dict:
    return {
        g["name"]: {key: g[key] for key in ("lr_multiplier", "wd_multiplier", "is_last_layer")} for g in groups
    }


def _assert_groups_match(groups, reference):
    ours = _per_param(groups)
    assert list(ours) == list(reference["per_param"])
    for name, expected in reference["per_param"].items():
        assert _close(ours[name]["lr_multiplier"], expected["lr_multiplier"]), name
        assert ours[name]["wd_multiplier"] == expected["wd_multiplier"], name
        assert ours[name]["is_last_layer"] == expected["is_last_layer"], name
    fused = fuse_params_groups(groups)
    assert len(fused) == len(reference["fused_groups"])
    for group, expected in zip(fused, reference["fused_groups"]):
        assert _close(group["lr_multiplier"], expected["lr_multiplier"])
        assert group["wd_multiplier"] == expected["wd_multiplier"]
        assert group["is_last_layer"] == expected["is_last_layer"]
        assert len(group["params"]) == expected["n_tensors"]
    assert sum(len(g["params"]) for g in fused) == len(groups)


@pytest.mark.parametrize(
    "case, model_kwargs, decay",
    [
        ("vit_small_p14_decay0.9_pe0.2", {"block_chunks": 0}, 0.9),
        ("vit_small_p14_blockchunks4_decay0.9_pe0.2", {"block_chunks": 4}, 0.9),
        ("vit_small_p14_reg4_decay0.9_pe0.2", {"block_chunks": 0, "num_register_tokens": 4}, 0.9),
        ("vit_small_p14_decay1.0_pe0.2 (vitl14/vitg14 setting)", {"block_chunks": 0}, 1.0),
    ],
)
def test_backbone_param_groups_match_upstream(schedules, case, model_kwargs, decay):
    model = vit_small(patch_size=14, img_size=28, init_values=1e-5, **model_kwargs)
    groups = get_params_groups_with_decay(model, lr_decay_rate=decay, patch_embed_lr_mult=0.2)
    _assert_groups_match(groups, schedules["param_groups"][case])


def test_dino_head_param_groups_match_upstream(schedules):
    head = DINOHead(in_dim=384, out_dim=256, hidden_dim=64, bottleneck_dim=32)
    groups = get_params_groups_with_decay(head, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    _assert_groups_match(groups, schedules["param_groups"]["dino_head_default_decay0.9_pe0.2"])


def test_frozen_parameters_get_no_group():
    head = DINOHead(in_dim=8, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    head.last_layer.weight_g.requires_grad_(False)
    names = [g["name"] for g in get_params_groups_with_decay(head)]
    assert "last_layer.weight_g" not in names and "last_layer.weight_v" in names
