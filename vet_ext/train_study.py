"""Study-level diagnosis: fine-tune a study model over all views, compare with averaging image predictions.

A study model (`vet_ext.study_model.StudyEncoder`: ViT per view with a view-type embedding, then
mean or transformer fusion) is trained with BCE on the labelled studies (unannotated labels
masked), with whole views dropped at random so it copes with incomplete studies, and kept at the
epoch with the best validation macro AP. `--unlabeled-weight w` adds DINO self-distillation on
unlabelled studies through VET-DINO's multi-view pipeline (loss = BCE + w * SSL); the student
backbone is the study model's own, the teacher an EMA of it. Unlabelled studies are the train
split's studies without any label, or every train study when all are labelled (then the SSL term
is a regulariser on the same studies rather than extra data).

The baseline is an image-level model on the same backbone (linear head on each image's [CLS],
BCE per image, same optimiser and budget) whose study prediction is the mean over its views.
Both are scored per study with all views, with one view removed and with a single view.

    python -m vet_ext.train_study --weights OUT/eval/training_9999/teacher_checkpoint.pth \
        --data DATA --labels all --fusion transformer --output-dir OUT/study
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dinov2.data.loaders import derive_seed, make_training_loader
from dinov2.eval.metrics import evaluate_predictions
from dinov2.eval.results import write_results
from dinov2.eval.setup import build_model_for_eval, get_eval_config, make_eval_transform
from dinov2.eval.utils import autocast_context, model_device
from dinov2.models.weights import read_weights_file
from dinov2.train.checkpointing import atomic_torch_save, load_torch_file
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
from dinov2.utils.utils import CosineScheduler, fix_random_seeds
from vet_ext.finetune import (
    BEST_NAME,
    EVAL_RESIZE_RATIO,
    LAST_NAME,
    FinetuneOptions,
    FinetuneTrainTransform,
    Task,
    TrainingState,
    classification_loss,
    merged_state_dict,
)
from vet_ext.lora import apply_lora
from vet_ext.multiview import make_multiview_pipeline
from vet_ext.studies import VetStudies
from vet_ext.study_data import CONDITIONS, ALL_VIEWS, StudyViews, collate_studies, drop_views, view_subsets
from vet_ext.study_model import FUSIONS, ImageLevelBaseline, StudyEncoder
from vet_ext.views import VIEW_CODES

STUDY, BASELINE = "study", "baseline"
MODEL_LABELS = {STUDY: "study model", BASELINE: "mean of image predictions"}
MODEL_DIRS = {STUDY: "study_model", BASELINE: "image_baseline"}
SELECTION_METRIC = "macro AP"
SSL_HEADS = ("dino_head", "ibot_head")


@dataclass
class StudyOptions(FinetuneOptions):
    """Fine-tuning options (lr, layer-wise decay, LoRA, early stopping...) plus the study-level ones."""

    fusion: str = "mean"
    fusion_depth: int = 2
    view_drop: float = 0.3
    max_views: int = 4
    unlabeled_weight: float = 0.0


# ----------------------------------------------------------------------------- data


@dataclass
class StudyData:
    """The study sets of one run and the task their labels define."""

    train: StudyViews
    val: StudyViews
    test: StudyViews | None
    unlabelled: Any  # raw VetStudies items (views, target) for the multi-view SSL pipeline
    unlabelled_note: str
    task: Task


def _annotated(targets: np.ndarray) -> np.ndarray:
    return ~np.isnan(targets).all(axis=1)


def load_study_data(args: argparse.Namespace, model_args: argparse.Namespace, options: StudyOptions) -> StudyData:
    """Train (labelled studies, augmented), val and test (centre crops) and the unlabelled studies."""
    eval_transform = make_eval_transform(model_args)
    train_transform = FinetuneTrainTransform(args.image_size, eval_transform.normalize)
    splits = {split: VetStudies(args.data, split=split, labels=args.labels) for split in ("train", "val", "test")}
    names = tuple(splits["train"].target_columns)
    if not names:
        raise UserError(f"{args.data}: the manifest has no label columns; prepare the data with --labels")
    train_targets = splits["train"].get_targets()
    labelled = np.flatnonzero(_annotated(train_targets))
    if len(labelled) == 0:
        raise UserError(f"{args.data}: no study of the train split has a label")
    if len(splits["val"]) == 0:
        raise UserError(f"{args.data}: the val split is empty; early stopping needs validation studies")
    unlabelled = np.flatnonzero(~_annotated(train_targets))
    if len(unlabelled):
        unlabelled_set, note = Subset(splits["train"], unlabelled.tolist()), f"{len(unlabelled)} train studies without labels"
    else:
        unlabelled_set, note = splits["train"], f"all {len(train_targets)} train studies (every one is labelled)"

    def evaluated(split: str) -> StudyViews:
        studies = splits[split]
        return StudyViews(studies, np.arange(len(studies)), eval_transform, options.max_views, random_subset=False)

    return StudyData(
        train=StudyViews(splits["train"], labelled, train_transform, options.max_views, random_subset=True),
        val=evaluated("val"),
        test=evaluated("test") if len(splits["test"]) else None,
        unlabelled=unlabelled_set,
        unlabelled_note=note,
        task=Task("multilabel", len(names), SELECTION_METRIC, names),
    )


# ----------------------------------------------------------------------------- models


def build_model(kind: str, backbone: nn.Module, task: Task, options: StudyOptions) -> nn.Module:
    """A plain (no adapter) study model or baseline around `backbone` (used as given, not copied)."""
    if kind == STUDY:
        return StudyEncoder(backbone, task.num_outputs, options.fusion, VIEW_CODES, options.fusion_depth)
    return ImageLevelBaseline(backbone, task.num_outputs)


def trainable_model(kind: str, backbone: nn.Module, task: Task, options: StudyOptions) -> nn.Module:
    """A trainable copy of the pretrained backbone (adapted with LoRA if asked) with the model's new layers."""
    backbone = copy.deepcopy(backbone).requires_grad_(True)
    if options.peft == "lora":
        apply_lora(backbone, options.lora_rank, options.lora_alpha)
    return build_model(kind, backbone, task, options).to(model_device(backbone)).train()


def new_layers(model: nn.Module) -> list[nn.Module]:
    """Everything the model adds to its backbone (view embedding, fusion, head): always trained."""
    return [child for name, child in model.named_children() if name != "backbone"]


def make_optimizer(model: nn.Module, extra_heads: list[nn.Module], options: StudyOptions) -> torch.optim.AdamW:
    """AdamW with dinov2's layer-wise lr decay on the backbone; new layers and SSL heads at full lr.

    Frozen parameters (the backbone outside its adapters under LoRA) are left out by the grouping.
    """
    groups = get_params_groups_with_decay(model.backbone, lr_decay_rate=options.layerwise_decay)
    for module in [*new_layers(model), *extra_heads]:
        groups += get_params_groups_with_decay(module)
    return torch.optim.AdamW(fuse_params_groups(groups), lr=options.lr, weight_decay=options.weight_decay)


# ----------------------------------------------------------------------------- self-distillation


class SelfDistillation:
    """DINOv2's losses on unlabelled studies, with the study model's backbone as the student.

    `cfg` is the pretraining configuration (heads, crops, masking, temperatures). The teacher
    starts as a copy of the (adapted) student backbone, the DINO/iBOT heads from the ones in the
    weights file when it is a teacher export (fresh heads would otherwise start the SSL term from
    noise); the teacher follows the student by EMA with `teacher.momentum_teacher`.
    """

    def __init__(self, cfg: DictConfig, student_backbone: nn.Module, weights: dict[str, Any], weights_name: str,
                 studies, options: StudyOptions) -> None:
        cfg = copy.deepcopy(cfg)
        cfg.student.pretrained_weights = ""
        device = model_device(student_backbone)
        self.meta = SSLMetaArch(cfg)
        self.meta.student["backbone"] = student_backbone
        self.meta.teacher["backbone"] = copy.deepcopy(student_backbone).requires_grad_(False)
        self.heads_from_weights = _load_export_heads(self.meta, weights, weights_name)
        self.meta.to(device).train()
        self.pipeline = make_multiview_pipeline(cfg)
        self.teacher_temp = float(cfg.teacher.teacher_temp)
        self.momentum = float(cfg.teacher.momentum_teacher)
        self.studies, self.options, self.device = studies, options, device

    def heads(self) -> list[nn.Module]:
        return [module for name, module in self.meta.student.items() if name != "backbone"]

    def batches(self, start_iteration: int) -> Iterator[dict[str, Any]]:
        """Endless reproducible multi-view batches, positioned at `start_iteration` (exact resume)."""
        return iter(make_training_loader(
            self.studies, self.pipeline, self.options.batch_size, self.options.num_workers,
            derive_seed(self.options.seed, 1), start_iteration,
        ))

    def loss(self, batch: dict[str, Any]) -> Tensor:
        total, _ = self.meta.compute_losses(self.pipeline.to_device(batch, self.device), self.teacher_temp)
        return total

    def update_teacher(self) -> None:
        self.meta.update_teacher(self.momentum)

    def state_dict(self) -> dict[str, Tensor]:
        """Teacher, heads and loss centres; the student backbone is saved with the study model."""
        return {k: v for k, v in self.meta.state_dict().items() if not k.startswith("student.backbone.")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.meta.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith("student.backbone.") for key in missing):
            raise RuntimeError(f"self-distillation state does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _load_export_heads(meta: SSLMetaArch, weights: dict[str, Any], weights_name: str) -> list[str]:
    """Copy the DINO/iBOT heads of a teacher export into student and teacher; names of those loaded."""
    state = weights.get("teacher", weights)
    loaded = []
    for name in SSL_HEADS:
        head_state = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")}
        if name not in meta.student or not head_state:
            continue
        try:
            meta.student[name].load_state_dict(head_state)
        except RuntimeError as exc:
            raise UserError(
                f"{weights_name}: its {name} does not fit the configuration's head ({str(exc).splitlines()[0]}); "
                "pass the pretraining run's config.yaml with --config-file"
            ) from None
        meta.teacher[name].load_state_dict(head_state)
        loaded.append(name)
    return loaded


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def study_features(model: nn.Module, dataset: StudyViews, options: StudyOptions, desc: str) -> tuple[Tensor, Tensor, np.ndarray]:
    """(view features [N, V, 2, D] on CPU, present [N, V], targets [N, L]) of every study, in eval mode."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    loader = DataLoader(
        dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
        collate_fn=functools.partial(collate_studies, n_slots=dataset.max_views),
    )
    features, present, targets = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        with autocast_context(device, torch.bfloat16):
            features.append(model.view_features(batch.images, batch.view_codes, batch.present).float().cpu())
        present.append(batch.present.cpu())
        targets.append(batch.targets.cpu())
    model.train(was_training)
    return torch.cat(features), torch.cat(present), torch.cat(targets).numpy()


@torch.no_grad()
def subset_probabilities(model: nn.Module, features: Tensor, masks: Tensor, chunk: int = 256) -> np.ndarray:
    """Study probabilities [M, L] from cached view features with only the `masks` views present."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    parts = [
        model.probabilities(features[i : i + chunk].to(device), masks[i : i + chunk].to(device)).float().cpu()
        for i in range(0, len(masks), chunk)
    ]
    model.train(was_training)
    return torch.cat(parts).numpy()


@dataclass
class ConditionScores:
    """The evaluations of one model under one condition: which study, which views, what it predicted."""

    condition: str
    study_rows: Tensor
    masks: Tensor
    probabilities: np.ndarray


def score_conditions(
    model: nn.Module, features: Tensor, present: Tensor, conditions: tuple[str, ...] = CONDITIONS
) -> list[ConditionScores]:
    scores = []
    for condition in conditions:
        rows, masks = view_subsets(present, condition)
        if len(rows):
            scores.append(ConditionScores(condition, rows, masks, subset_probabilities(model, features[rows], masks)))
    return scores


def scores_by_view_count(scores: list[ConditionScores], targets: np.ndarray, names) -> list[dict[str, Any]]:
    """Macro AP / AUC grouped by how many views an evaluation used (each distinct view subset once)."""
    seen: dict[tuple, tuple[int, np.ndarray]] = {}
    for score in scores:
        for row, mask, probabilities in zip(score.study_rows.tolist(), score.masks, score.probabilities):
            seen.setdefault((row, tuple(mask.tolist())), (int(mask.sum()), probabilities))
    rows = []
    for count in sorted({count for count, _ in seen.values()}):
        members = [(key[0], p) for key, (n, p) in seen.items() if n == count]
        summary, _, _ = evaluate_predictions(np.stack([p for _, p in members]), targets[[r for r, _ in members]], names)
        rows.append({"views used": count, "evaluations": len(members), **summary})
    return rows


def validation_score(model: nn.Module, dataset: StudyViews, task: Task, options: StudyOptions) -> dict[str, float]:
    """Study-level metrics with all views: what selects the best epoch."""
    features, present, targets = study_features(model, dataset, options, desc="val")
    (scores,) = score_conditions(model, features, present, conditions=(ALL_VIEWS,))
    summary, _, _ = evaluate_predictions(scores.probabilities, targets, task.label_names)
    return summary


# ----------------------------------------------------------------------------- training


def _save(directory: Path, model, optimizer, state: TrainingState, ssl: SelfDistillation | None, best: dict | None) -> None:
    if best is not None:
        atomic_torch_save(best, directory / BEST_NAME)
    last = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": vars(state),
            "ssl": ssl.state_dict() if ssl is not None else {}}
    atomic_torch_save(last, directory / LAST_NAME)


def _resume(directory: Path, model, optimizer, ssl: SelfDistillation | None) -> tuple[TrainingState, dict | None]:
    last_path, best_path = directory / LAST_NAME, directory / BEST_NAME
    if not last_path.is_file():
        return TrainingState(), None
    checkpoint = load_torch_file(last_path)
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if ssl is not None:
            ssl.load_state_dict(checkpoint["ssl"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"{last_path}: written by a different model or options ({type(exc).__name__}); "
            "use --no-resume or another --output-dir"
        ) from None
    best = load_torch_file(best_path) if best_path.is_file() else None
    tqdm.write(f"resuming {directory.name} after epoch {checkpoint['state']['epoch']}")
    return TrainingState(**checkpoint["state"]), best


def fit(
    kind: str,
    model: nn.Module,
    data: StudyData,
    options: StudyOptions,
    directory: Path,
    ssl: SelfDistillation | None = None,
) -> dict[str, Any]:
    """Train with BCE (+ w * SSL), early-stopping on val macro AP; returns the best checkpoint dict.

    best.pth (merged weights + metrics) and last.pth (everything to resume, SSL teacher included)
    are written atomically in `directory` after every epoch; an existing last.pth is resumed.
    Whole views are dropped for the study model only: the baseline learns from single images, so
    dropping views would just take training images away from it.
    """
    task, view_drop = data.task, options.view_drop if kind == STUDY else 0.0
    optimizer = make_optimizer(model, ssl.heads() if ssl is not None else [], options)
    device = model_device(model)
    iterations = max(1, math.ceil(len(data.train) / options.batch_size))
    total_iterations = options.epochs * iterations
    schedule = CosineScheduler(options.lr, 0.0, total_iterations,
                               warmup_iters=min(int(options.warmup_epochs * iterations), total_iterations))
    directory.mkdir(parents=True, exist_ok=True)
    state, best = _resume(directory, model, optimizer, ssl) if options.resume else (TrainingState(), None)

    while state.epoch < options.epochs and state.stale_epochs < options.patience:
        torch.manual_seed(options.seed + state.epoch)  # epoch order, crops and view subsets survive a resume
        loader = DataLoader(
            data.train, batch_size=options.batch_size, shuffle=True, num_workers=options.num_workers,
            collate_fn=collate_studies, generator=torch.Generator().manual_seed(options.seed + state.epoch),
        )
        drop_generator = torch.Generator().manual_seed(derive_seed(options.seed, state.epoch))
        unlabelled = ssl.batches(state.epoch * iterations) if ssl is not None else None
        losses: dict[str, list[float]] = defaultdict(list)
        progress = tqdm(loader, desc=f"{MODEL_DIRS[kind]} epoch {state.epoch + 1}/{options.epochs}", unit="batch", leave=False)
        for step, batch in enumerate(progress):
            lr = schedule[state.epoch * iterations + step]
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_multiplier"]
                group["weight_decay"] = options.weight_decay * group["wd_multiplier"]
            present = drop_views(batch.present, view_drop, drop_generator) if view_drop > 0 else batch.present
            batch, present = batch.to(device), present.to(device)
            with autocast_context(device, torch.bfloat16):
                features = model.view_features(batch.images, batch.view_codes, present)
                logits, targets = model.supervised_logits(features, present, batch.targets)
            supervised = classification_loss(task, logits, targets)
            loss = supervised
            if ssl is not None:
                with autocast_context(device, torch.bfloat16):
                    self_distillation = ssl.loss(next(unlabelled))
                loss = supervised + options.unlabeled_weight * self_distillation
                losses["train SSL"].append(self_distillation.item())
            if not torch.isfinite(loss):
                raise UserError(f"{MODEL_DIRS[kind]}: non-finite loss at epoch {state.epoch + 1}, step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ssl is not None:
                ssl.update_teacher()
            losses["train BCE"].append(supervised.item())
            progress.set_postfix(loss=f"{loss.item():.4f}")

        summary = validation_score(model, data.val, task, options)
        score = summary[task.metric]
        if math.isnan(score):
            raise UserError(f"validation {task.metric} is undefined: no label has both classes among the val studies")
        improved = score > state.best_score
        state.history.append({"epoch": state.epoch + 1, **{k: float(np.mean(v)) for k, v in losses.items()}, **summary})
        if improved:
            state.best_score, state.best_epoch, state.stale_epochs = score, state.epoch + 1, 0
            best = {"model": merged_state_dict(model), "metrics": summary, "epoch": state.epoch + 1, "kind": kind,
                    "fusion": options.fusion, "fusion_depth": options.fusion_depth,
                    "label_names": list(task.label_names), "view_codes": list(VIEW_CODES)}
        else:
            state.stale_epochs += 1
        state.epoch += 1
        tqdm.write(
            f"{MODEL_DIRS[kind]} epoch {state.epoch}: train BCE {np.mean(losses['train BCE']):.4f}"
            + (f", SSL {np.mean(losses['train SSL']):.4f}" if ssl is not None else "")
            + f", val {task.metric} {score:.2f}"
            + (" (best)" if improved else f" (best {state.best_score:.2f} at epoch {state.best_epoch})")
        )
        _save(directory, model, optimizer, state, ssl, best if improved else None)
    if best is None:
        raise UserError("no epoch was trained: --epochs must be at least 1")
    return {**best, "history": state.history, "stopped_early": state.epoch < options.epochs}


def load_best(kind: str, backbone: nn.Module, task: Task, options: StudyOptions, best: dict[str, Any]) -> nn.Module:
    """The plain (adapters merged) model of a best checkpoint, in eval mode."""
    model = build_model(kind, copy.deepcopy(backbone), task, options)
    model.load_state_dict(best["model"])
    return model.to(model_device(backbone)).eval()


# ----------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vet_ext.train_study", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="backbone weights: teacher export, checkpoint or hub file")
    parser.add_argument("--config-file", help="model (and SSL) configuration (default: the run's config.yaml)")
    parser.add_argument("--data", required=True, help="prepared DATA folder (manifest.parquet)")
    parser.add_argument("--labels", default="all", help="'all' or comma-separated label columns")
    parser.add_argument("--output-dir", required=True, help="checkpoints per model, results.json, results.md")
    parser.add_argument("--fusion", choices=FUSIONS, default="mean", help="mean of [CLS] tokens, or a small transformer")
    parser.add_argument("--fusion-depth", type=int, default=2, help="layers of the transformer fusion")
    parser.add_argument("--peft", choices=("none", "lora"), default="none", help="lora: train adapters + heads only")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--unlabeled-weight", type=float, default=0.0, help="weight w of the SSL term (0: supervised only)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="studies per batch (and unlabelled studies per SSL batch)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the last block and new layers")
    parser.add_argument("--layerwise-decay", type=float, default=0.75, help="lr factor per block towards the input")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--patience", type=int, default=5, help="epochs without val improvement before stopping")
    parser.add_argument("--view-drop", type=float, default=0.3, help="probability of dropping each view in training")
    parser.add_argument("--image-size", type=int, default=224, help="training crop and evaluation centre crop")
    parser.add_argument("--max-views", type=int, default=4, help="views per study (more: a random subset in training)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the image-level baseline")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing last.pth files")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "lr", "patience", "lora_rank", "lora_alpha", "image_size", "max_views", "fusion_depth"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.layerwise_decay <= 1:
        raise UserError(f"--layerwise-decay must be in (0, 1], got {args.layerwise_decay}")
    if not 0 <= args.view_drop < 1:
        raise UserError(f"--view-drop must be in [0, 1), got {args.view_drop}")
    if args.unlabeled_weight < 0 or args.weight_decay < 0 or args.warmup_epochs < 0 or args.num_workers < 0:
        raise UserError("--unlabeled-weight, --weight-decay, --warmup-epochs and --num-workers must not be negative")


def _result_rows(split: str, kind: str, scores: list[ConditionScores], targets: np.ndarray, names) -> tuple[list, list]:
    """Main-table rows (one per condition) and per-label rows of one model on one split."""
    rows, per_label_rows = [], []
    for score in scores:
        summary, per_label, _ = evaluate_predictions(score.probabilities, targets[score.study_rows.numpy()], names)
        rows.append({"split": split, "condition": score.condition, "model": MODEL_LABELS[kind],
                     "evaluations": len(score.study_rows), **summary})
        per_label_rows += [{"condition": score.condition, "model": MODEL_LABELS[kind], **row} for row in per_label]
    return rows, per_label_rows


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    _check_args(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    options = StudyOptions(**{name: getattr(args, name) for name in StudyOptions.__dataclass_fields__ if hasattr(args, name)})
    model_args = argparse.Namespace(
        config_file=args.config_file, pretrained_weights=args.weights, opts=[],
        crop_size=args.image_size, resize_size=None, resize_ratio=EVAL_RESIZE_RATIO,
    )
    data = load_study_data(args, model_args, options)
    cfg = get_eval_config(model_args)
    if options.unlabeled_weight > 0 and cfg is None:
        raise UserError(
            f"--unlabeled-weight needs the pretraining configuration (heads, crops, masking) and {args.weights} "
            "has no run config.yaml beside it: pass one with --config-file"
        )
    backbone = build_model_for_eval(cfg, args.weights)
    kinds = [STUDY, BASELINE] if args.baseline else [STUDY]

    best: dict[str, dict[str, Any]] = {}
    ssl = None
    for kind in kinds:
        fix_random_seeds(options.seed)
        model = trainable_model(kind, backbone, data.task, options)
        if kind == STUDY and options.unlabeled_weight > 0:
            ssl = SelfDistillation(cfg, model.backbone, read_weights_file(args.weights), args.weights, data.unlabelled, options)
        best[kind] = fit(kind, model, data, options, output_dir / MODEL_DIRS[kind], ssl if kind == STUDY else None)
        del model

    names = data.task.label_names
    rows, details = [], {}
    splits = {"val": data.val, **({"test": data.test} if data.test is not None else {})}
    report_split = "test" if data.test is not None else "val"
    by_views, per_label = [], []
    for kind in kinds:
        model = load_best(kind, backbone, data.task, options, best[kind])
        for split, dataset in splits.items():
            features, present, targets = study_features(model, dataset, options, desc=f"{split} ({MODEL_DIRS[kind]})")
            scores = score_conditions(model, features, present)
            split_rows, split_per_label = _result_rows(split, kind, scores, targets, names)
            rows += split_rows
            if split == report_split:
                per_label += split_per_label
                by_views += [{"model": MODEL_LABELS[kind], **row} for row in scores_by_view_count(scores, targets, names)]
    order = {"split": list(splits), "condition": list(CONDITIONS), "model": [MODEL_LABELS[k] for k in kinds]}
    rows.sort(key=lambda row: tuple(order[key].index(row[key]) for key in order))
    details[f"{report_split}: macro AP by number of views used"] = by_views
    details[f"{report_split}: per-label AP / AUC"] = per_label
    for kind in kinds:
        details[f"epochs: {MODEL_LABELS[kind]}"] = best[kind]["history"]

    info = {
        "weights": args.weights, "data": args.data, "labels": ", ".join(names),
        "study model": f"{options.fusion} fusion" + (f" (depth {options.fusion_depth})" if options.fusion == "transformer" else "")
        + f", view-type embedding, view drop {options.view_drop}",
        "baseline": "linear head per image on [CLS], BCE per image, mean of the views' probabilities",
        "peft": f"lora (rank {options.lora_rank}, alpha {options.lora_alpha})" if options.peft == "lora" else "none",
        "semi-supervised": (f"w = {options.unlabeled_weight} on {data.unlabelled_note}"
                            + (f"; heads from the weights: {', '.join(ssl.heads_from_weights) or 'none (fresh)'}" if ssl else ""))
        if options.unlabeled_weight > 0 else "off",
        "training studies": f"{len(data.train)} labelled", "image size": args.image_size, "max views": options.max_views,
        "one view dropped": "each study with >= 2 views once per view, without it (pooled)",
        "single view": "each study once per view, with that view alone (pooled)",
        **{f"best epoch ({MODEL_LABELS[k]})": f"{best[k]['epoch']} of {len(best[k]['history'])}"
           + (" (stopped early)" if best[k]["stopped_early"] else "") for k in kinds},
    }
    write_results(output_dir, "study-level diagnosis", rows, details=details, info=info)
    headline = {(row["condition"], row["model"]): row[SELECTION_METRIC] for row in rows if row["split"] == report_split}
    comparison = ", ".join(
        f"{condition} {headline[(condition, MODEL_LABELS[STUDY])]:.2f}"
        + (f" (baseline {headline[(condition, MODEL_LABELS[BASELINE])]:.2f})" if BASELINE in kinds else "")
        for condition in CONDITIONS if (condition, MODEL_LABELS[STUDY]) in headline
    )
    print(f"study-level training done: {report_split} macro AP {comparison}; results in {output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
