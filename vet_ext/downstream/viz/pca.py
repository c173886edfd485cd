"""The first three principal components of patch features as colours, body separated from air.

Fitting one PCA jointly over every view of a study puts all views in the same colour space, so
a structure that keeps its colour from the lateral to the ventro-dorsal view is represented
alike in both. The first component usually separates the animal from the background; its sign
is arbitrary, so it is flipped to grow with patch brightness (tissue attenuates, so the body is
the brighter part of a radiograph in display orientation) before thresholding it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2.utils.errors import UserError
from vet_ext.downstream.viz.figures import PanelGrid, set_title, show_gray, show_map
from vet_ext.downstream.viz.loading import Checkpoint, View

PANEL_PX = 256
FIGURE_FILE = "pca.png"
COMPONENTS = 3


@dataclass
class PcaResult:
    rgb: list[Tensor]  # per view [h, w, 3] in [0, 1]; background black
    foreground: list[Tensor]  # per view bool [h, w]
    explained_variance: list[float]  # ratio of each of the first components


def _unit_range(values: Tensor) -> Tensor:
    """Min-max scaled to [0, 1]; a constant column becomes 0."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    return (values - low) / (high - low).clamp_min(1e-12)


def pca_rgb(features: Sequence[Tensor], brightness: Sequence[Tensor], threshold: float = 0.5) -> PcaResult:
    """Joint PCA of per-view patch features [h, w, D]; `brightness` [h, w] orients the first component.

    Foreground = patches whose first component, scaled to [0, 1] over all views, exceeds
    `threshold`; components 1-3 are scaled to [0, 1] over the foreground patches only, so the
    colours spend their range on the body.
    """
    shapes = [tuple(f.shape[:2]) for f in features]
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).double()
    centred = flat - flat.mean(dim=0)
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
    kept = min(COMPONENTS, basis.shape[0])
    scores = centred @ basis[:kept].T
    if kept < COMPONENTS:
        scores = F.pad(scores, (0, COMPONENTS - kept))
    light = torch.cat([b.flatten() for b in brightness]).double()
    if torch.dot(scores[:, 0] - scores[:, 0].mean(), light - light.mean()) < 0:
        scores[:, 0] = -scores[:, 0]
    foreground = _unit_range(scores[:, :1])[:, 0] > threshold
    colours = torch.zeros_like(scores)
    if foreground.any():
        colours[foreground] = _unit_range(scores[foreground])
    variance = singular**2
    explained = (variance[:kept] / variance.sum().clamp_min(1e-30)).tolist()
    sizes = [h * w for h, w in shapes]
    return PcaResult(
        rgb=[c.reshape(*shape, COMPONENTS).float() for c, shape in zip(colours.split(sizes), shapes)],
        foreground=[m.reshape(shape) for m, shape in zip(foreground.split(sizes), shapes)],
        explained_variance=[round(v, 4) for v in explained],
    )


def patch_brightness(gray: Tensor, patch_size: int) -> Tensor:
    """Mean intensity [h/p, w/p] of each patch of a resized grayscale image [1, h, w]."""
    return F.avg_pool2d(gray[None], patch_size)[0, 0]


# --- command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--foreground-threshold", type=float, default=0.5,
        help="first component (scaled to [0, 1] over the study) above which a patch is body",
    )  # fmt: skip


def check_arguments(args: argparse.Namespace) -> None:
    if not 0.0 <= args.foreground_threshold < 1.0:
        raise UserError(f"--foreground-threshold must be in [0, 1), got {args.foreground_threshold}")


def analyse(checkpoint: Checkpoint, views: Sequence[View], args: argparse.Namespace) -> PcaResult:
    features, brightness = [], []
    for view in views:
        gray, image = checkpoint.inputs(view, args.image_size)
        features.append(checkpoint.patch_features(image))
        brightness.append(patch_brightness(gray, checkpoint.patch_size))
    return pca_rgb(features, brightness, args.foreground_threshold)


def write_pca_figure(
    path: str | Path, views: Sequence[View], results: Mapping[str, PcaResult], panel_height: int = PANEL_PX
) -> Path:
    """Per checkpoint and view: the radiograph, then its patch colours (black = background)."""
    grid = PanelGrid(list(results), [tuple(view.pixels.shape) for view in views for _ in range(2)], panel_height)
    for row, result in enumerate(results.values()):
        for index, (view, rgb, mask) in enumerate(zip(views, result.rgb, result.foreground)):
            image_ax, pca_ax = grid.axes[row][2 * index : 2 * index + 2]
            show_gray(image_ax, view.pixels, view.name)
            show_map(pca_ax, rgb, tuple(view.pixels.shape))
            set_title(pca_ax, f"{view.name}: PCA 1-3, body {float(mask.float().mean()):.0%}")
    return grid.save(path)


def write_outputs(
    out_dir: Path, views: Sequence[View], results: Mapping[str, PcaResult], args: argparse.Namespace
) -> tuple[list[Path], dict[str, Any]]:
    files = [write_pca_figure(out_dir / FIGURE_FILE, views, results)]
    details = {
        "fit": "jointly over all views; first component oriented to grow with patch brightness",
        "foreground_threshold": args.foreground_threshold,
        "checkpoints": {
            name: {
                "explained_variance": result.explained_variance,
                "foreground_fraction": {
                    view.name: round(float(mask.float().mean()), 4) for view, mask in zip(views, result.foreground)
                },
            }
            for name, result in results.items()
        },
    }
    return files, details
