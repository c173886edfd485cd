"""The built-in "dino" pipeline: DINOv2's multi-crop augmentation and iBOT-masking collate."""
from omegaconf import DictConfig

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import masking_collate
from dinov2.data.registry import Pipeline, register_pipeline


@register_pipeline("dino")
def make_dino_pipeline(cfg: DictConfig) -> Pipeline:
    """Crops from `cfg.crops`, masks on the global crops' patch grid from `cfg.ibot`."""
    crops = cfg.crops
    augmentation = DataAugmentationDINO(
        crops.global_crops_scale,
        crops.local_crops_scale,
        crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        mean=tuple(crops.mean),
        std=tuple(crops.std),
    )
    return Pipeline(transform=augmentation, collate=masking_collate(cfg))
