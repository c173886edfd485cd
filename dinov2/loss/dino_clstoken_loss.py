"""DINO loss on class tokens, plus the teacher-target machinery it shares with the iBOT loss.

The teacher's targets come either from centring (a running mean of teacher logits, subtracted
before a sharp softmax, so no prototype can dominate) or from a few Sinkhorn-Knopp iterations
(which spread the batch evenly over prototypes). Both must give the same answer whether the batch
lives on one process or is split over many, so every batch statistic is all-reduced when a
process group exists and computed locally when it does not.
"""
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov2 import distributed


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Cross-entropy of the student's tempered softmax against teacher probabilities, per row.

    Student logits [..., K] broadcast against teacher probabilities [..., K]; the result drops the
    last dim. Computed in float32 because the log-softmax of fp16 logits loses the small
    probabilities that carry most of the signal at a 0.1 temperature.
    """
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -torch.sum(teacher_probs.float() * log_probs, dim=-1)


def reduce_over_ranks(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce in place over the process group, or leave as is when there is none."""
    if distributed.is_enabled():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, teacher_temp: float, n_samples_total: int | torch.Tensor, n_iterations: int
) -> torch.Tensor:
    """Balanced soft assignment of samples [B, K] to prototypes; every returned row sums to 1.

    `n_samples_total` counts the rows of all processes together: the assignment is a single
    matrix split by rows across ranks, so every sum over samples is all-reduced.

    Each prototype's row of exp(logits/temp) is divided by its largest entry (over all ranks)
    before the first normalisation. The first row normalisation removes any per-prototype factor,
    so this changes nothing mathematically, but it keeps exp() from overflowing to inf (and the
    result from turning into NaN) when logits/temp exceeds ~88.
    """
    scaled = teacher_logits.float() / teacher_temp
    # amax of an empty tensor fails: a rank may hold no masked patch this step, and must still
    # join the collectives; -inf is the neutral element of the MAX reduction.
    local_max = scaled.amax(dim=0, keepdim=True) if len(scaled) else scaled.new_full((1, scaled.shape[1]), -torch.inf)
    per_prototype_max = reduce_over_ranks(local_max, op=dist.ReduceOp.MAX)
    q = torch.exp(scaled - per_prototype_max).t()  # [K, B]: prototypes by samples
    n_prototypes = q.shape[0]
    q /= reduce_over_ranks(q.sum())
    for _ in range(n_iterations):
        q /= reduce_over_ranks(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples_total
    q *= n_samples_total
    return q.t()


class CenteredTeacherLoss(nn.Module):
    """Student/teacher loss whose teacher targets are centred by a lazily updated running mean.

    The centre update is split in two so the all-reduce of the batch statistics overlaps with the
    student's forward and backward: `_start_center_update` launches it, and the EMA is applied only
    when the next step asks for centred targets. Step t is therefore centred with statistics up
    to step t-1, exactly as upstream DINOv2.
    """

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending: torch.Tensor | None = None  # [sum of the batch's rows..., row count]
        self._reduce_handle = None

    @torch.no_grad()
    def _start_center_update(self, batch_sum: torch.Tensor, n_rows: int) -> None:
        """Remember this rank's row sum and row count and start summing both over ranks in the
        background (one collective). Ranks may hold different numbers of rows (masked patches):
        the centre is the mean over every row of the global batch, so it does not depend on how
        the batch is split."""
        count = batch_sum.new_full((1,), n_rows, dtype=torch.float32)
        self._pending = torch.cat([batch_sum.float().flatten(), count])
        self._reduce_handle = dist.all_reduce(self._pending, async_op=True) if distributed.is_enabled() else None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the pending batch statistics into the centre (no-op when nothing is pending)."""
        if self._pending is None:
            return
        if self._reduce_handle is not None:
            self._reduce_handle.wait()
        batch_center = (self._pending[:-1] / self._pending[-1]).view_as(self.center)
        self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))
        self._pending = None
        self._reduce_handle = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Sharpened teacher targets [..., K] (same shape as the logits), centred with every
        update started so far."""
        self.apply_center_update()
        return F.softmax((teacher_output - self.center.flatten()) / teacher_temp, dim=-1)

    def cross_entropy(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Per-row cross-entropy [N] of student logits [N, K] against teacher targets [N, K].

        Exposed so a meta-architecture can choose which student and teacher views to pair.
        Teacher targets may carry leading dims ([T, N, K] -> [T, N]): the student's
        log-softmax is then computed once for all T teacher views.
        """
        return soft_cross_entropy(student_logits, teacher_probs, self.student_temp)

    def pairwise_cross_entropy(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every student crop against every teacher crop: [S, B, K] x [T, B, K] -> [S, T, B].

        One batched matrix product per image instead of broadcasting, which would materialise
        an [S, T, B, K] tensor (gigabytes with 20 local crops and 65k prototypes).
        """
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -torch.einsum("sbk,tbk->stb", log_probs, teacher_probs.float())


class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy between student and teacher class-token prototype distributions."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__((1, out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Start the centre update with the teacher logits [B, K] of this step."""
        self._start_center_update(teacher_output.sum(dim=0, keepdim=True), len(teacher_output))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for teacher logits [B, K] (B rows on each rank)."""
        n_samples_total = teacher_output.shape[0] * distributed.get_global_size()
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples_total, n_iterations)

    def forward(
        self,
        student_output_list: Sequence[torch.Tensor],
        teacher_out_softmaxed_centered_list: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Sum over every (student view, teacher view) pair of the mean cross-entropy over rows.

        Not divided by the number of pairs: the caller weights the terms (upstream semantics).
        """
        teacher_views = torch.stack(list(teacher_out_softmaxed_centered_list))  # [T, B, K]
        total = 0
        for student_view in student_output_list:
            total = total + self.cross_entropy(student_view, teacher_views).mean(dim=-1).sum()
        return total
