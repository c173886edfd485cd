"""SwiGLU feed-forward network (used by ViT-g and the vitl14/vitg14 training configs).

The gate and value projections are packed in one matrix `w12` so that the keys match upstream
DINOv2 checkpoints, which were written by xformers' packed SwiGLU.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.layers.mlp import FeedForward


class SwiGLUFFN(FeedForward):
    """SiLU gating and no dropout, as upstream: `act_layer` and `drop` are ignored."""

    def build(self, in_features: int, hidden_features: int, out_features: int, *, bias: bool, **ignored) -> None:
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

    def hidden_width(self, hidden_features: int) -> int:
        return swiglu_hidden_features(hidden_features)
