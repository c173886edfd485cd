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

As upstream, heads can start from a saved grid (`--classifier-fpath`; already trained to the
last iteration, they are only evaluated), and a class mapping lets heads trained on a larger
label space score a dataset whose classes are a subset of it (`--*-class-mapping-fpath*`).

    python -m dinov2.eval.linear --pretrained-weights W.pth --train-dataset STR --val-dataset STR \
        --output-dir OUT/linear --epochs 10 --epoch-length 100
"""
from __future__ import annotations

import argparse
import logging
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    MULTI,
    SINGLE,
    MetricType,
    check_available,
    default_metric,
    evaluate_predictions,
    metric_key,
    num_outputs,
    per_class_accuracy,
    target_kind,
)
from dinov2.eval.results import append_json_lines, write_results
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
from dinov2.utils.io import atomic_write

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
        help="metric that picks the best head (default: mean_accuracy for classes, macro_ap for labels; "
        "per_class_accuracy picks by its mean)",
    )
    parser.add_argument(
        "--test-metric-types", type=MetricType, choices=list(MetricType), nargs="+",
        help="metric of each test dataset (default: the val metric for every one); per_class_accuracy adds a "
        "table of every class's accuracy",
    )
    parser.add_argument(
        "--classifier-fpath", type=str,
        help="linear heads to start from (a running_checkpoint_linear_eval.pth or model_*.pth); this run's own "
        "running checkpoint wins when resuming; heads trained to the last iteration are only evaluated",
    )
    parser.add_argument(
        "--val-class-mapping-fpath", type=str,
        help=".npy integer array: the head output that scores each class of the val dataset",
    )
    parser.add_argument(
        "--test-class-mapping-fpaths", type=str, nargs="+",
        help=".npy class mapping of each test dataset, 'None' for a dataset without one (default: none)",
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
        test_metric_types=None,
        classifier_fpath=None,
        val_class_mapping_fpath=None,
        test_class_mapping_fpaths=None,
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
def head_logits(head: nn.Module, tokens: torch.Tensor, class_mapping: np.ndarray | None = None) -> torch.Tensor:
    """Float logits on the CPU; with a class mapping, column j is the head's output mapping[j]
    (upstream's `preds[:, class_mapping]`: heads trained on a larger label space scored on a subset)."""
    device = next(head.parameters()).device
    logits = torch.cat([head(chunk.to(device)).float().cpu() for chunk in tokens.split(4096)])
    return logits if class_mapping is None else logits[:, torch.from_numpy(class_mapping)]


def evaluate_heads(
    heads: nn.ModuleDict,
    tokens: torch.Tensor,
    targets: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    class_mapping: np.ndarray | None = None,
) -> dict[str, tuple[dict[str, float], list[dict], list[str]]]:
    """`evaluate_predictions` of every head on cached tokens."""
    results = {}
    for name, head in heads.items():
        probabilities = head_probabilities(head_logits(head, tokens, class_mapping), targets)
        results[name] = evaluate_predictions(probabilities, targets, names)
    return results


def per_class_rows(logits: torch.Tensor, targets: np.ndarray, class_names: Sequence[str] | None) -> list[dict]:
    """Upstream's per_class_accuracy as a table: one row per class present, in percent."""
    labelled = targets >= 0
    truth = torch.from_numpy(targets[labelled])
    counts = np.bincount(truth.numpy())
    return [
        {
            "class": c,
            **({"name": class_names[c]} if class_names is not None and c < len(class_names) else {}),
            "accuracy": 100.0 * accuracy,
            "samples": int(counts[c]),
        }
        for c, accuracy in per_class_accuracy(logits[torch.from_numpy(labelled)], truth).items()
    ]


@dataclass
class ClassMapping:
    """Which head output scores each class of a dataset (upstream's --*-class-mapping-fpath .npy)."""

    path: str
    indices: np.ndarray


def load_class_mapping(path: str | None) -> ClassMapping | None:
    """The mapping in `path`; None (or upstream's placeholder "None") means the outputs are the classes."""
    if path is None or path == "None":
        return None
    if not Path(path).is_file():
        raise UserError(f"{path}: class mapping file not found")
    try:
        indices = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise UserError(f"{path}: not a .npy array file (numpy.save of an integer array)") from None
    if not isinstance(indices, np.ndarray):
        indices.close()
        raise UserError(f"{path}: an .npz archive; a class mapping is one .npy array")
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise UserError(f"{path}: a class mapping must be a 1-D integer array (the head output of each class), "
                        f"found {indices.dtype} of shape {indices.shape}")
    if indices.size == 0 or indices.min() < 0:
        raise UserError(f"{path}: a class mapping needs at least one entry and no negative index")
    return ClassMapping(path, indices.astype(np.int64))


def check_heads_fit(
    width: int, heads_source: str, dataset_str: str, targets: np.ndarray, mapping: ClassMapping | None
) -> None:
    """Every class (or label) of the dataset must be one of the heads' outputs, through the mapping if any."""
    if mapping is not None:
        if mapping.indices.max() >= width:
            raise UserError(f"{mapping.path}: index {mapping.indices.max()} is out of range for {heads_source}, "
                            f"which have {width} outputs")
        space, owner = len(mapping.indices), f"the {len(mapping.indices)} entries of {mapping.path}"
    else:
        space, owner = width, f"the {width} outputs of {heads_source}"
    if target_kind(targets) == MULTI:
        if targets.shape[1] != space:
            raise UserError(f"{dataset_str}: {targets.shape[1]} labels do not match {owner}")
    elif targets.size and targets.max() >= space:
        raise UserError(f"{dataset_str}: class {targets.max()} is beyond {owner}")


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
    head = lambda key: key.rsplit(".linear.", 1)[0]  # noqa: E731
    missing = sorted({head(key) for key in expected.keys() - found.keys()})
    unexpected = sorted({head(key) for key in found.keys() - expected.keys()})
    reshaped = [key for key in expected.keys() & found.keys() if expected[key].shape != found[key].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} head(s) of this run not in the file, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} head(s) in the file not in this run, e.g. {unexpected[0]}")
    if reshaped:
        key = sorted(reshaped)[0]
        problems.append(f"{key} is {list(found[key].shape)} in the file, {list(expected[key].shape)} here "
                        "(other backbone width or number of classes)")
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


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "epoch_length", "save_checkpoint_frequency"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(lr <= 0 for lr in args.learning_rates):
        raise UserError(f"--learning-rates must be positive, got {args.learning_rates}")
    if args.train_augmentation and args.feature_cache:
        raise UserError("--feature-cache cannot be combined with --train-augmentation (cached images are not re-augmented)")
    n_tests = len(args.test_dataset_strs or [args.val_dataset_str])
    for flag, values in (("--test-metric-types", args.test_metric_types),
                         ("--test-class-mapping-fpaths", args.test_class_mapping_fpaths)):
        if values is not None and len(values) != n_tests:
            raise UserError(f"{flag} has {len(values)} entries for {n_tests} test dataset(s); "
                            "give one per test dataset, in --test-datasets order, or none")
    for metric in (args.val_metric_type, *(args.test_metric_types or ())):
        if metric is not None:
            check_available(metric)


def _train_dataset(args: argparse.Namespace, eval_transform, use_cache: bool):
    """Cached tokens are embedded like evaluation images; the augmented stream gets upstream's train transform."""
    if use_cache:
        return make_dataset(args.train_dataset_str, transform=eval_transform)
    cfg = get_eval_config(args)
    mean, std = (tuple(cfg.crops.mean), tuple(cfg.crops.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return make_dataset(args.train_dataset_str, transform=ClassificationTrainTransform(args.crop_size, mean, std))


def _training_batches(
    args: argparse.Namespace, train_dataset, use_cache: bool, model: nn.Module, autocast_dtype, extract: dict
) -> tuple[Callable[[int], Callable], np.ndarray | None]:
    """(make_batches for `train_linear_heads`, the training targets when known: they size the heads)."""
    if use_cache:
        tokens, targets = extract_features(
            model, train_dataset, args.batch_size, args.num_workers, desc="train tokens", **extract
        )
        cached = CachedBatches(tokens, targets, args.batch_size)
        return (lambda start: cached), targets
    targets = normalize_targets(train_dataset.get_targets()) if hasattr(train_dataset, "get_targets") else None
    return (
        lambda start: AugmentedBatches(model, train_dataset, args.batch_size, args.num_workers, start, autocast_dtype)
    ), targets


def _heads_width(start: HeadsCheckpoint | None, target_sets: list[np.ndarray], train_str: str) -> tuple[int, str]:
    """(outputs of every head, what decided it): the start file's heads, else every class seen."""
    if start is not None:
        return start.num_outputs, f"the heads in {start.path}"
    if not target_sets:
        raise UserError(f"{train_str}: its classes are unknown (no get_targets) and every evaluation dataset has a "
                        "class mapping; drop --train-augmentation so the training targets are read")
    return num_outputs(*target_sets), "the heads (one output per class of the datasets without a mapping)"


def _score_tests(
    head: nn.Module, tests: list[tuple[str, ClassMapping | None, MetricType]], eval_sets: dict, eval_datasets: dict
) -> tuple[list[dict], dict[str, list[dict]], set[str]]:
    """The chosen head on each test dataset: (one summary row each, detail tables, skipped labels)."""
    rows, per_label, per_class, skipped = [], [], [], set()
    for string, mapping, test_metric in tests:
        tokens, targets = eval_sets[string]
        logits = head_logits(head, tokens, mapping.indices if mapping else None)
        summary, label_rows, skipped_here = evaluate_predictions(
            head_probabilities(logits, targets), targets, label_names(eval_datasets[string], targets)
        )
        rows.append({"dataset": string, **summary})
        per_label += [{"dataset": string, **row} for row in label_rows]
        if test_metric == MetricType.PER_CLASS_ACCURACY:
            class_names = getattr(eval_datasets[string], "classes", None)  # ImageFolder's folder names
            class_names = class_names if isinstance(class_names, (list, tuple)) else None
            per_class += [{"dataset": string, **row} for row in per_class_rows(logits, targets, class_names)]
        skipped.update(skipped_here)
    tables = (("per-label AP / AUC", per_label), ("per-class accuracy", per_class))
    return rows, {title: table for title, table in tables if table}, skipped


def _training_note(
    args: argparse.Namespace, start: HeadsCheckpoint | None, trained_for: int, to_train: bool, use_cache: bool
) -> str:
    if not to_train:
        return f"none: heads from {start.path}, trained for {trained_for} iterations"
    note = f"{args.epochs * args.epoch_length} iterations of batch {args.batch_size}, " + (
        "cached features (no augmentation)" if use_cache else "augmented images"
    )
    return note + (f", continued from {start.path} after iteration {start.iteration}" if start is not None else "")


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    output_dir = prepare_output_dir(args)
    test_strs = args.test_dataset_strs or [args.val_dataset_str]
    val_mapping = load_class_mapping(args.val_class_mapping_fpath)
    test_mappings = [load_class_mapping(path) for path in args.test_class_mapping_fpaths or [None] * len(test_strs)]
    max_iter = args.epochs * args.epoch_length
    start = start_checkpoint(output_dir, not args.no_resume, args.classifier_fpath)
    to_train = start is None or start.iteration + 1 < max_iter
    eval_transform = make_eval_transform(args)
    eval_strs = list(dict.fromkeys([args.val_dataset_str, *test_strs]))
    eval_datasets = {string: make_dataset(string, transform=eval_transform) for string in eval_strs}
    use_cache = not args.train_augmentation if args.feature_cache is None else args.feature_cache
    train_dataset = _train_dataset(args, eval_transform, use_cache) if to_train else None
    model, autocast_dtype = setup_and_build_model(args)
    blocks_list = n_last_blocks_list(model.n_blocks)
    forward = lambda images: intermediate_tokens(model, images, max(blocks_list))  # noqa: E731
    extract = dict(autocast_dtype=autocast_dtype, forward=forward)
    eval_sets = {
        string: extract_features(model, dataset, args.batch_size, args.num_workers, desc=f"{string} tokens", **extract)
        for string, dataset in eval_datasets.items()
    }
    make_batches, train_targets = (
        _training_batches(args, train_dataset, use_cache, model, autocast_dtype, extract) if to_train else (None, None)
    )
    val_tokens, val_targets = eval_sets[args.val_dataset_str]
    metric = args.val_metric_type or default_metric(val_targets)
    key = metric_key(metric, val_targets)
    tests = list(zip(test_strs, test_mappings, args.test_metric_types or [metric] * len(test_strs)))
    test_keys = [metric_key(test_metric, eval_sets[string][1]) for string, _, test_metric in tests]
    scored = [(args.val_dataset_str, val_mapping), *((string, mapping) for string, mapping, _ in tests)]
    if train_targets is not None:
        scored.append((args.train_dataset_str, None))
    targets_of = {string: targets for string, (_, targets) in eval_sets.items()}
    targets_of[args.train_dataset_str] = train_targets
    width, heads_source = _heads_width(
        start, [targets_of[string] for string, mapping in scored if mapping is None], args.train_dataset_str
    )
    for string, mapping in scored:
        check_heads_fit(width, heads_source, string, targets_of[string], mapping)
    heads, param_groups = setup_linear_classifiers(
        model.embed_dim, blocks_list, args.learning_rates, args.batch_size, width
    )
    heads.to(model_device(model))
    names = label_names(eval_datasets[args.val_dataset_str], val_targets)
    metrics_path = output_dir / METRICS_FILE

    def validate(iteration: int) -> str:
        results = evaluate_heads(
            heads, val_tokens, val_targets, names, class_mapping=val_mapping.indices if val_mapping else None
        )
        name = best_head(results, key)
        if distributed.is_main_process():
            record = {"iter": iteration, "best_classifier": {"name": name, key: results[name][0][key]}}
            append_json_lines(metrics_path, [record])
        return name

    trained_for = train_linear_heads(
        heads, param_groups, make_batches, max_iter=max_iter, output_dir=output_dir,
        resume=not args.no_resume, start=start, checkpoint_period=args.epoch_length,
        named_checkpoint_period=args.save_checkpoint_frequency * args.epoch_length,
        eval_period=args.eval_period_iterations, evaluate=validate,
    )
    chosen = validate(trained_for)
    rows, details, skipped = _score_tests(heads[chosen], tests, eval_sets, eval_datasets)
    if distributed.is_main_process():
        mappings = [f"{string}: {mapping.path}" for string, mapping in scored if mapping is not None]
        info = {
            "weights": args.pretrained_weights,
            "train": f"{args.train_dataset_str} "
            + (f"({len(train_dataset)} images)" if train_dataset is not None else "(not read: nothing left to train)"),
            "best head (on val)": chosen,
            "chosen by": f"{key} on {args.val_dataset_str}",
            "training": _training_note(args, start, trained_for, to_train, use_cache),
            **({"class mappings": "; ".join(mappings)} if mappings else {}),
            "skipped labels (one class only)": ", ".join(sorted(skipped)) or "none",
        }
        write_results(output_dir, "linear", rows, details=details or None, info=info)
        print(f"linear done: best head {chosen}; {test_strs[0]}: {test_keys[0]} {rows[0][test_keys[0]]:.2f}; "
              f"results in {output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser(description="DINOv2 linear evaluation").parse_args()))
