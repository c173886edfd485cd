"""KoLeo regulariser: pushes each class embedding away from its nearest neighbour in the batch,
so the features spread over the sphere (Sablayrolles et al., 2018, "Spreading vectors for
similarity search")."""
import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean log distance of each L2-normalised row to its nearest other row.

    Always computed in float32 with autocast off: in fp16 the eps of the normalisation and of
    the distance round to zero, so two identical embeddings (common with tiny batches) give
    log(0) = -inf. In float32 they give a large but finite value, as upstream in float32.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, student_output: torch.Tensor) -> torch.Tensor:
        """Loss for backbone class tokens [B, D]; a single row is its own neighbour."""
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=self.eps)
            neighbour = self._nearest_neighbour(x)
            distances = F.pairwise_distance(x, x[neighbour], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()

    @staticmethod
    @torch.no_grad()
    def _nearest_neighbour(x: torch.Tensor) -> torch.Tensor:
        """Index of each unit row's most similar other row (largest dot product)."""
        similarity = x @ x.t()
        similarity.fill_diagonal_(-1)
        return similarity.argmax(dim=1)
