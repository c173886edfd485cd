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

The random choices of a study (which views, which boxes, which changes) are drawn first, into a
`StudyCropPlan`, in the order the per-crop transforms always drew them; `vet_ext.pretraining.crop_render`
then renders the plan. A CPU worker does both ("multiview"); the "multiview_device" pipeline
draws the plan in the workers and renders whole batches on the training device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from omegaconf import DictConfig

from dinov2.data.augmentations import CropGeometry
from dinov2.data.transforms import random_resized_crop_params
from dinov2.utils.errors import UserError
from vet_ext.pretraining.crop_render import BRIGHTNESS, CONTRAST, GAMMA, CropGroupPlan, render_crops, to_unit_float

GLOBAL_CROPS_PER_VIEW = 2
CROP_ASPECT_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default, as DINOv2 uses it


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    """One draw whatever p is (as RandomApply does), so that p = 0 does not shift later draws."""
    return float(torch.rand(1, generator=generator)) < p


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


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


def check_gray_view(view: torch.Tensor) -> torch.Tensor:
    """The view, if it is [1, H, W]: any other shape would be cropped along the wrong axes."""
    if view.ndim != 3 or view.shape[0] != 1:
        raise ValueError(f"expected a gray view of shape [1, H, W], got {tuple(view.shape)}")
    return view


@dataclass(frozen=True)
class CropRecipe:
    """How one kind of crop is drawn: its box scale, and the chances of each change.

    `draw` takes the random numbers in the order the per-image transforms of dinov2.data
    (RandomResizedCrop, RandomHorizontalFlip, RandomApply(intensity), RandomApply(GaussianBlur),
    RandomSolarize) take them, so a seed gives the crops it always gave. A recipe without
    solarisation draws nothing for it.
    """

    scale: tuple[float, float]
    settings: AugmentationSettings
    blur_probability: float
    solarize_probability: float | None = None

    def draw(self, height: int, width: int, generator: torch.Generator) -> dict:
        settings = self.settings
        box = random_resized_crop_params(height, width, self.scale, CROP_ASPECT_RATIO, generator)
        hflip = _chance(generator, settings.hflip_probability)
        intensity = _chance(generator, settings.intensity_probability)
        order, factors = [BRIGHTNESS, CONTRAST, GAMMA], [1.0, 1.0, 1.0]
        if intensity:
            order = torch.randperm(3, generator=generator).tolist()
            u_brightness, u_contrast, u_gamma = torch.rand(3, generator=generator).tolist()
            log_gamma = (math.log(settings.gamma_range[0]), math.log(settings.gamma_range[1]))
            factors = [
                _between((max(0.0, 1 - settings.brightness), 1 + settings.brightness), u_brightness),
                _between((max(0.0, 1 - settings.contrast), 1 + settings.contrast), u_contrast),
                math.exp(_between(log_gamma, u_gamma)),
            ]
        sigma = _uniform(generator, *settings.blur_sigma) if _chance(generator, self.blur_probability) else 0.0
        solarize = self.solarize_probability is not None and _chance(generator, self.solarize_probability)
        return {"boxes": box, "hflip": hflip, "intensity": intensity, "intensity_order": order,
                "intensity_factors": factors, "blur_sigma": sigma, "solarize": solarize}  # fmt: skip


# per-crop field of a plan: dtype and the shape of one crop's entry
_PLAN_FIELDS = {
    "boxes": (torch.int64, (4,)),
    "hflip": (torch.bool, ()),
    "intensity": (torch.bool, ()),
    "intensity_order": (torch.int64, (3,)),
    "intensity_factors": (torch.float32, (3,)),
    "blur_sigma": (torch.float32, ()),
    "solarize": (torch.bool, ()),
}


def group_plan(draws: Sequence[dict], n_views: int) -> CropGroupPlan:
    """Per-crop draws (view-major) -> a CropGroupPlan with leading dims [n_views, crops per view]."""
    fields = {
        key: torch.tensor([draw[key] for draw in draws], dtype=dtype).reshape(n_views, -1, *entry)
        for key, (dtype, entry) in _PLAN_FIELDS.items()
    }
    return CropGroupPlan(**fields)


@dataclass(frozen=True)
class StudyCropPlan:
    """Every random choice of one study's crops: rendering it needs no generator."""

    view_indices: tuple[int, int]  # the two views of the study the crops come from
    teacher_view: int  # 0 or 1: the teacher sees the global crops of view_indices[teacher_view]
    global_crops: CropGroupPlan  # [2 views, GLOBAL_CROPS_PER_VIEW]
    local_crops: CropGroupPlan  # [2 views, local crops per view]


class MultiViewAugmentation:
    """Two views of a study -> 2 global and `local_crops_number` local crops of each view.

    Returns {"global_crops": [v0 g0, v0 g1, v1 g0, v1 g1], "local_crops": [v0 locals..., v1
    locals...], "teacher_view": 0 or 1, "view_indices": (i, j)}: the teacher sees the global
    crops of view `teacher_view`. A study with one view uses it twice (the crops still differ),
    so it still contributes; dropping such studies is the dataset's business, not this class's.
    """

    def __init__(self, geometry: CropGeometry, settings: AugmentationSettings = AugmentationSettings()):
        self.local_crops_number = geometry.local_crops_number
        self.global_crops_size, self.local_crops_size = geometry.global_crops_size, geometry.local_crops_size
        self.mean, self.std = geometry.mean, geometry.std
        first_blur, second_blur = settings.global_blur_probability
        global_scale = geometry.global_crops_scale
        self.global_recipes = (
            CropRecipe(global_scale, settings, first_blur),
            CropRecipe(global_scale, settings, second_blur, solarize_probability=settings.solarize_probability),
        )
        self.local_recipe = CropRecipe(geometry.local_crops_scale, settings, settings.local_blur_probability)

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

    def plan(self, view_sizes: Sequence[tuple[int, int]], generator: torch.Generator) -> StudyCropPlan:
        """The study's crops, drawn from the (height, width) of its views only: no pixel is read."""
        view_indices = self.draw_view_pair(len(view_sizes), generator)
        teacher_view = _randint(generator, 2)
        sizes = [view_sizes[index] for index in view_indices]
        global_draws = [recipe.draw(*size, generator) for size in sizes for recipe in self.global_recipes]
        local_draws = [self.local_recipe.draw(*size, generator) for size in sizes for _ in range(self.local_crops_number)]
        return StudyCropPlan(view_indices, teacher_view, group_plan(global_draws, 2), group_plan(local_draws, 2))

    def render(self, views: torch.Tensor, plan: CropGroupPlan, size: int) -> torch.Tensor:
        """Views [2, H, W] -> crops [2, K, 3, size, size] (see `vet_ext.pretraining.crop_render.render_crops`)."""
        return render_crops(views, plan, size, self.mean, self.std)

    def __call__(self, views: Sequence[torch.Tensor], generator: torch.Generator) -> dict:
        """`views`: the study's images, uint8 (or float in [0, 1]) [1, H, W], sizes may differ."""
        plan = self.plan([tuple(view.shape[-2:]) for view in views], generator)
        pair = to_unit_float(pad_to_canvas([check_gray_view(views[index])[0] for index in plan.view_indices]))
        global_crops = self.render(pair, plan.global_crops, self.global_crops_size)
        local_crops = self.render(pair, plan.local_crops, self.local_crops_size)
        return {
            "global_crops": list(global_crops.flatten(0, 1)),
            "local_crops": list(local_crops.flatten(0, 1)),
            "teacher_view": plan.teacher_view,
            "view_indices": plan.view_indices,
        }

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "MultiViewAugmentation":
        return cls(CropGeometry.from_config(cfg.crops), settings_from_config(cfg))


class MultiViewPlanning:
    """The transform of the "multiview_device" pipeline: a study's plan and its two chosen views.

    No pixel work: the views stay uint8 (a quarter of the bytes of float crops on the way to
    the GPU) and the crops are rendered there, batched, from the plan.
    """

    def __init__(self, augmentation: MultiViewAugmentation):
        self.augmentation = augmentation

    def __call__(self, views: Sequence[torch.Tensor], generator: torch.Generator) -> dict:
        plan = self.augmentation.plan([tuple(view.shape[-2:]) for view in views], generator)
        pair = [check_gray_view(views[index]) for index in plan.view_indices]
        return {"views": pair, "plan": plan, "teacher_view": plan.teacher_view, "view_indices": plan.view_indices}


def pad_to_canvas(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[H_i, W_i] images (or [C, H_i, W_i]...) -> one zero-padded stack at the largest height and width.

    Crop boxes stay inside their own image, so the padding is never sampled.
    """
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    if all(image.shape[-2:] == (height, width) for image in images):
        return torch.stack(list(images))
    canvas = images[0].new_zeros((len(images), *images[0].shape[:-2], height, width))
    for index, image in enumerate(images):
        canvas[index, ..., : image.shape[-2], : image.shape[-1]] = image
    return canvas
