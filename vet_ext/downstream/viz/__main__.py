"""python -m vet_ext.viz {attention,patch-similarity,pca}: what the model learned, as PNGs.

Each `--weights` entry is a teacher export (OUT/eval/<tag>/teacher_checkpoint.pth, architecture
from the run's OUT/config.yaml), a training checkpoint, a released backbone file (architecture
from its keys), or `random:ARCH` (e.g. `random:vit_small`): an untrained network with a fixed
seed, the baseline that shows what training added. Views come from a prepared DATA folder
(`--data DATA --study ID`) or from DICOM files (`--dicom FILE ...`). Every view is resized as a
whole (no crop) to `--image-size` on its long side, each side rounded to a multiple of the patch
size, and every figure shows it at its source aspect ratio. OUT receives the PNGs and a
summary.json that lists them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Sequence

from tqdm import tqdm

from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write_text
from vet_ext.ingestion.manifest import SPLITS
from vet_ext.downstream.viz import attention, pca, similarity
from vet_ext.downstream.viz.loading import (
    RANDOM_PREFIX, View, checkpoint_names, load_checkpoint, load_dicom_views, load_study, resolve_device,
)  # fmt: skip

COMMANDS: dict[str, ModuleType] = {"attention": attention, "patch-similarity": similarity, "pca": pca}
SUMMARY_FILE = "summary.json"


def _common_arguments() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--weights", nargs="+", required=True, metavar="W",
        help=f"teacher export, training checkpoint or released backbone file, or {RANDOM_PREFIX}ARCH "
        f"(e.g. {RANDOM_PREFIX}vit_small) for an untrained network; one figure row each",
    )  # fmt: skip
    common.add_argument("--names", nargs="+", metavar="NAME", help="row labels, one per --weights entry")
    common.add_argument(
        "--config-file", help="training config giving the architecture (default: the run's config.yaml "
        "beside the checkpoint, else inferred from the file's keys)",
    )  # fmt: skip
    source = common.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="prepared DATA folder (python -m vet_ext.prepare)")
    source.add_argument("--dicom", nargs="+", type=Path, metavar="FILE", help="DICOM files, one view per frame")
    common.add_argument("--study", help="study id in DATA (with --data)")
    common.add_argument("--split", choices=SPLITS, help="split holding the study (default: search all)")
    common.add_argument("--out", type=Path, required=True, help="output folder (created)")
    common.add_argument("--image-size", type=int, default=448, help="long side fed to the model, pixels")
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vet_ext.viz", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_arguments()
    for name, module in COMMANDS.items():
        summary = module.__doc__.split("\n")[0]
        command = commands.add_parser(
            name, parents=[common], help=summary, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        module.add_arguments(command)
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    if args.data is not None and not args.study:
        raise UserError("--data needs --study ID (the study to show)")
    if args.dicom is not None and (args.study or args.split):
        raise UserError("--study and --split select a study of --data; with --dicom the files are the study")
    if args.image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    COMMANDS[args.command].check_arguments(args)


def _views(args: argparse.Namespace) -> list[View]:
    if args.data is not None:
        return load_study(args.data, args.study, args.split)
    return load_dicom_views(args.dicom)


def _source(args: argparse.Namespace) -> dict:
    if args.data is not None:
        return {"data": str(args.data), "study": args.study, "split": args.split}
    return {"dicom": [str(path) for path in args.dicom]}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    started = time.perf_counter()
    module = COMMANDS[args.command]
    names = checkpoint_names(args.weights, args.names)
    device = resolve_device(args.device)
    views = _views(args)
    results, checkpoints = {}, []
    with tqdm(total=len(names), desc=args.command, unit="checkpoint") as progress:
        for spec, name in zip(args.weights, names):
            checkpoint = load_checkpoint(spec, name, args.config_file, device)
            results[name] = module.analyse(checkpoint, views, args)
            checkpoints.append(checkpoint.describe())
            progress.update(1)
    args.out.mkdir(parents=True, exist_ok=True)
    files, details = module.write_outputs(args.out, views, results, args)
    summary = {
        "command": args.command,
        "source": _source(args),
        "image_size": args.image_size,
        "views": [{"name": view.name, "height": view.pixels.shape[0], "width": view.pixels.shape[1]} for view in views],
        "checkpoints": checkpoints,
        "files": [path.name for path in files],
        "details": details,
    }
    atomic_write_text(args.out / SUMMARY_FILE, json.dumps(summary, indent=2))
    print(
        f"{args.command}: {len(names)} checkpoint(s) x {len(views)} view(s) ({', '.join(v.name for v in views)}) "
        f"-> {', '.join(summary['files'])} and {SUMMARY_FILE} in {args.out} ({time.perf_counter() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
