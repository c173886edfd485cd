"""Stochastic depth: the two ways a residual branch is dropped during training.

Small rates drop the branch per sample (`DropPath`). Larger rates instead compute the branch only
for a random subset of the batch (`add_residual_on_random_subset`), which has the same
expectation but saves the compute of the dropped samples (upstream DINOv2 uses it above 0.1).
"""
from typing import Callable

import torch
from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Zero whole samples with probability `drop_prob`, scaling survivors to keep the mean."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(mask_shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        keep.div_(keep_prob)
    return x * keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def subset_size(batch_size: int, drop_ratio: float) -> int:
    """Samples that receive the residual branch; at least one so the branch always trains."""
    return max(int(batch_size * (1 - drop_ratio)), 1)


def add_residual_on_random_subset(
    x: Tensor, residual_fn: Callable[[Tensor], Tensor], drop_ratio: float
) -> Tensor:
    """x + residual_fn(x) for a random subset of samples, scaled by B/kept; others pass unchanged."""
    batch_size = x.shape[0]
    kept = torch.randperm(batch_size, device=x.device)[: subset_size(batch_size, drop_ratio)]
    residual = residual_fn(x[kept])
    summed = torch.index_add(
        x.flatten(1), 0, kept, residual.flatten(1).to(x.dtype), alpha=batch_size / len(kept)
    )
    return summed.view_as(x)
