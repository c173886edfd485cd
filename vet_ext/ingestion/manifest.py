"""DATA/manifest.parquet: the columnar index of every cached image, its schema, writer and reader.

prepare writes it, the datasets and the viz commands read it, and benches fake it at scale; all
of them go through this module, so the column names, the split names, the metadata stored in
the Parquet schema (label and PHI columns, cache size, where the shards are) and the format
version are defined once. Rows are sorted by study, then view (in `VIEW_CODES` order), image and
frame: a study's views are contiguous, which is what lets the datasets index studies by offsets.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write
from vet_ext.ingestion.views import VIEW_CODES

MANIFEST_NAME = "manifest.parquet"
FORMAT_VERSION = 1
SCHEMA_METADATA_KEY = b"vet_dino"  # Parquet schema metadata: label/PHI column names, cache size, shards
SHARDS_DIR = "shards"
SPLITS = ("train", "val", "test")
# One row per cached image (a multi-frame file gives several); labels, `split` and phi_* are added.
IMAGE_COLUMN_TYPES = {
    "study_id": str, "image_id": str, "frame": np.int32, "view": str, "body_part": str, "species": str,
    "pixel_spacing_x": np.float64, "pixel_spacing_y": np.float64, "source_path": str,
    "shard": np.int32, "offset": np.int64, "height": np.int32, "width": np.int32,
}  # fmt: skip


@dataclass(frozen=True)
class ManifestInfo:
    """What the schema metadata says about a prepared DATA/ folder."""

    path: Path
    label_columns: list[str]
    phi_columns: list[str]
    cache_size: int | None
    shards_dir: Path


def write_manifest(
    table: pd.DataFrame | pa.Table, root: str | Path, *, cache_size: int, label_columns: list[str],
) -> Path:  # fmt: skip
    """Write the manifest of DATA folder `root` atomically (a reader never sees half a file)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    metadata = {
        "format_version": FORMAT_VERSION, "cache_size": cache_size, "shards_dir": SHARDS_DIR,
        "label_columns": list(label_columns), "phi_columns": [c for c in table.column_names if c.startswith("phi_")],
    }  # fmt: skip
    schema_metadata = {**(table.schema.metadata or {}), SCHEMA_METADATA_KEY: json.dumps(metadata).encode()}
    table = table.replace_schema_metadata(schema_metadata)
    return atomic_write(Path(root) / MANIFEST_NAME, lambda file: pq.write_table(table, file, compression="zstd"))


def open_manifest(root: str | Path, who: str) -> ManifestInfo:
    """The manifest of `root`, checked; `who` (a dataset or command name) starts every error line."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{who}: root '{root}' does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UserError(
            f"{who}: no {MANIFEST_NAME} in '{root}'; create it with: python -m vet_ext.prepare --dicom-root RAW --out {root}"
        )
    metadata = json.loads((pq.read_schema(path).metadata or {}).get(SCHEMA_METADATA_KEY, b"{}"))
    version = metadata.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise UserError(f"{who}: {path} has format version {version}; this vet_ext reads up to {FORMAT_VERSION}, upgrade it")
    return ManifestInfo(
        path=path,
        label_columns=list(metadata.get("label_columns", [])),
        phi_columns=list(metadata.get("phi_columns", [])),
        cache_size=metadata.get("cache_size"),
        shards_dir=root / metadata.get("shards_dir", SHARDS_DIR),
    )


def check_split(split: str, who: str) -> str:
    if split not in SPLITS:
        raise UserError(f"{who}: unknown split '{split}'; valid splits: {', '.join(SPLITS)}")
    return split


def read_manifest(info: ManifestInfo, columns: list[str], split: str | None = None) -> pa.Table:
    """Only the given columns (of one split's rows, if given), in manifest order."""
    filters = None if split is None else [("split", "=", split)]
    return pq.read_table(info.path, columns=columns, filters=filters)


# ----------------------------------------------------------------------------- building the table


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A user's CSV (image list, labels) as strings, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc})") from exc
    absent = [c for c in required if c not in table.columns]
    if absent:
        raise UserError(f"{path}: missing column(s) {', '.join(absent)}; columns are {', '.join(table.columns)}")
    return table


def _hash_id(salt: str, value: str) -> str:
    return hashlib.sha256(f"{salt}\x00{value}".encode("utf-8")).hexdigest()


def assign_split(study_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A study's split from a hash of (seed, id): independent of every other study, hence stable under growth."""
    digest = hashlib.sha256(f"{seed}\x00{study_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_labels(path: Path, reserved: Iterable[str]) -> pd.DataFrame:
    """labels CSV -> frame indexed by study_id; 0/1 (integer) columns stay integer with -1 for missing."""
    table = read_csv(path, required=("study_id",))
    clash = sorted(set(table.columns) & (set(reserved) - {"study_id"}))
    if clash:
        raise UserError(f"{path}: label column(s) {', '.join(clash)} clash with manifest columns")
    duplicated = table["study_id"][table["study_id"].duplicated()].unique()
    if len(duplicated):
        raise UserError(f"{path}: study_id listed more than once: {', '.join(map(str, duplicated[:5]))}")
    table = table.set_index("study_id")
    for column in table.columns:
        try:
            values = pd.to_numeric(table[column])
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path}: label column '{column}' is not numeric ({exc})") from exc
        present = values.dropna()
        is_integer = bool(np.all(np.mod(present, 1) == 0)) if len(present) else True
        table[column] = values.fillna(-1).astype(np.int64) if is_integer else values.astype(np.float64)
    return table


def _missing_label_value(dtype: np.dtype) -> Any:
    return -1 if np.issubdtype(dtype, np.integer) else np.nan


def _view_rank(views: pd.Series) -> pd.Series:
    return views.map({code: rank for rank, code in enumerate(VIEW_CODES)}).fillna(len(VIEW_CODES))


def build_manifest(
    image_columns: dict[str, list], *, seed: int, val_fraction: float, test_fraction: float,
    labels: Path | None = None, keep_phi: bool = False, salt: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:  # fmt: skip
    """Image rows -> the manifest table: sorted, split, labelled, ids hashed with `salt` when one is given."""
    phi = image_columns.pop("phi")
    frame = pd.DataFrame(image_columns).astype(IMAGE_COLUMN_TYPES)
    if keep_phi:
        for key in sorted({k for entry in phi for k in entry}):
            frame[f"phi_{key}"] = [entry.get(key, "") for entry in phi]
    frame["_rank"] = _view_rank(frame["view"])
    frame = frame.sort_values(["study_id", "_rank", "image_id", "frame", "source_path"], kind="stable")
    frame = frame.drop(columns="_rank").reset_index(drop=True)

    studies = pd.Series(frame["study_id"].unique())
    split_of = {s: assign_split(s, seed, val_fraction, test_fraction) for s in studies}
    frame["split"] = frame["study_id"].map(split_of).astype(str)

    label_info: dict[str, Any] = {"columns": []}
    if labels is not None:
        table = read_labels(labels, frame.columns)
        label_info = {
            "columns": list(table.columns),
            "studies_without_labels": int((~studies.isin(table.index)).sum()),
            "label_rows_without_images": int((~table.index.isin(studies)).sum()),
        }
        joined = table.reindex(frame["study_id"])
        for column in table.columns:
            missing = _missing_label_value(table[column].dtype)
            frame[column] = joined[column].fillna(missing).to_numpy().astype(table[column].dtype)

    if salt is not None:
        frame = frame.drop(columns="source_path")
        for column in ("study_id", "image_id"):
            unique = frame[column].unique()
            frame[column] = frame[column].map(dict(zip(unique, (_hash_id(salt, v) for v in unique))))
    return frame, label_info
