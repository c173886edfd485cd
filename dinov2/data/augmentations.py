"""DINOv2's multi-crop augmentation of one image, with explicit randomness."""
from dataclasses import dataclass
from typing import Sequence

import torch
from omegaconf import DictConfig

from dinov2.data.transforms import (
    ColorJitter,
    Compose,
    GaussianBlur,
    Normalize,
    RandomApply,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSolarize,
    to_float_rgb,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropGeometry:
    """The `crops` section of a training config: what every multi-crop augmentation (DINOv2's, and
    the plug-ins') is built from, read in one place."""

    global_crops_scale: tuple[float, ...]
    local_crops_scale: tuple[float, ...]
    local_crops_number: int
    global_crops_size: int
    local_crops_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, crops: DictConfig) -> "CropGeometry":
        return cls(
            global_crops_scale=tuple(crops.global_crops_scale), local_crops_scale=tuple(crops.local_crops_scale),
            local_crops_number=crops.local_crops_number, global_crops_size=crops.global_crops_size,
            local_crops_size=crops.local_crops_size, mean=tuple(crops.mean), std=tuple(crops.std),
        )  # fmt: skip


class DataAugmentationDINO:
    """Two global crops and `local_crops_number` local crops of one image, as upstream DINOv2.

    Each crop gets its own random resized crop and flip, then colour jitter (p 0.8) and random
    grayscale (p 0.2). Blur follows what upstream *does*, not what its arguments say: its blur
    wrapper applies the transform with probability 1 - p, so "p=1.0" on the first global crop
    means it is never blurred, "p=0.1" on the second means blurred with probability 0.9 (then
    solarised with p 0.2), and locals are blurred with p 0.5. The released weights were trained
    that way, so it is reproduced here on purpose.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.local_crops_number = local_crops_number
        self.global_geometry = Compose(
            [RandomResizedCrop(global_crops_size, scale=global_crops_scale), RandomHorizontalFlip(p=0.5)]
        )
        self.local_geometry = Compose(
            [RandomResizedCrop(local_crops_size, scale=local_crops_scale), RandomHorizontalFlip(p=0.5)]
        )
        colour = [
            RandomApply(ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), p=0.8),
            RandomGrayscale(p=0.2),
        ]
        normalize = Normalize(mean, std)
        self.global_transform_1 = Compose([*colour, normalize])
        self.global_transform_2 = Compose(
            [*colour, RandomApply(GaussianBlur(), p=0.9), RandomSolarize(threshold=128, p=0.2), normalize]
        )
        self.local_transform = Compose([*colour, RandomApply(GaussianBlur(), p=0.5), normalize])

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, list[torch.Tensor] | tuple]:
        """uint8 (or float in [0, 1]) [C, H, W] image -> normalised float32 crops [3, size, size]."""
        image = to_float_rgb(image)
        global_crop_1 = self.global_transform_1(self.global_geometry(image, generator), generator)
        global_crop_2 = self.global_transform_2(self.global_geometry(image, generator), generator)
        local_crops = [
            self.local_transform(self.local_geometry(image, generator), generator)
            for _ in range(self.local_crops_number)
        ]
        return {
            "global_crops": [global_crop_1, global_crop_2],
            "global_crops_teacher": [global_crop_1, global_crop_2],
            "local_crops": local_crops,
            "offsets": (),
        }
