"""Benchmark: one full training iteration of the real trainer, and how close it runs to the GPU's limit.

Builds the model, losses, optimizer and schedules exactly as `dinov2.train.train` does (its
`Trainer`), then times `Trainer.train_step` -- forward, backward, gradient clipping, optimizer
step, EMA update -- on a synthetic batch that already sits on the device, shaped by the real
collate (so iBOT masks and the teacher's rows are those of a real batch). After warm-up every
iteration is timed between two device synchronisations; the median is reported with images/s,
studies/s, crops/s and peak memory. Model FLOPs per step are counted analytically
(`dinov2.train.flops`: nominal, and executed after stochastic depth's skipped samples) and divided
by the bf16 matmul rate measured on the same device in the same run: MFU.

Layouts: multi-view (per study: student 4 global + 2 x L local crops, teacher the 2 global crops
of one view) and single-view (per image: 2 global + L local, the teacher sees both globals).
The defaults are upstream's training settings (patch 14, 98 px locals, drop path 0.3 uniform,
LayerScale, MLP FFN, one shared 65,536-prototype head, softmax centring, bf16), so the single-view
numbers compare with upstream's on the same GPU (`docs/performance.md`). Levers are switched with
config overrides, e.g. `train.compile=true`, and recorded with each row.

    python bench/train_step.py --out bench_out/train_step                       # ViT-S/B/L, both layouts
    python bench/train_step.py --arch vit_base --mode singleview --local-crops 8 --label plain
    python bench/train_step.py --device cpu --arch vit_tiny --batch-size 2      # smoke test

Outputs in --out: results.json, results.md (printed), train_step.png.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from machine import cpu_model  # noqa: E402  (bench/machine.py)
from dinov2.configs import get_default_config  # noqa: E402
from dinov2.data import SSLBatch, make_pipeline  # noqa: E402
from dinov2.eval.results import write_results  # noqa: E402
from dinov2.train.train import Trainer  # noqa: E402
from dinov2.utils.cli import ConfigArgumentParser, run_cli  # noqa: E402
from dinov2.utils.config import apply_scaling_rules_to_cfg, merge_strict  # noqa: E402
from dinov2.utils.errors import UserError  # noqa: E402
from dinov2.train.flops import CropGroup, StepShape, training_step_flops  # noqa: E402
from dinov2.utils.io import atomic_write  # noqa: E402

# upstream's training settings at patch 14 (the anchors' configuration); bf16 is added on the GPU
UPSTREAM_SETTINGS = {
    "student.patch_size": 14,
    "student.drop_path_rate": 0.3,
    "student.drop_path_uniform": True,
    "student.layerscale": 1.0e-5,
    "student.ffn_layer": "mlp",
    "crops.global_crops_size": 224,
    "crops.local_crops_size": 98,
    "train.centering": "centering",
}
MODES = ("multiview", "singleview")
VIEWS_PER_STUDY = 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("bench/train_step.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out/train_step")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--arch", nargs="+", default=None, help="default: vit_small vit_base vit_large (cuda), vit_tiny (cpu)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch-size", type=int, default=None, help="studies (multi-view) or images per step; default 64 (cuda), 2 (cpu)")
    parser.add_argument("--fallback-batch-size", type=int, default=32, help="tried when --batch-size runs out of memory")
    parser.add_argument("--local-crops", type=int, default=10, help="local crops per image (per view in multi-view)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations; default 30 (cuda), 3 (cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first; default 10 (cuda), 1 (cpu)")
    parser.add_argument("--matmul-size", type=int, default=None, help="square matmul for the peak rate; default 8192 (cuda), 1024 (cpu)")
    parser.add_argument("--config-file", default=None, help="a training config to start from instead of upstream's settings")
    parser.add_argument("--label", default="", help="names this configuration in the table (e.g. the lever tried)")
    parser.add_overrides("config overrides, key=value (levers); after -- when they follow --arch or --mode")
    return parser


@dataclass(frozen=True)
class Case:
    arch: str
    mode: str
    batch_size: int
    local_crops: int

    @property
    def images_per_item(self) -> int:
        return VIEWS_PER_STUDY if self.mode == "multiview" else 1


def _resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    on_cuda = args.device == "cuda"
    pick = lambda value, cuda, cpu: value if value is not None else (cuda if on_cuda else cpu)  # noqa: E731
    args.arch = pick(args.arch, ["vit_small", "vit_base", "vit_large"], ["vit_tiny"])
    args.batch_size = pick(args.batch_size, 64, 2)
    args.iterations = pick(args.iterations, 30, 3)
    args.warmup = pick(args.warmup, 10, 1)
    args.matmul_size = pick(args.matmul_size, 8192, 1024)
    return args


def build_config(args: argparse.Namespace, case: Case, output_dir: str):
    cfg = get_default_config()
    if args.config_file:
        cfg = merge_strict(cfg, OmegaConf.load(args.config_file), f"from {args.config_file}")
    else:
        # bf16 on the GPU; the CPU smoke test computes in float32, the dtype its matmul rate is measured in
        precision = "bf16" if args.device == "cuda" else "fp32"
        upstream = {**UPSTREAM_SETTINGS, "compute_precision.precision": precision}
        cfg = merge_strict(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in upstream.items()]), "bench")
    settings = {
        "student.arch": case.arch,
        "train.batch_size_per_gpu": case.batch_size,
        "crops.local_crops_number": case.local_crops,
        "train.pipeline": case.mode if case.mode == "multiview" else "dino",
        "train.device": args.device,
        "train.output_dir": output_dir,
    }
    cfg = merge_strict(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in settings.items()]), "bench")
    if args.opts:
        cfg = merge_strict(cfg, OmegaConf.from_dotlist(args.opts), "from command line")
    return apply_scaling_rules_to_cfg(cfg)


def synthetic_batch(cfg, case: Case, seed: int = 0) -> SSLBatch:
    """Random crops through the pipeline's own collate: real masks, real teacher rows."""
    generator = torch.Generator().manual_seed(seed)
    crops = cfg.crops
    n_global = 2 * case.images_per_item
    n_local = case.local_crops * case.images_per_item

    def crop(size: int) -> torch.Tensor:
        return torch.randn(3, size, size, generator=generator)

    samples = []
    for index in range(case.batch_size):
        sample = {
            "global_crops": [crop(crops.global_crops_size) for _ in range(n_global)],
            "local_crops": [crop(crops.local_crops_size) for _ in range(n_local)],
            "sample_seed": seed * 1_000_003 + index,
        }
        if case.mode == "multiview":
            sample["teacher_view"] = index % VIEWS_PER_STUDY
        samples.append((sample, None))
    return make_pipeline(cfg).collate(samples, random.Random(seed))


def step_shape(batch: SSLBatch, case: Case, cfg) -> StepShape:
    student = [CropGroup(len(batch.collated_global_crops), cfg.crops.global_crops_size)]
    if case.local_crops:
        student.append(CropGroup(len(batch.collated_local_crops), cfg.crops.local_crops_size))
    return StepShape(
        student_crops=tuple(student),
        teacher_crops=(CropGroup(len(batch.teacher_global_index), cfg.crops.global_crops_size),),
        masked_tokens=len(batch.mask_indices_list),
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int, repeats: int = 10) -> float:
    """FLOP/s of a square matmul in the compute dtype (bf16 on CUDA, float32 on the CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2.0 * size**3 * repeats / (time.perf_counter() - started)


def time_case(args: argparse.Namespace, case: Case, peak_rate: float) -> dict:
    gc.collect()  # the previous case's model must not count in this one's peak memory
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = build_config(args, case, output_dir)
        trainer = Trainer(cfg)
        device = trainer.device
        batch = make_pipeline(cfg).to_device(synthetic_batch(cfg, case), device)
        shape = step_shape(batch, case, cfg)
        values = dict(trainer.schedules.at(0), freeze_backbone=False)
        trainer.model.train()
        times = []
        total = args.warmup + args.iterations
        for iteration in tqdm(range(total), desc=f"{case.arch} {case.mode} b{case.batch_size}", leave=False):
            if iteration == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _synchronize(device)
            started = time.perf_counter()
            stepped, loss, *_ = trainer.train_step(batch, values)
            _synchronize(device)
            if iteration >= args.warmup:
                times.append(time.perf_counter() - started)
        if not stepped:
            raise UserError(f"{case}: the loss is not finite ({float(loss)}), so the timing would not be of a real step")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        flops = training_step_flops(trainer.model, shape)
    step = statistics.median(times)
    crops_per_item = sum(g.count for g in shape.student_crops) / case.batch_size
    return {
        "label": args.label,
        "arch": case.arch,
        "mode": case.mode,
        "batch": case.batch_size,
        "student_crops_per_item": int(crops_per_item),
        "step_ms": 1000 * step,
        "step_ms_min": 1000 * min(times),
        "images_per_s": case.batch_size * case.images_per_item / step,
        "studies_per_s": case.batch_size / step if case.mode == "multiview" else None,
        "crops_per_s": case.batch_size * crops_per_item / step,
        "peak_gib": peak,
        "tflop_nominal": flops.nominal / 1e12,
        "tflop_executed": flops.executed / 1e12,
        "mfu_nominal": flops.nominal / step / peak_rate,
        "mfu_executed": flops.executed / step / peak_rate,
        "loss": float(loss.detach()),
    }


def run_case(args: argparse.Namespace, case: Case, peak_rate: float) -> dict:
    """Time `case`; on a GPU out of memory, fall back to the smaller batch, as the issue allows."""
    try:
        return time_case(args, case, peak_rate)
    except torch.cuda.OutOfMemoryError:
        pass  # retried below, once the exception no longer holds the failed model's frames
    gc.collect()
    torch.cuda.empty_cache()
    if case.batch_size <= args.fallback_batch_size:
        return {"label": args.label, "arch": case.arch, "mode": case.mode, "batch": case.batch_size, "step_ms": None, "note": "out of memory"}
    smaller = Case(case.arch, case.mode, args.fallback_batch_size, case.local_crops)
    return dict(run_case(args, smaller, peak_rate), note=f"batch {case.batch_size} out of memory")


def plot(rows: list[dict], png: Path) -> Path:
    timed = [row for row in rows if row.get("step_ms")]
    names = [f"{r['arch']}\n{r['mode']} b{r['batch']}" for r in timed]
    figure, (speed, mfu) = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(timed) + 2), 3.6))
    speed.bar(names, [r["images_per_s"] for r in timed], color="tab:blue")
    speed.set_ylabel("images / s")
    mfu.bar(names, [100 * r["mfu_nominal"] for r in timed], color="tab:gray", label="nominal")
    mfu.bar(names, [100 * r["mfu_executed"] for r in timed], color="tab:orange", label="executed")
    mfu.set_ylabel("MFU (%)")
    mfu.legend()
    for axis in (speed, mfu):
        axis.tick_params(axis="x", labelsize=7)
    figure.suptitle("training step (" + (timed[0]["label"] or "upstream settings") + ")" if timed else "training step")
    figure.tight_layout()
    atomic_write(png, lambda f: figure.savefig(f, format="png", dpi=110))
    plt.close(figure)
    return png


def main(argv: list[str] | None = None) -> int:
    args = _resolve_defaults(get_args_parser().parse_args(argv))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args = _resolve_defaults(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak_rate = matmul_rate(device, args.matmul_size)
    cases = [Case(arch, mode, args.batch_size, args.local_crops) for arch in args.arch for mode in args.mode]
    started = time.perf_counter()
    rows = [run_case(args, case, peak_rate) for case in cases]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    info = {
        "machine": machine,
        "torch": torch.__version__,
        "matmul_tflops": peak_rate / 1e12,
        "matmul": f"{args.matmul_size}^3 {'bf16' if device.type == 'cuda' else 'float32'}",
        "overrides": " ".join(args.opts) or "none",
        "config": args.config_file or "upstream settings (patch 14, drop path 0.3, bf16)",
        "warmup / timed iterations": f"{args.warmup} / {args.iterations}",
        "attention": os.environ.get("DINOV2_ATTENTION", "sdpa"),
    }
    name = f"train_step {args.label}".strip()
    write_results(out, name, rows, info=info)
    png = plot(rows, out / "train_step.png")
    print(f"{len(rows)} configurations in {time.perf_counter() - started:.1f} s on {machine}; "
          f"matmul peak {peak_rate / 1e12:.1f} TFLOP/s; results in {out / 'results.json'}, {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
