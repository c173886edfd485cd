"""DINOv2 training loop: `python -m dinov2.train.train --config-file FILE --output-dir OUT [key=value ...]`.

Upstream's flags, outputs and checkpoint layout, with three things made reliable:
- resume is exact: the data stream restarts at the checkpoint's sample (each sample's
  augmentation is seeded by its index and pass), per-iteration randomness (stochastic depth) is
  seeded from (seed, rank, iteration), and pending centre updates are applied before saving;
- a non-finite loss or gradient skips that step and is counted; too many in a row stop the run
  with the last good checkpoint intact;
- it runs on CPU in float32 as well as on CUDA with bf16/fp16 autocast.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dinov2.data import make_dataset, make_pipeline, make_training_loader
from dinov2.distributed import get_global_rank, is_main_process
from dinov2.logging import setup_logging
from dinov2.logging.metrics import MetricsLog
from dinov2.train.checkpointing import Checkpointer, export_teacher, load_torch_file
from dinov2.train.schedules import build_schedules
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.cli import run_cli
from dinov2.utils.config import setup
from dinov2.utils.errors import UserError
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay

logger = logging.getLogger("dinov2")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINOv2 training", add_help=add_help)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming from the last checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="export the teacher of the last checkpoint and stop")
    parser.add_argument("--eval", type=str, default="", help="unused (kept for upstream compatibility)")
    parser.add_argument("--output-dir", "--output_dir", default="", type=str, help="output directory")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="config overrides as key=value")
    return parser


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """One run: the model, its optimizer, schedules and checkpoints, on one device."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        self.device = _training_device(cfg.train.device)
        self.model = SSLMetaArch(cfg).to(self.device)
        self.optimizer = self._build_optimizer()
        self.schedules = build_schedules(cfg)
        self.autocast_dtype = PRECISIONS[cfg.compute_precision.student.backbone.mixed_precision.param_dtype]
        use_scaler = self.device.type == "cuda" and cfg.compute_precision.grad_scaler and self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.checkpointer = Checkpointer(self.output_dir, get_global_rank(), cfg.train.max_to_keep)
        self.max_iter = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
        period = cfg.train.checkpoint_period_iterations or 3 * cfg.train.OFFICIAL_EPOCH_LENGTH
        self.checkpoint_period = period

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = []
        for module in self.model.student.values():
            groups += get_params_groups_with_decay(
                module,
                lr_decay_rate=self.cfg.optim.layerwise_decay,
                patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult,
            )
        fused = list(fuse_params_groups(groups))
        return torch.optim.AdamW(fused, betas=(self.cfg.optim.adamw_beta1, self.cfg.optim.adamw_beta2))

    def _apply_schedules(self, values: dict[str, float]) -> None:
        for group in self.optimizer.param_groups:
            group["weight_decay"] = values["wd"] * group["wd_multiplier"]
            base = values["last_layer_lr"] if group["is_last_layer"] else values["lr"]
            group["lr"] = base * group["lr_multiplier"]

    def _autocast(self):
        if self.device.type != "cuda" or self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        # A pending (lazy) centre update belongs to this step; applying it now changes no number
        # and keeps it from being lost at resume (upstream drops it: inexact resume).
        self.model.dino_loss.apply_center_update()
        self.model.ibot_patch_loss.apply_center_update()
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def resume_or_load(self, resume: bool) -> int:
        """Iteration to start from: after the last checkpoint, else 0 (optionally from MODEL.WEIGHTS)."""
        path = self.checkpointer.last_checkpoint() if resume else None
        if path is not None:
            state = self.checkpointer.load(path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
            logger.info("resumed from %s (iteration %d)", path, state["iteration"])
            return state["iteration"] + 1
        if self.cfg.MODEL.WEIGHTS:
            self._load_model_weights(self.cfg.MODEL.WEIGHTS)
        return 0

    def _load_model_weights(self, path: str) -> None:
        """Continue from another run: a training checkpoint (ours or upstream's single-rank one)
        gives student, teacher and centres; a teacher export gives backbone and heads to both."""
        state = load_torch_file(path)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            _load_strict(self.model, state["model"], f"MODEL.WEIGHTS={path}")
        elif isinstance(state, dict) and isinstance(state.get("teacher"), dict):
            teacher = {k.replace("module.", ""): v for k, v in state["teacher"].items()}
            for modules in (self.model.student, self.model.teacher):
                _load_strict(modules, teacher, f"MODEL.WEIGHTS={path}")
        else:
            raise UserError(f"MODEL.WEIGHTS={path} is neither a training checkpoint ('model') nor a teacher export ('teacher')")
        logger.info("weights loaded from %s", path)

    def export(self, tag: str) -> Path:
        return export_teacher(self.output_dir, tag, self.model.teacher_state_dict())

    # ------------------------------------------------------------------------------ training
    def train_step(self, batch: dict, values: dict[str, float]) -> tuple[bool, torch.Tensor, dict]:
        """One iteration; returns (stepped, optimised loss, logged terms)."""
        self._apply_schedules(values)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            total, loss_dict = self.model.compute_losses(
                batch, teacher_temp=values["teacher_temp"], freeze_backbone=values["freeze_backbone"]
            )
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        finite = torch.isfinite(total.detach())
        if self.cfg.optim.clip_grad:
            for module in self.model.student.values():
                norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
                finite &= torch.isfinite(norm)
        if not bool(finite):  # the step's one host sync
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return False, total, loss_dict
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.update_teacher(values["mom"])
        return True, total, loss_dict

    def train(self, start_iter: int) -> dict:
        cfg = self.cfg
        dataset = make_dataset(cfg.train.dataset_path)
        loader = make_training_loader(
            dataset,
            make_pipeline(cfg),
            batch_size=cfg.train.batch_size_per_gpu,
            num_workers=cfg.train.num_workers,
            seed=cfg.train.seed,
            start_iter=start_iter,
        )
        metrics = MetricsLog(self.output_dir / "training_metrics.json")
        metrics.truncate_after(start_iter - 1)
        self.model.train()
        nonfinite_total, nonfinite_in_row = 0, 0
        last_saved = self.checkpointer.last_checkpoint()
        # The bar is closed (its line ended) even when the run stops with an error.
        with tqdm(total=self.max_iter, initial=start_iter, desc="train", unit="it", disable=not is_main_process(), dynamic_ncols=True) as progress:
            data_iter = iter(loader)
            iter_end = time.perf_counter()
            for iteration in range(start_iter, self.max_iter):
                batch = _to_device(next(data_iter), self.device)
                data_time = time.perf_counter() - iter_end
                torch.manual_seed(_iteration_seed(cfg.train.seed, get_global_rank(), iteration))
                values = dict(self.schedules.at(iteration), freeze_backbone=iteration < cfg.train.head_warmup_iterations)
                stepped, total, loss_dict = self.train_step(batch, values)
                if stepped:
                    nonfinite_in_row = 0
                    metrics.update(total_loss=sum(loss_dict.values()), **loss_dict)
                else:
                    nonfinite_total += 1
                    nonfinite_in_row += 1
                    logger.warning("iteration %d: non-finite loss or gradient, step skipped", iteration)
                    if nonfinite_in_row >= cfg.train.max_consecutive_nonfinite:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_row} non-finite losses in a row (iteration {iteration}); "
                            f"stopped; last good checkpoint: {last_saved or 'none'}"
                        )
                metrics.update(
                    iter_time=time.perf_counter() - iter_end,
                    data_time=data_time,
                    lr=values["lr"],
                    wd=values["wd"],
                    mom=values["mom"],
                    last_layer_lr=values["last_layer_lr"],
                    current_batch_size=batch["collated_global_crops"].shape[0] // int(batch.get("n_global_crops", 2)),
                )
                is_last = iteration == self.max_iter - 1
                if iteration % cfg.train.log_period_iterations == 0 or is_last:
                    record = metrics.write(iteration, nonfinite_steps=nonfinite_total)
                    progress.set_postfix(loss=f"{record.get('total_loss', math.nan):.3f}", lr=f"{values['lr']:.2e}")
                if (iteration + 1) % cfg.evaluation.eval_period_iterations == 0 or is_last:
                    if is_main_process():
                        self.export(f"training_{iteration}")
                if (iteration + 1) % self.checkpoint_period == 0 or is_last:
                    last_saved = self.checkpointer.save(self.state(), iteration, final=is_last)
                progress.update(1)
                iter_end = time.perf_counter()
        return {"iterations": self.max_iter - start_iter, "nonfinite_steps": nonfinite_total, "last_checkpoint": str(last_saved)}


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        problems = [f"{label} {len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise UserError(f"{what} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(state)


def _iteration_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + iteration) % (2**63)


def _training_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = setup(args)
    setup_logging(cfg.train.output_dir)
    trainer = Trainer(cfg)
    start_iter = trainer.resume_or_load(resume=not args.no_resume)
    if args.eval_only:
        path = trainer.export(f"manual_{max(start_iter - 1, 0)}")
        print(f"teacher exported to {path}")
        return 0
    started = time.perf_counter()
    try:
        summary = trainer.train(start_iter)
    except NonFiniteLossError as exc:
        raise UserError(str(exc)) from None
    if is_main_process():
        print(
            f"done: {summary['iterations']} iterations in {time.perf_counter() - started:.1f} s, "
            f"{summary['nonfinite_steps']} skipped non-finite steps; outputs in {cfg.train.output_dir} "
            f"(last checkpoint {summary['last_checkpoint']})"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
