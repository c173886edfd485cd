"""Training the grid of linear heads: SGD over batches, with a running checkpoint to resume from.

A run on a shared cluster is killed and resumed; the checkpoint holds heads, optimiser and
schedule together, and a resume refuses a schedule other than the one the heads were trained on
(the cosine decay would otherwise restart in the wrong place).
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dinov2 import distributed
from dinov2.eval.linear_heads import head_loss
from dinov2.models.weights import state_differences
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write

logger = logging.getLogger("dinov2")

RUNNING_CHECKPOINT = "running_checkpoint_linear_eval.pth"


def _save_checkpoint(path: Path, heads: nn.Module, optimizer, scheduler, iteration: int) -> None:
    state = {
        "heads": heads.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
    }
    atomic_write(path, lambda f: torch.save(state, f))


@dataclass
class HeadsCheckpoint:
    """A saved state of the head grid, to resume from or to start another run from."""

    path: Path
    heads: dict[str, torch.Tensor]
    optimizer: dict | None
    scheduler: dict | None
    iteration: int  # the last trained iteration; -1 when the file does not say
    resumed: bool = False  # this run's own running checkpoint rather than --classifier-fpath

    @property
    def num_outputs(self) -> int:
        return next(value.shape[0] for key, value in self.heads.items() if key.endswith("linear.weight"))


def read_heads_checkpoint(path: str | Path, resumed: bool = False) -> HeadsCheckpoint:
    """Our checkpoints {"heads", "optimizer", "scheduler", "iteration"} and upstream's fvcore ones,
    whose heads sit under "model" with an `AllClassifiers` (and DDP) prefix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: linear heads checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"{path}: not a PyTorch checkpoint readable with weights_only ({type(exc).__name__})") from None
    heads = state.get("heads", state.get("model")) if isinstance(state, dict) else None
    if not isinstance(heads, dict):
        heads = {}
    heads = {key.removeprefix("module.").removeprefix("classifiers_dict."): value for key, value in heads.items()}
    if not any(key.endswith("linear.weight") for key in heads):
        raise UserError(
            f"{path}: holds no linear heads (expected a 'heads' entry as written by dinov2.eval.linear, "
            "or upstream's 'model')"
        )
    return HeadsCheckpoint(
        path, heads, state.get("optimizer"), state.get("scheduler"), int(state.get("iteration", -1)), resumed
    )


def start_checkpoint(output_dir: Path, resume: bool, classifier_fpath: str | None = None) -> HeadsCheckpoint | None:
    """Upstream's order: this run's running checkpoint when resuming and it exists, else the given heads."""
    running = output_dir / RUNNING_CHECKPOINT
    if resume and running.is_file():
        return read_heads_checkpoint(running, resumed=True)
    return read_heads_checkpoint(classifier_fpath) if classifier_fpath else None


def _heads_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """Why saved heads cannot be loaded, in head names and shapes ("" when they fit): names carry
    the blocks, pooling and learning rate, shapes the backbone width and the number of classes."""
    differences = state_differences(expected, found)
    head = lambda key: key.rsplit(".linear.", 1)[0]  # noqa: E731
    missing = sorted({head(key) for key in differences.missing})
    unexpected = sorted({head(key) for key in differences.unexpected})
    problems = []
    if missing:
        problems.append(f"{len(missing)} head(s) of this run not in the file, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} head(s) in the file not in this run, e.g. {unexpected[0]}")
    if differences.reshaped:
        key = sorted(differences.reshaped)[0]
        in_file, here = differences.reshaped[key]
        problems.append(f"{key} is {in_file} in the file, {here} here (other backbone width or number of classes)")
    return "; ".join(problems)


def _restore(checkpoint: HeadsCheckpoint, heads: nn.Module, optimizer, scheduler, max_iter: int) -> int:
    """Load heads, momentum and schedule position; returns the first iteration still to train.

    Continuing needs the file's cosine schedule to be this run's: its length is part of every
    later learning rate, so a different `max_iter` is refused rather than silently reshaped.
    """
    hint = "; use --no-resume or another --output-dir" if checkpoint.resumed else ""
    mismatch = _heads_mismatch(heads.state_dict(), checkpoint.heads)
    if mismatch:
        raise UserError(f"{checkpoint.path}: linear heads that do not fit this run ({mismatch}){hint}")
    heads.load_state_dict(checkpoint.heads)
    if checkpoint.optimizer is not None:
        try:
            optimizer.load_state_dict(checkpoint.optimizer)
        except (KeyError, ValueError) as exc:
            raise UserError(f"{checkpoint.path}: optimizer state that does not fit the heads ({exc}){hint}") from None
    start_iter = checkpoint.iteration + 1
    if checkpoint.scheduler is not None and start_iter < max_iter:
        trained_for = checkpoint.scheduler.get("T_max")
        if trained_for != max_iter:
            raise UserError(
                f"{checkpoint.path}: heads trained for {start_iter} of a {trained_for}-iteration schedule; "
                f"this run's schedule has {max_iter} (--epochs x --epoch-length): continue with the same one{hint}"
            )
        scheduler.load_state_dict(checkpoint.scheduler)
    logger.info("linear heads from %s, trained to iteration %d", checkpoint.path, start_iter)
    return start_iter


def train_linear_heads(
    heads: nn.ModuleDict,
    param_groups: list[dict],
    make_batches: Callable[[int], Callable[[int], tuple[torch.Tensor, torch.Tensor]]] | None,
    *,
    max_iter: int,
    output_dir: Path,
    resume: bool = True,
    start: HeadsCheckpoint | None = None,
    checkpoint_period: int = 1250,
    named_checkpoint_period: int = 25000,
    eval_period: int = 0,
    evaluate: Callable[[int], object] | None = None,
) -> int:
    """SGD (momentum 0.9, no weight decay, cosine to 0) on the summed losses of all heads.

    Starts from `start` (as chosen by `start_checkpoint`), else from output_dir's running
    checkpoint when `resume`. `make_batches(start_iter)` gives the batch function
    `(iteration) -> (tokens, targets)`, made once the start is known so a streaming loader can
    start there; it may be None when `start` leaves nothing to train. Checkpoints are atomic.
    Returns the number of iterations the heads have been trained for.
    """
    optimizer = torch.optim.SGD(param_groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max_iter, eta_min=0)
    running = output_dir / RUNNING_CHECKPOINT
    if start is None:
        start = start_checkpoint(output_dir, resume)
    start_iter = _restore(start, heads, optimizer, scheduler, max_iter) if start is not None else 0
    next_batch = make_batches(start_iter) if start_iter < max_iter else None
    device = next(heads.parameters()).device
    heads.train()
    with tqdm(total=max(max_iter, start_iter), initial=start_iter, desc="linear heads", unit="it",
              disable=not distributed.is_main_process(), dynamic_ncols=True) as progress:
        for iteration in range(start_iter, max_iter):
            tokens, targets = next_batch(iteration)
            tokens, targets = tokens.to(device), targets.to(device)
            loss = sum(head_loss(head(tokens), targets) for head in heads.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            last = iteration == max_iter - 1
            if distributed.is_main_process() and ((iteration + 1) % checkpoint_period == 0 or last):
                _save_checkpoint(running, heads, optimizer, scheduler, iteration)
            if distributed.is_main_process() and (iteration + 1) % named_checkpoint_period == 0:
                _save_checkpoint(output_dir / f"model_{iteration:07d}.pth", heads, optimizer, scheduler, iteration)
            if evaluate is not None and eval_period > 0 and (iteration + 1) % eval_period == 0 and not last:
                heads.eval()
                evaluate(iteration)
                heads.train()
    heads.eval()
    return max(max_iter, start_iter)
