"""SwiGLU feed-forward network (used by ViT-g and the vitl14/vitg14 training configs).

The gate and value projections are packed in one matrix `w12` so that the keys match upstream
DINOv2 checkpoints, which were written by xformers' packed SwiGLU.
"""
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLUFFN(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        # act_layer and drop are accepted so every FFN shares one constructor signature;
        # SwiGLU always uses SiLU gating and no dropout, as upstream.
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_features(hidden_features: int) -> int:
    """2/3 of the MLP width (same parameter count as an MLP), rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU whose `hidden_features` is given as the MLP width and shrunk by the upstream rule."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        out_features = out_features or in_features
        hidden_features = swiglu_hidden_features(hidden_features or in_features)
        super().__init__(in_features, hidden_features, out_features, act_layer, drop, bias)
