"""torch.hub entry points for the released DINOv2 backbones, loaded from LOCAL files only.

    torch.hub.load("/path/to/repo", "dinov2_vits14", source="local", weights="dinov2_vits14_pretrain.pth")

Nothing is ever downloaded: the weights file must already be on disk (hospital and cluster
machines often have no internet access, and silent downloads hide which weights were used).
"""
# Underscore names: torch.hub.list() reports every public callable of this file as an entry point.
from typing import Callable as _Callable

from dinov2.models.vision_transformer import ARCHITECTURES as _ARCHITECTURES
from dinov2.models.vision_transformer import DinoVisionTransformer as _ViT
from dinov2.models.weights import load_backbone_weights as _load_backbone_weights
from dinov2.utils.errors import UserError as _UserError

dependencies = ["torch"]

# Settings of the released checkpoints (they differ from the constructor defaults).
_HUB_SETTINGS = {"img_size": 518, "patch_size": 14, "init_values": 1.0, "block_chunks": 0}
_REGISTER_SETTINGS = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}


def _make_dinov2_model(
    arch: str, name: str, registers: bool, pretrained: bool, weights: str | None, **kwargs
) -> _ViT:
    settings = dict(_HUB_SETTINGS)
    if arch == "vit_giant2":
        settings["ffn_layer"] = "swiglufused"
    if registers:
        settings.update(_REGISTER_SETTINGS)
    if pretrained and weights is None:
        raise _UserError(
            f"{name}: this repository never downloads weights; pass weights=PATH to a local file "
            f"(e.g. {name.removesuffix('_reg')}{'_reg4' if registers else ''}_pretrain.pth), "
            "or pretrained=False for random weights"
        )
    model = _ARCHITECTURES.lookup(arch)(**{**settings, **kwargs})
    if weights is not None:
        _load_backbone_weights(model, weights, strict=True)
    return model


def _entry_point(arch: str, name: str, doc: str) -> _Callable[..., _ViT]:
    """The hub entry point `name` (the release with 4 registers when it ends in "_reg"); torch.hub
    shows `doc` as its help."""

    def load(*, pretrained: bool = True, weights: str | None = None, **kwargs) -> _ViT:
        return _make_dinov2_model(arch, name, name.endswith("_reg"), pretrained, weights, **kwargs)

    load.__name__ = load.__qualname__ = name
    load.__doc__ = doc
    return load


dinov2_vits14 = _entry_point("vit_small", "dinov2_vits14", "DINOv2 ViT-S/14.")
dinov2_vitb14 = _entry_point("vit_base", "dinov2_vitb14", "DINOv2 ViT-B/14.")
dinov2_vitl14 = _entry_point("vit_large", "dinov2_vitl14", "DINOv2 ViT-L/14.")
dinov2_vitg14 = _entry_point("vit_giant2", "dinov2_vitg14", "DINOv2 ViT-g/14 (SwiGLU feed-forward).")
dinov2_vits14_reg = _entry_point("vit_small", "dinov2_vits14_reg", "DINOv2 ViT-S/14 with 4 register tokens.")
dinov2_vitb14_reg = _entry_point("vit_base", "dinov2_vitb14_reg", "DINOv2 ViT-B/14 with 4 register tokens.")
dinov2_vitl14_reg = _entry_point("vit_large", "dinov2_vitl14_reg", "DINOv2 ViT-L/14 with 4 register tokens.")
dinov2_vitg14_reg = _entry_point("vit_giant2", "dinov2_vitg14_reg", "DINOv2 ViT-g/14 (SwiGLU) with 4 register tokens.")
