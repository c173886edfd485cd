"""End-to-end fine-tuning of a DINOv2 backbone with a linear head, fully or through LoRA adapters.

Frozen-feature probes (dinov2.eval) say how good the pretrained features are; a clinic wants
the best classifier its labels allow, which means moving the backbone too. Lower blocks get
geometrically smaller learning rates (layer-wise decay) so generic features survive a small
labelled set; `--peft lora` trains only rank-r adapters and the head. The model kept is the one
with the best validation score (macro AP for findings, accuracy for classes), saved with its
adapters merged so `best.pth` loads wherever a DINOv2 backbone does.

    python -m vet_ext.finetune --weights OUT/eval/training_9999/teacher_checkpoint.pth \
        --train-dataset VetImages:root=DATA:split=train:labels=all \
        --val-dataset VetImages:root=DATA:split=val:labels=all \
        --test-dataset VetImages:root=DATA:split=test:labels=all --output-dir OUT/finetune --peft lora
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dinov2.data import make_dataset
from dinov2.data.transforms import ClassificationEvalTransform, ColorJitter, RandomResizedCrop, to_float_rgb
from dinov2.eval.metrics import (
    MULTI,
    MetricType,
    evaluate_predictions,
    is_binary,
    metric_key,
    num_outputs,
    summarize_tries,
    target_kind,
)
from dinov2.eval.results import write_results
from dinov2.eval.setup import build_model_for_eval, get_eval_config, make_eval_transform
from dinov2.eval.utils import autocast_context, extract_features, label_names, normalize_targets, sample_per_class
from dinov2.train.checkpointing import atomic_torch_save, load_torch_file
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
from dinov2.utils.utils import CosineScheduler, fix_random_seeds
from vet_ext.lora import apply_lora, merge_lora

EVAL_RESIZE_RATIO = 256 / 224  # upstream's evaluation resize -> centre crop ratio
CROP_SCALE = (0.4, 1.0)  # radiograph findings are small: never train on a crop of a few percent
INTENSITY_JITTER = 0.2  # brightness and contrast factors in [0.8, 1.2]: exposure differences
HEAD_INIT_STD = 0.01  # upstream's linear-probe head init
BEST_NAME, LAST_NAME = "best.pth", "last.pth"


# ----------------------------------------------------------------------------- task and model


@dataclass(frozen=True)
class Task:
    """What the targets ask for: one class among several, one finding (0/1), or several findings.

    `metric` is the `evaluate_predictions` summary key that selects the best epoch: accuracy for
    classes, (macro) average precision for findings, which are rare enough to make accuracy useless.
    """

    kind: str  # "multiclass" | "binary" | "multilabel"
    num_outputs: int
    metric: str
    label_names: tuple[str, ...] = ()


def infer_task(targets: list[np.ndarray], names: list[str]) -> Task:
    """The task of normalised targets (train first, then the evaluated splits), checked for consistency;
    `names` label the columns of multi-label targets."""
    kinds = {target_kind(t) for t in targets}
    if len(kinds) > 1:
        raise UserError("the datasets have different kinds of targets (one class vs several labels)")
    train = targets[0]
    if target_kind(train) == MULTI:
        if len({t.shape[1] for t in targets}) > 1:
            raise UserError(f"the datasets have different numbers of labels: {[t.shape[1] for t in targets]}")
        return Task("multilabel", train.shape[1], metric_key(MetricType.MACRO_AP, train), tuple(names))
    if not (train >= 0).any():
        raise UserError("the training dataset has no labelled images")
    if all(is_binary(t) or not (t >= 0).any() for t in targets):
        return Task("binary", 1, metric_key(MetricType.MACRO_AP, train))
    return Task("multiclass", num_outputs(*targets), metric_key(MetricType.MEAN_ACCURACY, train))


class ImageClassifier(nn.Module):
    """Backbone + linear head on the [CLS] token, optionally concatenated with the mean patch token."""

    def __init__(self, backbone: nn.Module, outputs: int, use_patch_mean: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.use_patch_mean = use_patch_mean
        self.head = nn.Linear(backbone.embed_dim * (2 if use_patch_mean else 1), outputs)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        features = self.backbone.forward_features(images)
        representation = features["x_norm_clstoken"]
        if self.use_patch_mean:
            patch_mean = features["x_norm_patchtokens"].mean(dim=1)
            representation = torch.cat((representation, patch_mean), dim=1)
        return self.head(representation)


def classification_loss(task: Task, logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy over classes; binary cross-entropy per finding, ignoring unannotated ones (NaN)."""
    logits = logits.float()
    if task.kind == "multiclass":
        return F.cross_entropy(logits, targets)
    targets = targets.float().reshape(logits.shape)
    annotated = ~torch.isnan(targets)
    if not annotated.any():
        return logits.sum() * 0.0  # keeps the graph: a batch with no annotation is a zero step
    return F.binary_cross_entropy_with_logits(logits[annotated], targets[annotated])


def probabilities(task: Task, logits: Tensor) -> Tensor:
    """What `evaluate_predictions` scores: class probabilities, or per-label ones ([1-p, p] for binary)."""
    logits = logits.float()
    if task.kind == "multiclass":
        return logits.softmax(dim=1)
    positive = logits.sigmoid()
    return torch.cat((1 - positive, positive), dim=1) if task.kind == "binary" else positive


# ----------------------------------------------------------------------------- data


class FinetuneTrainTransform:
    """Random resized crop + small brightness/contrast jitter, then the evaluation normalisation.

    No flips: left and right laterals are different views. Randomness comes from torch's default
    generator, which the loader's workers seed from the run seed.
    """

    def __init__(self, size: int, normalize: Callable[[Tensor], Tensor]) -> None:
        self.crop = RandomResizedCrop(size, scale=CROP_SCALE)
        self.jitter = ColorJitter(brightness=INTENSITY_JITTER, contrast=INTENSITY_JITTER)
        self.normalize = normalize

    def __call__(self, image: Tensor) -> Tensor:
        generator = torch.default_generator
        return self.normalize(self.jitter(self.crop(to_float_rgb(image), generator), generator))


def dataset_targets(dataset: Any) -> np.ndarray:
    """Normalised targets without decoding images where the dataset can say them (VetImages, ImageFolder)."""
    if hasattr(dataset, "get_targets"):
        return normalize_targets(dataset.get_targets())
    if hasattr(dataset, "targets"):
        return normalize_targets(dataset.targets)
    return normalize_targets([dataset[i][1] for i in range(len(dataset))])


def sample_per_label(targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Few-shot for findings: n positive images of every label (their union, so possibly fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = set()
    for j in range(targets.shape[1]):
        positives = np.flatnonzero(targets[:, j] == 1)
        chosen.update(positives[torch.randperm(len(positives), generator=generator)[:n].numpy()].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


# ----------------------------------------------------------------------------- training


@dataclass
class FinetuneOptions:
    """Everything a fine-tune depends on besides data and weights (the few-shot tries share one)."""

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
    use_patch_mean: bool = False
    num_workers: int = 0
    seed: int = 0
    resume: bool = True


@dataclass
class TrainingState:
    """What last.pth restores besides weights: where the run is and how it has gone so far."""

    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def build_classifier(backbone: nn.Module, task: Task, options: FinetuneOptions) -> ImageClassifier:
    """A trainable copy of `backbone` (untouched, so few-shot tries all start from it) with a head."""
    backbone = copy.deepcopy(backbone).requires_grad_(True)
    if options.peft == "lora":
        apply_lora(backbone, options.lora_rank, options.lora_alpha)
    device = next(backbone.parameters()).device
    return ImageClassifier(backbone, task.num_outputs, options.use_patch_mean).to(device)


def make_optimizer(model: ImageClassifier, options: FinetuneOptions) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with dinov2's layer-wise lr decay and no-decay rules."""
    groups = get_params_groups_with_decay(model.backbone, lr_decay_rate=options.layerwise_decay)
    groups += get_params_groups_with_decay(model.head)
    fused = fuse_params_groups(groups)
    return torch.optim.AdamW(fused, lr=options.lr, weight_decay=options.weight_decay, betas=(0.9, 0.999))


def merged_state_dict(model: ImageClassifier) -> dict[str, Tensor]:
    """The model's weights with adapters folded in: keys `backbone.*` (a plain backbone) and `head.*`."""
    export = merge_lora(copy.deepcopy(model))
    return {key: value.detach().cpu().clone() for key, value in export.state_dict().items()}


def predict(
    model: ImageClassifier, task: Task, dataset, options: FinetuneOptions, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, normalised targets) of a dataset, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, targets = extract_features(
        model, dataset, options.batch_size, options.num_workers,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        forward=lambda images: probabilities(task, model(images)), desc=desc,
    )
    model.train(was_training)
    return scores.numpy(), targets


def evaluate(model: ImageClassifier, task: Task, dataset, options: FinetuneOptions, desc: str):
    """(summary, per-label rows, skipped labels) of `dinov2.eval.metrics.evaluate_predictions`, in percent."""
    scores, targets = predict(model, task, dataset, options, desc)
    return evaluate_predictions(scores, targets, list(task.label_names) or None)


def _save_checkpoints(output_dir: Path, model, optimizer, state: TrainingState, best: dict | None) -> None:
    if best is not None:
        atomic_torch_save(best, output_dir / BEST_NAME)
    last = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": vars(state)}
    atomic_torch_save(last, output_dir / LAST_NAME)


def _resume(output_dir: Path, model, optimizer) -> tuple[TrainingState, dict | None]:
    last_path, best_path = output_dir / LAST_NAME, output_dir / BEST_NAME
    if not last_path.is_file():
        return TrainingState(), None
    checkpoint = load_torch_file(last_path)
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"{last_path}: written by a different model or options ({type(exc).__name__}); "
            "use --no-resume or another --output-dir"
        ) from None
    best = load_torch_file(best_path) if best_path.is_file() else None
    return TrainingState(**checkpoint["state"]), best


def fine_tune(
    backbone: nn.Module,
    task: Task,
    train_dataset,
    val_dataset,
    options: FinetuneOptions,
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """Train a classifier, early-stopping on the validation metric; returns the best checkpoint dict.

    With `output_dir`, best.pth (merged weights + metrics) and last.pth (everything to resume)
    are written atomically after every epoch, and an existing last.pth is resumed from.
    """
    model = build_classifier(backbone, task, options).train()
    optimizer = make_optimizer(model, options)
    device = next(model.parameters()).device
    iterations = max(1, math.ceil(len(train_dataset) / options.batch_size))
    schedule = CosineScheduler(
        options.lr, 0.0, options.epochs * iterations,
        warmup_iters=min(int(options.warmup_epochs * iterations), options.epochs * iterations),
    )
    state, best = TrainingState(), None
    if output_dir is not None and options.resume:
        state, best = _resume(output_dir, model, optimizer)

    while state.epoch < options.epochs and state.stale_epochs < options.patience:
        torch.manual_seed(options.seed + state.epoch)  # epoch order and augmentations survive a resume
        loader = DataLoader(
            train_dataset, batch_size=options.batch_size, shuffle=True, num_workers=options.num_workers,
            generator=torch.Generator().manual_seed(options.seed + state.epoch), drop_last=False,
        )
        losses = []
        progress = tqdm(loader, desc=f"epoch {state.epoch + 1}/{options.epochs}", unit="batch", leave=False)
        for step, (images, targets) in enumerate(progress):
            lr = schedule[state.epoch * iterations + step]
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_multiplier"]
                group["weight_decay"] = options.weight_decay * group["wd_multiplier"]
            with autocast_context(device, torch.bfloat16):
                logits = model(images.to(device, non_blocking=True))
            loss = classification_loss(task, logits, targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.set_postfix(loss=f"{loss.item():.4f}")
        summary, _, _ = evaluate(model, task, val_dataset, options, desc="val")
        score = summary[task.metric]
        if math.isnan(score):
            raise UserError(
                f"validation {task.metric} is undefined: the validation dataset needs both classes of a label"
            )
        improved = score > state.best_score
        state.history.append({"epoch": state.epoch + 1, "train loss": float(np.mean(losses)), **summary})
        if improved:
            state.best_score, state.best_epoch, state.stale_epochs = score, state.epoch + 1, 0
            best = {
                "model": merged_state_dict(model), "metrics": summary, "epoch": state.epoch + 1,
                "task": {"kind": task.kind, "metric": task.metric, "label_names": list(task.label_names)},
                "use_patch_mean": options.use_patch_mean,
            }
        else:
            state.stale_epochs += 1
        state.epoch += 1
        tqdm.write(
            f"epoch {state.epoch}: train loss {np.mean(losses):.4f}, val {task.metric} {score:.2f}"
            + (" (best)" if improved else f" (best {state.best_score:.2f} at epoch {state.best_epoch})")
        )
        if output_dir is not None:
            _save_checkpoints(output_dir, model, optimizer, state, best if improved else None)
    if best is None:
        raise UserError("no epoch was trained: --epochs must be at least 1")
    return {**best, "history": state.history, "stopped_early": state.epoch < options.epochs}


def load_classifier(backbone: nn.Module, task: Task, best: dict[str, Any]) -> ImageClassifier:
    """The plain (merged) classifier stored in a best checkpoint, ready for evaluation."""
    model = ImageClassifier(copy.deepcopy(backbone), task.num_outputs, best["use_patch_mean"])
    model.load_state_dict(best["model"])
    return model.to(next(backbone.parameters()).device).eval()


# ----------------------------------------------------------------------------- runs


def labelled_subset(dataset, targets: np.ndarray) -> tuple[Any, np.ndarray]:
    """(dataset, targets) without unlabelled (-1) images for one class per image; labels keep all (NaN is masked)."""
    if target_kind(targets) == MULTI or (targets >= 0).all():
        return dataset, targets
    keep = np.flatnonzero(targets >= 0)
    return Subset(dataset, keep.tolist()), targets[keep]


def evaluate_best(backbone, task: Task, best: dict, options: FinetuneOptions, splits: dict[str, Any]):
    """Rows and per-label tables of the best checkpoint on each evaluated split."""
    model = load_classifier(backbone, task, best)
    rows, details, skipped = [], {}, set()
    for split, dataset in splits.items():
        summary, per_label, skipped_here = evaluate(model, task, dataset, options, desc=split)
        rows.append({"split": split, **summary})
        if per_label:
            details[f"{split} per-label AP / AUC"] = per_label
        skipped.update(skipped_here)
    return rows, details, sorted(skipped)


def few_shot(
    backbone, task: Task, train_dataset, train_targets: np.ndarray, splits: dict[str, Any],
    options: FinetuneOptions, n_per_class: list[int], n_tries: int,
) -> list[dict[str, Any]]:
    """Mean ± std over `n_tries` fine-tunes on n labelled images per class (per label for findings)."""
    rows = []
    for n in n_per_class:
        tries: dict[str, list[dict[str, float]]] = {split: [] for split in splits}
        for attempt in range(n_tries):
            seed = options.seed + attempt
            if task.kind == "multilabel":
                indices = sample_per_label(train_targets, n, seed)
            else:
                indices = sample_per_class(train_targets, n, seed)
            tqdm.write(f"few-shot: {n} per class, try {attempt + 1}/{n_tries} ({len(indices)} images)")
            best = fine_tune(backbone, task, Subset(train_dataset, indices.tolist()), splits["val"], options)
            model = load_classifier(backbone, task, best)
            for split, dataset in splits.items():
                tries[split].append(evaluate(model, task, dataset, options, desc=split)[0])
        rows += [{"train": f"{n} per class", "split": split, **summarize_tries(tries[split])} for split in splits]
    return rows


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value}")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "lr", "patience", "lora_rank", "lora_alpha", "image_size", "n_tries"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if not 0 < args.layerwise_decay <= 1:
        raise UserError(f"--layerwise-decay must be in (0, 1], got {args.layerwise_decay}")
    if args.weight_decay < 0 or args.warmup_epochs < 0 or args.num_workers < 0:
        raise UserError("--weight-decay, --warmup-epochs and --num-workers must not be negative")


def _parse_n_per_class(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value <= 0 for value in values):
        raise UserError(f"--n-per-class must be positive integers separated by commas (e.g. 1,5,10), got '{text}'")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vet_ext.finetune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="backbone weights: teacher export, checkpoint or hub file")
    parser.add_argument("--config-file", help="model configuration (default: the run's config.yaml or the weights)")
    parser.add_argument("--train-dataset", required=True, help="dataset string, e.g. VetImages:root=DATA:split=train")
    parser.add_argument("--val-dataset", required=True, help="dataset string for early stopping")
    parser.add_argument("--test-dataset", help="dataset string evaluated once with the best checkpoint")
    parser.add_argument("--output-dir", required=True, help="best.pth, last.pth, results.json, results.md")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the last block and head")
    parser.add_argument("--layerwise-decay", type=float, default=0.75, help="lr factor per block towards the input")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--patience", type=int, default=5, help="epochs without val improvement before stopping")
    parser.add_argument("--peft", choices=("none", "lora"), default="none", help="lora: train adapters + head only")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--use-patch-mean", action="store_true", help="head on [CLS] + mean patch token")
    parser.add_argument("--image-size", type=int, default=224, help="training crop and evaluation centre crop")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="ignore OUT/last.pth")
    parser.add_argument("--n-per-class", help="few-shot instead: comma-separated n labelled images per class")
    parser.add_argument("--n-tries", type=int, default=5, help="few-shot subsets per n")
    return parser


def _datasets(args: argparse.Namespace, model_args: argparse.Namespace):
    """(train dataset, its targets, {"val": ..., "test": ...}, task), unlabelled training images left out."""
    eval_transform: ClassificationEvalTransform = make_eval_transform(model_args)
    train_transform = FinetuneTrainTransform(args.image_size, eval_transform.normalize)
    train_dataset = make_dataset(args.train_dataset, transform=train_transform)
    splits = {"val": make_dataset(args.val_dataset, transform=eval_transform)}
    if args.test_dataset:
        splits["test"] = make_dataset(args.test_dataset, transform=eval_transform)
    train_targets = dataset_targets(train_dataset)
    names = label_names(train_dataset, train_targets)
    task = infer_task([train_targets, *(dataset_targets(d) for d in splits.values())], names)
    train_dataset, train_targets = labelled_subset(train_dataset, train_targets)
    return train_dataset, train_targets, splits, task


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    _check_args(args)
    n_per_class = _parse_n_per_class(args.n_per_class)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_args = argparse.Namespace(
        config_file=args.config_file, pretrained_weights=args.weights, opts=[],
        crop_size=args.image_size, resize_size=None, resize_ratio=EVAL_RESIZE_RATIO,
    )
    train_dataset, train_targets, splits, task = _datasets(args, model_args)
    fix_random_seeds(args.seed)
    backbone = build_model_for_eval(get_eval_config(model_args), args.weights)
    options = FinetuneOptions(**{name: getattr(args, name) for name in FinetuneOptions.__dataclass_fields__})
    lora = f"lora (rank {options.lora_rank}, alpha {options.lora_alpha})"
    info = {
        "weights": args.weights, "train": args.train_dataset, "val": args.val_dataset, "test": args.test_dataset,
        "task": f"{task.kind} ({task.num_outputs} outputs), selected on val {task.metric}",
        "peft": lora if options.peft == "lora" else "none (every backbone weight trained)",
    }
    results_md = output_dir / "results.md"

    if n_per_class:
        rows = few_shot(backbone, task, train_dataset, train_targets, splits, options, n_per_class, args.n_tries)
        write_results(output_dir, "fine-tune few-shot", rows, info={**info, "tries": args.n_tries})
        print(f"few-shot fine-tuning done: {len(n_per_class)} settings x {args.n_tries} tries; results in {results_md}")
        return 0

    best = fine_tune(backbone, task, train_dataset, splits["val"], options, output_dir)
    rows, details, skipped = evaluate_best(backbone, task, best, options, splits)
    details["epochs"] = best["history"]
    stopped = " (stopped early)" if best["stopped_early"] else ""
    info.update({
        "best epoch": f"{best['epoch']} of {len(best['history'])}{stopped}",
        "checkpoint": str(output_dir / BEST_NAME),
        "skipped labels (one class only)": ", ".join(skipped) or "none",
    })
    write_results(output_dir, "fine-tune", rows, details=details, info=info)
    print(
        f"fine-tuning done: {len(best['history'])} epochs{stopped}, best epoch {best['epoch']} with val "
        f"{task.metric} {best['metrics'][task.metric]:.2f}; model in {output_dir / BEST_NAME}, results in {results_md}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
