"""Image -> sequence of patch embeddings, the first step of every ViT forward."""
from torch import Tensor, nn

from dinov2.utils.errors import UserError


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return value if isinstance(value, tuple) else (value, value)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches projected to `embed_dim` by one strided convolution.

    `img_size` only fixes `num_patches` (hence the stored positional-embedding grid); any input
    whose sides are multiples of the patch size is accepted at run time.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: type[nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, H/p * W/p, D] (row-major over the patch grid), or [B, H/p, W/p, D]."""
        height, width = x.shape[-2:]
        patch_h, patch_w = self.patch_size
        if height % patch_h or width % patch_w:
            raise UserError(
                f"image size {height}x{width} is not a multiple of the patch size {patch_h}x{patch_w}"
            )
        x = self.proj(x)
        grid_h, grid_w = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        if not self.flatten_embedding:
            x = x.reshape(-1, grid_h, grid_w, self.embed_dim)
        return x
