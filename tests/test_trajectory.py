"""The Trainer against 30 steps of upstream's own training loop (fixtures/trajectory_*.pt).

One forward-backward matching upstream (test_meta_arch.py) says nothing of what a loop composes
around it: parameter groups (layer-wise decay, patch-embed multiplier, last-layer flag), the five
schedules with their warm-ups and the last-layer freeze, clipping per student submodule, AdamW and
the EMA. Here `Trainer.train_step` takes all 30 steps from upstream's starting weights on
upstream's two batches, and every step's schedule values, losses and gradient norms, the final
student, teacher and centres must be upstream's.
"""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FIXTURES
from dinov2.configs import get_default_config
from dinov2.train import train as train_module
from dinov2.utils.config import merge_strict

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fixture_vit", "one_thread")]
SCHEDULE_KEYS = ("lr", "wd", "mom", "teacher_temp", "last_layer_lr")


def _trainer(reference: dict, output_dir) -> train_module.Trainer:
    cfg = merge_strict(get_default_config(), OmegaConf.create(reference["config"]), "trajectory fixture")
    cfg.train.device, cfg.train.output_dir = "cpu", str(output_dir)
    # the fixture ran in float32 on CPU; its fp16 keys without a scaler describe no GPU run
    cfg.compute_precision.precision = "fp32"
    trainer = train_module.Trainer(cfg)  # optim.lr is the fixture's, already scaled for its batch of 4
    for owner in ("student", "teacher"):
        for name, state in reference[f"initial_{owner}_state_dict"].items():
            getattr(trainer.model, owner)[name].load_state_dict(state, strict=True)
    trainer.model.train()
    return trainer


def _key_bias_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """True where a parameter is free to wander: the key third of attention's qkv bias adds the
    same constant to every logit of a query, which softmax ignores; its true gradient is zero and
    AdamW turns rounding noise into lr-sized steps."""
    keep = torch.ones_like(tensor, dtype=torch.bool)
    if name.endswith("attn.qkv.bias"):
        dim = tensor.shape[0] // 3
        keep[dim : 2 * dim] = False
    return keep


@pytest.mark.parametrize("variant", ["centering", "sinkhorn"])
def test_thirty_steps_follow_upstreams_training_loop(variant, tmp_path, monkeypatch):
    reference = torch.load(FIXTURES / f"trajectory_{variant}.pt", weights_only=True)
    trainer = _trainer(reference, tmp_path)

    norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        norm = clip(parameters, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    for index, expected in enumerate(reference["steps"]):
        values = dict(trainer.schedules.at(index), freeze_backbone=False)
        for key in SCHEDULE_KEYS:
            assert values[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), (index, key)
        norms.clear()
        step = trainer.train_step(reference["batches"][index % 2], values)
        assert step.stepped
        for name, loss in expected["loss_dict"].items():
            # abs: KoLeo's logged value is a mean of O(1) log-distances that nearly cancel
            assert float(step.loss_dict[name]) == pytest.approx(loss, rel=1e-5, abs=1e-6), (index, name)
        assert norms == pytest.approx(list(expected["grad_norm_before_clip"].values()), rel=1e-4), index

    for owner in ("student", "teacher"):
        for module, state in reference[f"final_{owner}_state_dict"].items():
            ours = getattr(trainer.model, owner)[module].state_dict()
            for name, value in state.items():
                keep = _key_bias_rows(name, value)
                error = (ours[name] - value)[keep].abs().max()
                assert error <= 1e-4 * value.abs().max(), (owner, module, name, float(error))
    trainer.model.dino_loss.apply_center_update()
    trainer.model.ibot_patch_loss.apply_center_update()
    for loss, key in ((trainer.model.dino_loss, "dino_center_final"), (trainer.model.ibot_patch_loss, "ibot_center_final")):
        expected = reference[key]
        assert (loss.center.view_as(expected) - expected).abs().max() <= 1e-4 * expected.abs().max(), key
