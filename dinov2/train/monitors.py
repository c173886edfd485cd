"""Collapse monitors: numbers in the training log that say whether the model is still learning.

A DINO run can stall silently: the loss goes flat while the teacher's outputs stop carrying
anything (upstream issue #272, collapse on medical crops). Four numbers tell the kinds apart:
- `teacher_entropy`: mean entropy of the teacher's [CLS] distributions over the prototypes, as a
  fraction of log K. Near 1: every output is uniform ("uniform collapse"), the targets teach nothing.
- `prototypes_in_use`: exp(entropy of the batch-mean distribution), the number of prototypes the
  batch spreads over. Near 1: every image goes to the same prototype ("one-prototype collapse").
- `student_teacher_kl`: mean KL(teacher || student) over the [CLS] pairs the DINO loss compares;
  the part of the loss that learning can still remove.
- `teacher_feature_std`: per-dimension standard deviation of the teacher's L2-normalised [CLS]
  features across the batch, averaged over dimensions and multiplied by sqrt(D) (about 1 when the
  features spread over the sphere, 0 when every image gets the same feature).

They are computed on the device with the losses, stay tensors until a logging iteration (no host
sync on the other steps), and are averaged over ranks with the losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

MONITORS = ("teacher_entropy", "prototypes_in_use", "student_teacher_kl", "teacher_feature_std")


@torch.no_grad()
def collapse_monitors(teacher_probs: Tensor, teacher_cls: Tensor, dino_cross_entropy: Tensor | None) -> dict[str, Tensor]:
    """The monitors of one step from the teacher's [CLS] targets [R, K], its [CLS] features [R, D]
    and the DINO loss's mean cross-entropy per pair (None without a DINO loss)."""
    probs = teacher_probs.float().flatten(0, -2)
    n_prototypes = probs.shape[-1]
    entropy = _entropy(probs).mean()
    monitors = {
        "teacher_entropy": entropy / math.log(n_prototypes),
        "prototypes_in_use": _entropy(probs.mean(dim=0)).exp(),
    }
    if dino_cross_entropy is not None:
        # every teacher row enters the same number of pairs, so mean CE - mean H is the mean KL
        monitors["student_teacher_kl"] = dino_cross_entropy.detach().float() - entropy
    features = torch.nn.functional.normalize(teacher_cls.detach().float(), dim=-1)
    spread = features.std(dim=0, correction=0).mean() if len(features) > 1 else features.new_zeros(())
    monitors["teacher_feature_std"] = spread * math.sqrt(features.shape[-1])
    return monitors


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


@dataclass(frozen=True)
class Symptom:
    monitor: str
    says: str  # what the value means, with the value filled in
    fix: str  # what usually fixes it


@dataclass
class CollapseWatch:
    """Warns once per monitor when it has said "collapsed" for `patience` iterations in a row.

    Judged on the logged values (window medians), so a single odd batch warns nobody. The limits
    sit far from healthy runs: uniform outputs (>= 0.98 of log K), fewer than 2 % of the
    prototypes the batch could reach (and at most 2), features spread less than 5 % of a sphere's.
    """

    patience: int
    limits: dict[str, float] = field(default_factory=lambda: {"teacher_entropy": 0.98, "prototypes_in_use": 0.02, "teacher_feature_std": 0.05})
    _since: dict[str, int] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    def symptoms(self, record: dict[str, float], reachable_prototypes: int) -> list[Symptom]:
        """What the record's values say is collapsed (regardless of how long)."""
        found = []
        entropy = record.get("teacher_entropy")
        if entropy is not None and entropy >= self.limits["teacher_entropy"]:
            found.append(Symptom(
                "teacher_entropy", f"the teacher's outputs are uniform (entropy {entropy:.3f} of log K)",
                "a lower teacher temperature (teacher.teacher_temp), a larger LayerScale init (student.layerscale), "
                "a lower learning rate (optim.base_lr), or with Sinkhorn-Knopp more teacher rows per prototype "
                "(a larger batch or fewer dino.head_n_prototypes)"))
        in_use = record.get("prototypes_in_use")
        if in_use is not None and in_use <= max(2.0, self.limits["prototypes_in_use"] * reachable_prototypes):
            found.append(Symptom(
                "prototypes_in_use", f"the batch uses {in_use:.1f} of {reachable_prototypes} reachable prototypes",
                "train.centering=sinkhorn_knopp, a higher teacher momentum (teacher.momentum_teacher) "
                "or fewer prototypes (dino.head_n_prototypes)"))
        spread = record.get("teacher_feature_std")
        if spread is not None and spread <= self.limits["teacher_feature_std"]:
            found.append(Symptom(
                "teacher_feature_std", f"every image gets nearly the same teacher feature (spread {spread:.3f} of a sphere's)",
                "a larger LayerScale init (student.layerscale), KoLeo (dino.koleo_loss_weight) or a lower learning rate"))
        return found

    def update(self, iteration: int, record: dict[str, float], reachable_prototypes: int) -> list[str]:
        """Warnings to print now: one line per monitor, the first time its collapse has lasted."""
        current = {symptom.monitor: symptom for symptom in self.symptoms(record, reachable_prototypes)}
        for monitor in list(self._since):
            if monitor not in current:
                del self._since[monitor]
        lines = []
        for monitor, symptom in current.items():
            since = self._since.setdefault(monitor, iteration)
            if self.patience > 0 and iteration - since >= self.patience and monitor not in self._warned:
                self._warned.add(monitor)
                lines.append(f"collapse: {symptom.says} since iteration {since} ({monitor}); usually fixed by {symptom.fix}")
        return lines
