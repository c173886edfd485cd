"""The tests' tiny ViT, defined once: conftest's `tiny_vit` fixture registers it in the test
process, tests/tiny_vit_run.py in the processes the tests launch (which cannot import conftest),
and tests that need a model object build it directly."""
from dinov2.models.vision_transformer import DinoVisionTransformer

TINY_ARCH = "vit_test_tiny"
# 2 blocks 64 wide in 2 heads: every code path of a real ViT, a training step in well under a
# second on CPU. mlp_ratio as upstream's vit_* generators pass it, which built the reference fixtures.
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4)
# A released (hub-style) file records no head count; loading it infers embed_dim // 64 heads, so a
# tiny ViT saved as such a file must have this many to load back as itself.
INFERRED_HEADS = 1


def make_tiny_vit(**overrides) -> DinoVisionTransformer:
    """The architecture behind `student.arch=vit_test_tiny` (a trainer passes image and patch size,
    registers and the like, as to upstream's generators), and the tests' tiny model object."""
    return DinoVisionTransformer(**{**TINY_VIT, **overrides})
