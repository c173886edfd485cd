"""Benchmark: prepare throughput on full-size DX radiographs (2048 x 2560, 16-bit).

Decoding is the one cost of `vet_ext.ingestion.prepare` that scales with the archive, so this measures
images per second for --workers 1 and 2 on uncompressed files and on JPEG Lossless (process 14)
files, the common archive syntax (encoded by the project's own writer, `vet_ext.ingestion.dicom_write`).
Files are copies of one synthetic image with new UIDs, so every file costs the same to decode.
Target: >= 15 images/s per core, uncompressed.

    .venv/bin/python bench/prepare_throughput.py [--files 48] [--jpeg-files 12] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from machine import print_load_after, print_run_header, print_targets  # bench/machine.py
from vet_ext.ingestion.dicom_write import write_dicom
from vet_ext.ingestion.prepare import PrepareConfig, prepare

ROWS, COLUMNS = 2560, 2048
TARGET_PER_CORE = 15.0


def radiograph_like(seed: int = 0) -> np.ndarray:
    """Smooth anatomy-scale structure plus quantum-like noise: compresses like a real radiograph."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    body = 20000 + 15000 * np.sin(xx / 300) * np.cos(yy / 400)
    return np.clip(body + rng.normal(0, 500, (ROWS, COLUMNS)), 0, 65535).astype(np.uint16)


def write_tree(root: Path, syntax: str, n_files: int, pixels: np.ndarray) -> float:
    """n_files DICOM files (two views per study) of the same pixels; returns seconds spent."""
    started = time.perf_counter()
    template = write_dicom(
        root / "template.dcm", pixels, study_uid="1.2.826.0.1.1", sop_uid="1.2.826.0.1.1.1", view_position="LL",
        photometric="MONOCHROME2", bits_stored=16, transfer_syntax=syntax, WindowCenter=20000, WindowWidth=30000,
        PixelSpacing=[0.15, 0.15],
    )  # fmt: skip
    dataset = pydicom.dcmread(template)
    template.unlink()
    for index in range(n_files):
        study = f"1.2.826.0.1.{index // 2 + 2}"
        dataset.StudyInstanceUID = study
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = f"{study}.{index % 2}"
        dataset.ViewPosition = ("LL", "VD")[index % 2]
        (root / study).mkdir(exist_ok=True)
        dataset.save_as(root / study / f"{index % 2}.dcm", enforce_file_format=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=48, help="uncompressed files")
    parser.add_argument("--jpeg-files", type=int, default=12, help="JPEG Lossless files (0 to skip)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache-size", type=int, default=512)
    args = parser.parse_args()
    print_run_header(np)
    pixels = radiograph_like()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax, count in (("uncompressed", ExplicitVRLittleEndian, args.files), ("JPEG Lossless SV1", JPEGLosslessSV1, args.jpeg_files)):
            if count == 0:
                continue
            raw = Path(tmp) / name.split()[0]
            raw.mkdir()
            seconds = write_tree(raw, syntax, count, pixels)
            megabytes = sum(p.stat().st_size for p in raw.rglob("*.dcm")) / count / 2**20
            print(f"{name}: {count} files of {ROWS}x{COLUMNS} 16-bit, {megabytes:.1f} MiB each, written in {seconds:.1f} s")
            for workers in args.workers:
                out = Path(tmp) / f"out-{name.split()[0]}-{workers}"
                config = PrepareConfig(out=out, dicom_root=raw, workers=workers, cache_size=args.cache_size, progress=False)
                started = time.perf_counter()
                summary = prepare(config)
                wall = time.perf_counter() - started
                counts = summary["counts"]
                assert counts["images"] == count and counts["errors"] == 0, counts
                per_second = counts["images_per_s"]
                results.append((name, workers, per_second, per_second / workers, count / wall))
    print(f"{'files':<20}{'workers':>8}{'images/s':>10}{'per worker':>12}{'incl. outputs':>15}")
    for name, workers, per_second, per_worker, overall in results:
        print(f"{name:<20}{workers:>8}{per_second:>10.1f}{per_worker:>12.1f}{overall:>15.1f}")
    uncompressed = [r[3] for r in results if r[0] == "uncompressed"]
    if uncompressed:
        best = min(uncompressed)
        goal = f">= {TARGET_PER_CORE:.0f} images/s per core uncompressed"
        print_targets((goal, best >= TARGET_PER_CORE, f"lowest {best:.1f} per worker"))
    print_load_after()
    return 0


if __name__ == "__main__":
    sys.exit(main())
