"""Name -> factory registries for datasets and data pipelines, open to plug-ins.

A dataset string such as "ImageFolder:root=/data/xrays" names a registered factory and its
keyword arguments; a pipeline (per-sample augmentation + per-batch collate) is chosen by
`train.pipeline`. Packages extend both without dinov2 importing them: they declare an entry
point in the group "dinov2.extensions" and register themselves when it is loaded.
"""
import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig

from dinov2.data.batch import SSLBatch, SSLMasks
from dinov2.utils.errors import UserError
from dinov2.utils.registry import Registry


@dataclass(frozen=True)
class Pipeline:
    """What turns dataset items into training batches.

    `transform(image, generator)` augments one image into a dict of crops; `collate(samples, rng)`
    turns a list of (crops, target) into the `SSLBatch` the meta-architecture consumes (a dict in
    upstream's format is accepted too). Both get their randomness explicitly so the loader can
    make every batch reproducible.

    `on_device(batch)`, when set, finishes the batch after it reached the training device: a
    pipeline whose CPU workers cannot keep up with the GPU draws its random parameters in the
    workers (so batches stay reproducible) and renders the crops there, batched. Its collate
    returns the masks (`SSLMasks`) with whatever its `on_device` needs, and `on_device` the `SSLBatch`.
    """

    transform: Callable[[Any, torch.Generator], dict]
    collate: Callable[[list[tuple[dict, Any]], random.Random], SSLMasks | Mapping[str, Any]]
    # the items the pipeline can use (e.g. studies with enough views); None: all of them
    select: Callable[[Any], Any] | None = None
    on_device: Callable[[SSLMasks], SSLBatch] | None = None

    def dataset_for(self, dataset: Any) -> Any:
        return self.select(dataset) if self.select is not None else dataset

    def to_device(self, batch: SSLMasks | Mapping[str, Any], device: torch.device) -> SSLBatch:
        """The batch as training consumes it: moved (asynchronously from pinned memory), then
        finished by `on_device` if the pipeline has that stage."""
        typed = batch if isinstance(batch, SSLMasks) else SSLBatch.from_mapping(batch)
        moved = typed.to(device, non_blocking=True)
        return self.on_device(moved) if self.on_device is not None else moved


DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
PIPELINES: Registry[Callable[[DictConfig], Pipeline]] = Registry("pipeline")


def register_dataset(name: str, *, replace: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `factory(transform=..., target_transform=..., **string_kwargs)` serves `name`."""
    return DATASETS.register(name, replace=replace)


def transform_item(
    image: Any, target: Any, transform: Callable | None, target_transform: Callable | None
) -> tuple[Any, Any]:
    """A registered dataset's item: its optional `transform` and `target_transform` (torchvision's
    convention) applied, so that `make_dataset` can hand the same two to any factory."""
    image = transform(image) if transform is not None else image
    return image, target_transform(target) if target_transform is not None else target


def register_pipeline(
    name: str, *, replace: bool = False
) -> Callable[[Callable[[DictConfig], Pipeline]], Callable[[DictConfig], Pipeline]]:
    """Decorator: `builder(cfg) -> Pipeline` serves `train.pipeline: name`."""
    return PIPELINES.register(name, replace=replace)


def parse_dataset_str(dataset_str: str) -> tuple[str, dict[str, str | list[str]]]:
    """"Name:key=value:key=value" -> (name, kwargs); a repeated key collects a list, in order."""
    name, *parts = dataset_str.split(":")
    if not name:
        raise UserError(f"dataset string '{dataset_str}' has no dataset name before the first ':'")
    kwargs: dict[str, str | list[str]] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise UserError(f"dataset string '{dataset_str}': '{part}' is not of the form key=value")
        if key not in kwargs:
            kwargs[key] = value
        elif isinstance(kwargs[key], list):
            kwargs[key].append(value)
        else:
            kwargs[key] = [kwargs[key], value]
    return name, kwargs


def _reject_unaccepted_keys(factory: Callable, name: str, dataset_str: str, kwargs: dict) -> None:
    """Check the keys against the factory's signature: a TypeError from inside it is a bug, not a typo."""
    try:
        inspect.signature(factory).bind(transform=None, target_transform=None, **kwargs)
    except TypeError as exc:
        parameters = inspect.signature(factory).parameters
        unknown = [key for key in kwargs if key not in parameters]
        accepted = ", ".join(p for p in parameters if p not in ("transform", "target_transform"))
        problem = f"unknown key '{unknown[0]}'" if unknown else str(exc)
        raise UserError(
            f"dataset '{name}' in '{dataset_str}': {problem}; accepted keys: {accepted or 'none'}"
        ) from exc


def make_dataset(dataset_str: str, transform: Callable | None = None, target_transform: Callable | None = None):
    """The dataset described by `dataset_str`; items are (image, target)."""
    name, kwargs = parse_dataset_str(dataset_str)
    factory = DATASETS.lookup(name, where=f" in '{dataset_str}'")
    _reject_unaccepted_keys(factory, name, dataset_str, kwargs)
    return factory(transform=transform, target_transform=target_transform, **kwargs)


def make_pipeline(cfg: DictConfig) -> Pipeline:
    """The pipeline named by `cfg.train.pipeline`, built from `cfg`."""
    return PIPELINES.lookup(cfg.train.pipeline, what="train.pipeline")(cfg)
