"""Does multi-view pretraining learn view-invariant features? The project's own replica of the claim.

Trains VET-DINO (multi-view) and plain DINOv2 (single-view) with the same budget on phantom
studies -- same iterations, same crops per step (the single-view batch holds twice as many
images, each giving one view's crops) and the same learning rate -- then compares both with the
untrained network on cross-view retrieval (for each image, is the nearest image of another view
from the same study?) and k-NN on the findings, through `vet_ext.downstream.eval.suite`.

With `--init PATH` (a released backbone or a teacher export) it also trains twice from that
initialisation, with and without head warm-up, and scores k-NN on teacher exports taken every
`--probe-every` iterations: the head warm-up question (fresh heads wreck good features early).

    python bench/view_invariance.py --out bench_out/view_invariance [--iterations 200] [--init W.pth]

Outputs: results.json, results.md (printed), and warmup.png with --init.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from dinov2.eval.results import write_results  # noqa: E402
from dinov2.logging.metrics import read_metrics  # noqa: E402
from dinov2.train.monitors import MONITORS  # noqa: E402
from dinov2.train.train import Trainer  # noqa: E402
from dinov2.utils.cli import ConfigArgumentParser, run_cli  # noqa: E402
from dinov2.utils.config import setup_run  # noqa: E402
from dinov2.utils.io import atomic_write  # noqa: E402
from vet_ext import demo  # noqa: E402
from vet_ext.downstream.eval import suite  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("bench/view_invariance.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out/view_invariance")
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--config-file", default=None, help="multi-view config (default: the demo's for the device)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations of each run")
    parser.add_argument("--init", default=None, help="backbone weights for the head warm-up comparison")
    parser.add_argument("--warmup-iterations", type=int, default=30)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_overrides("config overrides for every run, key=value")
    return parser


def _train(config_file: Path, output_dir: Path, opts: list[str]) -> tuple[Path, float]:
    started = time.perf_counter()
    cfg = setup_run(config_file, opts, output_dir)
    trainer = Trainer(cfg)
    start = trainer.resume_or_load(resume=True)
    if start < trainer.max_iter:
        trainer.train(start)
    export = output_dir / "eval" / f"training_{trainer.max_iter - 1}" / "teacher_checkpoint.pth"
    return export, time.perf_counter() - started


def training_health(output_dir: Path) -> dict[str, float]:
    """The collapse monitors at the last logged iteration and the loss change over the last half of
    the run: a comparison between two stalled runs says nothing about view invariance."""
    records = read_metrics(output_dir / "training_metrics.json")
    last, middle = records[-1], records[len(records) // 2]
    health = {key: round(last[key], 4) for key in MONITORS if key in last}
    health["total_loss_change_last_half"] = round(last["total_loss"] - middle["total_loss"], 4)
    return health


def budget_opts(cfg_file: Path, iterations: int | None) -> list[str]:
    """The iteration budget as config keys: one 'epoch' of `iterations`, warm-ups scaled to it."""
    if iterations is None:
        return []
    return ["train.OFFICIAL_EPOCH_LENGTH=1", f"optim.epochs={iterations}",
            f"optim.warmup_epochs={max(1, iterations // 10)}", f"teacher.warmup_teacher_temp_epochs={max(1, iterations // 10)}",
            f"evaluation.eval_period_iterations={iterations}", f"train.checkpoint_period_iterations={max(1, iterations // 4)}"]


def singleview_opts(cfg, data: Path) -> list[str]:
    """Plain DINOv2 with the multi-view run's crops per step and learning rate."""
    batch = 2 * cfg.train.batch_size_per_gpu  # a study gives two views' crops; an image gives one
    base_lr = cfg.optim.base_lr / math.sqrt(2)  # lr = base_lr * sqrt(batch / 1024): keep lr equal
    return ["train.pipeline=dino", f"train.dataset_path=VetImages:root={data}:split=train",
            f"train.batch_size_per_gpu={batch}", f"optim.base_lr={base_lr}"]


def compare(args, out: Path, data: Path, config_file: Path, device: str) -> tuple[list[dict], dict]:
    common = [f"train.device={device}", *budget_opts(config_file, args.iterations), *args.opts]
    mv_cfg = OmegaConf.merge(OmegaConf.load(config_file), OmegaConf.from_dotlist(common))
    multiview, mv_seconds = _train(config_file, out / "multiview", [f"train.dataset_path=VetStudies:root={data}:split=train", *common])
    singleview, sv_seconds = _train(config_file, out / "singleview", [*common, *singleview_opts(mv_cfg, data)])
    suite.main(["--weights", str(multiview), str(singleview), "--names", "multi-view (VET-DINO)", "single-view (DINOv2)",
                "--random-init", mv_cfg.student.arch, "--data", str(data), "--output-dir", str(out / "suite"),
                "--c-grid-size", "12", "--linear-epochs", "5", "--epoch-length", "50"])
    results = json.loads((out / "suite" / "results.json").read_text())
    timings = {"multi-view training s": round(mv_seconds, 1), "single-view training s": round(sv_seconds, 1),
               "multi-view training health": training_health(out / "multiview"),
               "single-view training health": training_health(out / "singleview")}  # fmt: skip
    return results["comparison"]["rows"], timings


def warmup_curves(args, out: Path, data: Path, config_file: Path, device: str) -> list[dict]:
    """k-NN macro AP of teacher exports over the first iterations, with and without head warm-up."""
    total = args.warmup_iterations * 3
    rows = []
    for label, warmup in (("with head warm-up", args.warmup_iterations), ("without", 0)):
        run = out / f"init_warmup_{warmup}"
        opts = [f"train.device={device}", f"train.dataset_path=VetStudies:root={data}:split=train",
                f"student.pretrained_weights={args.init}", f"train.head_warmup_iterations={warmup}",
                *budget_opts(config_file, total), f"evaluation.eval_period_iterations={args.probe_every}", *args.opts]
        _train(config_file, run, opts)
        cfg = OmegaConf.load(run / "config.yaml")
        exports = {int(p.parent.name.split("_")[1]) + 1: p for p in (run / "eval").glob("training_*/teacher_checkpoint.pth")}
        for iteration, export in sorted(exports.items()):
            (knn,) = demo.knn_table(cfg, {label: export}, data, device)
            rows.append({"run": label, "iteration": iteration, **{k: v for k, v in knn.items() if k != "model"}})
    return rows


def plot_warmup(rows: list[dict], png: Path) -> None:
    metric = next(k for k in rows[0] if k.startswith("macro AP"))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label in dict.fromkeys(r["run"] for r in rows):
        points = [(r["iteration"], r[metric]) for r in rows if r["run"] == label]
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"k-NN {metric}")
    ax.set_title("Continued pretraining: head warm-up")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = demo._device(args.device)
    config_file = Path(args.config_file) if args.config_file else demo.CONFIGS / f"demo_{'gpu' if device == 'cuda' else 'cpu'}.yaml"
    data = demo.make_data(out, args.studies, args.image_size, args.seed)
    rows, timings = compare(args, out, data, config_file, device)
    details = {}
    if args.init:
        details["head warm-up"] = warmup_curves(args, out, data, config_file, device)
        plot_warmup(details["head warm-up"], out / "warmup.png")
    info = {"command": "python bench/view_invariance.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": str(config_file), **timings}
    write_results(out, "view_invariance", rows, details=details, info=info)
    return 0


if __name__ == "__main__":
    run_cli(main)
