"""Upstream's evaluation set-up: the common flags and a frozen teacher backbone ready for inference.

The backbone's architecture comes, in this order, from `--config-file` (a run's config.yaml,
a YAML path, or a shipped name such as "eval/vits14_pretrain"), from the config.yaml of the run
that exported the weights (OUT/eval/<tag>/teacher_checkpoint.pth -> OUT/config.yaml), or from
the weights themselves. Weights load strictly: a file that does not fit the model is an error
naming the file and the keys, never a half-loaded network evaluated in silence.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from dinov2 import distributed
from dinov2.configs import CONFIGS_DIR, dinov2_default_config
from dinov2.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from dinov2.data.transforms import ClassificationEvalTransform
from dinov2.fsdp import resolve_precision
from dinov2.models import build_model_from_cfg
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import infer_backbone_kwargs, load_backbone_weights, read_weights_file
from dinov2.utils.config import get_cfg
from dinov2.utils.errors import UserError
from dinov2.utils.utils import fix_random_seeds
from dinov2.logging import setup_logging

logger = logging.getLogger("dinov2")

UPSTREAM_RESIZE_RATIO = 256 / 224  # upstream's evaluation: resize to 256, centre crop 224


def get_args_parser(
    description: str | None = None,
    parents: Sequence[argparse.ArgumentParser] | None = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, parents=list(parents or []), add_help=add_help)
    parser.add_argument(
        "--config-file",
        type=str,
        help="model configuration: a run's config.yaml, a YAML file or a shipped name like eval/vits14_pretrain "
        "(default: the exporting run's config.yaml if found, else the architecture read from the weights)",
    )
    parser.add_argument(
        "--pretrained-weights",
        type=str,
        help="backbone weights: a teacher export {'teacher': ...}, a training checkpoint, a released hub file, "
        "a .safetensors file or a transformers / timm / RAD-DINO folder",
    )
    parser.add_argument("--output-dir", default="", type=str, help="output directory for results and logs")
    parser.add_argument("--opts", help="extra configuration options key=value", default=[], nargs="+")
    return parser


def add_image_arguments(parser: argparse.ArgumentParser, resize_ratio: float) -> None:
    """Evaluation image size. Upstream hard-codes 256 -> 224; small models and CPU runs want less."""
    parser.add_argument("--crop-size", type=int, default=224, help="centre crop fed to the model (default 224)")
    parser.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help=f"shorter side before the crop (default: crop size x {resize_ratio:g}, upstream's ratio)",
    )
    parser.add_argument("--num-workers", type=int, default=5, help="data loader workers (default 5)")
    parser.set_defaults(resize_ratio=resize_ratio)


LEVEL_NOUNS = {"image": "images", "study": "studies"}


def add_level_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--level",
        choices=("image", "study"),
        default="image",
        help="evaluate per image, or per study on the mean of its L2-normalised image embeddings "
        "(needs a dataset with study ids, e.g. VetImages)",
    )


def resolve_config_file(name: str) -> Path:
    """A YAML path as given, else a shipped config name ("eval/vits14_pretrain[.yaml]")."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    known = sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.glob("*/*.yaml"))
    raise UserError(f"config file not found: {name} (shipped configs: {', '.join(known)})")


def _run_config_of(weights: Path) -> Path | None:
    """OUT/config.yaml for weights exported by a run as OUT/eval/<tag>/teacher_checkpoint.pth."""
    candidate = weights.resolve().parent.parent.parent / "config.yaml"
    if weights.resolve().parent.parent.name == "eval" and candidate.is_file():
        return candidate
    return None


def eval_config(
    config_file: str | None = None, pretrained_weights: str | None = None, opts: Sequence[str] = ()
) -> DictConfig | None:
    """The model configuration, or None when the architecture is to be read from the weights."""
    if config_file:
        path = resolve_config_file(config_file)
    else:
        path = _run_config_of(Path(pretrained_weights)) if pretrained_weights else None
        if path is not None:
            logger.info("using the exporting run's configuration %s", path)
    if path is None:
        if opts:
            raise UserError("--opts needs a model configuration (--config-file)")
        return None
    return get_cfg(path, opts)


def get_eval_config(args: argparse.Namespace) -> DictConfig | None:
    """`eval_config` from upstream's flags (`--config-file`, `--pretrained-weights`, `--opts`)."""
    return eval_config(
        getattr(args, "config_file", None), getattr(args, "pretrained_weights", None), getattr(args, "opts", None) or ()
    )


def get_autocast_dtype(cfg: DictConfig | None) -> torch.dtype:
    """The precision the teacher trained in, resolved as the trainer resolves it (upstream's
    defaults without a config), so features are computed as in training."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_precision((cfg if cfg is not None else dinov2_default_config).compute_precision, device).compute


def _architecture_from_weights(weights: dict[str, Any], path: str) -> DinoVisionTransformer:
    try:
        kwargs = infer_backbone_kwargs(weights)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    if kwargs["num_register_tokens"] > 0:
        # released register models interpolate positions this way; it is not stored in weights
        kwargs.update(interpolate_antialias=True, interpolate_offset=0.0)
    logger.info("architecture read from %s: %s", path, kwargs)
    return DinoVisionTransformer(**kwargs)


def load_backbone(cfg: DictConfig | None, pretrained_weights: str | None) -> DinoVisionTransformer:
    """Teacher-only backbone on the CPU with the weights loaded strictly, in eval mode."""
    if not pretrained_weights:
        raise UserError("--pretrained-weights is required (a teacher_checkpoint.pth, a backbone .pth or "
                        ".safetensors file, or a transformers / RAD-DINO folder)")  # fmt: skip
    weights = read_weights_file(pretrained_weights)
    if cfg is None:
        model = _architecture_from_weights(weights, pretrained_weights)
    else:
        model, _ = build_model_from_cfg(cfg, only_teacher=True)
    try:
        load_backbone_weights(model, weights, strict=True)
    except UserError as exc:
        raise UserError(f"{pretrained_weights}: {exc}") from None
    return model.eval().requires_grad_(False)


def build_model_for_eval(cfg: DictConfig | None, pretrained_weights: str | None) -> DinoVisionTransformer:
    """`load_backbone`, on the GPU if any."""
    model = load_backbone(cfg, pretrained_weights)
    if torch.cuda.is_available():
        model.cuda(distributed.get_local_rank())
    return model


def setup_and_build_model(args: argparse.Namespace) -> tuple[DinoVisionTransformer, torch.dtype]:
    """(frozen backbone, autocast dtype) from upstream's flags; seeds from the config (0 without one)."""
    cfg = get_eval_config(args)
    fix_random_seeds(cfg.train.seed if cfg is not None else 0)
    torch.backends.cudnn.benchmark = True
    return build_model_for_eval(cfg, args.pretrained_weights), get_autocast_dtype(cfg)


def prepare_output_dir(args: argparse.Namespace) -> Path:
    """`--output-dir` (default: here), created, with the run's log file in it."""
    output_dir = Path(args.output_dir or ".")
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(output_dir)
    return output_dir


def eval_transform(
    cfg: DictConfig | None, crop_size: int, resize_size: int | None = None, resize_ratio: float = UPSTREAM_RESIZE_RATIO
) -> ClassificationEvalTransform:
    """Upstream's resize + centre crop, normalised as the model was trained (ImageNet's statistics
    without a configuration); the resize defaults to `crop_size * resize_ratio`."""
    mean, std = (tuple(cfg.crops.mean), tuple(cfg.crops.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    resize = resize_size or int(round(crop_size * resize_ratio))
    if crop_size <= 0 or resize < crop_size:
        raise UserError(f"--crop-size {crop_size} must be positive and no larger than --resize-size {resize}")
    return ClassificationEvalTransform(resize, crop_size, mean, std)


def make_eval_transform(args: argparse.Namespace) -> ClassificationEvalTransform:
    """`eval_transform` for upstream's flags and those of `add_image_arguments`."""
    return eval_transform(get_eval_config(args), args.crop_size, args.resize_size, args.resize_ratio)
