"""Studies as padded view batches, whole-view masking, and the view subsets a study is judged on.

A study holds one to a handful of views of different sizes. For the study model each view is
transformed to a fixed-size image, and a batch pads every study to the same number of view
slots with a `present` mask saying which slots are real. Training drops whole views at random
(never all of them) so the model learns to answer from whatever subset a clinic took; the
evaluation asks the same question on purpose with all views, with one removed, and with one only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dinov2.utils.errors import UserError
from vet_ext.ingestion.views import VIEW_CODES

UNKNOWN_VIEW = VIEW_CODES.index("UNKNOWN")

ALL_VIEWS, ONE_VIEW_DROPPED, SINGLE_VIEW = "all views", "one view dropped", "single view"
CONDITIONS = (ALL_VIEWS, ONE_VIEW_DROPPED, SINGLE_VIEW)


@dataclass
class StudyBatch:
    """Padded studies: images [B, V, 3, H, W], view codes [B, V] (indices into VIEW_CODES),
    present [B, V] (False = padding) and targets [B, L] (NaN = not annotated)."""

    images: Tensor
    view_codes: Tensor
    present: Tensor
    targets: Tensor

    def to(self, device: torch.device) -> "StudyBatch":
        return StudyBatch(*(t.to(device, non_blocking=True) for t in (self.images, self.view_codes, self.present, self.targets)))


class StudyViews(Dataset):
    """Items (views [n, 3, S, S], view codes [n], target) of chosen studies of a VetStudies dataset.

    `transform` turns one uint8 view [1, H, W] into [3, S, S]. A study with more than `max_views`
    views keeps a random subset of them when `random_subset` (training: every view gets used over
    the epochs), else its first `max_views` in manifest order (evaluation: reproducible).
    """

    def __init__(
        self,
        studies,
        indices: Sequence[int] | np.ndarray,
        transform: Callable[[Tensor], Tensor],
        max_views: int,
        random_subset: bool,
    ) -> None:
        if max_views < 1:
            raise UserError(f"--max-views must be at least 1, got {max_views}")
        self.studies, self.indices = studies, np.asarray(indices, dtype=np.int64)
        self.transform, self.max_views, self.random_subset = transform, max_views, random_subset

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        study = int(self.indices[index])
        views, target = self.studies[study]
        codes = [VIEW_CODES.index(code) for code in self.studies.view_codes(study)]
        chosen = list(range(len(views)))
        if len(chosen) > self.max_views:
            chosen = sorted(torch.randperm(len(chosen))[: self.max_views].tolist()) if self.random_subset else chosen[: self.max_views]
        images = torch.stack([self.transform(views[k]) for k in chosen])
        return images, torch.tensor([codes[k] for k in chosen], dtype=torch.int64), target


def collate_studies(samples: Sequence[tuple[Tensor, Tensor, Tensor]], n_slots: int | None = None) -> StudyBatch:
    """Pad every study to `n_slots` view slots (default: the most views in the batch).

    Padding slots hold zero images with the UNKNOWN code and are marked absent; a fixed
    `n_slots` lets batches of an evaluation be concatenated.
    """
    slots = n_slots if n_slots is not None else max(len(images) for images, _, _ in samples)
    first = samples[0][0]
    images = first.new_zeros((len(samples), slots, *first.shape[1:]))
    codes = torch.full((len(samples), slots), UNKNOWN_VIEW, dtype=torch.int64)
    present = torch.zeros((len(samples), slots), dtype=torch.bool)
    for row, (study_images, study_codes, _) in enumerate(samples):
        n = len(study_images)
        if n > slots:
            raise ValueError(f"a study with {n} views does not fit {slots} view slots")
        images[row, :n], codes[row, :n], present[row, :n] = study_images, study_codes, True
    targets = torch.stack([torch.as_tensor(target, dtype=torch.float32) for _, _, target in samples])
    return StudyBatch(images, codes, present, targets)


def drop_views(present: Tensor, probability: float, generator: torch.Generator | None = None) -> Tensor:
    """Whole-view masking: each present view is dropped with `probability`, but never all of a study's.

    When every view of a study was dropped, one of its views, chosen uniformly, is kept instead;
    a view of an n-view study is therefore dropped with probability p - p**n / n.
    """
    if not 0.0 <= probability < 1.0:
        raise UserError(f"--view-drop must be in [0, 1), got {probability}")
    if not bool(present.any(dim=1).all()):
        raise ValueError("every study needs at least one present view")
    kept = present & (torch.rand(present.shape, generator=generator, device=present.device) >= probability)
    emptied = ~kept.any(dim=1)
    if bool(emptied.any()):
        scores = torch.rand(present.shape, generator=generator, device=present.device).masked_fill(~present, -1.0)
        rescued = torch.zeros_like(present).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        kept = kept | (rescued & emptied[:, None])
    return kept


def view_subsets(present: Tensor, condition: str) -> tuple[Tensor, Tensor]:
    """(study row [M], present mask [M, V]) of every evaluation under `condition`.

    all views: each study once. one view dropped: each study with >= 2 views once per view,
    without that view. single view: each study once per view, with that view alone.
    """
    if condition == ALL_VIEWS:
        return torch.arange(len(present)), present.clone()
    if condition not in CONDITIONS:
        raise ValueError(f"unknown evaluation condition '{condition}'; known: {', '.join(CONDITIONS)}")
    rows, masks = [], []
    for row, study_present in enumerate(present):
        views = study_present.nonzero().flatten().tolist()
        if condition == ONE_VIEW_DROPPED and len(views) < 2:
            continue
        for view in views:
            if condition == ONE_VIEW_DROPPED:
                mask = study_present.clone()
                mask[view] = False
            else:
                mask = torch.zeros_like(study_present)
                mask[view] = True
            rows.append(row)
            masks.append(mask)
    if not rows:
        return torch.zeros(0, dtype=torch.int64), present[:0].clone()
    return torch.tensor(rows, dtype=torch.int64), torch.stack(masks)
