"""The `timm` layout: `vit_*_patch14_dinov2` and `vit_*_patch14_reg4_dinov2` state dicts.

timm keeps upstream's key names except where its VisionTransformer differs (read off timm's
`_convert_dinov2` and the dinov2 model definitions in timm/models/vision_transformer.py): no mask
token; SwiGLU is its packed GluMlp (`mlp.fc1` = upstream's `w12`, gate half first; `mlp.fc2` =
`w3`); register models are built with `no_embed_class`, so `reg_token` replaces
`register_tokens` and the [CLS] position is added into `cls_token` once, leaving `pos_embed`
patch positions only. That addition is the one upstream computes at every forward, so features
are unchanged; a round trip back gives the same sum in `cls_token` and a zero [CLS] position.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dinov2.models.formats.spec import BackboneSpec, ratio_for_width, swiglu_mlp_ratio
from dinov2.utils.errors import UserError

TIMM_SIZES = {(384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large", (1536, 40, 24): "giant"}
LAYERSCALE_INIT = 1e-5  # timm's init_values for its DINOv2 models; only whether it is set matters for loading
SWIGLU_BASE = "giant"  # the one timm DINOv2 definition built with SwiGLUPacked and SiLU
FFN_RENAMES = (("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))


def timm_name(spec: BackboneSpec) -> str:
    """The timm model name whose definition this backbone fits (sizes may be overridden by model_args)."""
    size = TIMM_SIZES.get((spec.embed_dim, spec.depth, spec.num_heads))
    if spec.ffn == "swiglu":
        size = SWIGLU_BASE
    elif size in (None, SWIGLU_BASE):
        size = "base"  # an MLP model of another size: base's definition, resized by model_args
    registers = "_reg4" if spec.num_register_tokens else ""
    return f"vit_{size}_patch14{registers}_dinov2"


def _check(spec: BackboneSpec) -> None:
    spec.refuse("timm")
    if spec.patch_size != 14:
        raise UserError(f"timm's DINOv2 definitions use patch 14; this backbone has patch {spec.patch_size}")


def to_timm(state: Mapping[str, Tensor], spec: BackboneSpec) -> dict[str, Tensor]:
    """Upstream's flat backbone keys -> timm's, for the model `timm_name(spec)` + `model_args(spec)`."""
    _check(spec)
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        if spec.ffn == "swiglu":
            for old, new in FFN_RENAMES:
                key = key.replace(old, new)
        out[key] = value
    if spec.num_register_tokens:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def is_timm_state(state: Mapping[str, Any]) -> bool:
    """timm's layout: a `reg_token`, or upstream's top-level keys without the mask token."""
    return "reg_token" in state or ("cls_token" in state and "mask_token" not in state)


def from_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm's keys -> upstream's flat backbone keys (a zero mask token, as timm has none)."""
    if "cls_token" not in state or "pos_embed" not in state:
        raise UserError("timm weights have no 'cls_token' / 'pos_embed': not a ViT state dict")
    out = dict(state)
    packed = _packed_swiglu(out)
    if packed:
        out = {_swap(key, reverse=True): value for key, value in out.items()}
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        cls_position = torch.zeros_like(out["pos_embed"][:, :1])
        out["pos_embed"] = torch.cat((cls_position, out["pos_embed"]), dim=1)
    out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1], dtype=out["cls_token"].dtype)
    return out


def _swap(key: str, reverse: bool) -> str:
    for old, new in FFN_RENAMES:
        key = key.replace(new, old) if reverse else key.replace(old, new)
    return key


def _packed_swiglu(state: Mapping[str, Tensor]) -> bool:
    """GluMlp packs both halves in fc1: its output is twice fc2's input (an MLP's equals it)."""
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def model_args(spec: BackboneSpec) -> dict[str, Any]:
    """Keyword arguments to `timm.create_model(timm_name(spec), ...)` that rebuild this exact backbone."""
    _check(spec)
    width = 2 * spec.hidden_features if spec.ffn == "swiglu" else spec.hidden_features
    args = {
        "img_size": spec.img_size,
        "patch_size": spec.patch_size,
        "in_chans": spec.in_chans,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": ratio_for_width(width, spec.embed_dim),
        "qkv_bias": spec.qkv_bias,
        "init_values": LAYERSCALE_INIT if spec.layerscale else None,
        "num_classes": 0,
    }
    if spec.num_register_tokens:
        args.update(reg_tokens=spec.num_register_tokens, no_embed_class=True)
    return args


def timm_config(spec: BackboneSpec, mean: tuple[float, ...], std: tuple[float, ...], crop_size: int, resize_size: int) -> dict[str, Any]:
    """config.json in timm's hub layout (architecture, model_args, pretrained_cfg)."""
    return {
        "architecture": timm_name(spec),
        "num_classes": 0,
        "num_features": spec.embed_dim,
        "model_args": model_args(spec),
        "pretrained_cfg": {
            "input_size": [spec.in_chans, crop_size, crop_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": crop_size / resize_size,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
        },
    }


def kwargs_from_timm_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """DinoVisionTransformer kwargs from a config.json we wrote (its model_args), else None."""
    args = config.get("model_args")
    if not isinstance(args, Mapping) or "embed_dim" not in args:
        return None
    registers = int(args.get("reg_tokens", 0))
    embed_dim = int(args["embed_dim"])
    width = int(embed_dim * float(args["mlp_ratio"]))
    swiglu = f"_{SWIGLU_BASE}_" in str(config.get("architecture", ""))
    ratio = swiglu_mlp_ratio(width // 2, embed_dim) if swiglu else width / embed_dim
    return {
        "img_size": int(args["img_size"]), "patch_size": int(args["patch_size"]),
        "in_chans": int(args.get("in_chans", 3)), "embed_dim": embed_dim,
        "depth": int(args["depth"]), "num_heads": int(args["num_heads"]),
        "mlp_ratio": ratio, "qkv_bias": bool(args.get("qkv_bias", True)),
        "ffn_layer": "swiglufused" if swiglu else "mlp",
        "init_values": 1.0 if args.get("init_values") else None, "block_chunks": 0,
        "num_register_tokens": registers,
    }  # fmt: skip
