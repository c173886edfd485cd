"""Backbone construction from the `student` section of a training config."""
from collections.abc import Callable, Mapping
from typing import Any

from dinov2.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer
from dinov2.utils.errors import UserError


def _option(args: Any, key: str) -> Any:
    """Read `student.<key>` from a DictConfig, a dict or a namespace, naming the key if absent."""
    try:
        return args[key] if isinstance(args, Mapping) else getattr(args, key)
    except (KeyError, AttributeError):
        raise UserError(f"config key student.{key} is missing") from None


def _arch_factory(arch: str) -> Callable[..., DinoVisionTransformer]:
    """`student.arch` may leave out "vit_" and may keep upstream's "_memeff" suffix (the attention
    backend is chosen by dinov2.layers here, not by the name), so configs written either way run."""
    name = arch.removesuffix("_memeff")
    if not name.startswith("vit_"):
        name = f"vit_{name}"
    return ARCHITECTURES.lookup(name, what="student.arch", where="" if name == arch else f" (given as '{arch}')")


def build_model(
    args: Any, only_teacher: bool = False, img_size: int = 224
) -> tuple[DinoVisionTransformer, DinoVisionTransformer, int] | tuple[DinoVisionTransformer, int]:
    """Student and teacher backbones (the teacher without stochastic depth) and their width.

    The teacher is built first, as upstream, so a seeded run draws the same initial weights.
    """
    factory = _arch_factory(str(_option(args, "arch")))
    vit_kwargs = dict(
        img_size=img_size,
        patch_size=_option(args, "patch_size"),
        init_values=_option(args, "layerscale"),
        ffn_layer=_option(args, "ffn_layer"),
        block_chunks=_option(args, "block_chunks"),
        qkv_bias=_option(args, "qkv_bias"),
        proj_bias=_option(args, "proj_bias"),
        ffn_bias=_option(args, "ffn_bias"),
        num_register_tokens=_option(args, "num_register_tokens"),
        interpolate_offset=_option(args, "interpolate_offset"),
        interpolate_antialias=_option(args, "interpolate_antialias"),
    )
    teacher = factory(**vit_kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = factory(
        **vit_kwargs,
        drop_path_rate=_option(args, "drop_path_rate"),
        drop_path_uniform=_option(args, "drop_path_uniform"),
    )
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg: Any, only_teacher: bool = False):
    """`build_model` for a full config: global crops fix the positional-embedding grid."""
    return build_model(cfg.student, only_teacher=only_teacher, img_size=cfg.crops.global_crops_size)


__all__ = ["build_model", "build_model_from_cfg", "DinoVisionTransformer"]
