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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset
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
from dinov2.eval.setup import build_model_for_eval
from dinov2.eval.utils import autocast_context, extract_features, label_names, normalize_targets, sample_per_class
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.utils import fix_random_seeds
from vet_ext.downstream import fitting

CROP_SCALE = (0.4, 1.0)  # radiograph findings are small: never train on a crop of a few percent
INTENSITY_JITTER = 0.2  # brightness and contrast factors in [0.8, 1.2]: exposure differences
HEAD_INIT_STD = 0.01  # upstream's linear-probe head init


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
class FinetuneOptions(fitting.FitOptions):
    """The fitting options plus the head's input (the few-shot tries share one)."""

    use_patch_mean: bool = False


def build_classifier(backbone: nn.Module, task: Task, options: FinetuneOptions) -> ImageClassifier:
    """A trainable copy of `backbone` (LoRA-adapted if asked) with a fresh head."""
    backbone = fitting.trainable_backbone(backbone, options)
    device = next(backbone.parameters()).device
    return ImageClassifier(backbone, task.num_outputs, options.use_patch_mean).to(device)


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


class ImageTrainer(fitting.Trainer):
    """A classifier of single images: cross-entropy, or binary cross-entropy per finding."""

    def __init__(self, backbone: nn.Module, task: Task, train_dataset, val_dataset, options: FinetuneOptions) -> None:
        model = build_classifier(backbone, task, options).train()
        info = {
            "task": {"kind": task.kind, "metric": task.metric, "label_names": list(task.label_names)},
            "use_patch_mean": options.use_patch_mean,
        }
        super().__init__(model, fitting.make_optimizer(model, [], options), train_dataset, task.metric, info)
        self.task, self.val_dataset, self.options = task, val_dataset, options
        self.device = next(model.parameters()).device

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images, targets = batch
        with autocast_context(self.device, torch.bfloat16):
            logits = self.model(images.to(self.device, non_blocking=True))
        loss = classification_loss(self.task, logits, targets.to(self.device))
        return loss, {"loss": loss}

    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.task, self.val_dataset, self.options, desc="val")[0]


def fine_tune(
    backbone: nn.Module,
    task: Task,
    train_dataset,
    val_dataset,
    options: FinetuneOptions,
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """Train a classifier, early-stopping on the validation metric; returns the best checkpoint dict
    (`vet_ext.downstream.fitting.fit`: with `output_dir`, checkpoints are written there and resumed from)."""
    return fitting.fit(ImageTrainer(backbone, task, train_dataset, val_dataset, options), options, output_dir)


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
    parser.add_argument("--train-dataset", required=True, help="dataset string, e.g. VetImages:root=DATA:split=train")
    parser.add_argument("--val-dataset", required=True, help="dataset string for early stopping")
    parser.add_argument("--test-dataset", help="dataset string evaluated once with the best checkpoint")
    parser.add_argument("--output-dir", required=True, help="best.pth, last.pth, results.json, results.md")
    parser.add_argument("--use-patch-mean", action="store_true", help="head on [CLS] + mean patch token")
    parser.add_argument("--n-per-class", help="few-shot instead: comma-separated n labelled images per class")
    parser.add_argument("--n-tries", type=int, default=5, help="few-shot subsets per n")
    fitting.add_fitting_arguments(parser, batch_size=32, num_workers=4)
    return parser


def _datasets(args: argparse.Namespace, eval_transform: ClassificationEvalTransform):
    """(train dataset, its targets, {"val": ..., "test": ...}, task), unlabelled training images left out."""
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
    fitting.check_fitting_arguments(args, positive=("n_tries",))
    n_per_class = _parse_n_per_class(args.n_per_class)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg, eval_transform = fitting.backbone_setup(args)
    train_dataset, train_targets, splits, task = _datasets(args, eval_transform)
    fix_random_seeds(args.seed)
    backbone = build_model_for_eval(cfg, args.weights)
    options = FinetuneOptions.from_args(args)
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
        "best epoch": fitting.best_epoch_note(best),
        "checkpoint": str(output_dir / fitting.BEST_NAME),
        "skipped labels (one class only)": ", ".join(skipped) or "none",
    })
    write_results(output_dir, "fine-tune", rows, details=details, info=info)
    print(
        f"fine-tuning done: {len(best['history'])} epochs{stopped}, best epoch {best['epoch']} with val "
        f"{task.metric} {best['metrics'][task.metric]:.2f}; model in {output_dir / fitting.BEST_NAME}, results in {results_md}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
