"""The inputs of prepare: finding the files (a DICOM tree, or a CSV of image exports) and decoding one.

Decoding runs in worker processes and must never raise: a file that cannot be read becomes a
`Decoded` with a (reason, detail) pair, which prepare writes to errors.csv and moves on. Results
come back in task order, so shard offsets never depend on worker timing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageSequence, UnidentifiedImageError

from dinov2.utils.errors import UserError
from vet_ext.ingestion.cache import to_cache_image
from vet_ext.ingestion.dicom import DicomError, read_dicom
from vet_ext.ingestion.manifest import read_csv
from vet_ext.ingestion.views import VIEW_CODES
from vet_ext.ingestion.windowing import percentile_window

# Files that are plainly something else when they also lack the DICM preamble: skipped, not errors.
NON_DICOM_SUFFIXES = frozenset(
    ".csv .tsv .txt .json .md .rst .xml .html .htm .log .yaml .yml .ini .pdf .py .parquet .zip .gz "
    ".png .jpg .jpeg .tif .tiff .bmp".split()
)


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
    decoder: dict[str, str] | None = None  # {"syntax", "decoder"}: reported per syntax in prepare.json


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
    table = read_csv(csv_path, required=("path", "study_id"))
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


# ----------------------------------------------------------------------------- decoding (worker side)


def read_image_frames(path: str) -> list[np.ndarray]:
    """PNG/JPEG/TIFF export -> float32 frames in [0, 1]; 8-bit is taken as displayed, deeper is windowed."""
    try:
        with Image.open(path) as image:
            frames = []
            for frame in ImageSequence.Iterator(image):
                if frame.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    frames.append(percentile_window(np.asarray(frame)).astype(np.float32))
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
            dicom = read_dicom(task.abs_path, display_size=task.cache_size)
            frames = dicom.frames
            base = {
                "study_id": dicom.study_id, "image_id": dicom.image_id, "view": dicom.view,
                "body_part": dicom.body_part or "", "species": dicom.species or "",
            }  # fmt: skip
            spacing = dicom.pixel_spacing
            # the file's own size: a codec may have decoded at a reduced resolution
            source_shape = (dicom.rows, dicom.columns) if dicom.rows and dicom.columns else None
            phi = dicom.phi if task.keep_phi else None
            decoder = {"syntax": dicom.transfer_syntax, "decoder": dicom.decoder}
            level = dicom.resolution_level if source_shape else 0
        else:
            frames = read_image_frames(task.abs_path)
            base = {
                "study_id": task.study_id, "image_id": task.image_id, "view": task.view, "body_part": "", "species": "",
            }  # fmt: skip
            spacing, source_shape, phi, level = None, None, None, 0
            decoder = {"syntax": Path(task.abs_path).suffix.lower().lstrip(".") or "image", "decoder": "pillow"}
        images = []
        for index, frame in enumerate(frames):
            cached = to_cache_image(frame, task.cache_size, level=level, full_shape=source_shape)
            spacing_x, spacing_y = _cached_spacing(spacing, source_shape or frame.shape, cached.shape)
            meta = {**base, "frame": index, "pixel_spacing_x": spacing_x, "pixel_spacing_y": spacing_y}
            if phi is not None:
                meta["phi"] = {k: str(v) for k, v in phi.items()}
            images.append((meta, cached))
        return Decoded(images, decoder=decoder)
    except (DicomError, ImageSourceError) as exc:
        return Decoded([], (exc.reason, exc.detail))
    except Exception as exc:  # noqa: BLE001 - one odd file must never stop a long run
        return Decoded([], ("unexpected error", f"{type(exc).__name__}: {exc}"))


# glibc's mallopt parameters (malloc.h) and the values a decode worker runs with
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
WORKER_MMAP_THRESHOLD = 32 * 2**20  # above one 2560 x 2048 float32 frame (20 MiB): every frame buffer comes from the heap
WORKER_TRIM_THRESHOLD = 512 * 2**20  # freed frame buffers stay mapped for the next file


def keep_frame_buffers() -> bool:
    """Make this process reuse freed frame-sized buffers instead of mapping fresh pages per file.

    A full-size radiograph passes through buffers of 10-40 MiB (stored values, display values,
    the resize's input). glibc serves blocks that large with mmap and, by thresholds it adapts to
    the process's history, gives them back on free, so a forked worker faulted ~1,200 fresh zeroed
    pages in per file (measured on 2 cores, 96 lossless-JPEG files: 111k faults in 2 workers vs 2k
    in one process, 23 % more CPU for the same files, 1.4x the one-worker rate instead of ~2x).
    With both thresholds fixed (which also stops glibc's adjustment) the buffers are reused.
    False where there is no glibc (macOS, musl): nothing changes there.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # no such library, or a libc without mallopt
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD))


def decode_all(tasks: list[DecodeTask], workers: int) -> Iterator[Decoded]:
    """Results in task order, so shard offsets do not depend on worker timing.

    One file is one task (a file takes tens of milliseconds, sending a task far less), so no
    worker waits idle at the end while the other finishes a chunk of several files.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(decode_source, tasks)
        return
    with multiprocessing.get_context().Pool(workers, initializer=keep_frame_buffers) as pool:
        yield from pool.imap(decode_source, tasks, chunksize=1)
