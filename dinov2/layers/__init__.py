"""Building blocks of the DINOv2 ViT and its heads (no dependency above `dinov2.utils`)."""
from dinov2.layers.attention import Attention, MemEffAttention, scaled_dot_product
from dinov2.layers.block import Block, NestedTensorBlock
from dinov2.layers.dino_head import DINOHead, WeightNormLinear
from dinov2.layers.drop_path import DropPath, add_residual_on_random_subset, drop_path
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp
from dinov2.layers.patch_embed import PatchEmbed
from dinov2.layers.swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden_features

__all__ = [
    "Attention", "MemEffAttention", "scaled_dot_product", "Block", "NestedTensorBlock", "DINOHead",
    "WeightNormLinear", "DropPath", "add_residual_on_random_subset", "drop_path", "LayerScale",
    "Mlp", "PatchEmbed", "SwiGLUFFN", "SwiGLUFFNFused", "swiglu_hidden_features",
]
