"""Benchmark: studies/s and crops/s of the real training data path, and whether it feeds the step.

Times what the trainer sees: `dinov2.data.loaders.make_training_loader` over `VetStudies` from a
prepared cache (reading, augmentation, collate, pinned memory when CUDA is present) with N loader
workers, then the move to the device and, for a pipeline with an `on_device` stage such as
"multiview_device", the rendering of the crops there (CUDA synchronised before the clock stops).
Without --data, a phantom cache is built in a temporary folder as `make demo` builds its own.
With --step-json (the results.json of bench/train_step.py) each row also says how many times the
step's consumption the pipeline delivers; the target is 1.5x.

    python bench/data_pipeline.py --pipeline multiview multiview_device --workers 0 2 --batches 10
    python bench/data_pipeline.py --data DATA --workers 16 --device cuda --step-json bench_out/train_step/results.json

Outputs in --out: results.json and results.md (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from machine import cpu_model  # bench/machine.py
from dinov2.data import SSLBatch, make_dataset, make_pipeline
from dinov2.data.loaders import make_training_loader
from dinov2.eval.results import write_results
from dinov2.utils.cli import run_cli
from dinov2.utils.config import get_cfg
from dinov2.utils.errors import UserError
from vet_ext.pretraining.augment import GLOBAL_CROPS_PER_VIEW

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "vetdino" / "multiview_vitb14.yaml"
TARGET_RATIO = 1.5  # the pipeline must deliver 1.5x what the step consumes
VIEWS_PER_STUDY = 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench/data_pipeline.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="a prepared cache (python -m vet_ext.prepare); default: a phantom one")
    parser.add_argument("--split", default="train", help="split of --data to read")
    parser.add_argument("--studies", type=int, default=64, help="phantom studies when --data is not given")
    parser.add_argument("--image-size", type=int, default=512, help="phantom cache image size (long side)")
    parser.add_argument("--pipeline", nargs="+", default=["multiview", "multiview_device"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=64, help="studies per batch")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per row")
    parser.add_argument("--warmup-batches", type=int, default=2, help="untimed batches first (worker start-up)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config: crop sizes and counts")
    parser.add_argument("--step-json", default=None, help="results.json of bench/train_step.py")
    parser.add_argument("--step-arch", default=None, help="the step row to compare with (default: the fastest multi-view one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_out/data_pipeline")
    return parser


def step_rate(path: Path, arch: str | None) -> dict:
    """The multi-view step to feed: {"arch", "studies_per_s"} from bench/train_step.py's results.json.

    A file with a top-level `studies_per_s` is taken as is; otherwise the rows of its sections
    with one, restricted to `arch` when given, and the fastest of them (the hungriest step).
    """
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--step-json {path}: cannot read it as JSON ({exc})") from exc
    if isinstance(results, dict) and isinstance(results.get("studies_per_s"), (int, float)):
        return {"arch": results.get("arch"), "studies_per_s": float(results["studies_per_s"])}
    sections = results.values() if isinstance(results, dict) else []
    rows = [row for section in sections if isinstance(section, dict) for row in section.get("rows", [])]
    rows = [row for row in rows if isinstance(row.get("studies_per_s"), (int, float))]
    if arch is not None:
        rows = [row for row in rows if row.get("arch") == arch]
    if not rows:
        which = f" for arch {arch}" if arch else ""
        raise UserError(f"--step-json {path}: no row with a 'studies_per_s' value{which}")
    fastest = max(rows, key=lambda row: row["studies_per_s"])
    return {"arch": fastest.get("arch"), "studies_per_s": float(fastest["studies_per_s"])}


def phantom_cache(folder: Path, studies: int, size: int, seed: int) -> Path:
    from vet_ext.demo import make_data  # the demo's phantom studies and cache, the same way

    return make_data(folder, studies, size, seed)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(args: argparse.Namespace, studies, name: str, workers: int, device: torch.device) -> dict:
    """Batches per second of one pipeline with `workers` loader processes, as the trainer consumes them."""
    cfg = get_cfg(args.config, [f"train.pipeline={name}"])
    pipeline = make_pipeline(cfg)
    loader = iter(make_training_loader(pipeline.dataset_for(studies), pipeline, args.batch_size, workers, args.seed))

    def next_batch() -> SSLBatch:
        return pipeline.to_device(next(loader), device)

    for _ in range(args.warmup_batches):
        next_batch()
    _synchronize(device)
    started = time.perf_counter()
    for _ in tqdm(range(args.batches), desc=f"{name}, {workers} workers", leave=False):
        batch = next_batch()
    _synchronize(device)
    seconds = time.perf_counter() - started
    crops_per_study = VIEWS_PER_STUDY * (GLOBAL_CROPS_PER_VIEW + cfg.crops.local_crops_number)
    studies_per_s = args.batches * args.batch_size / seconds
    assert len(batch.collated_global_crops) + len(batch.collated_local_crops) == crops_per_study * args.batch_size
    return {
        "pipeline": name,
        "workers": workers,
        "device": device.type,
        "batch": args.batch_size,
        "studies_per_s": studies_per_s,
        "crops_per_s": studies_per_s * crops_per_study,
        "crops_per_study": crops_per_study,
        "ms_per_batch": 1000 * seconds / args.batches,
    }


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    if args.batches < 1 or args.batch_size < 1 or args.warmup_batches < 0:
        raise UserError("--batches and --batch-size must be >= 1, --warmup-batches >= 0")
    step = step_rate(Path(args.step_json), args.step_arch) if args.step_json else None
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            print(f"building a phantom cache: {args.studies} studies at {args.image_size} px")
            data = phantom_cache(Path(tmp), args.studies, args.image_size, args.seed)
        else:
            data = Path(args.data)
        studies = make_dataset(f"VetStudies:root={data}:split={args.split}")
        rows = [time_pipeline(args, studies, name, workers, device) for name in args.pipeline for workers in args.workers]
    for row in rows:
        if step is not None:
            row["step_studies_per_s"] = step["studies_per_s"]
            row["ratio_to_step"] = row["studies_per_s"] / step["studies_per_s"]
            row["meets_1.5x"] = row["ratio_to_step"] >= TARGET_RATIO
    info = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "data": args.data or f"phantom cache, {args.studies} studies at {args.image_size} px",
        "studies in the split": len(studies),
        "config": args.config,
        "warmup / timed batches": f"{args.warmup_batches} / {args.batches}",
    }
    if step is not None:
        info["step"] = f"{step['arch'] or 'step'}: {step['studies_per_s']:.1f} studies/s ({args.step_json})"
    write_results(args.out, "data_pipeline", rows, info=info)
    best = max(rows, key=lambda row: row["studies_per_s"])
    verdict = f"; {best['ratio_to_step']:.2f}x the step" if step is not None else ""
    print(f"{len(rows)} configurations in {time.perf_counter() - started:.1f} s; fastest: {best['pipeline']} with "
          f"{best['workers']} workers, {best['studies_per_s']:.1f} studies/s = {best['crops_per_s']:.0f} crops/s{verdict}; "
          f"results in {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
