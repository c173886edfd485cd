"""Batch assembly for SSL training: stack the crops crop-major and draw the iBOT masks."""
import random
from typing import Any, Sequence

import torch

from dinov2.data.masking import MaskingGenerator
from dinov2.loss.ibot_patch_loss import masked_token_weights


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict[str, Any], Any]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: random.Random | None = None,
    teacher_global_index: torch.Tensor | None = None,
    sample_seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Collate (crops, target) samples into the batch dict `SSLMetaArch` consumes.

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
    rng = random if rng is None else rng
    height, width = mask_generator.get_shape()
    n_tokens = height * width if n_tokens is None else n_tokens

    crops = [sample[0] for sample in samples_list]
    global_crops = _stack_crop_major([c["global_crops"] for c in crops])
    local_crops = _stack_crop_major([c["local_crops"] for c in crops])
    if local_crops is None:
        local_crops = global_crops.new_empty((0, *global_crops.shape[1:]))

    n_crops = len(global_crops)
    teacher_rows = _teacher_rows(teacher_global_index, n_crops)
    if sample_seeds is not None:
        collated_masks, upperbound = _per_sample_masks(
            sample_seeds, teacher_rows, n_crops, mask_ratio_tuple, mask_probability, n_tokens, mask_generator
        )
        return _batch(crops, global_crops, local_crops, dtype, collated_masks, upperbound, teacher_rows)
    n_teacher_rows = len(teacher_rows)
    n_masked_crops = int(n_teacher_rows * mask_probability)
    # float32 ratios as upstream, so int(n_tokens * ratio) rounds the same way
    ratio_bounds = torch.linspace(*mask_ratio_tuple, n_masked_crops + 1)
    masks = []
    upperbound = 0
    for low, high in zip(ratio_bounds[:-1], ratio_bounds[1:]):
        masks.append(mask_generator(int(n_tokens * rng.uniform(low, high)), rng=rng))
        upperbound += int(n_tokens * high)
    masks += [mask_generator(0, rng=rng) for _ in range(n_masked_crops, n_teacher_rows)]
    rng.shuffle(masks)

    collated_masks = torch.zeros((n_crops, height * width), dtype=torch.bool)
    collated_masks[teacher_rows] = torch.stack([torch.from_numpy(m) for m in masks]).flatten(1)
    return _batch(crops, global_crops, local_crops, dtype, collated_masks, upperbound, teacher_rows)


def _per_sample_masks(sample_seeds, teacher_rows, n_crops, mask_ratio_tuple, mask_probability, n_tokens, mask_generator):
    """Masks [n_crops, H*W], each image's (rows with row % n_images == image) from its own generator."""
    n_images = len(sample_seeds)
    collated_masks = torch.zeros((n_crops, mask_generator.num_patches), dtype=torch.bool)
    upperbound = 0
    for image, seed in enumerate(sample_seeds):
        rng = random.Random(seed)
        rows = [row for row in teacher_rows.tolist() if row % n_images == image]
        for row in rng.sample(rows, round(mask_probability * len(rows))):
            n_masked = int(n_tokens * rng.uniform(*mask_ratio_tuple))
            collated_masks[row] = torch.from_numpy(mask_generator(n_masked, rng=rng)).flatten()
            upperbound += int(n_tokens * mask_ratio_tuple[1])
    return collated_masks, upperbound


def _batch(crops, global_crops, local_crops, dtype, collated_masks, upperbound, teacher_rows) -> dict[str, Any]:
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masked_token_weights(collated_masks),
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=len(mask_indices_list), dtype=torch.long),
        "teacher_global_index": teacher_rows,
        "n_global_crops": len(crops[0]["global_crops"]),
    }


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
