"""DINOv2 training loop: `python -m dinov2.train.train --config-file FILE --output-dir OUT [key=value ...]`.

Upstream's flags, outputs and checkpoint layout, with three things made reliable:
- resume is exact: the data stream restarts at the checkpoint's sample (each sample's
  augmentation is seeded by its index and pass), per-iteration randomness (stochastic depth) is
  seeded from (seed, rank, iteration), and pending centre updates are applied before saving;
- a non-finite loss or gradient skips that step and is counted; too many in a row stop the run
  with the last good checkpoint intact (with fp16's gradient scaler, overflowing gradients are
  the scaler's to skip and do not count);
- one precision setting (`compute_precision.precision`, see dinov2.fsdp.precision) drives
  autocast, every FSDP2 policy and the scaler; CPU runs are float32 unless it asks otherwise.

Under torchrun or srun it joins the process group and spreads the model with DDP or FSDP2
(`train.distributed_strategy`, see dinov2.fsdp). The data, the logged losses and the checkpoints
do not depend on the number of processes: the same global batch gives the same run, and a
checkpoint resumes on any world size. SIGUSR1 (e.g. `sbatch --signal=USR1@120`) makes the run
save a checkpoint at the end of the current iteration and stop, to be resumed later.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
from tqdm import tqdm

from dinov2 import distributed
from dinov2.data import SSLBatch, make_dataset, make_pipeline, make_training_loader
from dinov2.distributed import get_global_rank, is_main_process
from dinov2.fsdp import distribute, full_tensor, get_training_state, resolve_precision, resolve_strategy, set_training_state
from dinov2.logging import setup_logging
from dinov2.logging.metrics import MetricsLog
from dinov2.train.checkpointing import Checkpointer, export_teacher, load_strict, load_torch_file
from dinov2.train.compile import compile_blocks
from dinov2.train.monitors import CollapseWatch
from dinov2.train.optimizer import apply_schedules, build_optimizer
from dinov2.train.schedules import build_schedules
from dinov2.train.ssl_meta_arch import SSLMetaArch, check_masks_on_teacher_rows
from dinov2.train.stop_signal import StopSignal
from dinov2.utils.cli import ConfigArgumentParser, run_cli
from dinov2.utils.config import setup
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("DINOv2 training", add_help=add_help)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming from the last checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="export the teacher of the last checkpoint and stop")
    parser.add_argument("--eval", type=str, default="", help="unused (kept for upstream compatibility)")
    parser.add_argument("--output-dir", "--output_dir", default="", type=str, help="output directory")
    parser.add_overrides()
    return parser


class NonFiniteLossError(RuntimeError):
    pass


class StepResult(NamedTuple):
    stepped: bool  # False: skipped as non-finite
    loss: torch.Tensor  # the optimised total, still on the device
    loss_dict: dict[str, torch.Tensor]
    stop: bool  # some rank was asked to stop after this step
    monitors: dict[str, torch.Tensor]  # collapse monitors (dinov2.train.monitors), still on the device


class Trainer:
    """One run: the model, its optimizer, schedules and checkpoints, on one device."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        self.device = _training_device(cfg.train.device)
        self.model = SSLMetaArch(cfg).to(self.device)
        if cfg.train.compile:
            compile_blocks(self.model.student, self.model.teacher)
        if cfg.train.distributed_strategy in ("ddp", "fsdp"):
            distributed.enable(single_process=True)  # a named strategy wraps even a single process
        self.strategy = resolve_strategy(cfg.train.distributed_strategy, self.device)
        self.precision = resolve_precision(cfg.compute_precision, self.device)
        logger.info("precision: %s", self.precision)
        distribute(self.model, self.strategy, cfg.compute_precision, self.device, self.precision)
        self.optimizer = build_optimizer(self.model.student, cfg.optim, self.device)
        self.schedules = build_schedules(cfg)
        self.scaler = self.precision.make_scaler()
        self.collapse_watch = CollapseWatch(cfg.train.collapse_warning_iterations)
        self.checkpointer = Checkpointer(self.output_dir, get_global_rank(), cfg.train.max_to_keep)
        self.max_iter = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
        period = cfg.train.checkpoint_period_iterations or 3 * cfg.train.OFFICIAL_EPOCH_LENGTH
        self.checkpoint_period = period

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def sharded_checkpoints(self) -> bool:
        return self.strategy == "fsdp"

    def state(self, full: bool = True) -> dict:
        """Model, optimizer (and scaler) state; whole tensors on rank 0, or this rank's shards."""
        # A pending (lazy) centre update belongs to this step; applying it now changes no number
        # and keeps it from being lost at resume (upstream drops it: inexact resume).
        self.model.dino_loss.apply_center_update()
        self.model.ibot_patch_loss.apply_center_update()
        model_state, optimizer_state = get_training_state(self.model, self.optimizer, full=full)
        state = {"model": model_state, "optimizer": optimizer_state}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def save_checkpoint(self, iteration: int, final: bool = False) -> Path:
        if self.sharded_checkpoints:
            return self.checkpointer.save_sharded(self.state(full=False), iteration, final=final)
        return self.checkpointer.save(self.state(full=True), iteration, final=final)

    def resume_or_load(self, resume: bool) -> int:
        """Iteration to start from: after the last checkpoint, else 0 (optionally from MODEL.WEIGHTS).

        A checkpoint of either form (file or sharded folder) loads whatever the world size and
        strategy that wrote it.
        """
        path = self.checkpointer.last_checkpoint() if resume else None
        if path is not None:
            full = not path.is_dir()
            if full:
                state = self.checkpointer.load(path)
            else:
                state = self.checkpointer.load_sharded(path, {**self.state(full=False), "iteration": -1})
            set_training_state(self.model, self.optimizer, state["model"], state["optimizer"], full=full)
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
            load_strict(self.model, state["model"], f"MODEL.WEIGHTS={path}")
        elif isinstance(state, dict) and isinstance(state.get("teacher"), dict):
            teacher = {k.replace("module.", ""): v for k, v in state["teacher"].items()}
            for modules in (self.model.student, self.model.teacher):
                load_strict(modules, teacher, f"MODEL.WEIGHTS={path}")
        else:
            raise UserError(f"MODEL.WEIGHTS={path} is neither a training checkpoint ('model') nor a teacher export ('teacher')")
        logger.info("weights loaded from %s", path)

    def export(self, tag: str) -> Path:
        """Teacher export; every rank takes part (FSDP gathers the shards), rank 0 writes it."""
        teacher_state = self.model.teacher_state_dict()
        path = self.output_dir / "eval" / tag / "teacher_checkpoint.pth"
        if is_main_process():
            path = export_teacher(self.output_dir, tag, teacher_state)
        distributed.barrier()
        return path

    # ------------------------------------------------------------------------------ training
    def train_step(self, batch: SSLBatch | Mapping[str, Any], values: dict[str, float], stop_requested: Callable[[], bool] = lambda: False) -> StepResult:
        """One iteration: forward, backward, clipping, and the update unless the step is non-finite.

        The ranks agree on two things with one all-reduce, which is the step's one host sync:
        whether every rank's step is finite (or their models would part ways) and whether some
        rank was asked to stop (`stop_requested()`, e.g. only rank 0 got SLURM's signal yet).

        With a gradient scaler, inf/nan gradients are the scaler's business: early in a run it
        overflows by design, skips those updates inside `scaler.step` and lowers its scale, so only
        a non-finite loss counts. Without one, a non-finite clipped gradient norm counts too.
        """
        apply_schedules(self.optimizer, values)
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            total, loss_dict, monitors = self.model.compute_losses(
                batch, teacher_temp=values["teacher_temp"], freeze_backbone=values["freeze_backbone"]
            )
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        finite = torch.isfinite(total.detach())
        if self.cfg.optim.clip_grad:
            for module in self.model.student.values():
                norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
                if self.scaler is None:
                    finite &= torch.isfinite(full_tensor(norm))
        finite, stop = _agree_across_ranks(finite, stop_requested())
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return StepResult(False, total, loss_dict, stop, monitors)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.model.update_teacher(values["mom"])
        return StepResult(True, total, loss_dict, stop, monitors)

    def train(self, start_iter: int, stop_requested: Callable[[], bool] = lambda: False) -> dict:
        """Train from `start_iter` to the end, or until `stop_requested()` turns true on some rank:
        then a checkpoint is saved after that iteration and the summary says `stopped_at`."""
        cfg = self.cfg
        pipeline = make_pipeline(cfg)
        dataset = pipeline.dataset_for(make_dataset(cfg.train.dataset_path))
        loader = make_training_loader(
            dataset,
            pipeline,
            batch_size=cfg.train.batch_size_per_gpu,
            num_workers=cfg.train.num_workers,
            seed=cfg.train.seed,
            start_iter=start_iter,
        )
        metrics = MetricsLog(self.output_dir / "training_metrics.json")
        if is_main_process():
            metrics.truncate_after(start_iter - 1)
        stopped_at = None
        self.model.train()
        nonfinite_total, nonfinite_in_row = 0, 0
        last_saved = self.checkpointer.last_checkpoint()
        # The bar is closed (its line ended) even when the run stops with an error.
        with tqdm(total=self.max_iter, initial=start_iter, desc="train", unit="it", disable=not is_main_process(), dynamic_ncols=True) as progress:
            data_iter = iter(loader)
            iter_end = time.perf_counter()
            for iteration in range(start_iter, self.max_iter):
                batch = next(data_iter)
                if iteration == start_iter:
                    check_masks_on_teacher_rows(batch, f"train.pipeline={cfg.train.pipeline}")
                batch = pipeline.to_device(batch, self.device)
                data_time = time.perf_counter() - iter_end
                torch.manual_seed(_iteration_seed(cfg.train.seed, get_global_rank(), iteration))
                values = dict(self.schedules.at(iteration), freeze_backbone=iteration < cfg.train.head_warmup_iterations)
                is_last = iteration == self.max_iter - 1
                stepped, total, loss_dict, stop, monitors = self.train_step(batch, values, stop_requested)
                stop = stop and not is_last
                if stepped:
                    nonfinite_in_row = 0
                    logged = _mean_over_ranks({**loss_dict, **monitors})  # one collective for both
                    metrics.update(total_loss=sum(logged[name] for name in loss_dict), **logged)
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
                    current_batch_size=batch.n_images,
                )
                if (iteration % cfg.train.log_period_iterations == 0 or is_last) and is_main_process():
                    record = metrics.write(iteration, nonfinite_steps=nonfinite_total, **_peak_memory(self.device))
                    progress.set_postfix(
                        loss=f"{record.get('total_loss', math.nan):.3f}", lr=f"{values['lr']:.2e}",
                        entropy=f"{record.get('teacher_entropy', math.nan):.3f}", prototypes=f"{record.get('prototypes_in_use', math.nan):.0f}",
                    )
                    # judged after the learning-rate warm-up: a network from scratch (LayerScale 1e-5)
                    # gives every image nearly the same feature until its blocks have grown
                    if iteration >= cfg.optim.warmup_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH:
                        reachable = min(cfg.dino.head_n_prototypes, batch.n_teacher_crops * batch.n_images)
                        for warning in self.collapse_watch.update(iteration, record, reachable):
                            logger.warning(warning)
                if (iteration + 1) % cfg.evaluation.eval_period_iterations == 0 or is_last:
                    self.export(f"training_{iteration}")
                if (iteration + 1) % self.checkpoint_period == 0 or is_last or stop:
                    last_saved = self.save_checkpoint(iteration, final=is_last)
                progress.update(1)
                iter_end = time.perf_counter()
                if stop:
                    stopped_at = iteration
                    break
        done = (stopped_at + 1 if stopped_at is not None else self.max_iter) - start_iter
        return {"iterations": done, "nonfinite_steps": nonfinite_total, "last_checkpoint": str(last_saved), "stopped_at": stopped_at}


def _agree_across_ranks(finite: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """(finite on every rank, stop asked on some rank), read back in one go.

    One MIN all-reduce of [finite, not stop] answers both; the stop flag enters as a fill on the
    device, not as a copy from the host, so the read-back below is the only wait on the GPU.
    """
    votes = torch.stack([finite.to(torch.int32), torch.full((), int(not stop), dtype=torch.int32, device=finite.device)])
    if distributed.is_enabled():
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MIN)
    answer = int(votes[0] * 2 + votes[1])  # both bits in one read-back
    return bool(answer & 2), not answer & 1


def _mean_over_ranks(loss_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Losses of the whole global batch (each rank's are means over its equal share), for logging."""
    if not distributed.is_enabled():
        return loss_dict
    means = distributed.all_reduce_mean(torch.stack([v.detach().float() for v in loss_dict.values()]))
    return dict(zip(loss_dict, means))


def _peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated so far in MiB (upstream's "max mem"); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"max_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}


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


def run(args: argparse.Namespace, stop: StopSignal | None = None) -> dict:
    """One training command in this process, joining the launcher's process group if there is one.

    Returns the training summary (with `stopped_at` set when `stop` ended it early), or
    {"exported": path} for --eval-only.
    """
    owns_group = not distributed.is_enabled()  # a caller's process group outlives this run
    distributed.enable()
    try:
        cfg = setup(args)
        setup_logging(cfg.train.output_dir)
        trainer = Trainer(cfg)
        start_iter = trainer.resume_or_load(resume=not args.no_resume)
        if args.eval_only:
            path = trainer.export(f"manual_{max(start_iter - 1, 0)}")
            if is_main_process():
                print(f"teacher exported to {path}")
            return {"exported": str(path)}
        started = time.perf_counter()
        try:
            summary = trainer.train(start_iter, stop_requested=stop.is_set if stop is not None else lambda: False)
        except NonFiniteLossError as exc:
            raise UserError(str(exc)) from None
        if is_main_process():
            if summary["stopped_at"] is not None:
                ending = f"stopped by a signal after iteration {summary['stopped_at']}; run the same command to resume"
            else:
                ending = "done"
            print(
                f"{ending}: {summary['iterations']} iterations in {time.perf_counter() - started:.1f} s "
                f"on {distributed.get_global_size()} process(es), {summary['nonfinite_steps']} skipped non-finite steps; "
                f"outputs in {cfg.train.output_dir} (last checkpoint {summary['last_checkpoint']})"
            )
        return summary
    finally:
        if owns_group:
            distributed.disable()


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    stop = StopSignal()
    try:
        run(args, stop)
    finally:
        stop.restore()
    return 0


if __name__ == "__main__":
    run_cli(main)
