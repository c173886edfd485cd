"""Feature extraction and the sample bookkeeping every evaluation shares.

Features are computed once per dataset, kept on the CPU in float32, and everything after that
(k-NN, logistic regression, cached linear heads, retrieval) works on tensors: the costly
backbone pass is never repeated for another k, C or learning rate.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dinov2 import distributed
from dinov2.eval.metrics import SINGLE, target_kind
from dinov2.utils.errors import UserError


def normalize_targets(targets: Any) -> np.ndarray:
    """int64 [N] class ids (-1 = unlabelled) or float32 [N, L] binary labels (NaN = not annotated).

    A 1-D float column (a class label read from a float manifest column) becomes int64 when its
    values are whole numbers, so one label is always a class whatever its storage type.
    """
    array = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if array.ndim == 2:
        return array.astype(np.float32)
    if array.ndim != 1:
        raise UserError(f"targets must be one class per sample or a vector of labels, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        known = ~np.isnan(array)
        if not np.all(array[known] == np.round(array[known])):
            raise UserError("a single float label must hold whole class numbers (0, 1, ...) or NaN")
        return np.where(known, array, -1).astype(np.int64)
    return array.astype(np.int64)


def label_names(dataset: Any, targets: np.ndarray) -> list[str]:
    """Names of multi-label columns: the dataset's `target_columns` when it has them, else indices."""
    if target_kind(targets) == SINGLE:
        return []
    names = list(getattr(dataset, "target_columns", []) or [])
    return names if len(names) == targets.shape[1] else [str(j) for j in range(targets.shape[1])]


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision on CUDA when asked; CPU runs (and dtype float32/None) stay in float32."""
    if device.type != "cuda" or dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


class _Indexed:
    """dataset[i] -> (i, image, target): lets shards from several ranks be put back in order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return index, image, target


def _gather_in_order(indices: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, size: int):
    """All ranks' shards, de-duplicated (DistributedSampler pads) and sorted by dataset index."""
    shards: list[Any] = [None] * distributed.get_global_size()
    dist.all_gather_object(shards, (indices, features, targets))
    all_indices = torch.cat([shard[0] for shard in shards])
    order = torch.zeros(size, dtype=torch.long)
    order[all_indices] = torch.arange(len(all_indices))  # a padded duplicate overwrites an equal copy
    return (torch.cat([shard[1] for shard in shards])[order], torch.cat([shard[2] for shard in shards])[order])


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    batch_size: int,
    num_workers: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, np.ndarray]:
    """(features float32 [N, ...] on CPU, `normalize_targets` of the targets), in dataset order.

    `forward(images)` defaults to `model(images)` (a DINOv2 backbone's normalised cls token).
    Under torch.distributed each rank embeds its shard and every rank receives the whole set.
    """
    forward = forward or model
    device = model_device(model)
    sampler = None
    if distributed.is_enabled():
        sampler = DistributedSampler(
            dataset, num_replicas=distributed.get_global_size(), rank=distributed.get_global_rank(), shuffle=False
        )
    loader = DataLoader(
        _Indexed(dataset),
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    all_indices, all_features, all_targets = [], [], []
    for indices, images, targets in tqdm(
        loader, desc=desc, unit="batch", disable=not distributed.is_main_process(), dynamic_ncols=True
    ):
        with autocast_context(device, autocast_dtype):
            features = forward(images.to(device, non_blocking=True))
        all_indices.append(indices)
        all_features.append(features.float().cpu())
        all_targets.append(torch.as_tensor(targets))
    if not all_features:
        raise UserError(f"{desc}: the dataset is empty")
    indices, features, targets = torch.cat(all_indices), torch.cat(all_features), torch.cat(all_targets)
    if distributed.is_enabled():
        features, targets = _gather_in_order(indices, features, targets, len(dataset))
    return features, normalize_targets(targets)


def aggregate_by_group(
    features: torch.Tensor, group_ids: Sequence[Any] | np.ndarray
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Mean of the L2-normalised rows of each group (e.g. a study's images).

    Normalising first makes every image weigh the same whatever its feature norm. Returns
    (group features [G, D], group ids [G] in order of first appearance, group index of each row [N]).
    """
    group_ids = np.asarray(group_ids)
    if len(group_ids) != len(features):
        raise UserError(f"{len(group_ids)} group ids for {len(features)} feature rows")
    _, first, inverse = np.unique(group_ids, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # np.unique sorts ids; renumber groups by first appearance
    inverse = rank[inverse.reshape(-1)]
    groups = group_ids[np.sort(first)]
    sums = torch.zeros(len(groups), features.shape[1], dtype=torch.float32)
    sums.index_add_(0, torch.from_numpy(inverse), F.normalize(features.float(), dim=1))
    counts = torch.from_numpy(np.bincount(inverse, minlength=len(groups))).float()
    return sums / counts[:, None], groups, inverse


def aggregate_targets(targets: np.ndarray, inverse: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """One target per group: a class must agree within a group; a finding is present if any image shows it."""
    if target_kind(targets) == SINGLE:
        result = np.full(len(groups), -1, dtype=np.int64)
        for group, target in zip(inverse, targets):
            if result[group] not in (-1, target) and target != -1:
                raise UserError(f"group '{groups[group]}' has images with different classes ({result[group]}, {target})")
            result[group] = max(result[group], target)
        return result
    result = np.full((len(groups), targets.shape[1]), np.nan, dtype=np.float32)
    for group, target in zip(inverse, targets):
        result[group] = np.fmax(result[group], target)
    return result


def study_ids_of(dataset, dataset_str: str) -> np.ndarray:
    """The study id of every item, for `--level study`; datasets without studies are a user error."""
    ids = getattr(dataset, "study_ids", None)
    if ids is None:
        raise UserError(
            f"--level study needs a dataset with study ids (e.g. VetImages); '{dataset_str}' has none"
        )
    return np.asarray(ids)


def sample_per_class(targets: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Indices of `n_per_class` samples of each class (all of a smaller class), drawn with `seed`.

    Few-shot evaluation: a separate seed per try gives different subsets.
    """
    if target_kind(targets) != SINGLE:
        raise UserError("--n-per-class-list needs single-label targets (one class per sample)")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in np.unique(targets[targets >= 0]):
        members = np.flatnonzero(targets == label)
        order = torch.randperm(len(members), generator=generator).numpy()
        chosen.append(members[order[:n_per_class]])
    return np.sort(np.concatenate(chosen))


def dataset_features(
    dataset,
    dataset_str: str,
    model: nn.Module,
    *,
    batch_size: int,
    num_workers: int,
    autocast_dtype: torch.dtype | None,
    level: str = "image",
    desc: str = "features",
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(features, targets, label names) of a dataset, per image or averaged per study (`level`)."""
    features, targets = extract_features(
        model, dataset, batch_size, num_workers, autocast_dtype=autocast_dtype, desc=desc
    )
    names = label_names(dataset, targets)
    if level == "study":
        features, groups, inverse = aggregate_by_group(features, study_ids_of(dataset, dataset_str))
        targets = aggregate_targets(targets, inverse, groups)
    return features, targets, names
