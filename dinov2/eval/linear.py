"""Linear probes on a frozen backbone, upstream DINOv2's protocol.

Inputs are the normalised outputs of the last 4 blocks (`get_intermediate_layers(n=4,
return_class_token=True)`). A grid of linear heads is trained jointly, one per combination of
{cls token of the last block, cls tokens of the last 4 blocks concatenated} x {without, with the
mean patch token of the last block} x learning rate (each scaled by batch size x world size / 256);
SGD with momentum 0.9, no weight decay, cosine decay to 0 over epochs x epoch-length iterations,
heads initialised N(0, 0.01) with zero bias. The head with the best validation metric is
reported on the test datasets (accuracy for classes; macro AP with a BCE loss for labels).

Upstream re-augments every training image at every step (random resized crop + flip), which
costs a backbone pass per step. By default (`--feature-cache`) the training images are embedded
once with the evaluation transform and the heads train on those cached tokens: the same
protocol without augmentation, hundreds of times cheaper on a CPU. `--train-augmentation`
restores upstream's behaviour (and turns the cache off).

    python -m dinov2.eval.linear --pretrained-weights W.pth --train-dataset STR --val-dataset STR \
        --output-dir OUT/linear --epochs 10 --epoch-length 100
"""
from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dinov2 import distributed
from dinov2.data import SamplerType, make_data_loader, make_dataset
from dinov2.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from dinov2.data.loaders import derive_seed
from dinov2.data.transforms import ClassificationTrainTransform
from dinov2.eval.metrics import (
    SINGLE,
    MetricType,
    default_metric,
    evaluate_predictions,
    metric_key,
    num_outputs,
    target_kind,
)
from dinov2.eval.results import append_json_lines, atomic_write, write_results
from dinov2.eval.setup import (
    add_image_arguments,
    get_args_parser as get_setup_args_parser,
    get_eval_config,
    make_eval_transform,
    prepare_output_dir,
    setup_and_build_model,
)
from dinov2.eval.utils import autocast_context, extract_features, label_names, model_device, normalize_targets
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")

N_LAST_BLOCKS_LIST = (1, 4)
RUNNING_CHECKPOINT = "running_checkpoint_linear_eval.pth"
METRICS_FILE = "results_eval_linear.json"
SEED = 0


def get_args_parser(
    description: str | None = None,
    parents: Sequence[argparse.ArgumentParser] | None = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    setup_parser = get_setup_args_parser(parents=parents, add_help=False)
    parser = argparse.ArgumentParser(description=description, parents=[setup_parser], add_help=add_help)
    parser.add_argument("--train-dataset", dest="train_dataset_str", type=str, help="training dataset")
    parser.add_argument("--val-dataset", dest="val_dataset_str", type=str, help="dataset that picks the best head")
    parser.add_argument(
        "--test-datasets", dest="test_dataset_strs", type=str, nargs="+", help="test datasets (default: val)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default 10)")
    parser.add_argument("--batch-size", type=int, help="batch size per process (default 128)")
    parser.add_argument("--epoch-length", type=int, help="iterations per epoch (default 1250)")
    parser.add_argument(
        "--save-checkpoint-frequency", type=int, help="epochs between two named checkpoints (default 20)"
    )
    parser.add_argument("--eval-period-iterations", type=int, help="iterations between validations (default 1250)")
    parser.add_argument("--learning-rates", nargs="+", type=float, help="learning rates of the head grid")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    parser.add_argument(
        "--val-metric-type", type=MetricType, choices=list(MetricType),
        help="metric that picks the best head (default: mean_accuracy for classes, macro_ap for labels)",
    )
    parser.add_argument(
        "--feature-cache", action=argparse.BooleanOptionalAction, default=None,
        help="embed training images once and train the heads on cached tokens "
        "(default: on, unless --train-augmentation)",
    )
    parser.add_argument(
        "--train-augmentation", action="store_true",
        help="upstream's random resized crop + flip at every step (a backbone pass per step; no cache)",
    )
    add_image_arguments(parser, resize_ratio=256 / 224)
    parser.set_defaults(
        train_dataset_str="ImageNet:split=TRAIN",
        val_dataset_str="ImageNet:split=VAL",
        test_dataset_strs=None,
        epochs=10,
        batch_size=128,
        num_workers=8,
        epoch_length=1250,
        save_checkpoint_frequency=20,
        eval_period_iterations=1250,
        learning_rates=[1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1],
        val_metric_type=None,
    )
    return parser


def n_last_blocks_list(depth: int) -> list[int]:
    """Upstream's {1, 4} last blocks; a backbone shallower than 4 blocks uses all it has."""
    return sorted({min(n, depth) for n in N_LAST_BLOCKS_LIST})


def intermediate_tokens(model: nn.Module, images: torch.Tensor, n_last_blocks: int) -> torch.Tensor:
    """[B, n+1, D]: normalised cls tokens of the last n blocks (oldest first), then the mean patch
    token of the last block: everything any head of the grid reads, in one tensor that can be cached."""
    layers = model.get_intermediate_layers(images, n=n_last_blocks, return_class_token=True, norm=True)
    class_tokens = [class_token for _, class_token in layers]
    return torch.stack((*class_tokens, layers[-1][0].mean(dim=1)), dim=1)


def linear_input(tokens: torch.Tensor, use_n_blocks: int, use_avgpool: bool) -> torch.Tensor:
    """Upstream's head input: last `use_n_blocks` cls tokens concatenated [+ mean patch token]."""
    n_cached = tokens.shape[1] - 1
    parts = [tokens[:, n_cached - use_n_blocks : n_cached].flatten(1)]
    if use_avgpool:
        parts.append(tokens[:, -1])
    return torch.cat(parts, dim=1).float()


class LinearClassifier(nn.Module):
    def __init__(self, embed_dim: int, use_n_blocks: int, use_avgpool: bool, num_outputs: int):
        super().__init__()
        self.use_n_blocks, self.use_avgpool = use_n_blocks, use_avgpool
        self.linear = nn.Linear(embed_dim * (use_n_blocks + int(use_avgpool)), num_outputs)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(linear_input(tokens, self.use_n_blocks, self.use_avgpool))


def scale_lr(learning_rate: float, batch_size: int) -> float:
    return learning_rate * batch_size * distributed.get_global_size() / 256.0


def setup_linear_classifiers(
    embed_dim: int, blocks_list: Sequence[int], learning_rates: Sequence[float], batch_size: int, num_outputs: int
) -> tuple[nn.ModuleDict, list[dict]]:
    """The head grid (upstream's names) and one optimizer parameter group per head with its scaled lr."""
    heads, param_groups = nn.ModuleDict(), []
    for n_blocks in blocks_list:
        for avgpool in (False, True):
            for base_lr in learning_rates:
                lr = scale_lr(base_lr, batch_size)
                head = LinearClassifier(embed_dim, n_blocks, avgpool, num_outputs)
                heads[f"classifier_{n_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_")] = head
                param_groups.append({"params": head.parameters(), "lr": lr})
    return heads, param_groups


def head_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classes (-1 ignored); BCE for labels over the annotated entries only."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, ignore_index=-1)
    annotated = ~torch.isnan(targets)
    losses = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    return (losses * annotated).sum() / annotated.sum().clamp_min(1)


def head_probabilities(logits: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    return (torch.softmax(logits, 1) if target_kind(targets) == SINGLE else torch.sigmoid(logits)).numpy()


def batch_indices(iteration: int, batch_size: int, size: int, seed: int = SEED) -> torch.Tensor:
    """Samples of batch `iteration` in an endless stream of seeded per-pass permutations.

    A pure function of (iteration, seed): a resumed run sees exactly the batches it would have seen.
    """
    positions = torch.arange(iteration * batch_size, (iteration + 1) * batch_size)
    passes, offsets = positions // size, positions % size
    indices = torch.empty_like(positions)
    for pass_number in passes.unique().tolist():
        generator = torch.Generator().manual_seed(derive_seed(seed, pass_number))
        in_pass = passes == pass_number
        indices[in_pass] = torch.randperm(size, generator=generator)[offsets[in_pass]]
    return indices


class CachedBatches:
    """Training batches drawn from cached tokens; samples without any label are dropped first."""

    def __init__(self, tokens: torch.Tensor, targets: np.ndarray, batch_size: int):
        keep = targets >= 0 if targets.ndim == 1 else ~np.isnan(targets).all(axis=1)
        self.tokens, self.targets = tokens[torch.from_numpy(keep)], torch.from_numpy(targets[keep])
        if len(self.tokens) == 0:
            raise UserError("the training dataset has no labelled sample")
        self.batch_size = batch_size

    def __call__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = batch_indices(iteration, self.batch_size, len(self.tokens))
        return self.tokens[index], self.targets[index]


class AugmentedBatches:
    """Upstream's training stream: freshly augmented images through the frozen backbone each step."""

    def __init__(self, model: nn.Module, dataset, batch_size: int, num_workers: int, start_iter: int, autocast_dtype):
        self.model, self.autocast_dtype = model, autocast_dtype
        self.n_last_blocks = max(n_last_blocks_list(model.n_blocks))
        loader = make_data_loader(
            dataset, batch_size=batch_size, num_workers=num_workers, shuffle=True, seed=SEED,
            sampler_type=SamplerType.SHARDED_INFINITE, sampler_advance=start_iter * batch_size, drop_last=True,
        )
        self.batches = iter(loader)

    @torch.no_grad()
    def __call__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = next(self.batches)
        device = model_device(self.model)
        with autocast_context(device, self.autocast_dtype):
            tokens = intermediate_tokens(self.model, images.to(device), self.n_last_blocks)
        return tokens.float(), torch.as_tensor(normalize_targets(targets))


@torch.no_grad()
def evaluate_heads(
    heads: nn.ModuleDict, tokens: torch.Tensor, targets: np.ndarray, names: Sequence[str] | None = None
) -> dict[str, tuple[dict[str, float], list[dict], list[str]]]:
    """`evaluate_predictions` of every head on cached tokens."""
    device = next(heads.parameters()).device
    results = {}
    for name, head in heads.items():
        logits = torch.cat([head(chunk.to(device)).float().cpu() for chunk in tokens.split(4096)])
        results[name] = evaluate_predictions(head_probabilities(logits, targets), targets, names)
    return results


def best_head(results: dict[str, tuple[dict[str, float], list, list]], key: str) -> str:
    """The head with the highest `key` (first of equals; NaN never wins)."""
    return max(results, key=lambda name: -math.inf if math.isnan(results[name][0][key]) else results[name][0][key])


def _save_checkpoint(path: Path, heads: nn.Module, optimizer, scheduler, iteration: int) -> None:
    state = {
        "heads": heads.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
    }
    atomic_write(path, lambda f: torch.save(state, f))


def _resume(path: Path, heads: nn.Module, optimizer, scheduler) -> int:
    """Load our running checkpoint; returns the first iteration still to train."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(
            f"{path}: checkpoint from a run with other heads/learning rates ({str(exc).splitlines()[0]}); "
            "use --no-resume or another --output-dir"
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resuming linear heads from %s at iteration %d", path, state["iteration"] + 1)
    return state["iteration"] + 1


def train_linear_heads(
    heads: nn.ModuleDict,
    param_groups: list[dict],
    make_batches: Callable[[int], Callable[[int], tuple[torch.Tensor, torch.Tensor]]],
    *,
    max_iter: int,
    output_dir: Path,
    resume: bool = True,
    checkpoint_period: int = 1250,
    named_checkpoint_period: int = 25000,
    eval_period: int = 0,
    evaluate: Callable[[int], object] | None = None,
) -> None:
    """SGD (momentum 0.9, no weight decay, cosine to 0) on the summed losses of all heads.

    `make_batches(start_iter)` gives the batch function `(iteration) -> (tokens, targets)`, made
    once the resume point is known so a streaming loader can start there. Checkpoints are atomic.
    """
    optimizer = torch.optim.SGD(param_groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max_iter, eta_min=0)
    running = output_dir / RUNNING_CHECKPOINT
    start_iter = _resume(running, heads, optimizer, scheduler) if resume else 0
    next_batch = make_batches(start_iter)
    device = next(heads.parameters()).device
    heads.train()
    with tqdm(total=max_iter, initial=start_iter, desc="linear heads", unit="it",
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


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "epoch_length", "save_checkpoint_frequency"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(lr <= 0 for lr in args.learning_rates):
        raise UserError(f"--learning-rates must be positive, got {args.learning_rates}")
    if args.train_augmentation and args.feature_cache:
        raise UserError("--feature-cache cannot be combined with --train-augmentation (cached images are not re-augmented)")


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    output_dir = prepare_output_dir(args)
    eval_transform = make_eval_transform(args)
    test_strs = args.test_dataset_strs or [args.val_dataset_str]
    eval_strs = list(dict.fromkeys([args.val_dataset_str, *test_strs]))
    eval_datasets = {string: make_dataset(string, transform=eval_transform) for string in eval_strs}
    use_cache = not args.train_augmentation if args.feature_cache is None else args.feature_cache
    if use_cache:
        train_dataset = make_dataset(args.train_dataset_str, transform=eval_transform)
    else:
        cfg = get_eval_config(args)
        mean, std = (tuple(cfg.crops.mean), tuple(cfg.crops.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
        train_dataset = make_dataset(
            args.train_dataset_str, transform=ClassificationTrainTransform(args.crop_size, mean, std)
        )
    model, autocast_dtype = setup_and_build_model(args)
    blocks_list = n_last_blocks_list(model.n_blocks)
    forward = lambda images: intermediate_tokens(model, images, max(blocks_list))  # noqa: E731
    extract = dict(autocast_dtype=autocast_dtype, forward=forward)
    eval_sets = {
        string: extract_features(model, dataset, args.batch_size, args.num_workers, desc=f"{string} tokens", **extract)
        for string, dataset in eval_datasets.items()
    }
    target_sets = [targets for _, targets in eval_sets.values()]
    if use_cache:
        train_tokens, train_targets = extract_features(
            model, train_dataset, args.batch_size, args.num_workers, desc="train tokens", **extract
        )
        cached = CachedBatches(train_tokens, train_targets, args.batch_size)
        make_batches = lambda start: cached  # noqa: E731
        target_sets.append(train_targets)
    else:
        if hasattr(train_dataset, "get_targets"):
            target_sets.append(normalize_targets(train_dataset.get_targets()))
        make_batches = lambda start: AugmentedBatches(  # noqa: E731
            model, train_dataset, args.batch_size, args.num_workers, start, autocast_dtype
        )
    val_tokens, val_targets = eval_sets[args.val_dataset_str]
    metric = args.val_metric_type or default_metric(val_targets)
    key = metric_key(metric, val_targets)
    names = label_names(eval_datasets[args.val_dataset_str], val_targets)
    heads, param_groups = setup_linear_classifiers(
        model.embed_dim, blocks_list, args.learning_rates, args.batch_size, num_outputs(*target_sets)
    )
    heads.to(model_device(model))
    metrics_path = output_dir / METRICS_FILE

    def validate(iteration: int) -> str:
        results = evaluate_heads(heads, val_tokens, val_targets, names)
        name = best_head(results, key)
        if distributed.is_main_process():
            append_json_lines(metrics_path, [{"iter": iteration, "best_classifier": {"name": name, key: results[name][0][key]}}])
        return name

    max_iter = args.epochs * args.epoch_length
    train_linear_heads(
        heads, param_groups, make_batches, max_iter=max_iter, output_dir=output_dir,
        resume=not args.no_resume, checkpoint_period=args.epoch_length,
        named_checkpoint_period=args.save_checkpoint_frequency * args.epoch_length,
        eval_period=args.eval_period_iterations, evaluate=validate,
    )
    chosen = validate(max_iter)
    rows, per_label, skipped = [], [], set()
    for string in test_strs:
        tokens, targets = eval_sets[string]
        summary, label_rows, skipped_here = evaluate_heads(
            nn.ModuleDict({chosen: heads[chosen]}), tokens, targets, label_names(eval_datasets[string], targets)
        )[chosen]
        rows.append({"dataset": string, **summary})
        per_label += [{"dataset": string, **row} for row in label_rows]
        skipped.update(skipped_here)
    if distributed.is_main_process():
        info = {
            "weights": args.pretrained_weights,
            "train": f"{args.train_dataset_str} ({len(train_dataset)} images)",
            "best head (on val)": chosen,
            "chosen by": f"{key} on {args.val_dataset_str}",
            "training": f"{max_iter} iterations of batch {args.batch_size}, "
            + ("cached features (no augmentation)" if use_cache else "augmented images"),
            "skipped labels (one class only)": ", ".join(sorted(skipped)) or "none",
        }
        details = {"per-label AP / AUC": per_label} if per_label else None
        write_results(output_dir, "linear", rows, details=details, info=info)
        print(f"linear done: best head {chosen}; {test_strs[0]}: {key} {rows[0][key]:.2f}; "
              f"results in {output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser(description="DINOv2 linear evaluation").parse_args()))
