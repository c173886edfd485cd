"""Datasets over a prepared DATA/ folder: whole studies for pretraining, single images for evaluation.

The index is columnar on purpose: a few numpy arrays (shard, offset, size, view, targets, study
boundaries) instead of one Python object per row. At millions of rows that keeps opening fast and
memory small, and forked DataLoader workers share the arrays' pages instead of copying them the
way reference counting copies pages full of Python objects. Pixels come from memory-mapped shards
opened lazily in each process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dinov2.data.registry import register_dataset, transform_item
from dinov2.utils.errors import UserError
from vet_ext.ingestion.cache import ShardReader
from vet_ext.ingestion.manifest import check_split, open_manifest, read_manifest
from vet_ext.ingestion.views import VIEW_CODES

_OTHER_VIEW = VIEW_CODES.index("OTHER")


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class _PreparedIndex:
    """Shared loading: manifest checks, label choice, split rows, and the pixel reader.

    Subclasses say which extra columns they need and turn the split's table into arrays in
    `_build`; the Arrow table is dropped right after, and its memory pool trimmed, so only the
    numpy arrays stay resident (and get inherited by forked workers).
    """

    name = "Vet"
    default_split = "train"
    extra_columns: tuple[str, ...] = ()

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        label: str | Sequence[str] | None = None,
        labels: str | Sequence[str] | None = None,
    ):
        split = self.default_split if split is None else split
        self.transform, self.target_transform = transform, target_transform
        self.root = Path(root)
        self.manifest = open_manifest(self.root, self.name)
        self.manifest_path = self.manifest.path
        self.split = check_split(split, self.name)
        self.label_columns: list[str] = self.manifest.label_columns
        self.target_columns, self.single_label = self._choose_labels(label, labels)
        self._reader = ShardReader(self.manifest.shards_dir)
        table = self._read([*self.extra_columns, "shard", "offset", "height", "width", "view", *self.target_columns])
        self._build(table)
        del table
        pa.default_memory_pool().release_unused()

    def _build(self, table: pa.Table) -> None:
        raise NotImplementedError

    def _choose_labels(
        self, label: str | Sequence[str] | None, labels: str | Sequence[str] | None
    ) -> tuple[list[str], bool]:
        """`label=x` -> one class label; repeated `label=` or `labels=a,b|all` -> a multi-hot vector."""
        if label is not None and labels is not None:
            raise UserError(f"{self.name}: give label= or labels=, not both")
        if label is not None:
            chosen, single = _as_list(label), isinstance(label, str)
        elif labels is not None and _as_list(labels) != ["all"]:
            chosen, single = [c for item in _as_list(labels) for c in item.split(",") if c], False
        else:
            chosen, single = list(self.label_columns), False
        unknown = [c for c in chosen if c not in self.label_columns]
        if unknown:
            valid = ", ".join(self.label_columns) or "none (prepare was run without --labels)"
            raise UserError(
                f"{self.name}: unknown label '{unknown[0]}' in {self.manifest_path}; valid labels: {valid}"
            )
        return chosen, single

    def _read(self, columns: list[str]) -> pa.Table:
        """Only the needed columns of this split's rows, in manifest order."""
        return read_manifest(self.manifest, columns, self.split)

    def _load_rows(self, table: pa.Table) -> None:
        self._shard = table.column("shard").to_numpy().astype(np.int32)
        self._offset = table.column("offset").to_numpy().astype(np.int64)
        self._height = table.column("height").to_numpy().astype(np.uint16)
        self._width = table.column("width").to_numpy().astype(np.uint16)
        view_index = pc.index_in(table.column("view"), value_set=pa.array(VIEW_CODES))
        self._view = pc.fill_null(view_index, _OTHER_VIEW).to_numpy().astype(np.int8)

    def _label_matrix(self, table: pa.Table) -> np.ndarray:
        """Targets as float32 [rows, labels]; a missing label (-1 or NaN in the manifest) becomes NaN."""
        matrix = np.empty((table.num_rows, len(self.target_columns)), dtype=np.float32)
        for j, column in enumerate(self.target_columns):
            values = table.column(column).to_numpy().astype(np.float32)
            if pa.types.is_integer(table.schema.field(column).type):
                values[values < 0] = np.nan
            matrix[:, j] = values
        return matrix

    def _image(self, row: int) -> torch.Tensor:
        pixels = self._reader.read(self._shard[row], self._offset[row], self._height[row], self._width[row])
        return torch.from_numpy(np.array(pixels)).unsqueeze(0)

    def _column_strings(self, column: str, rows: np.ndarray | None = None) -> np.ndarray:
        values = self._read([column]).column(column)
        if rows is not None:
            values = values.take(pa.array(rows))
        return values.to_numpy(zero_copy_only=False)


@register_dataset("VetStudies")
class VetStudies(_PreparedIndex):
    """One item per study: all its cached views, in manifest order (view code, then image id).

    Items are `(views, target)`: `views` is a list of uint8 tensors [1, H, W] (sizes may differ) and
    `target` a float tensor of the chosen labels (all label columns by default; NaN = missing).
    `transform`, if given, receives the whole list so multi-view augmentation can pair the views.
    """

    name = "VetStudies"
    extra_columns = ("study_id",)

    def _build(self, table: pa.Table) -> None:
        """Group rows by study: a stable argsort of dictionary codes keeps manifest order inside a study."""
        codes = pc.dictionary_encode(table.column("study_id")).combine_chunks().indices.to_numpy()
        self._order = np.argsort(codes, kind="stable").astype(np.int32 if len(codes) < 2**31 else np.int64)
        sorted_codes = codes[self._order]
        starts = np.flatnonzero(sorted_codes[1:] != sorted_codes[:-1]) + 1
        boundaries = [[0], starts, [len(codes)]] if len(codes) else [[0]]
        self._study_offsets = np.concatenate(boundaries).astype(np.int64)
        table = table.drop_columns(["study_id"]).take(pa.array(self._order))
        self._load_rows(table)
        self._targets = self._label_matrix(table.take(pa.array(self._study_offsets[:-1])))

    def __len__(self) -> int:
        return len(self._study_offsets) - 1

    def _rows(self, index: int) -> range:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: study {index} out of range ({len(self)} studies)")
        index %= len(self)
        return range(self._study_offsets[index], self._study_offsets[index + 1])

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor] | Any, torch.Tensor | Any]:
        views = [self._image(row) for row in self._rows(index)]
        target = torch.from_numpy(self._targets[index].copy())
        return transform_item(views, target, self.transform, self.target_transform)

    def view_codes(self, index: int) -> list[str]:
        return [VIEW_CODES[code] for code in self._view[self._rows(index).start : self._rows(index).stop]]

    def get_targets(self) -> np.ndarray:
        """float32 [studies, labels], NaN where a study has no label."""
        return self._targets

    @property
    def study_ids(self) -> np.ndarray:
        """One id per study, read on demand (training never needs the strings)."""
        return self._column_strings("study_id", self._order[self._study_offsets[:-1]])

    @property
    def image_ids(self) -> np.ndarray:
        """Every image id in dataset order; study i owns `image_ids[study_offsets[i]:study_offsets[i+1]]`."""
        return self._column_strings("image_id", self._order)

    @property
    def study_offsets(self) -> np.ndarray:
        return self._study_offsets


@register_dataset("VetImages")
class VetImages(_PreparedIndex):
    """One item per cached image (frame), for evaluation: `(uint8 tensor [1, H, W], target)`.

    With a single `label=x` the target is an int class (-1 when missing); with several labels,
    `labels=a,b` or `labels=all` (also the default) it is a float multi-hot vector (NaN = missing).
    """

    name = "VetImages"
    default_split = "val"

    def _build(self, table: pa.Table) -> None:
        self._load_rows(table)
        if self.single_label:
            self._targets = table.column(self.target_columns[0]).to_numpy()
            if pa.types.is_integer(table.schema.field(self.target_columns[0]).type):
                self._targets = self._targets.astype(np.int64)
        else:
            self._targets = self._label_matrix(table)

    def __len__(self) -> int:
        return len(self._shard)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Any, int | float | torch.Tensor | Any]:
        image = self._image(index)
        if self.single_label:
            target: int | float | torch.Tensor = self._targets[index].item()
        else:
            target = torch.from_numpy(self._targets[index].copy())
        return transform_item(image, target, self.transform, self.target_transform)

    def view_codes(self, index: int) -> list[str]:
        return [VIEW_CODES[self._view[index]]]

    def get_targets(self) -> np.ndarray:
        """int64 [images] for one label (-1 = missing), else float32 [images, labels] (NaN = missing)."""
        return self._targets

    @property
    def study_ids(self) -> np.ndarray:
        return self._column_strings("study_id")

    @property
    def image_ids(self) -> np.ndarray:
        return self._column_strings("image_id")
