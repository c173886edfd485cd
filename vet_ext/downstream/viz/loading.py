"""What the viz commands look at: backbones from any weights file, and the views of one study.

A user compares checkpoints of different origins side by side (a teacher export of our run, a
released hub file, an untrained network), so each `--weights` entry is turned into a ready
`Checkpoint` here, with the normalisation it was trained with; and a study comes either from a
prepared DATA folder or from loose DICOM files, so both become the same list of `View`s.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dinov2.models import build_model
from dinov2.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer
from dinov2.models.weights import (
    extract_backbone_state_dict, infer_backbone_kwargs, load_backbone_weights, read_weights_file,
)  # fmt: skip
from dinov2.utils.config import get_cfg
from dinov2.utils.errors import UserError
from vet_ext.ingestion.manifest import SPLITS
from vet_ext.ingestion.dicom import DicomError, read_dicom
from vet_ext.pretraining.datasets import VetStudies

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0  # an untrained baseline must look the same in every run
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How the released checkpoints were built (weights alone do not say; see hubconf.py).
HUB_SETTINGS = {"img_size": 518, "patch_size": 14, "init_values": 1.0, "block_chunks": 0}
HUB_REGISTER_SETTINGS = {"interpolate_antialias": True, "interpolate_offset": 0.0}
RUN_CONFIG_NAME = "config.yaml"


@dataclass
class View:
    """One radiograph as displayed: grayscale float [H, W] in [0, 1] at its source resolution."""

    name: str
    pixels: Tensor


@dataclass
class Checkpoint:
    """A backbone in eval mode plus what is needed to feed it images the way it was trained."""

    name: str
    model: DinoVisionTransformer
    source: str
    config: str | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    def model_input(self, gray: Tensor) -> Tensor:
        """Resized grayscale [h, w] -> normalised [1, 3, h, w] on the model's device."""
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        image = (gray.float().expand(3, -1, -1) - mean) / std
        return image.unsqueeze(0).to(self.device)

    def inputs(self, view: View, long_side: int) -> tuple[Tensor, Tensor]:
        """(resized grayscale [1, h, w], normalised model input [1, 3, h, w]) of one view."""
        size = model_input_size(view.pixels.shape[0], view.pixels.shape[1], long_side, self.patch_size)
        gray = resize_gray(view.pixels, size)
        return gray, self.model_input(gray)

    @torch.inference_mode()
    def patch_features(self, image: Tensor) -> Tensor:
        """Final normed patch tokens of a model input, as a grid [h/p, w/p, D] on the CPU."""
        grid_h, grid_w = image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size
        tokens = self.model.forward_features(image)["x_norm_patchtokens"][0]
        return tokens.float().cpu().reshape(grid_h, grid_w, -1)

    def describe(self) -> dict[str, Any]:
        model = self.model
        return {
            "name": self.name,
            "weights": self.source,
            "config": self.config,
            "embed_dim": model.embed_dim,
            "depth": model.n_blocks,
            "num_heads": model.num_heads,
            "patch_size": model.patch_size,
            "num_register_tokens": model.num_register_tokens,
        }


def model_input_size(height: int, width: int, long_side: int, patch_size: int) -> tuple[int, int]:
    """Long side scaled to `long_side`, aspect kept, each side rounded to a multiple of the patch."""
    scale = long_side / max(height, width)

    def fit(side: int) -> int:
        return max(patch_size, round(side * scale / patch_size) * patch_size)

    return fit(height), fit(width)


def resize_gray(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """[H, W] -> [1, h, w]; antialiased so a downscaled radiograph does not alias fine trabeculae."""
    resized = F.interpolate(pixels[None, None].float(), size=size, mode="bilinear", antialias=True)
    return resized[0].clamp(0.0, 1.0)


# --- checkpoints ---------------------------------------------------------------------------


def default_name(spec: str) -> str:
    """'training_1249' for OUT/eval/training_1249/teacher_checkpoint.pth, else the file stem."""
    if spec.startswith(RANDOM_PREFIX):
        return spec
    path = Path(spec)
    return path.parent.name if path.name == "teacher_checkpoint.pth" and path.parent.name else path.stem


def checkpoint_names(specs: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names is not None and len(names) != len(specs):
        raise UserError(f"--names gives {len(names)} labels for {len(specs)} --weights entries")
    chosen = list(names) if names is not None else [default_name(spec) for spec in specs]
    duplicates = sorted({name for name in chosen if chosen.count(name) > 1})
    if duplicates:
        raise UserError(f"checkpoint names must differ (pass --names): {', '.join(duplicates)}")
    return chosen


def run_config_path(weights: Path, stored: dict[str, Any]) -> Path | None:
    """The config.yaml of the training run that wrote `weights`, when there is one.

    Only files written by a run qualify: a teacher export sits at OUT/eval/<tag>/ (config two
    folders up), a training checkpoint in OUT/ itself. A bare backbone file never takes a config
    that merely lies next to it.
    """
    if "teacher" in stored:
        candidate = weights.parent.parent.parent / RUN_CONFIG_NAME if weights.parent.parent.name == "eval" else None
    elif "model" in stored:
        candidate = weights.parent / RUN_CONFIG_NAME
    else:
        candidate = None
    return candidate if candidate is not None and candidate.is_file() else None


def _from_config(cfg: DictConfig, arch: str | None = None) -> DinoVisionTransformer:
    student = OmegaConf.to_container(cfg.student, resolve=True)
    if arch is not None:
        student["arch"] = arch
    model, _ = build_model(student, only_teacher=True, img_size=cfg.crops.global_crops_size)
    return model


def _normalisation(cfg: DictConfig | None) -> dict[str, tuple[float, ...]]:
    crops = cfg.crops if cfg is not None else {}
    return {
        "mean": tuple(float(v) for v in crops.get("mean", IMAGENET_MEAN)),
        "std": tuple(float(v) for v in crops.get("std", IMAGENET_STD)),
    }


def _random_model(arch: str, cfg: DictConfig | None) -> DinoVisionTransformer:
    name = arch if arch.startswith("vit_") else f"vit_{arch}"
    factory = ARCHITECTURES.lookup(name, where=f" in --weights {RANDOM_PREFIX}{arch}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        if cfg is not None:
            return _from_config(cfg, arch=name)
        return factory(**HUB_SETTINGS)


def _from_keys(stored: dict[str, Any], source: str) -> DinoVisionTransformer:
    try:
        kwargs = infer_backbone_kwargs(stored)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    if kwargs["num_register_tokens"]:
        # Without a config, a register model is a released one: those interpolate like this.
        kwargs.update(HUB_REGISTER_SETTINGS)
    return DinoVisionTransformer(**kwargs)


def load_checkpoint(
    spec: str, name: str, config_file: str | None = None, device: torch.device | str = "cpu"
) -> Checkpoint:
    """A backbone for one `--weights` entry: a file of ours or a released one, or `random:ARCH`.

    The architecture comes from `config_file` if given, else from the config.yaml of the run
    that wrote the file, else from the file's keys (released backbones).
    """
    cfg = get_cfg(config_file) if config_file else None
    if spec.startswith(RANDOM_PREFIX):
        model = _random_model(spec[len(RANDOM_PREFIX):], cfg)
        config_used = config_file
    else:
        path = Path(spec)
        stored = read_weights_file(path)
        extract_backbone_state_dict(stored, source=str(path))  # a clear error before building anything
        if cfg is None:
            run_config = run_config_path(path, stored)
            cfg = get_cfg(run_config) if run_config is not None else None
            config_used = str(run_config) if run_config is not None else None
        else:
            config_used = config_file
        model = _from_config(cfg) if cfg is not None else _from_keys(stored, str(path))
        try:
            load_backbone_weights(model, stored, strict=True)
        except UserError as exc:
            where = f" (architecture from {config_used})" if config_used else ""
            raise UserError(f"{path}{where}: {exc}") from None
    return Checkpoint(name, model.eval().to(device), spec, config_used, **_normalisation(cfg))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


# --- studies -------------------------------------------------------------------------------


def _unique_names(codes: Sequence[str]) -> list[str]:
    """View codes as labels; repeats get a number ('LL', 'LL 2') so titles stay unambiguous."""
    seen: dict[str, int] = {}
    names = []
    for code in codes:
        seen[code] = seen.get(code, 0) + 1
        names.append(code if seen[code] == 1 else f"{code} {seen[code]}")
    return names


def load_study(data: str | Path, study_id: str, split: str | None = None) -> list[View]:
    """Every cached view of one study of a prepared DATA folder, in the dataset's view order."""
    splits = [split] if split else list(SPLITS)
    for name in splits:
        dataset = VetStudies(data, split=name)
        matches = np.flatnonzero(dataset.study_ids == study_id)
        if len(matches):
            index = int(matches[0])
            images, _ = dataset[index]
            codes = dataset.view_codes(index)
            return [View(label, image[0].float() / 255.0) for label, image in zip(_unique_names(codes), images)]
    where = f"split '{split}'" if split else f"any split ({', '.join(SPLITS)})"
    raise UserError(f"--study {study_id}: no such study in {where} of {data}")


def load_dicom_views(paths: Sequence[str | Path]) -> list[View]:
    """Each frame of each file becomes a view, named by the view code read from its tags."""
    codes, frames = [], []
    for path in paths:
        try:
            image = read_dicom(path)
        except DicomError as exc:
            raise UserError(str(exc)) from None
        for frame in image.frames:
            codes.append(image.view)
            frames.append(torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32)))
    if not frames:
        raise UserError(f"--dicom: no image frames in {', '.join(map(str, paths))}")
    return [View(label, frame) for label, frame in zip(_unique_names(codes), frames)]

