"""Batch assembly for multi-view studies: DINOv2's collate, told which global crops the teacher sees.

Each study brings 4 global crops (view 0: crops 0 and 1, view 1: crops 0 and 1), stacked
crop-major like DINOv2's, and the student sees all of them. The teacher sees the 2 global crops
of the study's `teacher_view`; `teacher_global_index` says which student rows those are, and
the iBOT masks go on exactly those rows (their targets are the teacher's tokens of the same crop).

The "multiview_device" pipeline collates uint8 views and crop plans instead of crops, and
renders the crops once the batch is on the training device (`RenderOnDevice`).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch

from vet_ext.augment import GLOBAL_CROPS_PER_VIEW, pad_to_canvas
from vet_ext.crop_render import CropGroupPlan, render_crops, to_unit_float


def teacher_global_rows(teacher_views: torch.Tensor, crops_per_view: int = GLOBAL_CROPS_PER_VIEW) -> torch.Tensor:
    """Rows of the crop-major global crops the teacher sees, teacher-crop-major.

    Study b's crop j of view v sits at row (crops_per_view * v + j) * B + b; teacher crop j of
    study b is listed at position j * B + b, the order the meta-architecture reads targets in.
    """
    n_studies = len(teacher_views)
    study = torch.arange(n_studies)
    crop = torch.arange(crops_per_view)[:, None]
    return ((crops_per_view * teacher_views.to(torch.int64)[None, :] + crop) * n_studies + study).flatten()


class MultiViewCollate:
    """`collate(samples, rng)` for the multi-view pipeline.

    `collate_masked(samples, rng=..., teacher_global_index=...)` is DINOv2's collate with its
    masking settings bound (e.g. the "dino" pipeline's collate), so masks are drawn exactly as
    upstream draws them, only restricted to the teacher's rows.
    """

    def __init__(self, collate_masked: Callable[..., dict[str, Any]]):
        self.collate_masked = collate_masked

    def __call__(self, samples: Sequence[tuple[dict[str, Any], Any]], rng: random.Random) -> dict[str, Any]:
        teacher_views = torch.tensor([crops["teacher_view"] for crops, _ in samples], dtype=torch.int64)
        return self.collate_masked(samples, rng=rng, teacher_global_index=teacher_global_rows(teacher_views))


GLOBAL_PLAN, LOCAL_PLAN = "global_plan", "local_plan"  # batch key prefixes of the device pipeline's plans
_NO_PIXELS = torch.empty(0)


class DeviceMultiViewCollate:
    """`collate(samples, rng)` for "multiview_device": uint8 views and crop plans, no crops yet.

    Masks, teacher rows and every other entry come from the "multiview" collate itself, given
    empty placeholders for the crops, so a batch gets exactly the masks it gets in "multiview".
    Views are zero-padded to the batch's largest height and width ([B, 2, H, W]); each plan field
    is one flat batch entry ([B, 2, crops per view, ...]), so the trainer moves it to the device.
    """

    def __init__(self, multiview_collate: MultiViewCollate):
        self.multiview_collate = multiview_collate

    def __call__(self, samples: Sequence[tuple[dict[str, Any], Any]], rng: random.Random) -> dict[str, Any]:
        plans = [crops["plan"] for crops, _ in samples]
        n_global_crops = plans[0].global_crops.shape.numel()
        placeholders = [
            ({**crops, "global_crops": [_NO_PIXELS] * n_global_crops, "local_crops": []}, target)
            for crops, target in samples
        ]
        batch = self.multiview_collate(placeholders, rng)
        del batch["collated_global_crops"], batch["collated_local_crops"]
        batch["views"] = pad_to_canvas([pad_to_canvas([view[0] for view in crops["views"]]) for crops, _ in samples])
        batch.update(CropGroupPlan.stack([plan.global_crops for plan in plans]).to_batch(GLOBAL_PLAN))
        batch.update(CropGroupPlan.stack([plan.local_crops for plan in plans]).to_batch(LOCAL_PLAN))
        return batch


class RenderOnDevice:
    """`on_device(batch)` of "multiview_device": the crops of a collated batch, rendered where it is.

    Returns the batch with `collated_global_crops` / `collated_local_crops` (float32, crop-major
    as in "multiview": row crop * B + study, crop = view * crops per view + k) instead of the
    views and plans.
    """

    def __init__(self, global_crops_size: int, local_crops_size: int, mean: Sequence[float], std: Sequence[float]):
        self.sizes = {GLOBAL_PLAN: global_crops_size, LOCAL_PLAN: local_crops_size}
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        views = batch["views"]
        n_studies, n_views = views.shape[:2]
        images = to_unit_float(views.flatten(0, 1))  # [B * 2, H, W]
        rendered = {}
        for prefix, output in ((GLOBAL_PLAN, "collated_global_crops"), (LOCAL_PLAN, "collated_local_crops")):
            plan = CropGroupPlan.from_batch(batch, prefix)
            size = self.sizes[prefix]
            crops = render_crops(images, plan.leading(n_studies * n_views, -1), size, self.mean, self.std)
            rendered[output] = crops.view(n_studies, -1, 3, size, size).transpose(0, 1).reshape(-1, 3, size, size)
        dropped = {"views", *CropGroupPlan.batch_keys(GLOBAL_PLAN), *CropGroupPlan.batch_keys(LOCAL_PLAN)}
        return {**{key: value for key, value in batch.items() if key not in dropped}, **rendered}
