"""Pre-norm transformer block with LayerScale and upstream DINOv2's stochastic depth."""
from typing import Callable

from torch import Tensor, nn

from dinov2.layers.attention import Attention
from dinov2.layers.drop_path import DropPath, add_residual_on_random_subset
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp

# Above this rate a dropped branch is skipped for a random subset of the batch instead of being
# computed and zeroed per sample (upstream's threshold).
SUBSET_DROP_THRESHOLD = 0.1


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    A list of tensors (crops of different sizes) is processed tensor by tensor: the result is
    exactly that of calling the block on each tensor, and equal sizes can be batched by the caller.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
            attn_drop=attn_drop, proj_drop=drop,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
            drop=drop, bias=ffn_bias,
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path
        # Upstream applies its first DropPath to both branches; one module keeps that behaviour.
        self.drop_path = DropPath(drop_path)

    def attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, list):
            return [self.forward_tensor(crops) for crops in x]
        return self.forward_tensor(x)

    def forward_tensor(self, x: Tensor) -> Tensor:
        if self.training and self.sample_drop_ratio > SUBSET_DROP_THRESHOLD:
            x = add_residual_on_random_subset(x, self.attn_residual, self.sample_drop_ratio)
            return add_residual_on_random_subset(x, self.ffn_residual, self.sample_drop_ratio)
        if self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path(self.attn_residual(x))
            return x + self.drop_path(self.ffn_residual(x))
        x = x + self.attn_residual(x)
        return x + self.ffn_residual(x)


# Upstream's name for the block that also accepts lists of crops; here every Block does.
NestedTensorBlock = Block
