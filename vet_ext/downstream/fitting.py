"""The fitting loop and command line that vet_ext's downstream trainers share.

Image-level fine-tuning (`vet_ext.downstream.finetune`) and the study-level models (`vet_ext.downstream.train_study`)
differ only in their model and in what one batch does. Epochs, the learning-rate schedule, early
stopping on a validation metric, best/last checkpoints, exact resume, the trainable (optionally
LoRA-adapted) backbone and the flags that set all of these must behave the same in both, so they
are written here once: a trainer subclasses `Trainer` and `fit` does the rest.
"""
from __future__ import annotations

import argparse
import copy
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov2.data.transforms import ClassificationEvalTransform
from dinov2.eval.setup import eval_config, eval_transform
from dinov2.train.checkpointing import atomic_torch_save, load_torch_file
from dinov2.utils.errors import UserError
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
from dinov2.utils.utils import CosineScheduler
from vet_ext.downstream.lora import apply_lora, merge_lora

BEST_NAME, LAST_NAME = "best.pth", "last.pth"

O = TypeVar("O", bound="FitOptions")


@dataclass
class FitOptions:
    """Everything a fit depends on besides data, model and weights (the few-shot tries share one)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4
    layerwise_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 5
    peft: str = "none"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    num_workers: int = 0
    seed: int = 0
    resume: bool = True

    @classmethod
    def from_args(cls: type[O], args: argparse.Namespace) -> O:
        """The options of a parsed command line: every field is a flag of the same name."""
        return cls(**{option.name: getattr(args, option.name) for option in fields(cls)})


@dataclass
class TrainingState:
    """What last.pth restores besides weights: where the run is and how it has gone so far."""

    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- model and optimiser


def trainable_backbone(backbone: nn.Module, options: FitOptions) -> nn.Module:
    """A trainable copy of `backbone` (untouched, so every model and few-shot try starts from it),
    with LoRA adapters when asked."""
    backbone = copy.deepcopy(backbone).requires_grad_(True)
    if options.peft == "lora":
        apply_lora(backbone, options.lora_rank, options.lora_alpha)
    return backbone


def make_optimizer(model: nn.Module, extra_heads: Sequence[nn.Module], options: FitOptions) -> torch.optim.AdamW:
    """AdamW with dinov2's layer-wise lr decay on `model.backbone`; the layers the model adds to it
    (heads, view embedding, fusion) and `extra_heads` (SSL heads) at full lr.

    Frozen parameters (the backbone outside its adapters under LoRA) are left out by the grouping.
    """
    groups = get_params_groups_with_decay(model.backbone, lr_decay_rate=options.layerwise_decay)
    new_layers = [module for name, module in model.named_children() if name != "backbone"]
    for module in [*new_layers, *extra_heads]:
        groups += get_params_groups_with_decay(module)
    return torch.optim.AdamW(fuse_params_groups(groups), lr=options.lr, weight_decay=options.weight_decay)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights with adapters folded in, so `backbone.*` is a plain DINOv2 backbone."""
    export = merge_lora(copy.deepcopy(model))
    return {key: value.detach().cpu().clone() for key, value in export.state_dict().items()}


# ----------------------------------------------------------------------------- the loop


class Trainer(ABC):
    """A model, its optimiser and what one batch does with them: the part of a fit that differs
    between trainers. `checkpoint_info` goes into best.pth beside the weights so it can be
    rebuilt without the command line."""

    name = ""  # names the model in progress lines, for runs that fit several
    collate_fn: Callable[[list[Any]], Any] | None = None  # the training loader's; None: torch's default

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, train_set: Dataset, metric: str,
        checkpoint_info: dict[str, Any],
    ) -> None:
        self.model, self.optimizer, self.train_set = model, optimizer, train_set
        self.metric, self.checkpoint_info = metric, checkpoint_info

    @abstractmethod
    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward pass of one training batch: the loss to minimise and its terms by name (each
        reported per epoch as "train <name>")."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Validation metrics after an epoch; `metric` among them selects the best epoch."""

    def begin_epoch(self, epoch: int, first_iteration: int) -> None:
        """Seed what the trainer itself draws during `epoch`, so a resumed run draws the same."""

    def after_update(self) -> None:
        """Follow an optimiser step (an EMA teacher does)."""

    def parts(self) -> dict[str, Any]:
        """What last.pth holds, by key: everything with a state that an exact resume needs."""
        return {"model": self.model, "optimizer": self.optimizer}


def fit(trainer: Trainer, options: FitOptions, directory: Path | None = None) -> dict[str, Any]:
    """Train until `options.epochs`, or `options.patience` epochs without a better validation
    score; returns the best epoch's checkpoint dict with the run's history.

    With `directory`, best.pth (merged weights, metrics, `checkpoint_info`) and last.pth
    (everything to resume) are written atomically after every epoch, and an existing last.pth is
    resumed from. Each epoch seeds its order and augmentations from its number and the schedule
    from its position, so a resumed run goes on exactly as an uninterrupted one.
    """
    iterations = max(1, math.ceil(len(trainer.train_set) / options.batch_size))
    total_iterations = options.epochs * iterations
    schedule = CosineScheduler(options.lr, 0.0, total_iterations,
                               warmup_iters=min(int(options.warmup_epochs * iterations), total_iterations))
    state, best = TrainingState(), None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        if options.resume:
            state, best = _resume(directory, trainer)
    epoch_name = f"{trainer.name} epoch".strip()

    while state.epoch < options.epochs and state.stale_epochs < options.patience:
        losses = _train_epoch(trainer, options, schedule, state.epoch, iterations, epoch_name)
        summary = trainer.validate()
        score = summary[trainer.metric]
        if math.isnan(score):
            raise UserError(
                f"validation {trainer.metric} is undefined: the validation set needs both classes of a label"
            )
        improved = score > state.best_score
        state.history.append({"epoch": state.epoch + 1, **{f"train {k}": v for k, v in losses.items()}, **summary})
        if improved:
            state.best_score, state.best_epoch, state.stale_epochs = score, state.epoch + 1, 0
            best = {"model": merged_state_dict(trainer.model), "metrics": summary, "epoch": state.epoch + 1,
                    **trainer.checkpoint_info}
        else:
            state.stale_epochs += 1
        state.epoch += 1
        tqdm.write(
            f"{epoch_name} {state.epoch}: train " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
            + f", val {trainer.metric} {score:.2f}"
            + (" (best)" if improved else f" (best {state.best_score:.2f} at epoch {state.best_epoch})")
        )
        if directory is not None:
            _save(directory, trainer, state, best if improved else None)
    if best is None:
        raise UserError("no epoch was trained: --epochs must be at least 1")
    return {**best, "history": state.history, "stopped_early": state.epoch < options.epochs}


def _train_epoch(
    trainer: Trainer, options: FitOptions, schedule: CosineScheduler, epoch: int, iterations: int, epoch_name: str
) -> dict[str, float]:
    """One pass over the training set; returns the mean of each loss term."""
    torch.manual_seed(options.seed + epoch)  # epoch order and augmentations survive a resume
    loader = DataLoader(
        trainer.train_set, batch_size=options.batch_size, shuffle=True, num_workers=options.num_workers,
        collate_fn=trainer.collate_fn, generator=torch.Generator().manual_seed(options.seed + epoch),
    )
    trainer.begin_epoch(epoch, epoch * iterations)
    terms: dict[str, list[float]] = defaultdict(list)
    progress = tqdm(loader, desc=f"{epoch_name} {epoch + 1}/{options.epochs}", unit="batch", leave=False)
    for step, batch in enumerate(progress):
        lr = schedule[epoch * iterations + step]
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr * group["lr_multiplier"]
            group["weight_decay"] = options.weight_decay * group["wd_multiplier"]
        loss, loss_terms = trainer.loss(batch)
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss at {epoch_name} {epoch + 1}, step {step}; lower --lr")
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.after_update()
        for name, value in loss_terms.items():
            terms[name].append(value.item())
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return {name: float(np.mean(values)) for name, values in terms.items()}


def _save(directory: Path, trainer: Trainer, state: TrainingState, best: dict[str, Any] | None) -> None:
    if best is not None:
        atomic_torch_save(best, directory / BEST_NAME)
    last = {key: part.state_dict() for key, part in trainer.parts().items()}
    atomic_torch_save({**last, "state": vars(state)}, directory / LAST_NAME)


def _resume(directory: Path, trainer: Trainer) -> tuple[TrainingState, dict[str, Any] | None]:
    last_path, best_path = directory / LAST_NAME, directory / BEST_NAME
    if not last_path.is_file():
        return TrainingState(), None
    checkpoint = load_torch_file(last_path)
    try:
        for key, part in trainer.parts().items():
            part.load_state_dict(checkpoint[key])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"{last_path}: written by a different model or options ({type(exc).__name__}); "
            "use --no-resume or another --output-dir"
        ) from None
    best = load_torch_file(best_path) if best_path.is_file() else None
    tqdm.write(f"resuming {directory.name} after epoch {checkpoint['state']['epoch']}")
    return TrainingState(**checkpoint["state"]), best


def best_epoch_note(result: dict[str, Any]) -> str:
    """Which epoch a fit kept, for the results' notes: "3 of 5 (stopped early)"."""
    stopped = " (stopped early)" if result["stopped_early"] else ""
    return f"{result['epoch']} of {len(result['history'])}{stopped}"


# ----------------------------------------------------------------------------- command line


def add_fitting_arguments(
    parser: argparse.ArgumentParser, batch_size: int, num_workers: int, batch_size_help: str | None = None
) -> None:
    """The backbone and fitting flags, as one group after the trainer's own; defaults that differ
    between trainers (a batch of studies is several images) are the caller's."""
    group = parser.add_argument_group("backbone and fitting")
    group.add_argument("--weights", required=True, help="backbone weights: teacher export, checkpoint or hub file")
    group.add_argument("--config-file", help="the pretraining run's configuration, if not the config.yaml beside the weights")
    group.add_argument("--epochs", type=int, default=20)
    group.add_argument("--batch-size", type=int, default=batch_size, help=batch_size_help)
    group.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the last block and new layers")
    group.add_argument("--layerwise-decay", type=float, default=0.75, help="lr factor per block towards the input")
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--warmup-epochs", type=float, default=1.0)
    group.add_argument("--patience", type=int, default=5, help="epochs without val improvement before stopping")
    group.add_argument("--peft", choices=("none", "lora"), default="none", help="lora: train adapters + new layers only")
    group.add_argument("--lora-rank", type=int, default=8)
    group.add_argument("--lora-alpha", type=float, default=16.0)
    group.add_argument("--image-size", type=int, default=224, help="training crop and evaluation centre crop")
    group.add_argument("--num-workers", type=int, default=num_workers)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing last.pth files")


def check_fitting_arguments(
    args: argparse.Namespace, positive: Sequence[str] = (), non_negative: Sequence[str] = ()
) -> None:
    """Refuse impossible fitting values before any data is read; `positive` and `non_negative`
    name the trainer's own flags (as attributes) that follow the same rules."""
    for name in ("epochs", "batch_size", "lr", "patience", "lora_rank", "lora_alpha", "image_size", *positive):
        if not getattr(args, name) > 0:
            raise UserError(f"{_flag(name)} must be positive, got {getattr(args, name)}")
    if not 0 < args.layerwise_decay <= 1:
        raise UserError(f"--layerwise-decay must be in (0, 1], got {args.layerwise_decay}")
    names = [*non_negative, "weight_decay", "warmup_epochs", "num_workers"]
    if any(getattr(args, name) < 0 for name in names):
        flags = [_flag(name) for name in names]
        raise UserError(f"{', '.join(flags[:-1])} and {flags[-1]} must not be negative")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def backbone_setup(args: argparse.Namespace) -> tuple[DictConfig | None, ClassificationEvalTransform]:
    """The backbone's configuration (from `--config-file`, else the run that exported `--weights`,
    else None: read from the weights) and upstream's evaluation crop at `--image-size`, normalised
    as the backbone was trained: what a fitting command's model and validation images need."""
    cfg = eval_config(args.config_file, args.weights)
    return cfg, eval_transform(cfg, args.image_size)
