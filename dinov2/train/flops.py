"""Analytic FLOPs of a DINOv2 training step, for model-FLOP utilisation (MFU).

The convention is the one upstream's GPU figures are quoted in (`docs/performance.md`): a
multiply-add is 2 FLOPs; every linear layer counts 2 x in x out per token (per row for the heads);
attention counts 4 N^2 D per sequence and block (q k^T and the weighted sum of v); the patch
embedding is a linear layer over p x p x channels; norms, activations and losses are left out.
The student's backward counts twice its forward, the teacher runs forward only.

"Nominal" FLOPs push every crop through every block. "Executed" FLOPs count what stochastic
depth really computes: above `SUBSET_DROP_THRESHOLD` a residual branch runs on a random subset of
each batch of crops only (`subset_size`), which is the work the GPU does. The counts come from the
modules themselves (their Linear layers), so any width, depth, FFN or head configuration is right
without a table of model sizes; modules on the meta device are enough.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from dinov2.layers.block import SUBSET_DROP_THRESHOLD, Block
from dinov2.layers.dino_head import DINOHead, WeightNormLinear
from dinov2.layers.drop_path import subset_size
from dinov2.models.vision_transformer import DinoVisionTransformer

STUDENT_BACKWARD_FACTOR = 3  # forward + backward (twice the forward)


@dataclass(frozen=True)
class Flops:
    nominal: float
    executed: float

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.nominal + other.nominal, self.executed + other.executed)

    def __mul__(self, factor: float) -> "Flops":
        return Flops(self.nominal * factor, self.executed * factor)


@dataclass(frozen=True)
class CropGroup:
    """`count` crops of `size` x `size` pixels, processed as one batch (one call per size)."""

    count: int
    size: int


def linear_flops_per_row(module: nn.Module) -> float:
    """2 x in x out summed over the module's linear layers: the FLOPs of one token or head row."""
    total = 0.0
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, WeightNormLinear)):
            total += 2.0 * layer.in_features * layer.out_features
    return total


def sequence_length(backbone: DinoVisionTransformer, size: int) -> int:
    """Tokens of a size x size crop: class token, registers, patches."""
    patches = (size // backbone.patch_size) ** 2
    return 1 + backbone.num_register_tokens + patches


def _block_flops(block: Block, sequences: int, tokens: int, training: bool) -> Flops:
    attention_branch = tokens * linear_flops_per_row(block.attn) + 4.0 * tokens**2 * block.attn.qkv.in_features
    ffn_branch = tokens * linear_flops_per_row(block.mlp)
    nominal = sequences * (attention_branch + ffn_branch)
    computed = sequences
    if training and block.sample_drop_ratio > SUBSET_DROP_THRESHOLD:
        computed = subset_size(sequences, block.sample_drop_ratio)
    return Flops(nominal, computed * (attention_branch + ffn_branch))


def backbone_forward_flops(backbone: DinoVisionTransformer, crops: Iterable[CropGroup], training: bool) -> Flops:
    """One forward pass of the backbone over each group of crops (patch embedding and blocks)."""
    conv = backbone.patch_embed.proj
    patch_flops = 2.0 * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    total = Flops(0.0, 0.0)
    for group in crops:
        patches = group.count * (group.size // backbone.patch_size) ** 2
        total = total + Flops(patches * patch_flops, patches * patch_flops)
        tokens = sequence_length(backbone, group.size)
        for block in backbone.iter_blocks():
            total = total + _block_flops(block, group.count, tokens, training)
    return total


def head_flops(heads: Iterable[tuple[DINOHead, int]]) -> Flops:
    """Each head over its number of rows ([CLS] tokens and masked patch tokens)."""
    flops = sum(rows * linear_flops_per_row(head) for head, rows in heads)
    return Flops(flops, flops)


@dataclass(frozen=True)
class StepShape:
    """What one training step processes, per GPU."""

    student_crops: tuple[CropGroup, ...]  # e.g. (global crops, local crops)
    teacher_crops: tuple[CropGroup, ...]  # the global crops the teacher sees
    masked_tokens: int  # iBOT rows through the head, for student and teacher alike


def training_step_flops(model: nn.Module, shape: StepShape) -> Flops:
    """Student forward + backward and teacher forward of an `SSLMetaArch`-like model.

    The iBOT rows go through `ibot_head` if the model has a separate one, else through the shared
    DINO head, as `SSLMetaArch` does.
    """
    student_rows = sum(group.count for group in shape.student_crops)
    teacher_rows = sum(group.count for group in shape.teacher_crops)

    def heads(modules: nn.ModuleDict, cls_rows: int) -> Flops:
        patch_head = modules["ibot_head"] if "ibot_head" in modules else modules["dino_head"]
        return head_flops([(modules["dino_head"], cls_rows), (patch_head, shape.masked_tokens)])

    student = backbone_forward_flops(model.student["backbone"], shape.student_crops, training=True)
    student = student + heads(model.student, student_rows)
    teacher = backbone_forward_flops(model.teacher["backbone"], shape.teacher_crops, training=False)
    teacher = teacher + heads(model.teacher, teacher_rows)
    return student * STUDENT_BACKWARD_FACTOR + teacher
