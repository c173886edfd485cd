"""Any folder of PNG/JPEG files as a dataset: the first thing a user with their own images tries.

Upstream DINOv2 only reads ImageNet with precomputed index files; here pointing `root` at a
directory is enough. Sub-folders of `root` are classes (sorted names -> 0, 1, ...); images
directly in `root`, or a tree without sub-folders, get target -1 (unlabelled).
"""
import pathlib
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dinov2.data.registry import register_dataset, transform_item
from dinov2.utils.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNLABELLED = -1


def load_image_uint8(path: pathlib.Path) -> torch.Tensor:
    """uint8 [C, H, W]: C = 1 for grayscale (16-bit scaled to 8), else 3 (RGB)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(image, dtype=np.float64)
                array = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
            elif image.mode in ("L", "1", "LA"):
                array = np.asarray(image.convert("L"))
            else:
                array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{path}: cannot read image: {exc}") from exc
    tensor = torch.from_numpy(np.array(array))  # a writable, contiguous copy
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


class ImageFolder:
    """Images found recursively under `root`, in sorted path order; items are (uint8 image, target)."""

    def __init__(self, root: str, transform: Callable | None = None, target_transform: Callable | None = None):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise UserError(f"dataset 'ImageFolder': root '{root}' is not a directory")
        self.paths = sorted(
            path for path in self.root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.paths:
            raise UserError(f"dataset 'ImageFolder': no {'/'.join(IMAGE_SUFFIXES)} images under '{root}'")
        folders = [path.relative_to(self.root).parts[0] if path.parent != self.root else None for path in self.paths]
        self.classes = sorted({folder for folder in folders if folder is not None})
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.targets = np.array([class_index.get(folder, UNLABELLED) for folder in folders], dtype=np.int64)
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = load_image_uint8(self.paths[index]), int(self.targets[index])
        return transform_item(image, target, self.transform, self.target_transform)


@register_dataset("ImageFolder")
def make_image_folder(
    root: str, transform: Callable | None = None, target_transform: Callable | None = None
) -> ImageFolder:
    return ImageFolder(root, transform=transform, target_transform=target_transform)
