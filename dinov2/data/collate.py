"""Batch assembly for SSL training: stack the crops crop-major and draw the iBOT masks.

A pipeline asks for DINOv2's collate with `masking_collate(cfg)`; `collate_data_and_cast` is
upstream's entry point to the same code.
"""
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from dinov2.data.batch import SSLBatch, SSLMasks
from dinov2.data.masking import MaskingGenerator
from dinov2.loss.ibot_patch_loss import masked_token_weights

Samples = Sequence[tuple[dict[str, Any], Any]]


def masking_collate(cfg: DictConfig) -> "MaskingCollate":
    """DINOv2's collate for `cfg`: masks on the global crops' patch grid, drawn as `cfg.ibot` says.

    Crops stay float32: the trainer casts them to its compute dtype on the device.
    """
    size, patch = cfg.crops.global_crops_size, cfg.student.patch_size
    grid = size // patch
    # Upstream's expression evaluated left to right: (((0.5 * G) // p) * G) // p, e.g. 666 at 518/14.
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * size // patch * size // patch)
    return MaskingCollate(
        mask_generator=mask_generator,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=grid * grid,
    )


@dataclass(frozen=True)
class MaskingCollate:
    """`collate(samples, rng, teacher_global_index=None) -> SSLBatch` with the masking settings bound.

    A pipeline whose teacher sees only some of the global crops passes their rows; one whose crops
    are made elsewhere (on the training device) draws only the masks (`masks`), the ones its crops
    would get here. When the training loader tagged every sample with its `sample_seed`, each
    image's masks come from its own seed, so a batch split over ranks gets the masks it would get
    whole; otherwise they are upstream's per-batch draw. See `collate_data_and_cast` for the draw.
    """

    mask_generator: MaskingGenerator
    mask_ratio_tuple: tuple[float, float]
    mask_probability: float
    n_tokens: int
    dtype: torch.dtype = torch.float32

    def __call__(self, samples: Samples, rng: random.Random | None, teacher_global_index: torch.Tensor | None = None) -> SSLBatch:
        return self._collate(samples, rng, teacher_global_index, _sample_seeds(samples))

    def masks(
        self, samples: Samples, rng: random.Random | None, n_global_crops: int, teacher_global_index: torch.Tensor | None = None
    ) -> SSLMasks:
        """The masks `__call__` would give samples with `n_global_crops` global crops each."""
        return self._draw(len(samples), n_global_crops, rng, teacher_global_index, _sample_seeds(samples))

    def _collate(self, samples, rng, teacher_global_index, sample_seeds) -> SSLBatch:
        crops = [sample[0] for sample in samples]
        global_crops = _stack_crop_major([c["global_crops"] for c in crops])
        local_crops = _stack_crop_major([c["local_crops"] for c in crops])
        if local_crops is None:
            local_crops = global_crops.new_empty((0, *global_crops.shape[1:]))
        masks = self._draw(len(crops), len(crops[0]["global_crops"]), rng, teacher_global_index, sample_seeds)
        return SSLBatch.from_masks(
            masks, collated_global_crops=global_crops.to(self.dtype), collated_local_crops=local_crops.to(self.dtype)
        )

    def _draw(self, n_images, n_global_crops, rng, teacher_global_index, sample_seeds) -> SSLMasks:
        n_crops = n_images * n_global_crops
        teacher_rows = _teacher_rows(teacher_global_index, n_crops)
        if sample_seeds is None:
            collated_masks, upperbound = self._batch_masks(random if rng is None else rng, teacher_rows, n_crops)
        else:
            collated_masks, upperbound = self._per_sample_masks(sample_seeds, teacher_rows, n_crops)
        mask_indices_list = collated_masks.flatten().nonzero().flatten()
        return SSLMasks(
            collated_masks=collated_masks,
            mask_indices_list=mask_indices_list,
            masks_weight=masked_token_weights(collated_masks),
            n_masked_patches=torch.full((1,), fill_value=len(mask_indices_list), dtype=torch.long),
            upperbound=upperbound,
            teacher_global_index=teacher_rows,
            n_global_crops=n_global_crops,
        )

    def _batch_masks(self, rng: random.Random, teacher_rows: torch.Tensor, n_crops: int) -> tuple[torch.Tensor, int]:
        """Upstream's draw: masks [n_crops, H*W] stratified over the ratios, shuffled over the teacher's rows."""
        n_teacher_rows = len(teacher_rows)
        n_masked_crops = int(n_teacher_rows * self.mask_probability)
        # float32 ratios as upstream, so int(n_tokens * ratio) rounds the same way
        ratio_bounds = torch.linspace(*self.mask_ratio_tuple, n_masked_crops + 1)
        masks = []
        upperbound = 0
        for low, high in zip(ratio_bounds[:-1], ratio_bounds[1:]):
            masks.append(self.mask_generator(int(self.n_tokens * rng.uniform(low, high)), rng=rng))
            upperbound += int(self.n_tokens * high)
        masks += [self.mask_generator(0, rng=rng) for _ in range(n_masked_crops, n_teacher_rows)]
        rng.shuffle(masks)

        collated_masks = torch.zeros((n_crops, self.mask_generator.num_patches), dtype=torch.bool)
        collated_masks[teacher_rows] = torch.stack([torch.from_numpy(m) for m in masks]).flatten(1)
        return collated_masks, upperbound

    def _per_sample_masks(self, sample_seeds: Sequence[int], teacher_rows: torch.Tensor, n_crops: int) -> tuple[torch.Tensor, int]:
        """Masks [n_crops, H*W], each image's (rows with row % n_images == image) from its own generator."""
        n_images = len(sample_seeds)
        collated_masks = torch.zeros((n_crops, self.mask_generator.num_patches), dtype=torch.bool)
        upperbound = 0
        for image, seed in enumerate(sample_seeds):
            rng = random.Random(seed)
            rows = [row for row in teacher_rows.tolist() if row % n_images == image]
            for row in rng.sample(rows, round(self.mask_probability * len(rows))):
                n_masked = int(self.n_tokens * rng.uniform(*self.mask_ratio_tuple))
                collated_masks[row] = torch.from_numpy(self.mask_generator(n_masked, rng=rng)).flatten()
                upperbound += int(self.n_tokens * self.mask_ratio_tuple[1])
        return collated_masks, upperbound


def _sample_seeds(samples: Samples) -> list[int] | None:
    """Every sample's `sample_seed` (set by the training loader), or None when some sample has none."""
    seeds = [crops.get("sample_seed") for crops, _ in samples]
    return seeds if all(seed is not None for seed in seeds) else None


def collate_data_and_cast(
    samples_list: Samples,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: random.Random | None = None,
    teacher_global_index: torch.Tensor | None = None,
    sample_seeds: Sequence[int] | None = None,
) -> SSLBatch:
    """Collate (crops, target) samples into the batch `SSLMetaArch` consumes.

    Crops are stacked crop-major (all images' first global crop, then all second ones, ...), which
    is the order the teacher's targets and the student's chunks assume. A fraction
    `mask_probability` of the global crops get masks whose ratios are stratified over
    `mask_ratio_tuple`, so every batch sees the whole range of difficulty; the rest stay unmasked.
    The masks are then shuffled so that which crops are masked is random.

    `teacher_global_index` lists the global-crop rows the teacher also sees (default: all, as
    upstream). Masks only make sense there, since the iBOT targets are the teacher's tokens of
    the same crop: the probability and ratios apply to those rows and the other rows stay unmasked.

    Random numbers come from `rng` (default: the module-level `random`) in upstream DINOv2's order:
    the mask ratio and generator draws per masked crop, then the generator calls for the unmasked
    ones, then the shuffle.

    With `sample_seeds` (one per sample), each image's masks come from its own generator instead:
    round(`mask_probability` x its teacher-seen crops) of them, chosen at random, are masked (the
    batch then has upstream's count, and every rank's share has masked tokens), each at a ratio
    drawn uniformly from `mask_ratio_tuple`. An image then gets the same masks whatever batch it is
    in, which is what makes a multi-process run see the masks of a single-process one.
    """
    if mask_generator is None:
        raise ValueError("collate_data_and_cast needs a mask_generator to draw the iBOT masks")
    height, width = mask_generator.get_shape()
    masking = MaskingCollate(
        mask_generator=mask_generator,
        mask_ratio_tuple=mask_ratio_tuple,
        mask_probability=mask_probability,
        n_tokens=height * width if n_tokens is None else n_tokens,
        dtype=dtype,
    )
    return masking._collate(samples_list, rng, teacher_global_index, sample_seeds)


def _teacher_rows(teacher_global_index: torch.Tensor | None, n_crops: int) -> torch.Tensor:
    """The rows as int64; a repeated or out-of-range row would silently mis-assign masks."""
    if teacher_global_index is None:
        return torch.arange(n_crops, dtype=torch.int64)
    rows = torch.as_tensor(teacher_global_index, dtype=torch.int64)
    distinct = rows.ndim == 1 and len(rows) > 0 and rows.unique().numel() == len(rows)
    if not distinct or int(rows.min()) < 0 or int(rows.max()) >= n_crops:
        raise ValueError(f"teacher_global_index must list distinct rows of the {n_crops} global crops, got {rows.tolist()}")
    return rows


def _stack_crop_major(per_image_crops: list[Sequence[torch.Tensor]]) -> torch.Tensor | None:
    """[image][crop] tensors -> one tensor with row crop * n_images + image (None if no crops)."""
    n_crops = len(per_image_crops[0])
    if any(len(image_crops) != n_crops for image_crops in per_image_crops):
        counts = [len(image_crops) for image_crops in per_image_crops]
        raise ValueError(f"every sample of a batch must have the same number of crops, got {counts}")
    if n_crops == 0:
        return None
    return torch.stack([image_crops[c] for c in range(n_crops) for image_crops in per_image_crops])
