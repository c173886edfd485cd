"""Block-wise patch masks for iBOT: masked patches come in rectangles, as in BEiT, so the student
cannot fill a hole by copying its immediate neighbours."""
import math
import random

import numpy as np


class MaskingGenerator:
    """Draws boolean masks [H, W] over the patch grid made of random rectangles.

    Randomness comes from a `random.Random` (the module-level `random` by default) and is consumed
    in upstream DINOv2's order, so the same seed gives bit-identical masks.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.height, self.width = input_size if isinstance(input_size, tuple) else (input_size, input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
            f"max = {self.num_masking_patches}, {self.log_aspect_ratio[0]:.3f} ~ {self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> np.ndarray:
        """Mask with at most `num_masking_patches` patches set (exact most of the time, else a few
        short: drawing stops at the first rectangle attempt that adds nothing)."""
        rng = random if rng is None else rng
        mask = np.zeros(self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            remaining = num_masking_patches - mask_count
            if self.max_num_patches is not None:
                remaining = min(remaining, self.max_num_patches)
            added = self._add_rectangle(mask, remaining, rng)
            if added == 0:
                break
            mask_count += added
        return mask

    def _add_rectangle(self, mask: np.ndarray, max_new_patches: float, rng: random.Random) -> int:
        """Try up to 10 random rectangles; mask the first one that adds between 1 and
        `max_new_patches` new patches and return how many it added (0 if none fitted)."""
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_new_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if h >= self.height or w >= self.width:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            new_patches = h * w - int(window.sum())
            if 0 < new_patches <= max_new_patches:
                window[:] = True
                return new_patches
        return 0
