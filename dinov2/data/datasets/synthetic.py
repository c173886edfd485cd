"""Generated images for smoke tests and benches: no files, no download, learnable classes.

Each class has its own shape, colours and background gradient; each index draws position,
size and colour jitter from a generator seeded by the index alone, so item i is the same
image in every process and worker, and costs well under a millisecond.
"""
import math
from typing import Callable

import torch

from dinov2.data.registry import register_dataset, transform_item
from dinov2.utils.errors import UserError

_SHAPES = ("disc", "square", "ring", "stripes")
_CLASS_SEED = 1_000_003
_ITEM_SEED = 7_919


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise UserError(f"dataset 'Synthetic': key '{key}' must be a positive integer, got '{value}'")
    return number


class SyntheticImages:
    """`n` uint8 images [3, size, size]; target = index % classes."""

    def __init__(
        self,
        n: int,
        size: int = 64,
        classes: int = 10,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        self.n, self.size, self.classes = n, size, classes
        self.transform, self.target_transform = transform, target_transform
        coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def _class_style(self, target: int) -> tuple[str, torch.Tensor, torch.Tensor, float]:
        generator = torch.Generator().manual_seed(_CLASS_SEED * (target + 1))
        colours = torch.rand(2, 3, generator=generator)
        angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
        return _SHAPES[target % len(_SHAPES)], colours[0], colours[1], angle

    def _shape_mask(self, shape: str, cy: float, cx: float, radius: float) -> torch.Tensor:
        dy, dx = self._yy - cy, self._xx - cx
        if shape == "disc":
            inside = dy**2 + dx**2 <= radius**2
        elif shape == "square":
            inside = (dy.abs() <= radius) & (dx.abs() <= radius)
        elif shape == "ring":
            distance = (dy**2 + dx**2).sqrt()
            inside = (distance <= radius) & (distance >= 0.6 * radius)
        else:
            inside = (torch.sin(self._xx * math.pi / radius * 2) > 0) & (dy.abs() <= radius)
        return inside.float()

    def image(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for Synthetic:n={self.n}")
        target = index % self.classes
        shape, background, foreground, angle = self._class_style(target)
        generator = torch.Generator().manual_seed(_ITEM_SEED * (index + 1))
        cy, cx, radius_draw, jitter = torch.rand(4, generator=generator).tolist()
        cy, cx, radius = 0.3 + 0.4 * cy, 0.3 + 0.4 * cx, 0.12 + 0.15 * radius_draw
        ramp = (self._xx * math.cos(angle) + self._yy * math.sin(angle) + 1.5) / 3
        canvas = background[:, None, None] * ramp
        blob = torch.exp(-((self._yy - (1 - cy)) ** 2 + (self._xx - (1 - cx)) ** 2) / 0.02)  # opposite the shape
        canvas = canvas + 0.3 * blob * (1 - background[:, None, None])
        mask = self._shape_mask(shape, cy, cx, radius)
        colour = (foreground * (0.8 + 0.4 * jitter)).clamp(0, 1)[:, None, None]
        canvas = canvas * (1 - mask) + colour * mask
        return (canvas.clamp(0, 1) * 255).round().to(torch.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = self.image(index), index % self.classes
        return transform_item(image, target, self.transform, self.target_transform)


@register_dataset("Synthetic")
def make_synthetic(
    n: str,
    size: str = "64",
    classes: str = "10",
    transform: Callable | None = None,
    target_transform: Callable | None = None,
) -> SyntheticImages:
    return SyntheticImages(
        n=_positive_int("n", n),
        size=_positive_int("size", size),
        classes=_positive_int("classes", classes),
        transform=transform,
        target_transform=target_transform,
    )
