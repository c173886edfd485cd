"""Study models scored as a clinic meets studies: with all views, one view missing, a single view.

A study-level prediction is only useful if it holds up when a view is missing, so every study is
scored under each condition of `vet_ext.downstream.study_data.CONDITIONS`. View features are computed once
per study and only the cheap fusion and head run per view subset.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dinov2.eval.metrics import evaluate_predictions
from dinov2.eval.utils import autocast_context, model_device
from vet_ext.downstream.fitting import FitOptions
from vet_ext.downstream.study_data import CONDITIONS, StudyViews, collate_studies, view_subsets


@torch.no_grad()
def study_features(model: nn.Module, dataset: StudyViews, options: FitOptions, desc: str) -> tuple[Tensor, Tensor, np.ndarray]:
    """(view features [N, V, 2, D] on CPU, present [N, V], targets [N, L]) of every study, in eval mode."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    loader = DataLoader(
        dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
        collate_fn=functools.partial(collate_studies, n_slots=dataset.max_views),
    )
    features, present, targets = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        with autocast_context(device, torch.bfloat16):
            features.append(model.view_features(batch.images, batch.view_codes, batch.present).float().cpu())
        present.append(batch.present.cpu())
        targets.append(batch.targets.cpu())
    model.train(was_training)
    return torch.cat(features), torch.cat(present), torch.cat(targets).numpy()


@torch.no_grad()
def subset_probabilities(model: nn.Module, features: Tensor, masks: Tensor, chunk: int = 256) -> np.ndarray:
    """Study probabilities [M, L] from cached view features with only the `masks` views present."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    parts = [
        model.probabilities(features[i : i + chunk].to(device), masks[i : i + chunk].to(device)).float().cpu()
        for i in range(0, len(masks), chunk)
    ]
    model.train(was_training)
    return torch.cat(parts).numpy()


@dataclass
class ConditionScores:
    """The evaluations of one model under one condition: which study, which views, what it predicted."""

    condition: str
    study_rows: Tensor
    masks: Tensor
    probabilities: np.ndarray


def score_conditions(
    model: nn.Module, features: Tensor, present: Tensor, conditions: tuple[str, ...] = CONDITIONS
) -> list[ConditionScores]:
    scores = []
    for condition in conditions:
        rows, masks = view_subsets(present, condition)
        if len(rows):
            scores.append(ConditionScores(condition, rows, masks, subset_probabilities(model, features[rows], masks)))
    return scores


def scores_by_view_count(scores: list[ConditionScores], targets: np.ndarray, names) -> list[dict[str, Any]]:
    """Macro AP / AUC grouped by how many views an evaluation used (each distinct view subset once)."""
    seen: dict[tuple, tuple[int, np.ndarray]] = {}
    for score in scores:
        for row, mask, probabilities in zip(score.study_rows.tolist(), score.masks, score.probabilities):
            seen.setdefault((row, tuple(mask.tolist())), (int(mask.sum()), probabilities))
    rows = []
    for count in sorted({count for count, _ in seen.values()}):
        members = [(key[0], p) for key, (n, p) in seen.items() if n == count]
        summary, _, _ = evaluate_predictions(np.stack([p for _, p in members]), targets[[r for r, _ in members]], names)
        rows.append({"views used": count, "evaluations": len(members), **summary})
    return rows
