"""Study-level diagnosis: fine-tune a study model over all views, compare with averaging image predictions.

A study model (`vet_ext.downstream.study_model.StudyEncoder`: ViT per view with a view-type embedding, then
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Subset

from dinov2.data.loaders import derive_seed, make_training_loader
from dinov2.data.transforms import ClassificationEvalTransform
from dinov2.eval.metrics import evaluate_predictions
from dinov2.eval.results import write_results
from dinov2.eval.setup import build_model_for_eval
from dinov2.eval.utils import autocast_context, model_device
from dinov2.models.weights import read_weights_file
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.utils import fix_random_seeds
from vet_ext.downstream.finetune import FinetuneTrainTransform, Task, classification_loss
from vet_ext.downstream.fitting import (
    FitOptions,
    Trainer,
    add_fitting_arguments,
    backbone_setup,
    best_epoch_note,
    check_fitting_arguments,
    fit,
    make_optimizer,
    trainable_backbone,
)
from vet_ext.pretraining.pipelines import make_multiview_pipeline
from vet_ext.downstream.eval.study_conditions import ConditionScores, score_conditions, scores_by_view_count, study_features
from vet_ext.pretraining.datasets import VetStudies
from vet_ext.downstream.study_data import CONDITIONS, ALL_VIEWS, StudyViews, collate_studies, drop_views
from vet_ext.downstream.study_model import FUSIONS, ImageLevelBaseline, StudyEncoder
from vet_ext.ingestion.views import VIEW_CODES

STUDY, BASELINE = "study", "baseline"
MODEL_LABELS = {STUDY: "study model", BASELINE: "mean of image predictions"}
MODEL_DIRS = {STUDY: "study_model", BASELINE: "image_baseline"}
SELECTION_METRIC = "macro AP"
SSL_HEADS = ("dino_head", "ibot_head")


@dataclass
class StudyOptions(FitOptions):
    """The fitting options (lr, layer-wise decay, LoRA, early stopping...) plus the study-level ones."""

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


def load_study_data(
    args: argparse.Namespace, eval_transform: ClassificationEvalTransform, options: StudyOptions
) -> StudyData:
    """Train (labelled studies, augmented), val and test (centre crops) and the unlabelled studies."""
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
    backbone = trainable_backbone(backbone, options)
    return build_model(kind, backbone, task, options).to(model_device(backbone)).train()


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
        return self.meta.compute_losses(self.pipeline.to_device(batch, self.device), self.teacher_temp).total

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


# ----------------------------------------------------------------------------- training


class StudyTrainer(Trainer):
    """The study model or the image-level baseline: BCE (+ w * SSL on unlabelled studies).

    Whole views are dropped for the study model only: the baseline learns from single images, so
    dropping views would just take training images away from it.
    """

    def __init__(self, kind: str, model: nn.Module, data: StudyData, options: StudyOptions,
                 ssl: SelfDistillation | None = None) -> None:
        info = {"kind": kind, "fusion": options.fusion, "fusion_depth": options.fusion_depth,
                "label_names": list(data.task.label_names), "view_codes": list(VIEW_CODES)}
        optimizer = make_optimizer(model, ssl.heads() if ssl is not None else [], options)
        super().__init__(model, optimizer, data.train, data.task.metric, info)
        self.name, self.collate_fn = MODEL_DIRS[kind], collate_studies
        self.data, self.options, self.ssl = data, options, ssl
        self.view_drop = options.view_drop if kind == STUDY else 0.0
        self.device = model_device(model)

    def begin_epoch(self, epoch: int, first_iteration: int) -> None:
        self.drop_generator = torch.Generator().manual_seed(derive_seed(self.options.seed, epoch))
        self.unlabelled = self.ssl.batches(first_iteration) if self.ssl is not None else None

    def loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        present = drop_views(batch.present, self.view_drop, self.drop_generator) if self.view_drop > 0 else batch.present
        batch, present = batch.to(self.device), present.to(self.device)
        with autocast_context(self.device, torch.bfloat16):
            features = self.model.view_features(batch.images, batch.view_codes, present)
            logits, targets = self.model.supervised_logits(features, present, batch.targets)
        supervised = classification_loss(self.data.task, logits, targets)
        if self.ssl is None:
            return supervised, {"BCE": supervised}
        with autocast_context(self.device, torch.bfloat16):
            self_distillation = self.ssl.loss(next(self.unlabelled))
        terms = {"SSL": self_distillation, "BCE": supervised}  # the column order results files have always had
        return supervised + self.options.unlabeled_weight * self_distillation, terms

    def after_update(self) -> None:
        if self.ssl is not None:
            self.ssl.update_teacher()

    def validate(self) -> dict[str, float]:
        """Study-level metrics with all views, as a clinic would use the model."""
        features, present, targets = study_features(self.model, self.data.val, self.options, desc="val")
        (scores,) = score_conditions(self.model, features, present, conditions=(ALL_VIEWS,))
        return evaluate_predictions(scores.probabilities, targets, self.data.task.label_names)[0]

    def parts(self) -> dict[str, Any]:
        """The SSL teacher, heads and centres too: a resumed run continues their EMA."""
        return {**super().parts(), **({"ssl": self.ssl} if self.ssl is not None else {})}


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
    parser.add_argument("--data", required=True, help="prepared DATA folder (manifest.parquet)")
    parser.add_argument("--labels", default="all", help="'all' or comma-separated label columns")
    parser.add_argument("--output-dir", required=True, help="checkpoints per model, results.json, results.md")
    parser.add_argument("--fusion", choices=FUSIONS, default="mean", help="mean of [CLS] tokens, or a small transformer")
    parser.add_argument("--fusion-depth", type=int, default=2, help="layers of the transformer fusion")
    parser.add_argument("--unlabeled-weight", type=float, default=0.0, help="weight w of the SSL term (0: supervised only)")
    parser.add_argument("--view-drop", type=float, default=0.3, help="probability of dropping each view in training")
    parser.add_argument("--max-views", type=int, default=4, help="views per study (more: a random subset in training)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the image-level baseline")
    add_fitting_arguments(parser, batch_size=16, num_workers=2,
                          batch_size_help="studies per batch (and unlabelled studies per SSL batch)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    check_fitting_arguments(args, positive=("max_views", "fusion_depth"), non_negative=("unlabeled_weight",))
    if not 0 <= args.view_drop < 1:
        raise UserError(f"--view-drop must be in [0, 1), got {args.view_drop}")


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
    options = StudyOptions.from_args(args)
    cfg, eval_transform = backbone_setup(args)
    data = load_study_data(args, eval_transform, options)
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
        trainer = StudyTrainer(kind, model, data, options, ssl if kind == STUDY else None)
        best[kind] = fit(trainer, options, output_dir / MODEL_DIRS[kind])
        del model, trainer

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
        **{f"best epoch ({MODEL_LABELS[k]})": best_epoch_note(best[k]) for k in kinds},
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
