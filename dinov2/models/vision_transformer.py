"""DINOv2's Vision Transformer: same constructor, state-dict keys and outputs as upstream.

Compatibility is pinned by tests/fixtures/dinov2_reference (outputs of upstream's code), so
released checkpoints load strictly and give the same features.
"""
import math
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.layers import Block, Mlp, PatchEmbed, SwiGLUFFNFused
from dinov2.utils.errors import UserError
from dinov2.utils.registry import Registry

FeatureDict = dict[str, Tensor | None]


def _identity_ffn(*args, **kwargs) -> nn.Module:
    return nn.Identity()


FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFNFused,  # upstream maps both names to the fused (rounded-width) variant
    "swiglufused": SwiGLUFFNFused,
    "identity": _identity_ffn,
}


class BlockChunk(nn.ModuleList):
    """A group of consecutive blocks (one FSDP unit), front-padded with Identity modules so that
    every block keeps its global index in the key (`blocks.{chunk}.{index}.*`)."""

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        for block in self:
            x = block(x)
        return x


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        """Arguments and defaults are upstream's; note `block_chunks=1` (not the hub's 0) and
        `init_values=None` (no LayerScale) are the constructor defaults there too."""
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise UserError(f"ffn_layer {ffn_layer!r} is not one of {sorted(FFN_LAYERS)}")
        if not 0 <= block_chunks <= depth:
            raise UserError(f"block_chunks must be between 0 and depth={depth}, got {block_chunks}")
        if num_register_tokens < 0:
            raise UserError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches
        # Registration order fixes the state-dict order: cls, pos, [registers], mask token.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        blocks = [
            block_fn(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_bias=proj_bias, ffn_bias=ffn_bias, drop_path=rates[i], norm_layer=norm_layer,
                act_layer=act_layer, ffn_layer=FFN_LAYERS[ffn_layer], init_values=init_values,
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            chunk_size = depth // block_chunks
            self.blocks = nn.ModuleList(
                BlockChunk([nn.Identity()] * start + blocks[start : start + chunk_size])
                for start in range(0, depth, chunk_size)
            )
        else:
            self.blocks = nn.ModuleList(blocks)

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def iter_blocks(self) -> list[nn.Module]:
        """The transformer blocks in depth order, whatever the (flat or chunked) layout."""
        if not self.chunked_blocks:
            return list(self.blocks)
        return [block for chunk in self.blocks for block in chunk if not isinstance(block, nn.Identity)]

    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Positional embeddings for an image of `height` x `width` pixels.

        With a non-zero `interpolate_offset`, bicubic interpolation is called with a scale factor
        (grid + offset) / M, and PyTorch samples at that scale rather than at the output size:
        kept on purpose, since released weights were trained and evaluated that way.
        """
        num_patches = x.shape[1] - 1
        num_stored = self.pos_embed.shape[1] - 1
        if num_patches == num_stored and height == width:
            return self.pos_embed
        side = int(math.sqrt(num_stored))
        if side * side != num_stored:
            raise UserError(f"pos_embed holds {num_stored} patch positions, not a square grid")
        pos_embed = self.pos_embed.float()
        grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if self.interpolate_offset:
            size_kwargs = {
                "scale_factor": (
                    (grid_h + self.interpolate_offset) / side,
                    (grid_w + self.interpolate_offset) / side,
                )
            }
        else:
            size_kwargs = {"size": (grid_h, grid_w)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **size_kwargs)
        assert grid.shape[-2:] == (grid_h, grid_w)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """[B, C, H, W] -> [B, 1 + R + HW, D]: cls, registers, then patches.

        Masked patches (bool [B, HW], True = masked) become the mask token before positions are
        added, so they keep their position; registers get no position at all.
        """
        height, width = x.shape[-2:]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)
        return x

    def _split_outputs(self, x: Tensor, masks: Tensor | None) -> FeatureDict:
        x_norm = self.norm(x)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: list[Tensor], masks_list: Sequence[Tensor | None] | None = None
    ) -> list[FeatureDict]:
        """Crops of different sizes: each tensor goes through every block on its own (no packing),
        so the result equals calling `forward_features` on each tensor."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"{len(x_list)} crop tensors but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, masks) for x, masks in zip(x_list, masks_list)]
        for block in self.blocks:
            tokens = block(tokens)
        return [self._split_outputs(x, masks) for x, masks in zip(tokens, masks_list)]

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> FeatureDict | list[FeatureDict]:
        if isinstance(x, list):
            return self.forward_features_list(x, masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self._split_outputs(x, masks)

    def _intermediate_tokens(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        wanted = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else n
        x = self.prepare_tokens_with_masks(x)
        outputs = []
        for index, block in enumerate(self.iter_blocks()):
            x = block(x)
            if index in wanted:
                outputs.append(x)
        if len(outputs) != len(wanted):
            raise ValueError(f"only {len(outputs)} of the {len(wanted)} requested blocks exist")
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Patch tokens of the last `n` blocks (or of the blocks indexed by `n`), for dense heads.

        Registers are dropped; `reshape` gives [B, D, H/p, W/p] feature maps.
        """
        outputs = self._intermediate_tokens(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid_h, grid_w = height // self.patch_size, width // self.patch_size
            patches = [
                out.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for out in patches
            ]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)

    def forward(self, *args, is_training: bool = False, **kwargs):
        """Feature dict(s) when `is_training`, else `head` of the normalised cls token."""
        features = self.forward_features(*args, **kwargs)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])


# `student.arch` names; a plug-in (or a test) registers its own as `ARCHITECTURES.register(name, factory)`
ARCHITECTURES: Registry[Callable[..., DinoVisionTransformer]] = Registry("architecture")


def _architecture(
    name: str, embed_dim: int, depth: int, num_heads: int, doc: str | None = None
) -> Callable[..., DinoVisionTransformer]:
    """Registers `name`: a ViT of this size with upstream's MLP ratio 4, whose patch size, registers
    and other constructor arguments the caller chooses."""

    def build(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
        return DinoVisionTransformer(
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4,
            num_register_tokens=num_register_tokens, **kwargs,
        )  # fmt: skip

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return ARCHITECTURES.register(name, build)


vit_tiny = _architecture(
    "vit_tiny", embed_dim=192, depth=12, num_heads=3,
    doc="ViT-Ti (DeiT's width 192, 3 heads): not released by DINOv2; for CPU demos and quick studies.",
)  # fmt: skip
vit_small = _architecture("vit_small", embed_dim=384, depth=12, num_heads=6)
vit_base = _architecture("vit_base", embed_dim=768, depth=12, num_heads=12)
vit_large = _architecture("vit_large", embed_dim=1024, depth=24, num_heads=16)
vit_giant2 = _architecture(
    "vit_giant2", embed_dim=1536, depth=40, num_heads=24,
    doc="ViT-g/14 as in the DINOv2 paper: width 1536, 24 heads of 64.",
)  # fmt: skip
