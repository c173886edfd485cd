"""The student's optimizer: upstream's parameter groups in one AdamW, its per-iteration schedules,
and a state for every parameter from the start (see `_create_fresh_state`)."""
from __future__ import annotations

import torch
from torch import nn

from dinov2.fsdp import unwrap
from dinov2.utils.errors import UserError
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay


def build_optimizer(student: nn.ModuleDict, optim_cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the student's submodules with layer-wise decay and the patch-embed multiplier
    (`optim.*`); its groups carry the multipliers `apply_schedules` uses."""
    groups = []
    for module in student.values():
        groups += get_params_groups_with_decay(
            unwrap(module),
            lr_decay_rate=optim_cfg.layerwise_decay,
            patch_embed_lr_mult=optim_cfg.patch_embed_lr_mult,
        )
    merged = list(fuse_params_groups(groups))
    betas = (optim_cfg.adamw_beta1, optim_cfg.adamw_beta2)
    optimizer = torch.optim.AdamW(merged, betas=betas, fused=_use_fused_adamw(optim_cfg.fused_adamw, device))
    _create_fresh_state(optimizer)
    return optimizer


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """Set this iteration's learning rates and weight decays, each group scaled by its multipliers."""
    for group in optimizer.param_groups:
        group["weight_decay"] = values["wd"] * group["wd_multiplier"]
        base = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
        group["lr"] = base * group["lr_multiplier"]


@torch.no_grad()
def _create_fresh_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state now, equal to the state its first step would create.

    AdamW creates a parameter's state at its first gradient, so a checkpoint saved while some
    parameters have had none (the frozen backbone of a head warm-up) would lack their state, and
    resuming it would fail the strict load or, worse, resume with states made up by the loader.
    The optimizer's own step makes the state (right dtypes and devices, fused or not), with zero
    gradients and a zero learning rate; resetting the step count leaves it indistinguishable
    from a state not yet created.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, learning_rates):
        group["lr"] = lr
    for p in params:
        p.grad = None
        optimizer.state[p]["step"].zero_()


def _use_fused_adamw(setting, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise UserError(f"config key optim.fused_adamw must be auto, true or false, got {setting!r}")
