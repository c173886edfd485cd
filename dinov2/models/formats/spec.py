"""What another library needs to know to rebuild one of our backbones, read off the model itself.

A teacher export stores tensors but not how the ViT was built (heads, interpolation settings), so
exports are written from a built, loaded model: whatever built it (a run's config or the weights'
keys) is then the one source of truth for every format.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.swiglu_ffn import swiglu_hidden_features
from dinov2.utils.errors import UserError

# blocks.{i}.rest (flat) or blocks.{chunk}.{i}.rest (chunked)
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(?:(\d+)\.)?(.+)$")


@dataclass(frozen=True)
class BackboneSpec:
    """Constructor facts of a DinoVisionTransformer that a target format has to express."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    in_chans: int
    num_register_tokens: int
    ffn: str  # "mlp" or "swiglu"
    hidden_features: int  # the FFN's hidden width (for SwiGLU: one of its two halves)
    qkv_bias: bool
    proj_bias: bool
    ffn_bias: bool
    layerscale: bool
    interpolate_antialias: bool
    interpolate_offset: float

    def refuse(self, target: str, *, needs_biases: bool = True) -> None:
        """Stop with the reason when `target` cannot express this architecture."""
        if needs_biases and not (self.proj_bias and self.ffn_bias):
            raise UserError(f"{target} cannot express a ViT without attention-projection or FFN biases "
                            f"(proj_bias={self.proj_bias}, ffn_bias={self.ffn_bias})")  # fmt: skip


def backbone_spec(model: nn.Module) -> BackboneSpec:
    """The spec of a built DinoVisionTransformer (flat or chunked blocks)."""
    blocks = model.iter_blocks()
    if not blocks:
        raise UserError("the backbone has no transformer blocks: nothing to export")
    first = blocks[0]
    height, width = model.patch_embed.img_size
    if height != width:
        raise UserError(f"img_size {height}x{width} is not square: no target format stores a non-square grid")
    if hasattr(first.mlp, "w12"):
        ffn, hidden, ffn_bias = "swiglu", first.mlp.w3.in_features, first.mlp.w3.bias is not None
    elif hasattr(first.mlp, "fc1"):
        ffn, hidden, ffn_bias = "mlp", first.mlp.fc1.out_features, first.mlp.fc1.bias is not None
    else:
        raise UserError(f"FFN {type(first.mlp).__name__} has no equivalent in other libraries")
    return BackboneSpec(
        embed_dim=model.embed_dim, depth=len(blocks), num_heads=model.num_heads,
        patch_size=model.patch_size, img_size=height, in_chans=model.patch_embed.in_chans,
        num_register_tokens=model.num_register_tokens, ffn=ffn, hidden_features=hidden,
        qkv_bias=first.attn.qkv.bias is not None, proj_bias=first.attn.proj.bias is not None,
        ffn_bias=ffn_bias, layerscale=isinstance(first.ls1, LayerScale),
        interpolate_antialias=bool(model.interpolate_antialias),
        interpolate_offset=float(model.interpolate_offset),
    )  # fmt: skip


def flat_block_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """blocks.{chunk}.{i}.* -> blocks.{i}.*: the layout released files use (block_chunks=0)."""
    flat = {}
    for key, value in state.items():
        match = BLOCK_KEY.match(key)
        if match and match.group(2) is not None:
            key = f"blocks.{match.group(2)}.{match.group(3)}"
        flat[key] = value
    return flat


def ratio_for_width(width: int, embed_dim: int) -> float:
    """An mlp_ratio r with int(embed_dim * r) == width, as the libraries compute the hidden width.

    width / embed_dim can land just below the integer in floating point (8192 / 1536 * 1536 =
    8191.99...), so half a unit is added where the plain ratio would round down.
    """
    ratio = width / embed_dim
    if int(embed_dim * ratio) != width:
        ratio = (width + 0.5) / embed_dim
    return int(ratio) if ratio == int(ratio) else ratio


def swiglu_mlp_ratio(hidden: int, embed_dim: int) -> float:
    """An mlp_ratio whose SwiGLU width rounds to `hidden` (4 for every released model)."""
    for ratio in (4, ratio_for_width(int(hidden * 1.5), embed_dim)):
        if swiglu_hidden_features(int(embed_dim * ratio)) == hidden:
            return ratio
    raise UserError(f"SwiGLU hidden width {hidden} matches no mlp_ratio for embed_dim {embed_dim}")
