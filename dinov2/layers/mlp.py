"""The feed-forward networks of a transformer block, and the standard one (keys `fc1`, `fc2`)."""
from typing import Callable

from torch import Tensor, nn


class FeedForward(nn.Module):
    """The constructor every `ffn_layer` of a Block shares, so that a config swaps them by name.

    Widths default to `in_features`; a subclass creates its layers in `build` and may derive the
    hidden width differently (`hidden_width`). Arguments a network has no use for are accepted
    and ignored, as upstream's do.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden = self.hidden_width(hidden_features or in_features)
        self.build(in_features, hidden, out_features or in_features, act_layer=act_layer, drop=drop, bias=bias)

    def hidden_width(self, hidden_features: int) -> int:
        return hidden_features

    def build(self, in_features: int, hidden_features: int, out_features: int, **options) -> None:
        raise NotImplementedError


class Mlp(FeedForward):
    def build(
        self, in_features: int, hidden_features: int, out_features: int, *,
        act_layer: Callable[..., nn.Module], drop: float, bias: bool,
    ) -> None:  # fmt: skip
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))
