"""Per-image augmentation ops in plain torch, each drawing its randomness from a given generator.

They mirror the torchvision transforms DINOv2 uses (same parameter sampling, same colour
formulas) without the dependency, and without the global RNG: a loader can then seed each
sample's generator from (seed, index, pass) and get the same crops in any worker, on resume.
Images are float tensors [3, H, W] in [0, 1] once `to_float_rgb` has run; every random op
has the signature `op(image, generator) -> image`.
"""
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL and torchvision


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand(1, generator=generator)) < p


def to_float_rgb(image: torch.Tensor) -> torch.Tensor:
    """uint8 or float [C, H, W] -> float32 [3, H, W] in [0, 1]; one channel is repeated to three.

    Radiographs are grayscale; repeating the channel lets weights trained on RGB apply.
    """
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    else:
        image = image.float()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] != 3:
        raise ValueError(f"expected an image with 1 or 3 channels, got shape {tuple(image.shape)}")
    return image


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """Luma [1, H, W] of an RGB image."""
    weights = image.new_tensor(_LUMA)[:, None, None]
    return (image * weights).sum(dim=0, keepdim=True)


def _blend(image: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * image + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(image, 0.0, factor)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(image, grayscale(image).mean(), factor)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(image, grayscale(image), factor)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image
    value, _ = image.max(dim=0)
    chroma = value - image.min(dim=0).values
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    safe_chroma = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (value - r) / safe_chroma, (value - g) / safe_chroma, (value - b) / safe_chroma
    is_r = value == r
    is_g = (value == g) & ~is_r
    is_b = ~is_r & ~is_g
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, value))


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv
    sector_float = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector_float
    sector = sector_float.long() % 6
    p = (value * (1.0 - saturation)).clamp(0, 1)
    q = (value * (1.0 - saturation * fraction)).clamp(0, 1)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0, 1)
    # (r, g, b) for each of the six hue sectors
    table = torch.stack(
        (
            torch.stack((value, q, p, p, t, value)),
            torch.stack((t, value, value, q, p, p)),
            torch.stack((p, p, t, value, value, q)),
        )
    )
    return table.gather(1, sector.expand(3, 1, *sector.shape)).squeeze(1)


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]); grays are unchanged."""
    hsv = _rgb_to_hsv(image)
    hsv[0] = torch.remainder(hsv[0] + shift, 1.0)
    return _hsv_to_rgb(hsv)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a `scale` fraction of the area with aspect in `ratio`.

    torchvision's sampling: up to 10 draws of (area, log-uniform aspect); if none fits in the
    image, the largest centred crop whose aspect is clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> torch.Tensor:
    """Crop then resize to size x size, bicubic with antialiasing (as PIL does when shrinking)."""
    region = image[:, top : top + h, left : left + w]
    if (h, w) == (size, size):
        return region.clone()
    resized = F.interpolate(region[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return resized[0].clamp(0, 1)


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's kernel and border rule)."""
    offsets = torch.arange(kernel_size, dtype=image.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    pad = kernel_size // 2
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return blurred[0]


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in self.transforms:
            image = transform(image, generator)
        return image


class RandomApply:
    def __init__(self, transform: Transform, p: float):
        self.transform, self.p = transform, p

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.transform(image, generator) if _chance(generator, self.p) else image


class RandomResizedCrop:
    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_crop_params(*image.shape[-2:], self.scale, self.ratio, generator)
        return resized_crop(image, top, left, h, w, self.size)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return image.flip(-1) if _chance(generator, self.p) else image


class ColorJitter:
    """Brightness, contrast, saturation and hue changes, in a random order (as torchvision)."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        self.brightness = (max(0.0, 1 - brightness), 1 + brightness) if brightness else None
        self.contrast = (max(0.0, 1 - contrast), 1 + contrast) if contrast else None
        self.saturation = (max(0.0, 1 - saturation), 1 + saturation) if saturation else None
        self.hue = (-hue, hue) if hue else None

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        order = torch.randperm(4, generator=generator).tolist()
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = [None if r is None else _uniform(generator, *r) for r in ranges]
        adjustments = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for op in order:
            if factors[op] is not None:
                image = adjustments[op](image, factors[op])
        return image


class RandomGrayscale:
    def __init__(self, p: float = 0.1):
        self.p = p

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return grayscale(image).expand_as(image).clone() if _chance(generator, self.p) else image


class GaussianBlur:
    """Always blurs, with sigma ~ U(sigma range); wrap it in RandomApply for a probability."""

    def __init__(self, kernel_size: int = 9, sigma: Sequence[float] = (0.1, 2.0)):
        self.kernel_size, self.sigma = kernel_size, tuple(sigma)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return gaussian_blur(image, self.kernel_size, _uniform(generator, *self.sigma))


class RandomSolarize:
    """Invert pixels at or above `threshold` (on the 0-255 scale, as for PIL images)."""

    def __init__(self, threshold: float = 128, p: float = 0.5):
        self.threshold, self.p = threshold / 255.0, p

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not _chance(generator, self.p):
            return image
        return torch.where(image >= self.threshold, 1.0 - image, image)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (image - self.mean) / self.std


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic antialiased resize of a [C, H, W] image in [0, 1] so that min(H, W) == size.

    The long side is int(size * long / short), torchvision's rounding, so evaluation crops
    match upstream's pixel grid.
    """
    height, width = image.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if height <= width else (new_long, size)
    if new_size == (height, width):
        return image
    resized = F.interpolate(image[None], size=new_size, mode="bicubic", align_corners=False, antialias=True)
    return resized[0].clamp(0, 1)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window (torchvision's rounding of the offsets); an image smaller
    than the window is zero-padded around, as torchvision does."""
    height, width = image.shape[-2:]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        image = F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = image.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[:, top : top + size, left : left + size]


class ClassificationEvalTransform:
    """Upstream's evaluation transform: Resize(shorter side) -> CenterCrop -> Normalize.

    Deterministic, so it takes the image alone (the dataset calls `transform(image)`); grayscale
    radiographs become three identical channels first, as released weights expect RGB.
    """

    def __init__(self, resize_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float]):
        self.resize_size, self.crop_size = resize_size, crop_size
        self.normalize = Normalize(mean, std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = center_crop(resize_shorter_side(to_float_rgb(image), self.resize_size), self.crop_size)
        return self.normalize(image)


class ClassificationTrainTransform:
    """Upstream's linear-probe training transform: RandomResizedCrop -> horizontal flip -> Normalize.

    Datasets call `transform(image)` without a generator, so it draws from torch's default
    generator, which DataLoader seeds per worker from the loader's seed.
    """

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float]):
        self.geometry = Compose([RandomResizedCrop(crop_size), RandomHorizontalFlip(p=0.5)])
        self.normalize = Normalize(mean, std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.geometry(to_float_rgb(image), torch.default_generator))
