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
) -> dict[str, Any]:
    """Collate (crops, target) samples into the batch dict `SSLMetaArch` consumes.

    Crops are stacked crop-major (all images' first global crop, then all second ones, ...), which
    is the order the teacher's targets and the student's chunks assume. A fraction
    `mask_probability` of the global crops get masks whose ratios are stratified over
    `mask_ratio_tuple`, so every batch sees the whole range of difficulty; the rest stay unmasked.
    The masks are then shuffled so that which crops are masked is random.

    Random numbers come from `rng` (default: the module-level `random`) in upstream DINOv2's order:
    the mask ratio and generator draws per masked crop, then the generator calls for the unmasked
    ones, then the shuffle.
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
    n_masked_crops = int(n_crops * mask_probability)
    # float32 ratios as upstream, so int(n_tokens * ratio) rounds the same way
    ratio_bounds = torch.linspace(*mask_ratio_tuple, n_masked_crops + 1)
    masks = []
    upperbound = 0
    for low, high in zip(ratio_bounds[:-1], ratio_bounds[1:]):
        masks.append(mask_generator(int(n_tokens * rng.uniform(low, high)), rng=rng))
        upperbound += int(n_tokens * high)
    masks += [mask_generator(0, rng=rng) for _ in range(n_masked_crops, n_crops)]
    rng.shuffle(masks)

    collated_masks = torch.stack([torch.from_numpy(m) for m in masks]).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masked_token_weights(collated_masks),
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=len(mask_indices_list), dtype=torch.long),
        "teacher_global_index": torch.arange(n_crops, dtype=torch.int64),
        "n_global_crops": len(crops[0]["global_crops"]),
    }


def _stack_crop_major(per_image_crops: list[Sequence[torch.Tensor]]) -> torch.Tensor | None:
    """[image][crop] tensors -> one tensor with row crop * n_images + image (None if no crops)."""
    n_crops = len(per_image_crops[0])
    if any(len(image_crops) != n_crops for image_crops in per_image_crops):
        counts = [len(image_crops) for image_crops in per_image_crops]
        raise ValueError(f"every sample of a batch must have the same number of crops, got {counts}")
    if n_crops == 0:
        return None
    return torch.stack([image_crops[c] for c in range(n_crops) for image_crops in per_image_crops])
