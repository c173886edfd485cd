"""Multi-view augmentation of one radiograph study for VET-DINO pretraining.

DINOv2 makes its two global crops from one image; here they come from two different views of
the same study (say a lateral and a ventro-dorsal), and the teacher sees the crops of one view
only. Half of the student's crops come from the view the teacher does not see, so matching the
teacher means recognising the same animal in another projection: the features learn the anatomy
the views share rather than the look of a single projection.

The photometric changes are those that happen between radiographs (exposure, contrast, the
detector's tone curve, focus; solarisation as in DINOv2), applied on one gray channel; hue and saturation
would be meaningless on gray images. Horizontal flips are off by default: a flipped lateral view
is a different laterality (left-right), which the model should not learn to ignore.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from omegaconf import DictConfig

from dinov2.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from dinov2.data.transforms import (
    Compose,
    GaussianBlur,
    Normalize,
    RandomApply,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSolarize,
    Transform,
    adjust_brightness,
)
from dinov2.utils.errors import UserError

GLOBAL_CROPS_PER_VIEW = 2


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def adjust_contrast_gray(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale the deviations from the image's mean gray level."""
    return (factor * image + (1 - factor) * image.mean()).clamp(0, 1)


def adjust_gamma(image: torch.Tensor, gamma: float) -> torch.Tensor:
    """Tone-curve change (gamma < 1 brightens the dark parts): detectors and display LUTs differ by it."""
    return image.clamp(0, 1).pow(gamma)


class IntensityJitter:
    """Brightness, contrast and gamma changes in a random order, each factor drawn per crop.

    Brightness and contrast factors are uniform in [1 - s, 1 + s]; gamma is log-uniform in
    `gamma_range` so that brightening and darkening curves are equally likely.
    """

    def __init__(self, brightness: float, contrast: float, gamma_range: Sequence[float]):
        self.brightness = (max(0.0, 1 - brightness), 1 + brightness)
        self.contrast = (max(0.0, 1 - contrast), 1 + contrast)
        self.log_gamma = (math.log(gamma_range[0]), math.log(gamma_range[1]))

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        order = torch.randperm(3, generator=generator).tolist()
        u_brightness, u_contrast, u_gamma = torch.rand(3, generator=generator).tolist()
        changes = (
            (adjust_brightness, _between(self.brightness, u_brightness)),
            (adjust_contrast_gray, _between(self.contrast, u_contrast)),
            (adjust_gamma, math.exp(_between(self.log_gamma, u_gamma))),
        )
        for index in order:
            adjust, factor = changes[index]
            image = adjust(image, factor)
        return image


def _between(bounds: tuple[float, float], fraction: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * fraction


@dataclass(frozen=True)
class AugmentationSettings:
    """How the crops of a view are changed (the `multiview.*` config keys): intensity, blur,
    solarisation and the optional horizontal flip.

    As in DINOv2, the two global crops of a view are treated asymmetrically (by default the
    first is never blurred, the second is blurred with p 0.9 and may be solarised), so each view
    offers the teacher one clean and one degraded crop.
    """

    intensity_probability: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    gamma_range: tuple[float, float] = (0.7, 1.4)
    global_blur_probability: tuple[float, float] = (0.0, 0.9)
    local_blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_probability: float = 0.2
    hflip_probability: float = 0.0


def settings_from_config(cfg: DictConfig) -> AugmentationSettings:
    """Read `multiview.*`, checking what a typo or wrong type would otherwise turn into nonsense."""
    section = cfg.multiview

    def pair(key: str) -> tuple[float, float]:
        value = list(section[key])
        if len(value) != 2:
            raise UserError(f"config key multiview.{key} must be a list of 2 numbers, got {value}")
        return float(value[0]), float(value[1])

    settings = AugmentationSettings(
        intensity_probability=float(section.intensity_probability),
        brightness=float(section.brightness),
        contrast=float(section.contrast),
        gamma_range=pair("gamma_range"),
        global_blur_probability=pair("global_blur_probability"),
        local_blur_probability=float(section.local_blur_probability),
        blur_sigma=pair("blur_sigma"),
        solarize_probability=float(section.solarize_probability),
        hflip_probability=float(section.hflip_probability),
    )
    if not 0 < settings.gamma_range[0] <= settings.gamma_range[1]:
        raise UserError(f"config key multiview.gamma_range must be 0 < low <= high, got {list(settings.gamma_range)}")
    probabilities = {
        "intensity_probability": [settings.intensity_probability],
        "global_blur_probability": settings.global_blur_probability,
        "local_blur_probability": [settings.local_blur_probability],
        "solarize_probability": [settings.solarize_probability],
        "hflip_probability": [settings.hflip_probability],
    }
    for key, values in probabilities.items():
        if not all(0.0 <= value <= 1.0 for value in values):
            raise UserError(f"config key multiview.{key} must be a probability in [0, 1], got {section[key]}")
    return settings


def to_gray_float(view: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 1]) [1, H, W] -> float32 [1, H, W] in [0, 1]."""
    if view.ndim != 3 or view.shape[0] != 1:
        raise ValueError(f"expected a gray view of shape [1, H, W], got {tuple(view.shape)}")
    return view.float() / 255.0 if view.dtype == torch.uint8 else view.float()


class MultiViewAugmentation:
    """Two views of a study -> 2 global and `local_crops_number` local crops of each view.

    Returns {"global_crops": [v0 g0, v0 g1, v1 g0, v1 g1], "local_crops": [v0 locals..., v1
    locals...], "teacher_view": 0 or 1, "view_indices": (i, j)}: the teacher sees the global
    crops of view `teacher_view`. A study with one view uses it twice (the crops still differ),
    so it still contributes; dropping such studies is the dataset's business, not this class's.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        settings: AugmentationSettings = AugmentationSettings(),
    ):
        self.local_crops_number = local_crops_number
        flip = RandomHorizontalFlip(p=settings.hflip_probability)
        self.global_geometry = Compose([RandomResizedCrop(global_crops_size, scale=global_crops_scale), flip])
        self.local_geometry = Compose([RandomResizedCrop(local_crops_size, scale=local_crops_scale), flip])

        intensity = RandomApply(
            IntensityJitter(settings.brightness, settings.contrast, settings.gamma_range),
            p=settings.intensity_probability,
        )

        def blur(p: float) -> Transform:
            return RandomApply(GaussianBlur(kernel_size=9, sigma=settings.blur_sigma), p=p)

        first_blur, second_blur = settings.global_blur_probability
        self.global_photometry = (
            Compose([intensity, blur(first_blur)]),
            Compose([intensity, blur(second_blur), RandomSolarize(threshold=128, p=settings.solarize_probability)]),
        )
        self.local_photometry = Compose([intensity, blur(settings.local_blur_probability)])
        self.normalize = Normalize(mean, std)

    def _finish(self, gray_crop: torch.Tensor) -> torch.Tensor:
        """One gray channel repeated to the three the (ImageNet-pretrained) backbone expects."""
        return self.normalize(gray_crop.expand(3, -1, -1))

    def _global_crops(self, view: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [
            self._finish(photometry(self.global_geometry(view, generator), generator))
            for photometry in self.global_photometry
        ]

    def _local_crops(self, view: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [
            self._finish(self.local_photometry(self.local_geometry(view, generator), generator))
            for _ in range(self.local_crops_number)
        ]

    @staticmethod
    def draw_view_pair(n_views: int, generator: torch.Generator) -> tuple[int, int]:
        """Two different views, every ordered pair equally likely; (0, 0) for a one-view study."""
        if n_views < 1:
            raise ValueError("a study without any view cannot be augmented")
        if n_views == 1:
            return 0, 0
        first = _randint(generator, n_views)
        second = _randint(generator, n_views - 1)
        return first, second + (second >= first)

    def __call__(self, views: Sequence[torch.Tensor], generator: torch.Generator) -> dict:
        """`views`: the study's images, uint8 (or float in [0, 1]) [1, H, W], sizes may differ."""
        view_indices = self.draw_view_pair(len(views), generator)
        teacher_view = _randint(generator, 2)
        pair = [to_gray_float(views[index]) for index in view_indices]
        global_crops = [crop for view in pair for crop in self._global_crops(view, generator)]
        local_crops = [crop for view in pair for crop in self._local_crops(view, generator)]
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "teacher_view": teacher_view,
            "view_indices": view_indices,
        }

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "MultiViewAugmentation":
        crops = cfg.crops
        return cls(
            global_crops_scale=tuple(crops.global_crops_scale),
            local_crops_scale=tuple(crops.local_crops_scale),
            local_crops_number=crops.local_crops_number,
            global_crops_size=crops.global_crops_size,
            local_crops_size=crops.local_crops_size,
            mean=tuple(crops.mean),
            std=tuple(crops.std),
            settings=settings_from_config(cfg),
        )
