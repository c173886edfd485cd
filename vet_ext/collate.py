"""Batch assembly for multi-view studies: DINOv2's collate, told which global crops the teacher sees.

Each study brings 4 global crops (view 0: crops 0 and 1, view 1: crops 0 and 1), stacked
crop-major like DINOv2's, and the student sees all of them. The teacher sees the 2 global crops
of the study's `teacher_view`; `teacher_global_index` says which student rows those are, and
the iBOT masks go on exactly those rows (their targets are the teacher's tokens of the same crop).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch

from vet_ext.augment import GLOBAL_CROPS_PER_VIEW


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
