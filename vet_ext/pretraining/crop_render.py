"""Rendering planned crops in batches, on whatever device the views are on.

A crop plan (`CropGroupPlan`) holds every random number of the multi-view augmentation; this
module turns views plus plans into normalised crops. The same code serves one study inside a
CPU data-loader worker and a whole batch on the training GPU, so both give the same crops for
the same plan, and the GPU path moves only uint8 views over the bus.

Resizing is separable resampling with per-crop weight matrices, out = Wy @ view @ Wx^T, whose
weights are those of `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`
(PyTorch's antialiased kernel: Keys cubic with a = -0.5, support widened by the downscale factor,
weights normalised per output pixel) restricted to the crop box. Weights outside the box are
zero, so views of different sizes can share a zero-padded canvas.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dinov2.data.transforms import adjust_brightness, resized_crop

CUBIC_A = -0.5  # PyTorch's (and PIL's) antialiased bicubic
BLUR_KERNEL_SIZE = 9
SOLARIZE_THRESHOLD = 128 / 255.0  # DINOv2's threshold on the 0-255 scale
BRIGHTNESS, CONTRAST, GAMMA = range(3)  # intensity changes, as numbered in `intensity_order`


@dataclass(frozen=True)
class CropGroupPlan:
    """The random choices for a group of same-size crops, one entry per crop (leading dims [...]).

    A plan is drawn on the CPU (cheap) and can be rendered anywhere; with leading dims
    [views, crops per view] it renders against a [views, H, W] stack of views.
    """

    boxes: torch.Tensor  # int64 [..., 4]: top, left, height, width in the view's pixels
    hflip: torch.Tensor  # bool [...]
    intensity: torch.Tensor  # bool [...]: whether the intensity jitter applies
    intensity_order: torch.Tensor  # int64 [..., 3]: the change (BRIGHTNESS, CONTRAST, GAMMA) made at each step
    intensity_factors: torch.Tensor  # float32 [..., 3]: brightness factor, contrast factor, gamma
    blur_sigma: torch.Tensor  # float32 [...]: Gaussian blur sigma in pixels, 0 for no blur
    solarize: torch.Tensor  # bool [...]

    @property
    def shape(self) -> torch.Size:
        return self.hflip.shape

    def map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> "CropGroupPlan":
        """The same plan with `change` applied to every field (reshape, index, move to a device)."""
        return CropGroupPlan(**{f.name: change(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def leading(self, *shape: int) -> "CropGroupPlan":
        """The plan with its leading (per-crop) dims reshaped to `shape`."""
        dims = len(self.shape)
        return self.map(lambda t: t.reshape(*shape, *t.shape[dims:]))

    @classmethod
    def stack(cls, plans: Sequence["CropGroupPlan"]) -> "CropGroupPlan":
        return cls(**{f.name: torch.stack([getattr(p, f.name) for p in plans]) for f in dataclasses.fields(cls)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CropGroupPlan":
        """The plan on `device`: a batch moves its plans with its tensors (`SSLMasks.to`)."""
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "CropGroupPlan":
        """Pinned with the rest of its batch by DataLoader(pin_memory=True), so its move is asynchronous."""
        return self.map(torch.Tensor.pin_memory)


def batched_on(device: torch.device) -> bool:
    """Whether crops are processed as one batch on `device`.

    Everywhere but on a CPU. A CPU core renders one study in a loader worker, where batched and
    grouped kernels were slower than crop-by-crop ones at these sizes (measured: a dense resampling
    matmul multiplies mostly zeros; the antialiased kernel does not).
    """
    return device.type != "cpu"


def to_unit_float(views: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; float views are taken as already in [0, 1]."""
    return views.float() / 255.0 if views.dtype == torch.uint8 else views.float()


def render_crops(
    views: torch.Tensor, plan: CropGroupPlan, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Views [V, H, W] (uint8, or float in [0, 1]) and a plan [V, K] -> crops [V, K, 3, size, size].

    Crop k of view v: resized crop (+ flip), intensity jitter, blur, solarisation, then the gray
    channel repeated to the three an RGB-pretrained backbone expects, normalised.
    """
    n_views, n_crops = plan.shape
    if n_crops == 0:  # e.g. crops.local_crops_number=0
        return torch.empty((n_views, 0, 3, size, size), device=views.device)
    crops = resize_crops(to_unit_float(views), plan.boxes, plan.hflip, size).flatten(0, 1)
    per_crop = plan.leading(n_views * n_crops)
    crops = jitter_intensity(crops, per_crop.intensity, per_crop.intensity_order, per_crop.intensity_factors)
    crops = blur(crops, per_crop.blur_sigma)
    crops = solarize(crops, per_crop.solarize)
    return normalize(crops, mean, std).view(n_views, n_crops, 3, size, size)


# ------------------------------------------------------------------------------------ resampling


def _cubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    near = ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1
    far = ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def axis_taps(
    start: torch.Tensor, length: torch.Tensor, size: int, extent: int, flip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampling of the segments [start, start + length) of an axis of `extent` pixels to `size` pixels.

    Returns (first [..., size], taps [..., size, T]): output pixel i is the sum over t of
    taps[..., i, t] * input[first[..., i] + t]. The arithmetic follows PyTorch's antialiased
    kernel step by step in float32 (centre, support, truncation of the tap range, normalisation),
    so the weights are the ones F.interpolate uses. `flip` reverses the outputs of those entries.
    T is the most taps a segment as long as the axis needs: known without reading the lengths
    back from the device.
    """
    device = length.device
    scale = length.to(torch.float32) / size
    downscaling = scale >= 1.0
    support = torch.where(downscaling, 2.0 * scale, torch.full_like(scale, 2.0))[..., None]
    inverse_scale = torch.where(downscaling, 1.0 / scale, torch.ones_like(scale))[..., None, None]
    center = scale[..., None] * (torch.arange(size, device=device, dtype=torch.float32) + 0.5)
    lowest = (center - support + 0.5).trunc().clamp(min=0)
    end = torch.minimum((center + support + 0.5).trunc(), length[..., None].to(torch.float32))
    n_taps = math.ceil(4 * max(extent / size, 1.0)) + 2
    source = lowest[..., None] + torch.arange(n_taps, device=device, dtype=torch.float32)
    taps = _cubic((source - center[..., None] + 0.5) * inverse_scale) * (source < end[..., None])
    taps = taps / taps.sum(-1, keepdim=True)
    first = start[..., None] + lowest.to(torch.int64)
    if flip is not None:
        first = torch.where(flip[..., None], first.flip(-1), first)
        taps = torch.where(flip[..., None, None], taps.flip(-2), taps)
    return first, taps


def _weight_matrix(first: torch.Tensor, taps: torch.Tensor, length: int) -> torch.Tensor:
    """Taps placed into dense rows over `length` inputs: [..., S, T] -> [..., S, length].

    Taps past a segment's end have zero weight; their index is clamped so they add nothing.
    """
    index = (first[..., None] + torch.arange(taps.shape[-1], device=taps.device)).clamp(max=length - 1)
    dense = taps.new_zeros((*taps.shape[:-1], length))
    return dense.scatter_add_(-1, index, taps)


def resize_crops_matmul(views: torch.Tensor, boxes: torch.Tensor, hflip: torch.Tensor, size: int) -> torch.Tensor:
    """Float views [V, H, W] and boxes [V, K, 4] -> crops [V, K, size, size], clamped to [0, 1].

    Two batched matmuls: the row weights of a view's K crops are stacked, [V, K*size, H] @ views,
    then each crop's intermediate [size, W] @ its column weights [W, size].
    """
    n_views, height, width = views.shape
    n_crops = boxes.shape[1]
    row_first, row_taps = axis_taps(boxes[..., 0], boxes[..., 2], size, height)
    column_first, column_taps = axis_taps(boxes[..., 1], boxes[..., 3], size, width, flip=hflip)
    rows = _weight_matrix(row_first, row_taps, height).view(n_views, n_crops * size, height)
    columns = _weight_matrix(column_first, column_taps, width).view(n_views * n_crops, size, width)
    vertical = (rows @ views).view(n_views * n_crops, size, width)
    return (vertical @ columns.transpose(1, 2)).view(n_views, n_crops, size, size).clamp(0, 1)


def resize_crops(views: torch.Tensor, boxes: torch.Tensor, hflip: torch.Tensor, size: int) -> torch.Tensor:
    """Float views [V, H, W] and boxes [V, K, 4] -> crops [V, K, size, size], clamped to [0, 1].

    Batched (`batched_on`): `resize_crops_matmul`. Otherwise the antialiased kernel itself, crop
    by crop, whose weights the matmul reproduces.
    """
    if batched_on(views.device):
        return resize_crops_matmul(views, boxes, hflip, size)
    n_views, n_crops = boxes.shape[:2]
    crops = views.new_empty((n_views * n_crops, size, size))
    for index, ((top, left, height, width), flip) in enumerate(zip(boxes.reshape(-1, 4).tolist(), hflip.flatten().tolist())):
        view = views[index // n_crops][None]
        crop = resized_crop(view, top, left, height, width, size)[0]
        crops[index] = crop.flip(-1) if flip else crop
    return crops.view(n_views, n_crops, size, size)


# ------------------------------------------------------------------------------------ photometry


def _update_selected(
    images: torch.Tensor, selected: torch.Tensor, change: Callable[[torch.Tensor, torch.Tensor | slice], torch.Tensor]
) -> torch.Tensor:
    """`images` [N, H, W] with `change(images[rows], rows)` applied to the selected crops only.

    Batched (`batched_on`), the change runs on every crop and the result is selected: no
    device-to-host sync. Otherwise it runs on the selected crops one at a time, and, as `images`
    is this module's own intermediate, updates them in place.
    """
    if batched_on(images.device):
        return torch.where(selected[:, None, None], change(images, slice(None)), images)
    for row in selected.nonzero().flatten().tolist():
        images[row] = change(images[row : row + 1], slice(row, row + 1))[0]
    return images


def adjust_contrast_gray(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Scale the deviations from each image's mean gray level ([..., H, W] images)."""
    return (factor * images + (1 - factor) * images.mean(dim=(-2, -1), keepdim=True)).clamp(0, 1)


def adjust_gamma(images: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """Tone-curve change (gamma < 1 brightens the dark parts): detectors and display LUTs differ by it."""
    return images.clamp(0, 1).pow(gamma)


_INTENSITY_CHANGES = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast_gray, GAMMA: adjust_gamma}


def jitter_intensity(
    images: torch.Tensor, applied: torch.Tensor, order: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast and gamma changes of gray crops [N, H, W], each crop in its own order."""
    for step in range(order.shape[1]):
        for change_index, change in _INTENSITY_CHANGES.items():

            def adjust(crops, rows, change=change, change_index=change_index):
                return change(crops, factors[rows, change_index][:, None, None])

            images = _update_selected(images, applied & (order[:, step] == change_index), adjust)
    return images


def gaussian_blur_crops(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of crops [N, H, W], sigma per crop (kernel 9, reflect padding)."""
    n = len(images)
    offsets = torch.arange(BLUR_KERNEL_SIZE, dtype=images.dtype, device=images.device) - (BLUR_KERNEL_SIZE - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(-1, keepdim=True)
    pad = BLUR_KERNEL_SIZE // 2
    padded = F.pad(images[None], (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(n, 1, 1, -1), groups=n)
    return F.conv2d(blurred, kernel.view(n, 1, -1, 1), groups=n)[0]


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur the crops whose sigma is positive."""
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # unselected rows are discarded anyway
    return _update_selected(images, sigma > 0, lambda crops, rows: gaussian_blur_crops(crops, safe_sigma[rows]))


def solarize(images: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above the threshold in the selected crops."""
    return _update_selected(
        images, selected, lambda crops, rows: torch.where(crops >= SOLARIZE_THRESHOLD, 1.0 - crops, crops)
    )


def normalize(gray: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Gray crops [N, H, W] -> [N, 3, H, W], the channel repeated then normalised per channel.

    Written channel by channel into one output: half the time of a broadcast over channels.
    """
    out = gray.new_empty((gray.shape[0], len(mean), *gray.shape[1:]))
    for channel, (channel_mean, channel_std) in enumerate(zip(mean, std)):
        torch.div(gray - channel_mean, channel_std, out=out[:, channel])
    return out
