"""Benchmark: open VetStudies / VetImages on a 5M-image, 700k-study manifest, and measure memory.

The question is whether the columnar index stays cheap at archive scale: how long opening takes
and how much memory the main process plus 8 forked DataLoader-like workers use once every worker
has touched the whole index (an epoch of random access does). RSS counts shared pages in every
process; PSS splits them fairly, so the sum of PSS is the real total; USS is each process's own.
No pixel data is needed: shard offsets are fake and no shard is ever opened.

    .venv/bin/python bench/index_scale.py [--images 5000000] [--studies 700000] [--workers 8]
"""
from __future__ import annotations

import argparse
import binascii
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from machine import print_load_after, print_run_header, print_targets  # bench/machine.py
from vet_ext.ingestion.manifest import MANIFEST_NAME, SPLITS, write_manifest
from vet_ext.pretraining.datasets import VetImages, VetStudies
from vet_ext.ingestion.views import VIEW_CODES

LABELS = ("cardiomegaly", "pleural_effusion", "mass", "fracture")


def hex_ids(rng: np.random.Generator, count: int) -> pa.Array:
    """`count` 64-character hex ids (the shape of --hash-ids output) without Python string objects."""
    raw = rng.integers(0, 256, size=count * 32, dtype=np.uint8).tobytes()
    return pa.array(np.frombuffer(binascii.hexlify(raw), dtype="S64")).cast(pa.string())


def fake_manifest(out: Path, n_images: int, n_studies: int, seed: int = 0) -> None:
    """A manifest with prepare's columns and dtypes, sorted by study like prepare writes it."""
    rng = np.random.default_rng(seed)
    per_study = 1 + rng.multinomial(n_images - n_studies, np.full(n_studies, 1 / n_studies))
    study_of_row = np.repeat(np.arange(n_studies), per_study)
    study_ids = hex_ids(rng, n_studies).sort()
    split_of_study = rng.choice(np.array(SPLITS), size=n_studies, p=[0.8, 0.1, 0.1])
    heights = rng.integers(384, 513, n_images).astype(np.int32)
    widths = np.full(n_images, 512, np.int32)
    sizes = heights.astype(np.int64) * widths
    offsets = np.cumsum(sizes) - sizes
    shard = (offsets >> 30).astype(np.int32)
    columns = {
        "study_id": study_ids.take(pa.array(study_of_row)),
        "image_id": hex_ids(rng, n_images),
        "frame": np.zeros(n_images, np.int32),
        "view": pa.array(np.array(VIEW_CODES[:4])[rng.integers(0, 4, n_images)]),
        "body_part": pa.array(np.array(["THORAX", "ABDOMEN"])[rng.integers(0, 2, n_images)]),
        "species": pa.array(np.array(["canine", "feline"])[rng.integers(0, 2, n_images)]),
        "pixel_spacing_x": np.full(n_images, 0.5),
        "pixel_spacing_y": np.full(n_images, 0.5),
        "shard": shard,
        "offset": offsets - (shard.astype(np.int64) << 30),
        "height": heights,
        "width": widths,
        "split": pa.array(split_of_study[study_of_row]),
    }
    for label in LABELS:
        columns[label] = rng.integers(-1, 2, n_studies)[study_of_row]
    write_manifest(pa.table(columns), out, cache_size=512, label_columns=list(LABELS))


def memory(pid: int) -> dict[str, float]:
    """RSS/PSS/USS in MiB from /proc (PSS/USS need smaps_rollup, Linux >= 4.14)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    except FileNotFoundError:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        return {"rss": rss / 1024, "pss": float("nan"), "uss": float("nan")}
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    }


def touch_index(datasets: list, seed: int) -> int:
    """What a worker does over an epoch, minus the pixels: every index array read, random items' views."""
    rng = np.random.default_rng(seed)
    checksum = 0
    for dataset in datasets:
        checksum += int(dataset._offset.sum()) + int(dataset._height.sum()) + int(dataset._shard.sum())
        checksum += int(np.nansum(dataset.get_targets()))
        for index in rng.integers(0, len(dataset), 20000):
            checksum += len(dataset.view_codes(int(index)))
    return checksum


def worker(datasets: list, seed: int, ready, done) -> None:
    touch_index(datasets, seed)
    ready.set()
    done.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5_000_000)
    parser.add_argument("--studies", type=int, default=700_000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    print_run_header(pa)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        builder = multiprocessing.get_context("fork").Process(target=fake_manifest, args=(root, args.images, args.studies))
        builder.start()  # in a child, so the main process's memory reflects only the datasets
        builder.join()
        size = (root / MANIFEST_NAME).stat().st_size / 2**20
        print(f"synthetic manifest: {args.images} images, {args.studies} studies, {size:.0f} MiB, built in {time.perf_counter() - started:.1f} s")
        baseline = memory(os.getpid())
        timings = {}
        started = time.perf_counter()
        studies = VetStudies(root, split="train")
        timings["VetStudies train"] = time.perf_counter() - started
        started = time.perf_counter()
        images = VetImages(root, split="val", labels="all")
        timings["VetImages val"] = time.perf_counter() - started
        started = time.perf_counter()
        all_images = VetImages(root, split="train", label="mass")
        timings["VetImages train"] = time.perf_counter() - started
        for name, seconds in timings.items():
            print(f"open {name}: {seconds:.2f} s")
        print(f"items: VetStudies train {len(studies)} studies, VetImages val {len(images)}, VetImages train {len(all_images)}")
        datasets = [studies, images, all_images]
        touch_index(datasets, seed=0)

        context = multiprocessing.get_context("fork")
        done = context.Event()
        readies, processes = [], []
        for rank in range(args.workers):
            ready = context.Event()
            process = context.Process(target=worker, args=(datasets, rank + 1, ready, done))
            process.start()
            readies.append(ready)
            processes.append(process)
        for ready in readies:
            ready.wait()
        rows = [("main (imports only)", baseline), ("main", memory(os.getpid()))]
        rows += [(f"worker {rank}", memory(p.pid)) for rank, p in enumerate(processes)]
        done.set()
        for process in processes:
            process.join()

    print(f"{'process':<20}{'RSS MiB':>10}{'PSS MiB':>10}{'USS MiB':>10}")
    for name, values in rows:
        print(f"{name:<20}{values['rss']:>10.0f}{values['pss']:>10.0f}{values['uss']:>10.0f}")
    live = [values for name, values in rows[1:]]
    totals = {key: sum(v[key] for v in live) for key in ("rss", "pss", "uss")}
    print(f"{'total (main+workers)':<20}{totals['rss']:>10.0f}{totals['pss']:>10.0f}{totals['uss']:>10.0f}")
    slowest = max(timings.values())
    print_targets(
        ("open < 10 s", slowest < 10, f"{slowest:.2f} s"),
        ("total PSS < 1024 MiB", totals["pss"] < 1024, f"{totals['pss']:.0f} MiB"),
    )
    print_load_after()
    return 0


if __name__ == "__main__":
    sys.exit(main())
