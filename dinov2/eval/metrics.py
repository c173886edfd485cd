"""Classification metrics shared by every evaluation: accuracy for classes, AP/AUC for findings.

Targets come in two kinds (see `dinov2.eval.utils.normalize_targets`): one class per sample
(int64 [N], -1 = unlabelled) or several binary labels (float32 [N, L], NaN = not annotated).
Radiograph findings are rare and imbalanced, so binary and multi-label targets are judged by
ranking metrics (average precision, ROC AUC) computed per label, where accuracy would reward
predicting "normal" everywhere. A label whose annotated samples are all of one class has no
defined AP/AUC; it is skipped and named in the result rather than silently counted.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from dinov2.utils.errors import UserError

SINGLE, MULTI = "single", "multi"


class MetricType(enum.Enum):
    """What picks the best head / C: upstream's names plus the ranking metrics for findings."""

    MEAN_ACCURACY = "mean_accuracy"
    MEAN_PER_CLASS_ACCURACY = "mean_per_class_accuracy"
    MACRO_AP = "macro_ap"
    MACRO_AUC = "macro_auc"
    PER_CLASS_ACCURACY = "per_class_accuracy"
    IMAGENET_REAL_ACCURACY = "imagenet_real_accuracy"

    def __str__(self) -> str:
        return self.value


# Upstream names accepted on the command line so that their users get a reason, not a usage error.
UNAVAILABLE_METRICS = {
    MetricType.IMAGENET_REAL_ACCURACY: "needs the ImageNet-ReaL labels (several correct classes per ImageNet "
    "validation image), and this project has no dataset that provides them; use mean_accuracy",
}


def check_available(metric: MetricType) -> None:
    """Refuse a metric that can be named but not computed here, before any costly work starts."""
    if metric in UNAVAILABLE_METRICS:
        raise UserError(f"metric {metric} {UNAVAILABLE_METRICS[metric]}")


def target_kind(targets: np.ndarray) -> str:
    return MULTI if targets.ndim == 2 else SINGLE


def is_binary(targets: np.ndarray) -> bool:
    """Single-label targets whose classes are 0 and 1 only (a finding present or absent)."""
    known = targets[targets >= 0]
    return target_kind(targets) == SINGLE and known.size > 0 and set(np.unique(known)) <= {0, 1}


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of samples whose class is among the k best-scored; k is capped at the class count."""
    if len(targets) == 0:
        return {f"top-{k}": math.nan for k in ks}
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == targets[:, None]
    return {f"top-{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> dict[int, float]:
    """Top-1 recall of each class present in `targets`, in class order: where a model fails,
    which one number hides."""
    predictions = scores.argmax(dim=1)
    return {c: (predictions[targets == c] == c).float().mean().item() for c in targets.unique().tolist()}


def mean_per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 recall averaged over the classes present in `targets` (each class weighs the same)."""
    recalls = list(per_class_accuracy(scores, targets).values())
    return float(np.mean(recalls)) if recalls else math.nan


def per_label_ap_auc(
    scores: np.ndarray, targets: np.ndarray, label_names: Sequence[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """AP and ROC AUC of each label over its annotated samples; labels with one class are skipped.

    Returns (rows {"label", "AP", "AUC", "positives", "annotated"} as fractions, skipped names).
    """
    rows, skipped = [], []
    for j, name in enumerate(label_names):
        known = ~np.isnan(targets[:, j])
        truth, score = targets[known, j].astype(int), scores[known, j]
        if len(np.unique(truth)) < 2:
            skipped.append(name)
            continue
        rows.append(
            {
                "label": name,
                "AP": float(average_precision_score(truth, score)),
                "AUC": float(roc_auc_score(truth, score)),
                "positives": int(truth.sum()),
                "annotated": int(known.sum()),
            }
        )
    return rows, skipped


def evaluate_predictions(
    probabilities: np.ndarray, targets: np.ndarray, label_names: Sequence[str] | None = None
) -> tuple[dict[str, float], list[dict[str, Any]], list[str]]:
    """Every metric that applies to these targets, in percent.

    `probabilities` is [N, C] class probabilities for single-label targets, [N, L] per-label
    probabilities for multi-label ones. Returns (summary, per-label rows, skipped labels):
    single-label -> top-1, top-5 (more than 5 classes), mean per-class accuracy, plus AP/AUC of class 1 when binary;
    multi-label -> macro AP and macro AUC over the labels that have both classes.
    """
    if target_kind(targets) == SINGLE:
        labelled = targets >= 0
        scores = torch.from_numpy(np.asarray(probabilities[labelled], dtype=np.float64))
        truth = torch.from_numpy(targets[labelled])
        ks = (1, 5) if scores.shape[1] > 5 else (1,)  # top-5 of five classes or fewer is always 100
        summary = {key: 100.0 * value for key, value in topk_accuracy(scores, truth, ks).items()}
        summary["mean per-class acc"] = 100.0 * mean_per_class_accuracy(scores, truth)
        if not is_binary(targets):
            return summary, [], []
        rows, skipped = per_label_ap_auc(
            scores[:, 1:2].numpy(), truth.numpy()[:, None].astype(np.float64), ["1"]
        )
        summary["AP"] = 100.0 * rows[0]["AP"] if rows else math.nan
        summary["AUC"] = 100.0 * rows[0]["AUC"] if rows else math.nan
        return summary, [], skipped
    names = list(label_names) if label_names is not None else [str(j) for j in range(targets.shape[1])]
    rows, skipped = per_label_ap_auc(np.asarray(probabilities, dtype=np.float64), targets, names)
    summary = {
        "macro AP": 100.0 * float(np.mean([row["AP"] for row in rows])) if rows else math.nan,
        "macro AUC": 100.0 * float(np.mean([row["AUC"] for row in rows])) if rows else math.nan,
    }
    per_label = [{**row, "AP": 100.0 * row["AP"], "AUC": 100.0 * row["AUC"]} for row in rows]
    return summary, per_label, skipped


def num_outputs(*target_sets: np.ndarray) -> int:
    """Width of a classifier's output for these target sets: classes seen anywhere, or labels."""
    if target_kind(target_sets[0]) == SINGLE:
        return int(max(targets.max() for targets in target_sets)) + 1
    return target_sets[0].shape[1]


def default_metric(targets: np.ndarray) -> MetricType:
    return MetricType.MACRO_AP if target_kind(targets) == MULTI else MetricType.MEAN_ACCURACY


def metric_key(metric: MetricType, targets: np.ndarray) -> str:
    """The `evaluate_predictions` summary key that `metric` reads, refusing metrics that do not apply.

    per_class_accuracy is a vector; where one number is needed (picking a head) it is its mean.
    """
    check_available(metric)
    multi = target_kind(targets) == MULTI
    if metric in (MetricType.MACRO_AP, MetricType.MACRO_AUC):
        if multi:
            return "macro AP" if metric == MetricType.MACRO_AP else "macro AUC"
        if is_binary(targets):
            return "AP" if metric == MetricType.MACRO_AP else "AUC"
        raise UserError(f"metric {metric} needs binary or multi-label targets; these have several classes")
    if multi:
        raise UserError(f"metric {metric} needs single-label targets; these are multi-label (use macro_ap)")
    return "top-1" if metric == MetricType.MEAN_ACCURACY else "mean per-class acc"


def summarize_tries(tries: Sequence[Mapping[str, float]]) -> dict[str, float | dict[str, float]]:
    """One value per metric: the value itself for one try, else {"mean", "std"} (population std)."""
    if len(tries) == 1:
        return dict(tries[0])
    return {
        key: {"mean": float(np.mean([t[key] for t in tries])), "std": float(np.std([t[key] for t in tries]))}
        for key in tries[0]
    }
