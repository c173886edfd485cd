"""`python -m dinov2.export`: a teacher backbone written for the libraries people load models with.

    python -m dinov2.export --weights OUT/eval/training_999/teacher_checkpoint.pth --format hf --out DIR

The backbone is built and loaded exactly as the evaluations build it (architecture from
--config-file, else the exporting run's config.yaml, else the weights), then written from that
model, so an export can only describe a network that loaded strictly. Formats:
- hf:          config.json + model.safetensors + preprocessor_config.json, for AutoModel.from_pretrained(DIR)
- timm:        model.safetensors (timm's keys) + config.json (architecture, model_args, pretrained_cfg)
- safetensors: backbone_compatible.safetensors (upstream's keys) [+ dino_head.safetensors]: RAD-DINO's layout
- dinov2:      backbone.pth, upstream's released-file layout (flat blocks), for torch.hub's dinov2 models
Every file is written atomically. An architecture a target cannot express is refused with the reason.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from dinov2.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from dinov2.eval.setup import UPSTREAM_RESIZE_RATIO, eval_config, load_backbone
from dinov2.logging import setup_logging
from dinov2.models.formats import hf, timm
from dinov2.models.formats.files import (
    BACKBONE_FILE, CONFIG_FILE, HEAD_FILE, MODEL_FILE, write_json, write_safetensors,
)  # fmt: skip
from dinov2.models.formats.spec import BackboneSpec, backbone_spec, flat_block_keys
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import extract_head_state_dict, read_weights_file
from dinov2.utils.cli import run_cli
from dinov2.utils.io import atomic_write
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")

FORMATS = ("hf", "timm", "safetensors", "dinov2")
PREPROCESSOR_FILE = "preprocessor_config.json"
DINOV2_FILE = "backbone.pth"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", "--pretrained-weights", dest="weights", required=True,
                        help="a teacher export, training checkpoint, released .pth, .safetensors file or weights folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the target layout")
    parser.add_argument("--out", required=True, help="output folder (created; files in it are replaced)")
    parser.add_argument("--config-file", help="model configuration (default: the exporting run's config.yaml, "
                        "else the architecture read from the weights)")
    parser.add_argument("--resize-size", type=int, default=None,
                        help="preprocessing short side written for hf/timm (default: img_size x 256/224)")
    return parser  # fmt: skip


def interpolation_note(spec: BackboneSpec) -> str | None:
    """Why transformers' features differ from ours off the trained grid, or None when they do not."""
    antialias = spec.num_register_tokens > 0
    if spec.interpolate_offset == 0 and spec.interpolate_antialias == antialias:
        return None
    return (f"transformers resamples positions by size with antialias={antialias}, this model with "
            f"interpolate_offset={spec.interpolate_offset:g}, interpolate_antialias={spec.interpolate_antialias}: "
            f"features are equal at {spec.img_size}x{spec.img_size} px only")  # fmt: skip


def write_export(model: DinoVisionTransformer, fmt: str, out: str | Path, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, resize_size: int | None = None,
                 head: Mapping[str, Tensor] | None = None) -> list[Path]:
    """Write a loaded backbone (and, for `safetensors`, its DINO head) in `fmt` into `out`.

    `mean`/`std` are the normalisation it was trained with and go into the hf/timm preprocessing,
    with the model's img_size as the crop and `resize_size` (default img_size x 256/224) as the
    short side before it. Returns the files written.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    spec = backbone_spec(model)
    state = flat_block_keys(model.state_dict())
    crop = spec.img_size
    resize = resize_size or int(round(crop * UPSTREAM_RESIZE_RATIO))
    if resize < crop:
        raise UserError(f"--resize-size {resize} is smaller than the model's img_size {crop}")
    out = Path(out)
    written = []
    if fmt == "hf":
        written.append(write_safetensors(out / MODEL_FILE, hf.to_hf(state, spec)))
        written.append(write_json(out / PREPROCESSOR_FILE, hf.preprocessor_config(mean, std, crop, resize)))
        written.append(write_json(out / CONFIG_FILE, hf.hf_config(spec)))  # last: a folder with a config is whole
        note = interpolation_note(spec)
        if note:
            logger.warning("%s", note)
    elif fmt == "timm":
        written.append(write_safetensors(out / MODEL_FILE, timm.to_timm(state, spec)))
        written.append(write_json(out / CONFIG_FILE, timm.timm_config(spec, mean, std, crop, resize)))
    elif fmt == "safetensors":
        written.append(write_safetensors(out / BACKBONE_FILE, state))
        if head:
            written.append(write_safetensors(out / HEAD_FILE, head))
    else:
        tensors = {key: value.detach().clone() for key, value in state.items()}
        written.append(atomic_write(out / DINOV2_FILE, lambda file: torch.save(tensors, file)))
    return written


def export(weights: str, fmt: str, out: str | Path, config_file: str | None = None,
           resize_size: int | None = None) -> list[Path]:
    """`write_export` for a weights path, its architecture and normalisation resolved as the
    evaluations resolve them."""
    cfg = eval_config(config_file, weights)
    model = load_backbone(cfg, weights)
    mean, std = (tuple(cfg.crops.mean), tuple(cfg.crops.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    head = extract_head_state_dict(read_weights_file(weights)) if fmt == "safetensors" else None
    return write_export(model, fmt, out, mean=mean, std=std, resize_size=resize_size, head=head)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    for path in export(args.weights, args.format, args.out, args.config_file, args.resize_size):
        print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
