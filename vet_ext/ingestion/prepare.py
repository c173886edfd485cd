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
import importlib.metadata
import json
import os
import secrets
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
from tqdm import tqdm

from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write_text
from vet_ext.ingestion.cache import SHARD_BYTES, ShardWriter, read_records
from vet_ext.ingestion.manifest import (
    FORMAT_VERSION, IMAGE_COLUMN_TYPES, MANIFEST_NAME, SHARDS_DIR, SPLITS, build_manifest, write_manifest,
)  # fmt: skip
from vet_ext.ingestion.sources import DecodeTask, Source, decode_all, scan_dicom_tree, scan_images_csv

ERRORS_NAME = "errors.csv"
SUMMARY_NAME = "prepare.json"
SALT_NAME = ".salt"
STATE_DIR = ".state"
KILL_HOOK_ENV = "VET_PREPARE_KILL_AFTER_FILES"
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


# ----------------------------------------------------------------------------- outputs


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in (*IMAGE_COLUMN_TYPES, "phi")}


def collect_images(
    records: Iterable[dict[str, Any]], current: dict[str, dict[str, Any]]
) -> tuple[dict[str, list], list[dict[str, str]], dict[str, dict[str, int]]]:
    """Columns of every image row, the errors, and the files per decoder (per transfer syntax), of
    the records whose file is still in the tree unchanged."""
    columns, errors, decoders = _empty_columns(), [], {}
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if current.get(record["key"]["path"]) == record["key"]:
            latest[record["key"]["path"]] = record
    for path in sorted(latest):
        record = latest[path]
        if record["error"] is not None:
            errors.append({"path": path, **record["error"]})
            continue
        if record.get("decoder"):
            per_syntax = decoders.setdefault(record["decoder"]["syntax"], {})
            per_syntax[record["decoder"]["decoder"]] = per_syntax.get(record["decoder"]["decoder"], 0) + 1
        for row in record["images"]:
            for name in IMAGE_COLUMN_TYPES:
                columns[name].append(path if name == "source_path" else row[name])
            columns["phi"].append(row.get("phi", {}))
    return columns, errors, decoders


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
    columns, errors, decoders = collect_images(records, current)
    manifest, label_info = build_manifest(
        columns, seed=config.seed, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
        labels=config.labels, keep_phi=config.keep_phi, salt=salt,
    )  # fmt: skip
    write_manifest(manifest, out, cache_size=config.cache_size, label_columns=label_info["columns"])
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
        "decoders": {syntax: dict(sorted(counts.items())) for syntax, counts in sorted(decoders.items())},
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
    started = last_checkpoint = time.perf_counter()
    between_files = True
    try:
        with tqdm(total=len(tasks), desc="prepare", unit="file", disable=not config.progress) as progress:
            for source, result in zip(todo, decode_all(tasks, config.workers or _default_workers())):
                between_files = False
                rows = []
                for meta, image in result.images:
                    shard, offset = writer.append_image(image)
                    height, width = image.shape
                    rows.append({**meta, "shard": shard, "offset": offset, "height": height, "width": width})
                error = None if result.error is None else {"reason": result.error[0], "detail": result.error[1]}
                writer.append_record({"key": source.key, "images": rows, "error": error, "decoder": result.decoder})
                between_files = True
                counters["files_decoded"] += 1
                counters["images_decoded"] += len(rows)
                progress.update(1)
                elapsed = time.perf_counter() - started
                progress.set_postfix_str(f"{counters['images_decoded'] / elapsed:.1f} images/s", refresh=False)
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
