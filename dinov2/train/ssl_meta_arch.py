"""Student, EMA teacher and the three self-supervised losses of DINOv2, generic over crop pairing.

The batch (`SSLBatch`) says which student global crops the teacher also sees (`teacher_global_index`,
one row of `collated_global_crops` per teacher row, crop-major). Plain DINOv2 is the case where the
teacher sees every global crop; VET-DINO's multi-view case is where it sees the global crops of one
view only. Every student crop is paired with every teacher crop except the same crop of the same
image, and the [CLS] loss is divided by the number of pairs, as upstream does, so the plain case
reproduces upstream's numbers.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from dinov2.data.batch import SSLBatch, SSLMasks
from dinov2.fsdp import full_module_state, local_tensor, reshard
from dinov2.layers import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import build_model_from_cfg
from dinov2.models.weights import load_backbone_weights, load_head_weights, read_weights_file
from dinov2.train.monitors import collapse_monitors
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")


def check_masks_on_teacher_rows(batch: SSLMasks | Mapping[str, Any], source: str = "batch") -> None:
    """iBOT targets are the teacher's tokens of the same crop, so masks must sit on its rows only.

    Checked once on a pipeline's first batch (while it is on the CPU) rather than every step,
    where reading the answer back would stall the GPU. `source` names the batch's maker.
    """
    if "teacher_global_index" not in batch:  # upstream's format: the teacher sees every row
        return
    masks, teacher_index = batch["collated_masks"], batch["teacher_global_index"]
    seen = torch.zeros(masks.shape[0], dtype=torch.bool)
    seen[teacher_index.cpu()] = True
    if bool(masks.cpu()[~seen].any()):
        raise UserError(f"{source}: iBOT masks found on a global crop that the teacher does not see")


class Losses(NamedTuple):
    total: Tensor  # what is optimised
    terms: dict[str, Tensor]  # the logged loss terms
    monitors: dict[str, Tensor]  # whether the model is still learning; no gradient


class SSLMetaArch(nn.Module):
    """DINOv2's meta-architecture: student and teacher (backbone + heads) and their losses."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        pretrained = str(cfg.student.pretrained_weights or "")
        stored = read_weights_file(pretrained) if pretrained else None
        if stored is not None:
            load_backbone_weights(student_backbone, stored, resize_pos_embed=True, source=pretrained)
            logger.info("student backbone initialised from %s", pretrained)
        self.embed_dim = embed_dim

        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)

        student, teacher = {"backbone": student_backbone}, {"backbone": teacher_backbone}
        if self.do_dino or self.do_ibot:
            student["dino_head"], teacher["dino_head"] = (self._dino_head(cfg.dino) for _ in range(2))
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"], teacher["ibot_head"] = (self._dino_head(cfg.ibot) for _ in range(2))
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        if stored is not None:
            heads = {name: module for name, module in student.items() if name != "backbone"}
            for name in load_head_weights(heads, stored, pretrained):
                logger.info("student %s initialised from %s", name, pretrained)

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        ibot_prototypes = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes)

        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def _dino_head(self, head_cfg) -> DINOHead:
        return DINOHead(
            in_dim=self.embed_dim,
            out_dim=head_cfg.head_n_prototypes,
            hidden_dim=head_cfg.head_hidden_dim,
            bottleneck_dim=head_cfg.head_bottleneck_dim,
            nlayers=head_cfg.head_nlayers,
        )

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths and never updates BN statistics
        return self

    # ----------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def teacher_targets(self, batch: SSLBatch, teacher_temp: float):
        """Soft targets: teacher [CLS] probabilities [n_teacher_crops, B, K], masked-patch
        probabilities, and the teacher's [CLS] features they came from (for the collapse monitors)."""
        crops = batch.collated_global_crops.index_select(0, batch.teacher_global_index)
        output = self.teacher.backbone(crops, is_training=True)
        cls_tokens = output["x_norm_clstoken"]
        masked_tokens = self._teacher_masked_patch_tokens(output["x_norm_patchtokens"], batch)
        n_masked = masked_tokens.shape[0]

        if self.do_ibot and not self.ibot_separate_head:
            logits = self.teacher.dino_head(torch.cat([cls_tokens, masked_tokens]))
            cls_logits, patch_logits = logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0] :]
        else:
            cls_logits = self.teacher.dino_head(cls_tokens)
            patch_logits = self.teacher.ibot_head(masked_tokens) if self.do_ibot else None

        centering = self.cfg.train.centering
        if centering == "centering":
            cls_targets = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp=teacher_temp)
            self.dino_loss.update_center(cls_logits)
            if self.do_ibot:
                patch_logits = patch_logits.unsqueeze(0)
                patch_targets = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp=teacher_temp)
                patch_targets = patch_targets.squeeze(0)
                self.ibot_patch_loss.update_center(patch_logits)
        elif centering == "sinkhorn_knopp":
            cls_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp=teacher_temp)
            if self.do_ibot:
                patch_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    patch_logits,
                    teacher_temp=teacher_temp,
                    n_masked_patches_tensor=patch_logits.new_full((1,), n_masked, dtype=torch.int64),  # a fill, not a host copy
                )
        else:
            raise ValueError(f"train.centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")

        cls_targets = cls_targets.view(batch.n_teacher_crops, batch.n_images, -1)
        return cls_targets, (patch_targets if self.do_ibot else None), cls_tokens

    def _teacher_masked_patch_tokens(self, patch_tokens: Tensor, batch: SSLBatch) -> Tensor:
        """Teacher patch features at the student's masked positions (masks live on teacher crops only)."""
        n_patches = patch_tokens.shape[1]
        mask_indices = batch.mask_indices_list.to(patch_tokens.device)
        student_rows, patch_positions = mask_indices // n_patches, mask_indices % n_patches
        teacher_row_of_student = torch.full(
            (batch.n_global_crops * batch.n_images,), -1, dtype=torch.long, device=patch_tokens.device
        )
        teacher_row_of_student[batch.teacher_global_index] = torch.arange(
            batch.teacher_global_index.shape[0], device=patch_tokens.device
        )
        teacher_rows = teacher_row_of_student[student_rows]  # valid: see check_masks_on_teacher_rows
        return patch_tokens.flatten(0, 1).index_select(0, teacher_rows * n_patches + patch_positions)

    # ----------------------------------------------------------------------------------- student
    def compute_losses(
        self, images: SSLBatch | Mapping[str, Any], teacher_temp: float, freeze_backbone: bool = False
    ) -> Losses:
        """The optimised loss, the logged terms (upstream halves koleo and iBOT for display) and
        the collapse monitors (dinov2.train.monitors), all still on the device.

        `freeze_backbone` runs the student backbone without gradients, so only the heads learn:
        fresh heads on a released backbone would otherwise push large, random gradients into
        features that are already good (head warm-up for continued pretraining). `images` may be a
        dict in upstream's format (stored batches, users' collates): it becomes an `SSLBatch` here.
        The batch is on the model's device already (the pipeline's `to_device` moved it).
        """
        batch = SSLBatch.from_mapping(images)
        cls_targets, patch_targets, teacher_cls = self.teacher_targets(batch, teacher_temp)

        global_crops, local_crops = batch.collated_global_crops, batch.collated_local_crops
        masks = batch.collated_masks
        has_locals = local_crops.shape[0] > 0
        crops = [global_crops, local_crops] if has_locals else [global_crops]
        crop_masks = [masks, None] if has_locals else [masks]
        with torch.no_grad() if freeze_backbone else contextlib.nullcontext():
            outputs = self.student.backbone(crops, masks=crop_masks, is_training=True)
        global_out = outputs[0]
        global_cls = global_out["x_norm_clstoken"]
        local_cls = outputs[1]["x_norm_clstoken"] if has_locals else global_cls[:0]

        head_inputs = [local_cls, global_cls]
        masked_patches = None
        if self.do_ibot:
            mask_indices = batch.mask_indices_list.to(global_crops.device)
            masked_patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            if not self.ibot_separate_head:
                head_inputs.append(masked_patches)
        head_out = self.student.dino_head(torch.cat(head_inputs)).split([t.shape[0] for t in head_inputs])
        local_logits, global_logits = head_out[0], head_out[1]
        if self.do_ibot:
            patch_logits = head_out[2] if not self.ibot_separate_head else self.student.ibot_head(masked_patches)

        loss_dict: dict[str, Tensor] = {}
        total = global_cls.new_zeros(())
        B, n_terms = batch.n_images, batch.n_loss_terms
        dino_cross_entropy = None
        if self.do_dino:
            local_logits = local_logits.view(batch.n_local_crops, B, -1)
            global_logits = global_logits.view(batch.n_global_crops, B, -1)
            pair_losses = self.dino_loss.pairwise_cross_entropy
            dino_local = pair_losses(local_logits, cls_targets).sum() / (B * n_terms)
            global_pairs = pair_losses(global_logits, cls_targets) * self._distinct_crop_pairs(batch)
            dino_global = global_pairs.sum() / (B * n_terms)
            loss_dict["dino_local_crops_loss"] = dino_local
            loss_dict["dino_global_crops_loss"] = dino_global
            dino_cross_entropy = dino_local + dino_global  # the mean over (student, teacher) pairs
            total = total + self.cfg.dino.loss_weight * (dino_local + dino_global)
        if self.do_koleo:
            koleo = self.cfg.dino.koleo_loss_weight * sum(
                self.koleo_loss(crop_cls) for crop_cls in global_cls.chunk(batch.n_global_crops)
            )
            loss_dict["koleo_loss"] = koleo / batch.n_global_crops
            total = total + koleo
        if self.do_ibot:
            teacher_rows_masks = masks.index_select(0, batch.teacher_global_index)
            ibot = self.ibot_patch_loss.forward_masked(
                patch_logits,
                patch_targets,
                student_masks_flat=teacher_rows_masks,
                masks_weight=batch.masks_weight.to(global_crops.device),
            )
            loss_dict["ibot_loss"] = ibot / batch.n_teacher_crops
            total = total + self.cfg.ibot.loss_weight * ibot
        return Losses(total, loss_dict, collapse_monitors(cls_targets, teacher_cls, dino_cross_entropy))

    @staticmethod
    def _distinct_crop_pairs(batch: SSLMasks) -> Tensor:
        """1 where student global crop s and teacher crop t of image b are different crops: [S, T, B]."""
        B = batch.n_images
        device = batch.teacher_global_index.device
        student_rows = torch.arange(batch.n_global_crops * B, device=device).view(batch.n_global_crops, 1, B)
        teacher_rows = batch.teacher_global_index.view(1, batch.n_teacher_crops, B)
        return (student_rows != teacher_rows).to(torch.float32)

    def forward_backward(self, images: SSLBatch | Mapping[str, Any], teacher_temp: float, scaler=None) -> tuple[Tensor, dict[str, Tensor]]:
        total, loss_dict, _ = self.compute_losses(images, teacher_temp)
        (scaler.scale(total) if scaler is not None else total).backward()
        return total, loss_dict

    # ----------------------------------------------------------------------------------- EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """Teacher <- momentum * teacher + (1 - momentum) * student, parameters only.

        Under FSDP the teacher is sharded exactly like the student, so each rank updates its own
        shards and no communication is needed, once both are in their sharded batch.
        """
        reshard(self.student)
        reshard(self.teacher)
        teacher_params, student_params = [], []
        for name, student_module in self.student.items():
            for s, t in zip(student_module.parameters(), self.teacher[name].parameters()):
                student_params.append(local_tensor(s.detach()))
                teacher_params.append(local_tensor(t))
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    def teacher_state_dict(self) -> dict[str, Tensor]:
        """The teacher as upstream exports it: `backbone.*`, `dino_head.*`, `ibot_head.*`.

        Whole tensors on the CPU; gathered from the shards under FSDP, so every rank must call it
        (rank 0 gets the complete state).
        """
        return full_module_state(self.teacher)
