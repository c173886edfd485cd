"""Batch assembly for multi-view studies: DINOv2's masking collate, told which global crops the teacher sees.

Each study brings 4 global crops (view 0: crops 0 and 1, view 1: crops 0 and 1), stacked
crop-major like DINOv2's, and the student sees all of them. The teacher sees the 2 global crops
of the study's `teacher_view`; `teacher_global_index` says which student rows those are, and
the iBOT masks go on exactly those rows (their targets are the teacher's tokens of the same crop).

The "multiview_device" pipeline collates uint8 views and crop plans instead of crops, and
renders the crops once the batch is on the training device (`RenderOnDevice`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from dinov2.data.batch import SSLBatch, SSLMasks
from dinov2.data.collate import MaskingCollate, Samples
from vet_ext.pretraining.augment import GLOBAL_CROPS_PER_VIEW, pad_to_canvas
from vet_ext.pretraining.crop_render import CropGroupPlan, render_crops, to_unit_float


def teacher_global_rows(teacher_views: torch.Tensor, crops_per_view: int = GLOBAL_CROPS_PER_VIEW) -> torch.Tensor:
    """Rows of the crop-major global crops the teacher sees, teacher-crop-major.

    Study b's crop j of view v sits at row (crops_per_view * v + j) * B + b; teacher crop j of
    study b is listed at position j * B + b, the order the meta-architecture reads targets in.
    """
    n_studies = len(teacher_views)
    study = torch.arange(n_studies)
    crop = torch.arange(crops_per_view)[:, None]
    return ((crops_per_view * teacher_views.to(torch.int64)[None, :] + crop) * n_studies + study).flatten()


def _teacher_rows_of(samples: Samples) -> torch.Tensor:
    return teacher_global_rows(torch.tensor([crops["teacher_view"] for crops, _ in samples], dtype=torch.int64))


class MultiViewCollate:
    """`collate(samples, rng)` for "multiview": masks drawn exactly as DINOv2 draws them (`masking`,
    with the `ibot.*` settings bound), only restricted to the teacher's rows."""

    def __init__(self, masking: MaskingCollate):
        self.masking = masking

    def __call__(self, samples: Samples, rng: random.Random) -> SSLBatch:
        return self.masking(samples, rng, teacher_global_index=_teacher_rows_of(samples))


@dataclass(frozen=True, eq=False, kw_only=True)
class PlannedBatch(SSLMasks):
    """A "multiview_device" batch before its crops exist: the "multiview" batch's masks and teacher
    rows, the uint8 views and the crop plans, all moved to the device together (`to`)."""

    views: torch.Tensor  # uint8 [B, 2, H, W], zero-padded to the batch's largest height and width
    global_plan: CropGroupPlan  # [B, 2, global crops per view]
    local_plan: CropGroupPlan  # [B, 2, local crops per view]


class DeviceMultiViewCollate:
    """`collate(samples, rng)` for "multiview_device": uint8 views and crop plans, no crops yet.

    The masks are the ones the "multiview" collate draws for the same samples, so a batch gets
    exactly the masks it gets in "multiview".
    """

    def __init__(self, masking: MaskingCollate):
        self.masking = masking

    def __call__(self, samples: Samples, rng: random.Random) -> PlannedBatch:
        plans = [crops["plan"] for crops, _ in samples]
        n_global_crops = plans[0].global_crops.shape.numel()
        return PlannedBatch.from_masks(
            self.masking.masks(samples, rng, n_global_crops, teacher_global_index=_teacher_rows_of(samples)),
            views=pad_to_canvas([pad_to_canvas([view[0] for view in crops["views"]]) for crops, _ in samples]),
            global_plan=CropGroupPlan.stack([plan.global_crops for plan in plans]),
            local_plan=CropGroupPlan.stack([plan.local_crops for plan in plans]),
        )


class RenderOnDevice:
    """`on_device(batch)` of "multiview_device": the crops of a collated batch, rendered where it is.

    Gives the `SSLBatch` of "multiview": float32 crops, crop-major (row crop * B + study,
    crop = view * crops per view + k), and the planned batch's masks.
    """

    def __init__(self, global_crops_size: int, local_crops_size: int, mean: Sequence[float], std: Sequence[float]):
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: PlannedBatch) -> SSLBatch:
        images = to_unit_float(batch.views.flatten(0, 1))  # [B * 2, H, W]
        n_studies = batch.views.shape[0]
        return SSLBatch.from_masks(
            batch,
            collated_global_crops=self._render(images, batch.global_plan, self.global_crops_size, n_studies),
            collated_local_crops=self._render(images, batch.local_plan, self.local_crops_size, n_studies),
        )

    def _render(self, images: torch.Tensor, plan: CropGroupPlan, size: int, n_studies: int) -> torch.Tensor:
        crops = render_crops(images, plan.leading(len(images), -1), size, self.mean, self.std)
        return crops.view(n_studies, -1, 3, size, size).transpose(0, 1).reshape(-1, 3, size, size)
