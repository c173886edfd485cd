"""The grid of linear heads of upstream's linear protocol: their inputs, the heads, batches, scoring.

Separate from the command (`dinov2.eval.linear`) because other evaluations train the same grid
on their own cached tokens (`vet_ext`'s comparison suite) and must not depend on its arguments.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2 import distributed
from dinov2.data import SamplerType, make_data_loader
from dinov2.data.loaders import derive_seed
from dinov2.eval.metrics import MULTI, SINGLE, evaluate_predictions, per_class_accuracy, target_kind
from dinov2.eval.utils import autocast_context, model_device, normalize_targets
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")

N_LAST_BLOCKS_LIST = (1, 4)
SEED = 0


def n_last_blocks_list(depth: int) -> list[int]:
    """Upstream's {1, 4} last blocks; a backbone shallower than 4 blocks uses all it has."""
    return sorted({min(n, depth) for n in N_LAST_BLOCKS_LIST})


def intermediate_tokens(model: nn.Module, images: torch.Tensor, n_last_blocks: int) -> torch.Tensor:
    """[B, n+1, D]: normalised cls tokens of the last n blocks (oldest first), then the mean patch
    token of the last block: everything any head of the grid reads, in one tensor that can be cached."""
    layers = model.get_intermediate_layers(images, n=n_last_blocks, return_class_token=True, norm=True)
    class_tokens = [class_token for _, class_token in layers]
    return torch.stack((*class_tokens, layers[-1][0].mean(dim=1)), dim=1)


def linear_input(tokens: torch.Tensor, use_n_blocks: int, use_avgpool: bool) -> torch.Tensor:
    """Upstream's head input: last `use_n_blocks` cls tokens concatenated [+ mean patch token]."""
    n_cached = tokens.shape[1] - 1
    parts = [tokens[:, n_cached - use_n_blocks : n_cached].flatten(1)]
    if use_avgpool:
        parts.append(tokens[:, -1])
    return torch.cat(parts, dim=1).float()


class LinearClassifier(nn.Module):
    def __init__(self, embed_dim: int, use_n_blocks: int, use_avgpool: bool, num_outputs: int):
        super().__init__()
        self.use_n_blocks, self.use_avgpool = use_n_blocks, use_avgpool
        self.linear = nn.Linear(embed_dim * (use_n_blocks + int(use_avgpool)), num_outputs)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(linear_input(tokens, self.use_n_blocks, self.use_avgpool))


def scale_lr(learning_rate: float, batch_size: int) -> float:
    return learning_rate * batch_size * distributed.get_global_size() / 256.0


def setup_linear_classifiers(
    embed_dim: int, blocks_list: Sequence[int], learning_rates: Sequence[float], batch_size: int, num_outputs: int
) -> tuple[nn.ModuleDict, list[dict]]:
    """The head grid (upstream's names) and one optimizer parameter group per head with its scaled lr."""
    heads, param_groups = nn.ModuleDict(), []
    for n_blocks in blocks_list:
        for avgpool in (False, True):
            for base_lr in learning_rates:
                lr = scale_lr(base_lr, batch_size)
                head = LinearClassifier(embed_dim, n_blocks, avgpool, num_outputs)
                heads[f"classifier_{n_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_")] = head
                param_groups.append({"params": head.parameters(), "lr": lr})
    return heads, param_groups


def head_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classes (-1 ignored); BCE for labels over the annotated entries only."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, ignore_index=-1)
    annotated = ~torch.isnan(targets)
    losses = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    return (losses * annotated).sum() / annotated.sum().clamp_min(1)


def head_probabilities(logits: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    return (torch.softmax(logits, 1) if target_kind(targets) == SINGLE else torch.sigmoid(logits)).numpy()


def batch_indices(iteration: int, batch_size: int, size: int, seed: int = SEED) -> torch.Tensor:
    """Samples of batch `iteration` in an endless stream of seeded per-pass permutations.

    A pure function of (iteration, seed): a resumed run sees exactly the batches it would have seen.
    """
    positions = torch.arange(iteration * batch_size, (iteration + 1) * batch_size)
    passes, offsets = positions // size, positions % size
    indices = torch.empty_like(positions)
    for pass_number in passes.unique().tolist():
        generator = torch.Generator().manual_seed(derive_seed(seed, pass_number))
        in_pass = passes == pass_number
        indices[in_pass] = torch.randperm(size, generator=generator)[offsets[in_pass]]
    return indices


class CachedBatches:
    """Training batches drawn from cached tokens; samples without any label are dropped first."""

    def __init__(self, tokens: torch.Tensor, targets: np.ndarray, batch_size: int):
        keep = targets >= 0 if targets.ndim == 1 else ~np.isnan(targets).all(axis=1)
        self.tokens, self.targets = tokens[torch.from_numpy(keep)], torch.from_numpy(targets[keep])
        if len(self.tokens) == 0:
            raise UserError("the training dataset has no labelled sample")
        self.batch_size = batch_size

    def __call__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = batch_indices(iteration, self.batch_size, len(self.tokens))
        return self.tokens[index], self.targets[index]


class AugmentedBatches:
    """Upstream's training stream: freshly augmented images through the frozen backbone each step."""

    def __init__(self, model: nn.Module, dataset, batch_size: int, num_workers: int, start_iter: int, autocast_dtype):
        self.model, self.autocast_dtype = model, autocast_dtype
        self.n_last_blocks = max(n_last_blocks_list(model.n_blocks))
        loader = make_data_loader(
            dataset, batch_size=batch_size, num_workers=num_workers, shuffle=True, seed=SEED,
            sampler_type=SamplerType.SHARDED_INFINITE, sampler_advance=start_iter * batch_size, drop_last=True,
        )
        self.batches = iter(loader)

    @torch.no_grad()
    def __call__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = next(self.batches)
        device = model_device(self.model)
        with autocast_context(device, self.autocast_dtype):
            tokens = intermediate_tokens(self.model, images.to(device), self.n_last_blocks)
        return tokens.float(), torch.as_tensor(normalize_targets(targets))


@torch.no_grad()
def head_logits(head: nn.Module, tokens: torch.Tensor, class_mapping: np.ndarray | None = None) -> torch.Tensor:
    """Float logits on the CPU; with a class mapping, column j is the head's output mapping[j]
    (upstream's `preds[:, class_mapping]`: heads trained on a larger label space scored on a subset)."""
    device = next(head.parameters()).device
    logits = torch.cat([head(chunk.to(device)).float().cpu() for chunk in tokens.split(4096)])
    return logits if class_mapping is None else logits[:, torch.from_numpy(class_mapping)]


def evaluate_heads(
    heads: nn.ModuleDict,
    tokens: torch.Tensor,
    targets: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    class_mapping: np.ndarray | None = None,
) -> dict[str, tuple[dict[str, float], list[dict], list[str]]]:
    """`evaluate_predictions` of every head on cached tokens."""
    results = {}
    for name, head in heads.items():
        probabilities = head_probabilities(head_logits(head, tokens, class_mapping), targets)
        results[name] = evaluate_predictions(probabilities, targets, names)
    return results


def per_class_rows(logits: torch.Tensor, targets: np.ndarray, class_names: Sequence[str] | None) -> list[dict]:
    """Upstream's per_class_accuracy as a table: one row per class present, in percent."""
    labelled = targets >= 0
    truth = torch.from_numpy(targets[labelled])
    counts = np.bincount(truth.numpy())
    return [
        {
            "class": c,
            **({"name": class_names[c]} if class_names is not None and c < len(class_names) else {}),
            "accuracy": 100.0 * accuracy,
            "samples": int(counts[c]),
        }
        for c, accuracy in per_class_accuracy(logits[torch.from_numpy(labelled)], truth).items()
    ]


@dataclass
class ClassMapping:
    """Which head output scores each class of a dataset (upstream's --*-class-mapping-fpath .npy)."""

    path: str
    indices: np.ndarray


def load_class_mapping(path: str | None) -> ClassMapping | None:
    """The mapping in `path`; None (or upstream's placeholder "None") means the outputs are the classes."""
    if path is None or path == "None":
        return None
    if not Path(path).is_file():
        raise UserError(f"{path}: class mapping file not found")
    try:
        indices = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise UserError(f"{path}: not a .npy array file (numpy.save of an integer array)") from None
    if not isinstance(indices, np.ndarray):
        indices.close()
        raise UserError(f"{path}: an .npz archive; a class mapping is one .npy array")
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise UserError(f"{path}: a class mapping must be a 1-D integer array (the head output of each class), "
                        f"found {indices.dtype} of shape {indices.shape}")
    if indices.size == 0 or indices.min() < 0:
        raise UserError(f"{path}: a class mapping needs at least one entry and no negative index")
    return ClassMapping(path, indices.astype(np.int64))


def check_heads_fit(
    width: int, heads_source: str, dataset_str: str, targets: np.ndarray, mapping: ClassMapping | None
) -> None:
    """Every class (or label) of the dataset must be one of the heads' outputs, through the mapping if any."""
    if mapping is not None:
        if mapping.indices.max() >= width:
            raise UserError(f"{mapping.path}: index {mapping.indices.max()} is out of range for {heads_source}, "
                            f"which have {width} outputs")
        space, owner = len(mapping.indices), f"the {len(mapping.indices)} entries of {mapping.path}"
    else:
        space, owner = width, f"the {width} outputs of {heads_source}"
    if target_kind(targets) == MULTI:
        if targets.shape[1] != space:
            raise UserError(f"{dataset_str}: {targets.shape[1]} labels do not match {owner}")
    elif targets.size and targets.max() >= space:
        raise UserError(f"{dataset_str}: class {targets.max()} is beyond {owner}")


def best_head(results: dict[str, tuple[dict[str, float], list, list]], key: str) -> str:
    """The head with the highest `key` (first of equals; NaN never wins)."""
    return max(results, key=lambda name: -math.inf if math.isnan(results[name][0][key]) else results[name][0][key])
