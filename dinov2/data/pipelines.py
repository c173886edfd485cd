"""The built-in "dino" pipeline: DINOv2's multi-crop augmentation and iBOT-masking collate."""
from dataclasses import asdict

from omegaconf import DictConfig

from dinov2.data.augmentations import CropGeometry, DataAugmentationDINO
from dinov2.data.collate import masking_collate
from dinov2.data.registry import Pipeline, register_pipeline


@register_pipeline("dino")
def make_dino_pipeline(cfg: DictConfig) -> Pipeline:
    """Crops from `cfg.crops`, masks on the global crops' patch grid from `cfg.ibot`."""
    augmentation = DataAugmentationDINO(**asdict(CropGeometry.from_config(cfg.crops)))
    return Pipeline(transform=augmentation, collate=masking_collate(cfg))
