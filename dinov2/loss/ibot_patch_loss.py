"""iBOT loss: the student predicts, for each masked patch, the teacher's prototype distribution
of the same patch seen unmasked."""
import torch

from dinov2.loss.dino_clstoken_loss import CenteredTeacherLoss, reduce_over_ranks, sinkhorn_knopp


class iBOTPatchLoss(CenteredTeacherLoss):
    """Masked-patch cross-entropy in which every masked image weighs the same, whatever its
    number of masked patches, and unmasked images count in the average with zero loss."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Start the centre update from masked teacher tokens [G, n, K] (or [n, K], one group).

        The batch statistic is the mean over every masked token of the global batch. Upstream
        averages per-rank means instead, which is the same in one process but weighs a rank's
        tokens by how few of them it masked; the exact mean keeps a run independent of its
        number of processes.
        """
        tokens = teacher_patch_tokens.flatten(0, -2)
        self._start_center_update(tokens.sum(dim=0), len(tokens))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | int,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for this rank's masked teacher tokens [n, K].

        The number of samples is the masked-token count summed over ranks (ranks hold different
        counts). The caller's count tensor is left untouched, unlike upstream's in-place reduce.
        """
        n_masked = torch.as_tensor(n_masked_patches_tensor, dtype=torch.int64, device=teacher_output.device).clone()
        n_samples_total = reduce_over_ranks(n_masked).sum()  # stays on the device: no host sync
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples_total, n_iterations)

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss over the masked tokens only (rows in the flat order of `student_masks_flat`).

        Each token weighs 1 / (masked tokens of its image); the weighted sum is divided by the
        number of images M of `student_masks_flat` [M, N], masked or not.
        """
        token_loss = self.cross_entropy(student_patch_tokens_masked, teacher_patch_tokens_masked)
        if masks_weight is None:
            masks_weight = masked_token_weights(student_masks_flat)
        if n_masked_patches is not None:
            token_loss = token_loss[:n_masked_patches]
        return (token_loss * masks_weight).sum() / student_masks_flat.shape[0]

    def forward(
        self,
        student_patch_tokens: torch.Tensor,
        teacher_patch_tokens: torch.Tensor,
        student_masks_flat: torch.Tensor,
    ) -> torch.Tensor:
        """Dense variant on all tokens [B, N, K]: masked mean per image, then mean over images."""
        token_loss = self.cross_entropy(student_patch_tokens, teacher_patch_tokens)
        masks = student_masks_flat.float()
        per_image = (token_loss * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return per_image.mean()


def masked_token_weights(masks: torch.Tensor) -> torch.Tensor:
    """1 / (masked count of the token's image) for every masked token of masks [M, N], in flat
    order; shared with the collate so both sides agree on the weighting."""
    per_image = 1 / masks.sum(dim=-1).clamp(min=1.0)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]

