"""The Hugging Face `transformers` layout: `Dinov2Model` / `Dinov2WithRegistersModel` folders.

Key names are the ones `save_pretrained` writes and the hub's DINOv2 checkpoints (facebook/dinov2-*,
microsoft/rad-dino) hold; transformers 5 renames them to its module names on load. The config is
written as JSON here, so exporting needs no `transformers` install. Differences that matter:
transformers splits qkv into query/key/value, always has LayerScale (ones express "none"), always
has projection and FFN biases, and resamples positions by size with no offset (antialiased for
the register model): off the trained grid, features match ours only for a model built with
interpolate_offset=0 and interpolate_antialias equal to "has registers".
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dinov2.models.formats.spec import BackboneSpec, swiglu_mlp_ratio, ratio_for_width
from dinov2.utils.errors import UserError

LAYER_NORM_EPS = 1e-6
RESAMPLE_BICUBIC = 3  # PIL's code, as the DINOv2 image processors on the hub use
MODEL_PREFIXES = ("dinov2.", "dinov2_with_registers.")  # task models (e.g. classification) nest the backbone
MARKER = "embeddings.cls_token"
# upstream name -> transformers name, for every tensor that is only renamed
TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
IN_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out",
}  # fmt: skip
QKV = ("query", "key", "value")


def is_hf_state(state: Mapping[str, Any]) -> bool:
    return any(key.endswith(MARKER) for key in state)


def to_hf(state: Mapping[str, Tensor], spec: BackboneSpec) -> dict[str, Tensor]:
    """Upstream's flat backbone keys -> transformers' on-disk keys (fresh tensors, no shared storage)."""
    spec.refuse("transformers")
    out = {TOP_LEVEL[key]: value for key, value in state.items() if key in TOP_LEVEL}
    for i in range(spec.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for name, hf_name in IN_BLOCK.items():
            for kind in ("weight", "bias"):
                if f"{src}{name}.{kind}" in state:
                    out[f"{dst}{hf_name}.{kind}"] = state[f"{src}{name}.{kind}"]
        for kind in ("weight", "bias"):
            if f"{src}attn.qkv.{kind}" in state:
                for part, tensor in zip(QKV, state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)):
                    out[f"{dst}attention.attention.{part}.{kind}"] = tensor
        for n in (1, 2):
            gamma = state.get(f"{src}ls{n}.gamma")
            out[f"{dst}layer_scale{n}.lambda1"] = gamma if gamma is not None else torch.ones(spec.embed_dim)
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def from_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers' on-disk keys -> upstream's flat backbone keys; a key it cannot place is an error."""
    state = {_strip_model_prefix(key): value for key, value in state.items()}
    renamed = {hf_name: name for name, hf_name in TOP_LEVEL.items()}
    out, qkv = {}, {}
    for key, value in state.items():
        if key in renamed:
            out[renamed[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layer"] or len(parts) < 5:
            raise UserError(f"transformers key '{key}' is not part of a DINOv2 backbone")
        index, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        src = f"blocks.{index}."
        if rest.startswith("attention.attention."):
            qkv.setdefault((index, kind), {})[rest.rsplit(".", 1)[1]] = value
        elif rest in ("layer_scale1", "layer_scale2"):
            out[f"{src}ls{rest[-1]}.gamma"] = value
        elif rest in IN_BLOCK.values():
            out[f"{src}{next(n for n, h in IN_BLOCK.items() if h == rest)}.{kind}"] = value
        else:
            raise UserError(f"transformers key '{key}' is not part of a DINOv2 backbone")
    for (index, kind), parts in qkv.items():
        if sorted(parts) != sorted(QKV):
            raise UserError(f"layer {index}: attention {kind} needs query, key and value, found {sorted(parts)}")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[name] for name in QKV], dim=0)
    return out


def _strip_model_prefix(key: str) -> str:
    for prefix in MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def hf_config(spec: BackboneSpec) -> dict[str, Any]:
    """config.json for AutoModel: the fields transformers' DINOv2 configs define (RAD-DINO's set)."""
    spec.refuse("transformers")
    if spec.ffn == "swiglu":
        mlp_ratio = swiglu_mlp_ratio(spec.hidden_features, spec.embed_dim)
    else:
        mlp_ratio = ratio_for_width(spec.hidden_features, spec.embed_dim)
    registers = spec.num_register_tokens > 0
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": mlp_ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": spec.img_size,
        "patch_size": spec.patch_size,
        "num_channels": spec.in_chans,
        "qkv_bias": spec.qkv_bias,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": spec.ffn == "swiglu",
        "apply_layernorm": True,
        "reshape_hidden_states": True,
        "out_features": [f"stage{spec.depth}"],
        "out_indices": [spec.depth],
        "stage_names": ["stem"] + [f"stage{i}" for i in range(1, spec.depth + 1)],
    }
    if registers:
        config["num_register_tokens"] = spec.num_register_tokens
    return config


def preprocessor_config(mean: tuple[float, ...], std: tuple[float, ...], crop_size: int, resize_size: int) -> dict[str, Any]:
    """preprocessor_config.json: resize the short side, centre-crop, normalise as in training."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resize_size},
        "resample": RESAMPLE_BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": crop_size, "width": crop_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def kwargs_from_hf_config(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """DinoVisionTransformer kwargs that rebuild a transformers DINOv2 config, interpolation included."""
    model_type = config.get("model_type")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{source}: model_type {model_type!r} is not a DINOv2 model (dinov2, dinov2_with_registers)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only gelu)")
    if float(config.get("layer_norm_eps", LAYER_NORM_EPS)) != LAYER_NORM_EPS:
        raise UserError(f"{source}: layer_norm_eps {config['layer_norm_eps']} is not DINOv2's {LAYER_NORM_EPS}")
    sizes = {}
    for key in ("image_size", "patch_size"):
        value = config.get(key, 518 if key == "image_size" else 14)
        value = list(value) if isinstance(value, (list, tuple)) else [value, value]
        if value[0] != value[1]:
            raise UserError(f"{source}: {key} {value} is not square")
        sizes[key] = int(value[0])
    registers = int(config.get("num_register_tokens", 0))
    return {
        "img_size": sizes["image_size"],
        "patch_size": sizes["patch_size"],
        "in_chans": int(config.get("num_channels", 3)),
        "embed_dim": _required(config, "hidden_size", source),
        "depth": _required(config, "num_hidden_layers", source),
        "num_heads": _required(config, "num_attention_heads", source),
        "mlp_ratio": float(config.get("mlp_ratio", 4)),
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "ffn_layer": "swiglufused" if config.get("use_swiglu_ffn") else "mlp",
        "init_values": float(config.get("layerscale_value", 1.0)),
        "block_chunks": 0,
        "num_register_tokens": registers,
        "interpolate_offset": 0.0,
        "interpolate_antialias": registers > 0,
    }


def _required(config: Mapping[str, Any], key: str, source: str) -> int:
    if key not in config:
        raise UserError(f"{source}: config has no '{key}'")
    return int(config[key])
