"""Shared plotting: a pixel-exact grid of image panels, map/mask/box overlays, atomic PNG writes.

Radiographs must not be stretched (a lateral thorax squeezed into a square misleads the eye), so
every panel is laid out in pixels with the width/height ratio of its source image, and every
overlay is drawn in source-pixel coordinates: a patch-grid map stretched over the panel is then
exactly the map upsampled to the image, whatever the patch size. Figures are drawn with
matplotlib's Agg canvas directly, so importing this never changes the pyplot backend of a caller.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from dinov2.utils.io import atomic_write_bytes

DPI = 100
TITLE_PX = 18  # band above each row of panels for the panel titles
LABEL_PX = 22  # column left of each row for the (rotated) checkpoint name
GAP_PX = 6
TITLE_FONT = 8
LABEL_FONT = 9
ANCHOR_COLOR = "red"
MATCH_COLOR = "yellow"


@dataclass(frozen=True)
class Box:
    """A panel's image area in figure pixels, from the top-left corner."""

    left: int
    top: int
    width: int
    height: int


def panel_width(height_px: int, source_hw: tuple[int, int]) -> int:
    """Width of a panel `height_px` tall that shows an image of `source_hw` undistorted."""
    return max(1, round(height_px * source_hw[1] / source_hw[0]))


class PanelGrid:
    """Rows of panels (one row per checkpoint), each column as wide as its image's aspect demands."""

    def __init__(self, row_labels: Sequence[str], column_shapes: Sequence[tuple[int, int]], panel_height: int):
        widths = [panel_width(panel_height, shape) for shape in column_shapes]
        self.width = LABEL_PX + sum(widths) + GAP_PX * len(widths)
        self.height = len(row_labels) * (TITLE_PX + panel_height) + GAP_PX
        self.figure = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        FigureCanvasAgg(self.figure)
        self.boxes: list[list[Box]] = []
        self.axes: list[list[Axes]] = []
        for row, label in enumerate(row_labels):
            top = row * (TITLE_PX + panel_height) + TITLE_PX
            left = LABEL_PX
            boxes = []
            for width in widths:
                boxes.append(Box(left, top, width, panel_height))
                left += width + GAP_PX
            self.boxes.append(boxes)
            self.axes.append([self._add_axes(box) for box in boxes])
            self.figure.text(
                LABEL_PX / 2 / self.width, 1 - (top + panel_height / 2) / self.height, label,
                rotation=90, ha="center", va="center", fontsize=LABEL_FONT, fontweight="bold",
            )  # fmt: skip

    def _add_axes(self, box: Box) -> Axes:
        bottom = 1 - (box.top + box.height) / self.height
        ax = self.figure.add_axes((box.left / self.width, bottom, box.width / self.width, box.height / self.height))
        ax.set_axis_off()
        return ax

    def save(self, path: str | os.PathLike) -> Path:
        return save_png(self.figure, path)


def _extent(shape_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    return (0.0, float(shape_hw[1]), float(shape_hw[0]), 0.0)


def show_gray(ax: Axes, pixels: Tensor, title: str | None = None) -> None:
    """A radiograph [H, W] in [0, 1], black = 0, in source-pixel coordinates."""
    shape = tuple(pixels.shape[-2:])
    ax.imshow(
        pixels.cpu().numpy(), cmap="gray", vmin=0.0, vmax=1.0, extent=_extent(shape), aspect="auto",
        interpolation="antialiased",
    )  # fmt: skip
    ax.set_xlim(0, shape[1])
    ax.set_ylim(shape[0], 0)
    if title:
        set_title(ax, title)


def show_map(
    ax: Axes, values: Tensor | np.ndarray, shape_hw: tuple[int, int], *, cmap: str = "viridis",
    alpha: float = 1.0, smooth: bool = False,
) -> None:  # fmt: skip
    """A patch-grid map stretched over the source image (upsampled to it), own colour range."""
    values = values.cpu().numpy() if isinstance(values, Tensor) else values
    interpolation = "bilinear" if smooth else "nearest"
    ax.imshow(values, cmap=cmap, alpha=alpha, extent=_extent(shape_hw), aspect="auto", interpolation=interpolation)
    ax.set_xlim(0, shape_hw[1])
    ax.set_ylim(shape_hw[0], 0)


def show_mask(ax: Axes, mask: Tensor, shape_hw: tuple[int, int], color, alpha: float = 0.5) -> None:
    """Patches where `mask` is true tinted with `color`; the rest left untouched."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[..., :3] = color[:3]
    rgba[..., 3] = mask.cpu().numpy().astype(np.float32) * alpha
    ax.imshow(rgba, extent=_extent(shape_hw), aspect="auto", interpolation="nearest")


def draw_patches(
    ax: Axes, cells: Sequence[tuple[int, int]], grid_hw: tuple[int, int], shape_hw: tuple[int, int],
    color: str, *, numbered: bool = False,
) -> None:  # fmt: skip
    """Outline patches (row, col) of a `grid_hw` grid laid over an image of `shape_hw` pixels."""
    cell_h, cell_w = shape_hw[0] / grid_hw[0], shape_hw[1] / grid_hw[1]
    for rank, (row, col) in enumerate(cells, start=1):
        corner = (col * cell_w, row * cell_h)
        ax.add_patch(Rectangle(corner, cell_w, cell_h, fill=False, edgecolor=color, linewidth=1.5))
        if numbered:
            ax.text(col * cell_w, row * cell_h, str(rank), color=color, fontsize=6, va="bottom", ha="left")


def distinct_colors(count: int) -> list[tuple[float, float, float, float]]:
    """Up to 10 colours that stay apart on a grayscale background (tab10), cycled beyond."""
    palette = colormaps["tab10"]
    return [palette(i % 10) for i in range(count)]


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Written atomically, so a reader (or a crash) never sees half a PNG under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def set_title(ax: Axes, text: str) -> None:
    ax.set_title(text, fontsize=TITLE_FONT, pad=2)
