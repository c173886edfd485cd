"""The "multiview" and "multiview_device" training pipelines (`train.pipeline`) and the config keys they read.

Both give the same batches for the same seed. "multiview" renders the crops in the loader's CPU
workers; "multiview_device" only draws their plans there and renders whole batches on the
training device, for GPUs that consume crops faster than CPU workers make them.

Importing this module registers both; `vet_ext.plugins.register` imports it, so every
dinov2 command knows them once vet_ext is installed.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from omegaconf import DictConfig

from dinov2.configs import register_config_defaults
from dinov2.data.collate import masking_collate
from dinov2.data.registry import Pipeline, register_pipeline
from dinov2.utils.errors import UserError
from vet_ext.pretraining.augment import AugmentationSettings, MultiViewAugmentation, MultiViewPlanning
from vet_ext.pretraining.collate import DeviceMultiViewCollate, MultiViewCollate, RenderOnDevice

_DEFAULTS = AugmentationSettings()

register_config_defaults(
    "vet_ext",
    {
        "crops": {"min_views_per_study": 1},  # studies with fewer views are left out of multi-view training
        "multiview": {
            "intensity_probability": _DEFAULTS.intensity_probability,  # brightness/contrast/gamma change
            "brightness": _DEFAULTS.brightness,  # factor in [1 - b, 1 + b]
            "contrast": _DEFAULTS.contrast,  # factor in [1 - c, 1 + c]
            "gamma_range": list(_DEFAULTS.gamma_range),  # log-uniform tone-curve exponent
            "global_blur_probability": list(_DEFAULTS.global_blur_probability),  # 1st, 2nd global crop of a view
            "local_blur_probability": _DEFAULTS.local_blur_probability,
            "blur_sigma": list(_DEFAULTS.blur_sigma),  # Gaussian blur sigma range, in pixels
            "solarize_probability": _DEFAULTS.solarize_probability,  # 2nd global crop of a view only
            "hflip_probability": _DEFAULTS.hflip_probability,  # 0: a flip swaps left and right (laterality)
        },
    },
)


@register_pipeline("multiview")
def make_multiview_pipeline(cfg: DictConfig) -> Pipeline:
    """Two views per study; masks drawn by DINOv2's masking collate (same `ibot.*` settings as "dino")."""
    return Pipeline(
        transform=MultiViewAugmentation.from_config(cfg),
        collate=MultiViewCollate(masking_collate(cfg)),
        select=functools.partial(select_studies, cfg=cfg),
    )


@register_pipeline("multiview_device")
def make_multiview_device_pipeline(cfg: DictConfig) -> Pipeline:
    """"multiview" with the pixel work moved to the training device: workers draw plans, send uint8 views."""
    crops = cfg.crops
    return Pipeline(
        transform=MultiViewPlanning(MultiViewAugmentation.from_config(cfg)),
        collate=DeviceMultiViewCollate(masking_collate(cfg)),
        select=functools.partial(select_studies, cfg=cfg),
        on_device=RenderOnDevice(crops.global_crops_size, crops.local_crops_size, tuple(crops.mean), tuple(crops.std)),
    )


class StudiesWithViews:
    """The studies of a study-level dataset that have at least `min_views` views.

    Filtering by index, before any pixels are read, keeps the batch size and the sampler's
    reproducible order intact; the view counts come from the dataset's `study_offsets`
    (VetStudies), so no image is loaded to decide.
    """

    def __init__(self, dataset: Any, min_views: int):
        offsets = getattr(dataset, "study_offsets", None)
        if offsets is None:
            raise UserError(
                f"crops.min_views_per_study needs a study-level dataset (such as VetStudies), got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.min_views = min_views
        self.indices = np.flatnonzero(np.diff(np.asarray(offsets)) >= min_views)
        if len(self.indices) == 0:
            raise UserError(
                f"crops.min_views_per_study={min_views}: none of the {len(dataset)} studies has that many views"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.indices[index])]


def select_studies(dataset: Any, cfg: DictConfig) -> Any:
    """`dataset` restricted to studies with at least `crops.min_views_per_study` views."""
    min_views = int(cfg.crops.min_views_per_study)
    if min_views < 1:
        raise UserError(f"config key crops.min_views_per_study must be >= 1, got {min_views}")
    return StudiesWithViews(dataset, min_views) if min_views > 1 else dataset
