"""Benchmark: each speed lever of the training step alone against the same plain baseline, then together.

Predict, change one thing, measure: every lever below carries its prediction (from the anchors
in docs/performance.md), runs `bench/train_step.py` in a fresh process (own memory peak, own
environment) with that one change, and is compared with the baseline measured in the same run.
Levers that pay (step time down by more than --keep-threshold) are combined into a final row.
A lever that cannot act here (xformers not installed, or on CPU) is reported as skipped, not timed.

    python bench/levers.py --out bench_out/levers                      # ViT-B/14 and ViT-L/14, on the GPU
    python bench/levers.py --arch vit_base --levers fused_adamw compile
    python bench/levers.py --device cpu --arch vit_tiny --levers fused_adamw -- crops.global_crops_size=56

Outputs in --out: results.json, results.md (printed), levers.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dinov2.eval.results import write_results  # noqa: E402
from dinov2.utils.cli import ConfigArgumentParser, run_cli  # noqa: E402
from dinov2.utils.io import atomic_write  # noqa: E402

BENCH = Path(__file__).resolve().parent


def _xformers_unavailable(device: str) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if device == "cpu":
        return "xformers has no CPU kernels"
    return None


@dataclass(frozen=True)
class Lever:
    name: str
    prediction: str
    opts: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # Why the lever cannot act on this device (it is then reported, not timed), None when it can:
    # a lever that changes nothing would time the baseline a second time under its name.
    unavailable: Callable[[str], str | None] = lambda device: None


# The baseline turns every lever off; each lever turns one on.
BASELINE = Lever("baseline", "-", ("train.compile=false", "optim.fused_adamw=false"), {"DINOV2_ATTENTION": "sdpa"})
LEVERS = {
    lever.name: lever
    for lever in (
        Lever("fused_adamw", "-1 to -3 % (one kernel instead of a dozen per parameter group)", ("optim.fused_adamw=true",)),
        Lever("compile", "-10 to -20 % (element-wise, LayerNorm and copies are a third of the kernel time)", ("train.compile=true",)),
        Lever("xformers", "slower: its flash kernels trail PyTorch's cuDNN choice 1.3-1.5x on 257 tokens",
              env={"DINOV2_ATTENTION": "xformers"}, unavailable=_xformers_unavailable),
        Lever("fp16_scaler", "same speed as bf16, plus the scaler's checks", ("compute_precision.precision=fp16",)),
        Lever("fsdp_one_gpu", "+2 to +5 % (FSDP2 hooks and casts, nothing to shard on one GPU)", ("train.distributed_strategy=fsdp",)),
    )
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("bench/levers.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_out/levers")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--arch", nargs="+", default=["vit_base", "vit_large"])
    parser.add_argument("--mode", nargs="+", default=["singleview", "multiview"], choices=("singleview", "multiview"))
    parser.add_argument("--local-crops", type=int, default=None, help="default: 8 single-view (upstream's), 10 per view multi-view")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--levers", nargs="+", choices=sorted(LEVERS), default=sorted(LEVERS))
    parser.add_argument("--keep-threshold", type=float, default=0.01, help="relative step-time gain a lever must bring")
    parser.add_overrides("config overrides for every run, key=value; after -- when they follow a list flag (--arch, --levers)")
    return parser


def measure(args: argparse.Namespace, arch: str, mode: str, lever_opts: list[str], env: dict[str, str]) -> dict:
    """One bench/train_step.py run in a fresh process; its single result row."""
    local_crops = args.local_crops if args.local_crops is not None else (8 if mode == "singleview" else 10)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(BENCH / "train_step.py"), "--out", out, "--device", args.device,
                   "--arch", arch, "--mode", mode, "--local-crops", str(local_crops)]
        for flag, value in (("--batch-size", args.batch_size), ("--iterations", args.iterations), ("--warmup", args.warmup)):
            if value is not None:
                command += [flag, str(value)]
        command += [*args.opts, *lever_opts]
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
        if proc.returncode != 0:
            return {"step_ms": None, "note": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
        results = json.loads((Path(out) / "results.json").read_text())
    (section,) = results.values()
    return section["rows"][0]


def effect(before: dict, after: dict) -> float | None:
    if not before.get("step_ms") or not after.get("step_ms"):
        return None
    return after["step_ms"] / before["step_ms"] - 1.0


def lever_rows(args: argparse.Namespace, arch: str, mode: str, progress) -> list[dict]:
    baseline = measure(args, arch, mode, list(BASELINE.opts), BASELINE.env)
    progress(f"{arch} {mode} baseline: {baseline.get('step_ms')}")
    rows, kept = [], []
    for name in args.levers:
        lever = LEVERS[name]
        reason = lever.unavailable(args.device)
        if reason is not None:
            rows.append(_row(arch, mode, lever.name, lever.prediction, baseline, {"note": f"skipped: {reason}"}, None, "skipped"))
            progress(f"{arch} {mode} {name}: skipped ({reason})")
            continue
        after = measure(args, arch, mode, [*BASELINE.opts, *lever.opts], {**BASELINE.env, **lever.env})
        change = effect(baseline, after)
        keep = change is not None and change < -args.keep_threshold
        if keep:
            kept.append(lever)
        rows.append(_row(arch, mode, lever.name, lever.prediction, baseline, after, change, "keep" if keep else "drop"))
        progress(f"{arch} {mode} {name}: {after.get('step_ms')} ({'n/a' if change is None else f'{100 * change:+.1f} %'})")
    if kept:
        opts = [*BASELINE.opts, *(o for lever in kept for o in lever.opts)]
        env = {**BASELINE.env, **{k: v for lever in kept for k, v in lever.env.items()}}
        after = measure(args, arch, mode, opts, env)
        names = " + ".join(lever.name for lever in kept)
        rows.append(_row(arch, mode, f"final ({names})", "-", baseline, after, effect(baseline, after), "final"))
    return rows


def _row(arch, mode, lever, prediction, before, after, change, decision) -> dict:
    return {
        "arch": arch,
        "mode": mode,
        "lever": lever,
        "prediction": prediction,
        "before_ms": before.get("step_ms"),
        "after_ms": after.get("step_ms"),
        "effect_pct": None if change is None else 100 * change,
        "before_gib": before.get("peak_gib"),
        "after_gib": after.get("peak_gib"),
        "images_per_s": after.get("images_per_s"),
        "studies_per_s": after.get("studies_per_s"),
        "mfu_executed": after.get("mfu_executed"),
        "decision": decision,
        "note": after.get("note", ""),
    }


def plot(rows: list[dict], png: Path) -> Path:
    measured = [r for r in rows if r["effect_pct"] is not None]
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(measured) + 1.5))
    labels = [f"{r['arch']} {r['mode']}: {r['lever']}" for r in measured]
    colours = ["tab:green" if r["effect_pct"] < 0 else "tab:red" for r in measured]
    axis.barh(labels, [r["effect_pct"] for r in measured], color=colours)
    axis.axvline(0, color="black", linewidth=0.8)
    axis.invert_yaxis()
    axis.set_xlabel("step time vs baseline (%), lower is faster")
    axis.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    atomic_write(png, lambda f: figure.savefig(f, format="png", dpi=110))
    plt.close(figure)
    return png


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for arch in args.arch:
        for mode in args.mode:
            rows += lever_rows(args, arch, mode, progress=lambda line: print(line, flush=True))
    write_results(out, "levers", rows, info={"device": args.device, "overrides": " ".join(args.opts) or "none",
                                             "baseline": " ".join(BASELINE.opts) + " DINOV2_ATTENTION=sdpa"})
    png = plot(rows, out / "levers.png")
    kept = sorted({r["lever"] for r in rows if r["decision"] == "keep"})
    print(f"{len(rows)} measurements in {time.perf_counter() - started:.0f} s; levers that pay: {', '.join(kept) or 'none'}; "
          f"results in {out / 'results.json'}, {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)
