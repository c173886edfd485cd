"""Low-rank adapters (LoRA) on the attention projections of a ViT backbone.

Fine-tuning all weights of a ViT-L on a few thousand radiographs overfits and needs the memory
of the full optimiser state; a rank-r update `W + (alpha / r) * B @ A` per projection trains a
fraction of a percent of the parameters instead. B starts at zero, so a freshly adapted model
computes exactly what the pretrained one did, and `merge_lora` folds the update back into plain
`nn.Linear` weights so the result loads anywhere a DINOv2 backbone does.
"""
import math

import torch
from torch import Tensor, nn

from dinov2.utils.errors import UserError

DEFAULT_TARGETS = ("attn.qkv", "attn.proj")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update of its weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        # A like a Linear layer's default init, B zero: the update starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.requires_grad_(False)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (without dropout)."""
        base = self.base
        linear = nn.Linear(
            base.in_features, base.out_features, bias=base.bias is not None,
            device=base.weight.device, dtype=base.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> nn.Module:
    """Freeze `model` and wrap every Linear whose name ends with one of `targets` in a LoRALinear.

    Everything else is frozen because LoRA's point is that only the adapters learn; a head added
    after this call stays trainable. Returns `model` (modified in place).
    """
    matches = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not matches:
        raise UserError(f"LoRA targets {list(targets)} match no nn.Linear layer of the model")
    adapters = {name: LoRALinear(model.get_submodule(name), rank, alpha, dropout) for name in matches}
    model.requires_grad_(False)  # the adapters are not attached yet, so they stay trainable
    for name, adapter in adapters.items():
        _replace_module(model, name, adapter)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter matrices (A and B of every LoRALinear), in module order."""
    return [p for module in model.modules() if isinstance(module, LoRALinear) for p in (module.lora_A, module.lora_B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear, in place: same forward, the original state-dict keys.

    The merged Linears keep the base layers' `requires_grad` (frozen) setting.
    """
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name, module in adapted:
        merged = module.merged()
        merged.requires_grad_(module.base.weight.requires_grad)
        _replace_module(model, name, merged)
    return model
