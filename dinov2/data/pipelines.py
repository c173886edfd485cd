"""The built-in "dino" pipeline: DINOv2's multi-crop augmentation and iBOT-masking collate."""
import functools
import random

import torch
from omegaconf import DictConfig

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.data.registry import Pipeline, register_pipeline


def _collate_with_rng(samples: list, rng: random.Random, **collate_kwargs) -> dict:
    """Masks per image when the training loader tagged every sample with its `sample_seed`, so a
    batch split over ranks gets the masks it would get whole; upstream's per-batch draw otherwise."""
    seeds = [crops.get("sample_seed") for crops, _ in samples]
    sample_seeds = seeds if all(seed is not None for seed in seeds) else None
    return collate_data_and_cast(samples, rng=rng, sample_seeds=sample_seeds, **collate_kwargs)


@register_pipeline("dino")
def make_dino_pipeline(cfg: DictConfig) -> Pipeline:
    """Crops from `cfg.crops`, masks on the global crops' patch grid from `cfg.ibot`.

    Crops stay float32: the trainer casts them to its compute dtype on the device.
    """
    crops = cfg.crops
    grid = crops.global_crops_size // cfg.student.patch_size
    augmentation = DataAugmentationDINO(
        crops.global_crops_scale,
        crops.local_crops_scale,
        crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        mean=tuple(crops.mean),
        std=tuple(crops.std),
    )
    # Upstream's expression evaluated left to right: (((0.5 * G) // p) * G) // p, e.g. 666 at 518/14.
    size, patch = crops.global_crops_size, cfg.student.patch_size
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * size // patch * size // patch)
    collate = functools.partial(
        _collate_with_rng,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=mask_generator,
    )
    return Pipeline(transform=augmentation, collate=collate)
