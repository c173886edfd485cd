"""Tree of radiographs -> DATA/: image shards, `manifest.parquet`, `errors.csv`, `prepare.json`.

Decoding DICOM is the expensive step of every epoch if done on the fly, so it happens once here:
each frame is windowed, shrunk to `cache_size` on its long side and stored as raw uint8 in
memory-mappable shards (see `vet_ext.ingestion.cache`). The manifest is the columnar index the datasets read.

Runs are idempotent and resumable. Every source file, good or bad, leaves one committed record
keyed by relative path + size + mtime, so a re-run decodes only files that are new or changed, and
a run killed at any moment resumes from its last commit. The manifest is rebuilt from those records
(sorted, never in arrival order), so a resumed run ends with the same manifest as an uninterrupted one.

Nothing patient-identifying leaves the decoder unless `keep_phi` is set. Splits are decided per
study from a hash of (seed, study id), so a study never moves split when the tree grows.

Test hook: with `VET_PREPARE_KILL_AFTER_FILES=N` in the environment the process SIGKILLs itself
right after writing the N-th decoded file's (uncommitted) bytes, to exercise crash recovery.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import secrets
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageSequence, UnidentifiedImageError
from tqdm import tqdm

from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write_bytes, atomic_write_text
from vet_ext.ingestion.cache import (
    FORMAT_VERSION, MANIFEST_NAME, SCHEMA_METADATA_KEY, SHARD_BYTES, SHARDS_DIR, SPLITS, ShardWriter,
    read_records, to_cache_image,
)  # fmt: skip
from vet_ext.ingestion.dicom import DicomError, read_dicom
from vet_ext.ingestion.views import VIEW_CODES

ERRORS_NAME = "errors.csv"
SUMMARY_NAME = "prepare.json"
SALT_NAME = ".salt"
STATE_DIR = ".state"
KILL_HOOK_ENV = "VET_PREPARE_KILL_AFTER_FILES"
IMAGE_COLUMN_TYPES = {
    "study_id": str, "image_id": str, "frame": np.int32, "view": str, "body_part": str, "species": str,
    "pixel_spacing_x": np.float64, "pixel_spacing_y": np.float64, "source_path": str,
    "shard": np.int32, "offset": np.int64, "height": np.int32, "width": np.int32,
}  # fmt: skip
# Files that are plainly something else when they also lack the DICM preamble: skipped, not errors.
NON_DICOM_SUFFIXES = frozenset(
    ".csv .tsv .txt .json .md .rst .xml .html .htm .log .yaml .yml .ini .pdf .py .parquet .zip .gz "
    ".png .jpg .jpeg .tif .tiff .bmp".split()
)
OUTPUT_NAMES = frozenset({MANIFEST_NAME, ERRORS_NAME, SUMMARY_NAME})


@dataclass
class PrepareConfig:
    """Everything a prepare run depends on; exactly one of `dicom_root` / `images_csv` is the source."""

    out: Path
    dicom_root: Path | None = None
    images_csv: Path | None = None
    labels: Path | None = None
    workers: int | None = None
    cache_size: int = 512
    split_by: str = "study"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    keep_phi: bool = False
    hash_ids: bool = False
    salt: str | None = field(default=None, repr=False)
    shard_bytes: int = SHARD_BYTES
    commit_every: int = 64
    checkpoint_seconds: float = 300.0
    progress: bool = True


@dataclass(frozen=True)
class Source:
    """One input file; `key` identifies its content for resumption (path, size, mtime + CSV metadata)."""

    path: str
    abs_path: str
    key: dict[str, Any]


@dataclass(frozen=True)
class DecodeTask:
    kind: str  # "dicom" or "image"
    abs_path: str
    cache_size: int
    keep_phi: bool
    study_id: str = ""  # study_id, image_id and view come from the CSV for image exports
    image_id: str = ""
    view: str = ""


@dataclass
class Decoded:
    """What a worker sends back: cache-ready frames with their metadata, or the reason it failed."""

    images: list[tuple[dict[str, Any], np.ndarray]]
    error: tuple[str, str] | None = None


class ImageSourceError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- scanning


def _has_dicom_preamble(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def scan_dicom_tree(root: Path, exclude: Path | None = None) -> tuple[list[Source], int]:
    """All candidate files below `root` in sorted order, and how many plain non-DICOM files were skipped.

    Files are tried whatever their extension (archives often drop `.dcm`); only hidden files,
    DICOMDIR indexes, obviously foreign files without a DICM preamble and the `exclude` folder
    (an output folder placed inside the tree) are left out.
    """
    sources, skipped = [], 0
    excluded = Path(exclude).resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and Path(dirpath, d).resolve() != excluded
        )
        for name in sorted(filenames):
            abs_path = os.path.join(dirpath, name)
            if name.startswith(".") or name.upper() == "DICOMDIR" or not os.path.isfile(abs_path):
                skipped += 1
                continue
            if Path(name).suffix.lower() in NON_DICOM_SUFFIXES and not _has_dicom_preamble(abs_path):
                skipped += 1
                continue
            stat = os.stat(abs_path)
            rel = os.path.relpath(abs_path, root).replace(os.sep, "/")
            sources.append(Source(rel, abs_path, {"path": rel, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return sources, skipped


def _normalise_view(value: Any, where: str) -> str:
    text = "" if pd.isna(value) else str(value).strip().upper()
    if not text:
        return "UNKNOWN"
    if text not in VIEW_CODES:
        raise UserError(f"{where}: view '{value}' is not one of {', '.join(VIEW_CODES)}")
    return text


def scan_images_csv(csv_path: Path) -> tuple[list[Source], list[dict[str, str]]]:
    """Rows of an exported-images CSV (path, study_id[, view]); paths are relative to the CSV's folder.

    A listed file that does not exist is an error of that row, not of the whole run.
    """
    table = _read_csv(csv_path, required=("path", "study_id"))
    duplicated = table["path"][table["path"].duplicated()].unique()
    if len(duplicated):
        raise UserError(f"{csv_path}: path listed more than once: {', '.join(map(str, duplicated[:5]))}")
    base = Path(csv_path).parent
    sources, missing = [], []
    for row_number, row in enumerate(table.itertuples(index=False), start=2):
        rel, study_id = str(row.path), str(row.study_id).strip()
        if not study_id or study_id == "nan":
            raise UserError(f"{csv_path} line {row_number}: empty study_id for '{rel}'")
        view = _normalise_view(getattr(row, "view", None), f"{csv_path} line {row_number}")
        abs_path = str(base / rel)
        if not os.path.isfile(abs_path):
            missing.append({"path": rel, "reason": "missing file", "detail": f"no file at {abs_path}"})
            continue
        stat = os.stat(abs_path)
        key = {"path": rel, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "study_id": study_id, "view": view}
        sources.append(Source(rel, abs_path, key))
    return sources, missing


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
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


# ----------------------------------------------------------------------------- decoding (worker side)


def _percentile_window(pixels: np.ndarray) -> np.ndarray:
    """High-bit-depth exports carry no window; the robust range (0.5-99.5 %) stands in for one."""
    low, high = np.percentile(pixels, [0.5, 99.5])
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.float32)
    return np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)


def read_image_frames(path: str) -> list[np.ndarray]:
    """PNG/JPEG/TIFF export -> float32 frames in [0, 1]; 8-bit is taken as displayed, deeper is windowed."""
    try:
        with Image.open(path) as image:
            frames = []
            for frame in ImageSequence.Iterator(image):
                if frame.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    frames.append(_percentile_window(np.asarray(frame, dtype=np.float32)))
                else:
                    frames.append(np.asarray(frame.convert("L"), dtype=np.float32) / 255.0)
            return frames
    except UnidentifiedImageError as exc:
        raise ImageSourceError("not an image", str(exc)) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageSourceError("decode failed", f"{type(exc).__name__}: {exc}") from exc


def _cached_spacing(
    spacing: tuple[float, float] | None, source: tuple[int, int], cached: tuple[int, int]
) -> tuple[float, float]:
    """DICOM (row, column) spacing of the source -> (x, y) millimetres per pixel of the cached image."""
    if spacing is None:
        return float("nan"), float("nan")
    row_mm, col_mm = spacing
    return float(col_mm) * source[1] / cached[1], float(row_mm) * source[0] / cached[0]


def decode_source(task: DecodeTask) -> Decoded:
    """Decode one file into cache images; any failure becomes a (reason, detail) so the run goes on."""
    try:
        if task.kind == "dicom":
            dicom = read_dicom(task.abs_path)
            frames = dicom.frames
            base = {
                "study_id": dicom.study_id, "image_id": dicom.image_id, "view": dicom.view,
                "body_part": dicom.body_part or "", "species": dicom.species or "",
            }  # fmt: skip
            spacing = dicom.pixel_spacing
            phi = dicom.phi if task.keep_phi else None
        else:
            frames = read_image_frames(task.abs_path)
            base = {
                "study_id": task.study_id, "image_id": task.image_id, "view": task.view, "body_part": "", "species": "",
            }  # fmt: skip
            spacing, phi = None, None
        images = []
        for index, frame in enumerate(frames):
            cached = to_cache_image(frame, task.cache_size)
            spacing_x, spacing_y = _cached_spacing(spacing, frame.shape, cached.shape)
            meta = {**base, "frame": index, "pixel_spacing_x": spacing_x, "pixel_spacing_y": spacing_y}
            if phi is not None:
                meta["phi"] = {k: str(v) for k, v in phi.items()}
            images.append((meta, cached))
        return Decoded(images)
    except (DicomError, ImageSourceError) as exc:
        return Decoded([], (exc.reason, exc.detail))
    except Exception as exc:  # noqa: BLE001 - one odd file must never stop a long run
        return Decoded([], ("unexpected error", f"{type(exc).__name__}: {exc}"))


def _decode_all(tasks: list[DecodeTask], workers: int) -> Iterator[Decoded]:
    """Results in task order, so shard offsets do not depend on worker timing."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(decode_source, tasks)
        return
    chunksize = max(1, min(16, len(tasks) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(decode_source, tasks, chunksize=chunksize)


# ----------------------------------------------------------------------------- manifest


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
    table = _read_csv(path, required=("study_id",))
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
    config: PrepareConfig, image_columns: dict[str, list], salt: str | None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Committed image rows -> the manifest table (sorted, split, labelled, de-identified as asked)."""
    phi = image_columns.pop("phi")
    frame = pd.DataFrame(image_columns).astype(IMAGE_COLUMN_TYPES)
    if config.keep_phi:
        for key in sorted({k for entry in phi for k in entry}):
            frame[f"phi_{key}"] = [entry.get(key, "") for entry in phi]
    frame["_rank"] = _view_rank(frame["view"])
    frame = frame.sort_values(["study_id", "_rank", "image_id", "frame", "source_path"], kind="stable")
    frame = frame.drop(columns="_rank").reset_index(drop=True)

    studies = pd.Series(frame["study_id"].unique())
    split_of = {s: assign_split(s, config.seed, config.val_fraction, config.test_fraction) for s in studies}
    frame["split"] = frame["study_id"].map(split_of).astype(str)

    label_info: dict[str, Any] = {"columns": []}
    if config.labels is not None:
        labels = read_labels(config.labels, frame.columns)
        label_info = {
            "columns": list(labels.columns),
            "studies_without_labels": int((~studies.isin(labels.index)).sum()),
            "label_rows_without_images": int((~labels.index.isin(studies)).sum()),
        }
        joined = labels.reindex(frame["study_id"])
        for column in labels.columns:
            missing = _missing_label_value(labels[column].dtype)
            frame[column] = joined[column].fillna(missing).to_numpy().astype(labels[column].dtype)

    if config.hash_ids:
        frame = frame.drop(columns="source_path")
        for column in ("study_id", "image_id"):
            unique = frame[column].unique()
            frame[column] = frame[column].map(dict(zip(unique, (_hash_id(salt, v) for v in unique))))
    return frame, label_info


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in (*IMAGE_COLUMN_TYPES, "phi")}


def collect_images(
    records: Iterable[dict[str, Any]], current: dict[str, dict[str, Any]]
) -> tuple[dict[str, list], list[dict[str, str]]]:
    """Columns of every image row, and the errors, of records whose file is still in the tree unchanged."""
    columns, errors = _empty_columns(), []
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if current.get(record["key"]["path"]) == record["key"]:
            latest[record["key"]["path"]] = record
    for path in sorted(latest):
        record = latest[path]
        if record["error"] is not None:
            errors.append({"path": path, **record["error"]})
            continue
        for row in record["images"]:
            for name in IMAGE_COLUMN_TYPES:
                columns[name].append(path if name == "source_path" else row[name])
            columns["phi"].append(row.get("phi", {}))
    return columns, errors


def _write_parquet_atomic(frame: pd.DataFrame, path: Path, metadata: dict[str, Any]) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    schema_metadata = {**(table.schema.metadata or {}), SCHEMA_METADATA_KEY: json.dumps(metadata).encode()}
    table = table.replace_schema_metadata(schema_metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    atomic_write_bytes(path, buffer.getvalue())


def _resolve_salt(config: PrepareConfig) -> str | None:
    """The salt never enters the manifest; a generated one lives in DATA/.salt so re-runs hash alike."""
    if not config.hash_ids:
        return None
    if config.salt:
        return config.salt
    salt_path = Path(config.out) / SALT_NAME
    if salt_path.exists():
        return salt_path.read_text(encoding="utf-8").strip()
    salt = secrets.token_hex(16)
    atomic_write_text(salt_path, salt + "\n", mode=0o600)
    return salt


def _package_version() -> str:
    try:
        return importlib.metadata.version("vet-dino")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _settings(config: PrepareConfig) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "salt"}
    settings["salt"] = "given" if config.salt else ("generated" if config.hash_ids else None)
    return settings


def write_outputs(
    config: PrepareConfig, records: Iterable[dict], current: dict[str, dict], scan_errors: list[dict],
    salt: str | None, counters: dict[str, Any], timings: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """Rebuild manifest, errors and summary from the committed records and replace them atomically."""
    started = time.perf_counter()
    out = Path(config.out)
    columns, errors = collect_images(records, current)
    manifest, label_info = build_manifest(config, columns, salt)
    metadata = {
        "format_version": FORMAT_VERSION, "cache_size": config.cache_size, "shards_dir": SHARDS_DIR,
        "label_columns": label_info["columns"], "phi_columns": [c for c in manifest.columns if c.startswith("phi_")],
    }  # fmt: skip
    _write_parquet_atomic(manifest, out / MANIFEST_NAME, metadata)
    errors_frame = pd.DataFrame(errors + scan_errors, columns=["path", "reason", "detail"])
    errors_frame = errors_frame.sort_values("path", kind="stable")
    atomic_write_text(out / ERRORS_NAME, errors_frame.to_csv(index=False))
    study_splits = manifest.drop_duplicates("study_id")["split"].value_counts()
    summary = {
        "version": _package_version(),
        "format_version": FORMAT_VERSION,
        "settings": _settings(config),
        "counts": {
            **counters,
            "images": len(manifest),
            "studies": int(manifest["study_id"].nunique()),
            "source_images": int(manifest.drop_duplicates(["study_id", "image_id"]).shape[0]),
            "duplicate_image_ids": int(manifest.duplicated(["image_id", "frame"]).sum()),
            "views": {v: int(n) for v, n in manifest["view"].value_counts().sort_index().items()},
            "studies_per_split": {s: int(study_splits.get(s, 0)) for s in SPLITS},
            "errors": len(errors_frame),
            "errors_by_reason": {r: int(n) for r, n in errors_frame["reason"].value_counts().sort_index().items()},
        },
        "labels": label_info,
        "timings": {**timings, "outputs_s": round(time.perf_counter() - started, 3)},
    }
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- the run


def _validate(config: PrepareConfig) -> None:
    if (config.dicom_root is None) == (config.images_csv is None):
        raise UserError("give exactly one source: --dicom-root DIR or --images-csv FILE")
    if config.dicom_root is not None and not Path(config.dicom_root).is_dir():
        raise UserError(f"--dicom-root {config.dicom_root}: not a directory")
    if config.split_by != "study":
        raise UserError(f"--split-by {config.split_by}: only 'study' is supported")
    fractions = (config.val_fraction, config.test_fraction)
    if min(fractions) < 0 or sum(fractions) > 1:
        raise UserError(f"--val-fraction {fractions[0]} / --test-fraction {fractions[1]}: need >= 0 and a sum <= 1")
    if config.cache_size < 1:
        raise UserError(f"--cache-size {config.cache_size}: must be a positive number of pixels")
    if config.workers is not None and config.workers < 1:
        raise UserError(f"--workers {config.workers}: must be at least 1")
    if config.salt and not config.hash_ids:
        raise UserError("--salt only makes sense with --hash-ids")
    if config.labels is not None and not Path(config.labels).is_file():
        raise UserError(f"--labels {config.labels}: no such file")


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_task(source: Source, config: PrepareConfig) -> DecodeTask:
    kind = "dicom" if config.dicom_root is not None else "image"
    if kind == "dicom":
        return DecodeTask(kind, source.abs_path, config.cache_size, config.keep_phi)
    study_id, view = source.key["study_id"], source.key["view"]
    return DecodeTask(kind, source.abs_path, config.cache_size, config.keep_phi, study_id, source.path, view)


def _append_new_files(
    writer: ShardWriter, todo: list[Source], config: PrepareConfig, counters: dict[str, Any], checkpoint: Callable[[], None]
) -> None:
    """Decode `todo` in order, append pixels and one record per file, commit every `commit_every` files.

    Whatever stops the loop, only whole files get committed: an exception part-way through a
    file leaves its bytes as an uncommitted tail that the next run truncates.
    """
    tasks = [_decode_task(source, config) for source in todo]
    kill_after = int(os.environ.get(KILL_HOOK_ENV, "0"))
    last_checkpoint, between_files = time.perf_counter(), True
    try:
        with tqdm(total=len(tasks), desc="prepare", unit="file", disable=not config.progress) as progress:
            for source, result in zip(todo, _decode_all(tasks, config.workers or _default_workers())):
                between_files = False
                rows = []
                for meta, image in result.images:
                    shard, offset = writer.append_image(image)
                    height, width = image.shape
                    rows.append({**meta, "shard": shard, "offset": offset, "height": height, "width": width})
                error = None if result.error is None else {"reason": result.error[0], "detail": result.error[1]}
                writer.append_record({"key": source.key, "images": rows, "error": error})
                between_files = True
                counters["files_decoded"] += 1
                counters["images_decoded"] += len(rows)
                progress.update(1)
                if counters["files_decoded"] == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if counters["files_decoded"] % config.commit_every == 0:
                    writer.commit()
                    if time.perf_counter() - last_checkpoint > config.checkpoint_seconds:
                        checkpoint()
                        last_checkpoint = time.perf_counter()
    finally:
        writer.close(commit=between_files)


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Bring DATA/ up to date with the source tree; returns the summary also written to prepare.json."""
    _validate(config)
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    salt = _resolve_salt(config)
    kind = "dicom" if config.dicom_root is not None else "image"
    if kind == "dicom":
        sources, skipped = scan_dicom_tree(Path(config.dicom_root), exclude=out)
        scan_errors: list[dict] = []
    else:
        (sources, scan_errors), skipped = scan_images_csv(Path(config.images_csv)), 0
    current = {source.path: source.key for source in sources}
    scanned = time.perf_counter()

    settings = {"cache_size": config.cache_size, "keep_phi": config.keep_phi, "source": kind}
    writer = ShardWriter(out / SHARDS_DIR, out / STATE_DIR, settings, config.shard_bytes)
    done = {record["key"]["path"]: record["key"] for record in read_records(out / STATE_DIR)}
    todo = [s for s in sources if done.get(s.path) != s.key]
    counters: dict[str, Any] = {
        "files_scanned": len(sources) + len(scan_errors), "files_skipped_non_dicom": skipped,
        "files_decoded": 0, "files_reused": len(sources) - len(todo), "images_decoded": 0,
    }  # fmt: skip

    def checkpoint() -> None:
        write_outputs(config, read_records(out / STATE_DIR), current, scan_errors, salt, counters, {})

    _append_new_files(writer, todo, config, counters, checkpoint)
    decode_seconds = time.perf_counter() - scanned
    counters["images_per_s"] = round(counters["images_decoded"] / decode_seconds, 2) if decode_seconds > 0 else 0.0
    timings = {"scan_s": round(scanned - started, 3), "decode_s": round(decode_seconds, 3)}
    summary = write_outputs(config, read_records(out / STATE_DIR), current, scan_errors, salt, counters, timings)
    summary["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any], out: Path) -> str:
    counts = summary["counts"]
    views = ", ".join(f"{v} {n}" for v, n in counts["views"].items()) or "none"
    errors = ", ".join(f"{r} {n}" for r, n in counts["errors_by_reason"].items()) or "none"
    return (
        f"prepared {counts['images']} images of {counts['studies']} studies in {out} "
        f"(decoded {counts['files_decoded']} files, reused {counts['files_reused']}, "
        f"{counts['images_per_s']} images/s); views: {views}; errors: {errors}"
    )


def _parse_args(argv: list[str] | None) -> PrepareConfig:
    parser = argparse.ArgumentParser(prog="python -m vet_ext.prepare", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom-root", type=Path, help="folder searched recursively for DICOM files")
    source.add_argument("--images-csv", type=Path, help="CSV of PNG/JPEG/TIFF exports: path, study_id[, view]")
    parser.add_argument("--out", type=Path, required=True, help="DATA folder (created; re-runs update it)")
    parser.add_argument("--labels", type=Path, help="CSV with study_id and one numeric column per label")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--cache-size", type=int, default=512, help="long side of cached images, pixels")
    parser.add_argument("--split-by", choices=["study"], default="study")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--keep-phi", action="store_true", help="add patient-identifying columns (phi_*)")
    parser.add_argument("--hash-ids", action="store_true", help="replace study/image ids by salted SHA-256")
    parser.add_argument("--salt", help="salt for --hash-ids (default: generated once, kept in OUT/.salt)")
    parser.add_argument("--shard-mib", type=int, default=SHARD_BYTES >> 20, help="target shard size in MiB")
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "shard_mib"}
    return PrepareConfig(**values, shard_bytes=args.shard_mib << 20)


def main(argv: list[str] | None = None) -> int:
    config = _parse_args(argv)
    summary = prepare(config)
    print(format_summary(summary, config.out))
    return 0


if __name__ == "__main__":
    run_cli(main)
