"""Datasets, augmentation pipelines and loaders; importing the package registers the built-ins."""
from dinov2.data.registry import (
    DATASETS,
    PIPELINES,
    Pipeline,
    make_dataset,
    make_pipeline,
    parse_dataset_str,
    register_dataset,
    register_pipeline,
)
from dinov2.data import datasets, pipelines  # noqa: F401  (imported to register the built-ins)
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.batch import SSLBatch, SSLMasks
from dinov2.data.collate import masking_collate
from dinov2.data.loaders import make_data_loader, make_training_loader
from dinov2.data.samplers import SamplerType
from dinov2.data.transforms import ClassificationEvalTransform, ClassificationTrainTransform

__all__ = [
    "ClassificationEvalTransform",
    "ClassificationTrainTransform",
    "DATASETS",
    "DataAugmentationDINO",
    "PIPELINES",
    "Pipeline",
    "SSLBatch",
    "SSLMasks",
    "SamplerType",
    "make_data_loader",
    "make_dataset",
    "make_pipeline",
    "make_training_loader",
    "masking_collate",
    "parse_dataset_str",
    "register_dataset",
    "register_pipeline",
]
