"""The SSL batch: what every collate returns and what the meta-architecture and trainer read.

Upstream passes a plain dict, so its key names are spelled wherever a batch is read and each reader
recomputes the crop layout from tensor shapes. Here the names are fields and the layout is
derived once, next to them. The names stay valid as keys (`batch["collated_masks"]`, `keys()`,
`items()`), so code written against upstream keeps working, and a batch in upstream's dict format
becomes an `SSLBatch` once, where it enters (`SSLBatch.from_mapping`).

The batch is deliberately not a `Mapping`: DataLoader's pinning rebuilds a mapping it cannot
construct as a plain dict, while any other object with a `pin_memory()` keeps its type.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, TypeVar

import torch
from torch import Tensor

BatchT = TypeVar("BatchT", bound="SSLMasks")

UPSTREAM_GLOBAL_CROPS = 2  # a batch that does not say how many global crops each image has is upstream's


@dataclass(frozen=True, eq=False, kw_only=True)
class SSLMasks:
    """The part of an SSL batch a masking collate draws: the iBOT masks and the rows they sit on.

    It is a batch of its own for a pipeline whose crops are made later (on the training device),
    and the base of `SSLBatch`. Global-crop rows are crop-major: row crop * n_images + image.
    """

    collated_masks: Tensor  # bool [n_global_crops * n_images, n_tokens]
    mask_indices_list: Tensor  # int64 [n_masked]: flat indices of the masked tokens of collated_masks
    masks_weight: Tensor  # float32 [n_masked]: 1 / (masked tokens of that token's crop)
    n_masked_patches: Tensor  # int64 [1]
    upperbound: int  # the most tokens the drawn ratios could mask
    teacher_global_index: Tensor  # int64 [n_teacher_crops * n_images]: global-crop rows the teacher sees, crop-major
    n_global_crops: int  # per image

    @property
    def n_images(self) -> int:
        return self.collated_masks.shape[0] // self.n_global_crops

    @property
    def n_teacher_crops(self) -> int:
        """Global crops per image that the teacher also sees."""
        return self.teacher_global_index.shape[0] // self.n_images

    @classmethod
    def from_masks(cls: type[BatchT], masks: SSLMasks, **fields: Any) -> BatchT:
        """A batch carrying `masks`' fields and `fields`: how a collate or a device stage adds its part."""
        return cls(**{f.name: getattr(masks, f.name) for f in dataclasses.fields(SSLMasks)}, **fields)

    # upstream's dict access
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    # the transfer: counts (int fields) stay on the host; every other field is a tensor or moves like one
    def to(self: BatchT, device: torch.device | str, non_blocking: bool = False) -> BatchT:
        return dataclasses.replace(
            self,
            **{key: value.to(device, non_blocking=non_blocking) for key, value in self.items() if not isinstance(value, int)},
        )

    def pin_memory(self: BatchT) -> BatchT:
        """Called by DataLoader(pin_memory=True), so that `to(..., non_blocking=True)` is asynchronous."""
        return dataclasses.replace(self, **{key: value.pin_memory() for key, value in self.items() if not isinstance(value, int)})


@dataclass(frozen=True, eq=False, kw_only=True)
class SSLBatch(SSLMasks):
    """One training batch: every image's crops, stacked crop-major, and their masks."""

    collated_global_crops: Tensor  # [n_global_crops * n_images, 3, H, W]
    collated_local_crops: Tensor  # [n_local_crops * n_images, 3, h, w]; 0 rows without local crops

    @property
    def n_local_crops(self) -> int:
        return self.collated_local_crops.shape[0] // self.n_images

    @property
    def n_loss_terms(self) -> int:
        """(student crop, teacher crop) pairs per image, a crop never paired with itself: the [CLS] loss normaliser."""
        return (self.n_global_crops + self.n_local_crops) * self.n_teacher_crops - self.n_teacher_crops

    @classmethod
    def from_mapping(cls, batch: SSLBatch | Mapping[str, Any]) -> SSLBatch:
        """The typed batch of a dict in upstream's format (users' collates, stored batches); an
        `SSLBatch` as it is, so every reader can call this where a batch enters.

        Upstream's dict has neither `teacher_global_index` nor `n_global_crops`: its teacher sees
        every one of its 2 global crops per image. Other keys are not part of the batch and are left out.
        """
        if isinstance(batch, SSLBatch):
            return batch
        global_crops = batch["collated_global_crops"]
        defaults = {
            "teacher_global_index": torch.arange(global_crops.shape[0], device=global_crops.device),
            "n_global_crops": UPSTREAM_GLOBAL_CROPS,
        }
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in batch and name not in defaults]
        if missing:
            raise KeyError(f"an SSL batch needs {', '.join(missing)}; it has {', '.join(batch)}")
        fields = {name: batch[name] if name in batch else defaults[name] for name in names}
        fields["n_global_crops"] = int(fields["n_global_crops"])  # a count, read on the host
        return cls(**fields)
