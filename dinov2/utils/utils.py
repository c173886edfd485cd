"""Training-loop helpers that upstream DINOv2 keeps in dinov2/utils/utils.py."""
import math
import random

import numpy as np
import torch


def fix_random_seeds(seed: int) -> None:
    """Seed every global generator a run may touch (Python, NumPy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class CosineScheduler:
    """Per-iteration value of a hyper-parameter: frozen at 0, linear warm-up, then cosine decay.

    The whole table is precomputed so that a resumed run reads exactly the value the original
    run would have used at that iteration. The layout follows upstream, including its quirk that
    the last warm-up value and the first cosine value are both `base_value`.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
    ):
        self.final_value = final_value
        self.total_iters = total_iters
        cosine_iters = total_iters - warmup_iters - freeze_iters
        if cosine_iters < 0:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed total_iters ({total_iters})"
            )
        frozen = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        angles = math.pi * np.arange(cosine_iters) / max(cosine_iters, 1)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(angles))
        self.schedule = np.concatenate((frozen, warmup, cosine))

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters
