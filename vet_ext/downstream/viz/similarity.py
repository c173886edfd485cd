"""Cross-view correspondence: which patches of the other views resemble one patch of the first.

Multi-view pretraining is meant to make the same anatomy look alike in a lateral and a
ventro-dorsal view; cosine similarity of final normed patch tokens to an anchor patch shows
whether it does. The anchor is given on the first view's patch grid (`--anchor ROW,COL`) or in
its source pixels (`--anchor-xy X,Y`), the latter pinning one anatomical point even when the
compared checkpoints have different patch sizes.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from dinov2.utils.errors import UserError
from vet_ext.downstream.viz.figures import ANCHOR_COLOR, MATCH_COLOR, PanelGrid, draw_patches, show_gray, show_map
from vet_ext.downstream.viz.loading import Checkpoint, View

PANEL_PX = 320
FIGURE_FILE = "patch_similarity.png"
Cell = tuple[int, int]


@dataclass
class Match:
    """Similarity of one target view's patches to the anchor, and its best patches."""

    view: int
    similarity: Tensor  # [h, w]
    top: list[Cell]
    scores: list[float]


@dataclass
class SimilarityResult:
    anchor: Cell
    anchor_grid: tuple[int, int]
    matches: list[Match]


def cosine_similarity_map(anchor: Tensor, features: Tensor) -> Tensor:
    """Cosine similarity [h, w] of an anchor embedding [D] to every patch of `features` [h, w, D]."""
    return F.cosine_similarity(features, anchor.expand_as(features), dim=-1)


def top_k_patches(similarity: Tensor, k: int) -> tuple[list[Cell], list[float]]:
    """The `k` most similar patches as (row, col), best first, and their similarities."""
    values, flat = similarity.flatten().topk(min(k, similarity.numel()))
    width = similarity.shape[1]
    return [(int(i) // width, int(i) % width) for i in flat], [float(v) for v in values]


def anchor_patch(x: float, y: float, source_hw: tuple[int, int], grid_hw: tuple[int, int]) -> Cell:
    """The patch covering source pixel (x, y) of an image resized as a whole onto `grid_hw`."""
    if not (0 <= x < source_hw[1] and 0 <= y < source_hw[0]):
        raise UserError(
            f"--anchor-xy {x:g},{y:g} is outside the first view ({source_hw[1]}x{source_hw[0]} pixels, X,Y)"
        )
    return math.floor(y * grid_hw[0] / source_hw[0]), math.floor(x * grid_hw[1] / source_hw[1])


def parse_pair(text: str, flag: str, kind: type = int) -> tuple:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return kind(parts[0]), kind(parts[1])
    except ValueError:
        raise UserError(f"{flag} expects two {kind.__name__} numbers separated by a comma, got {text!r}") from None


def _anchor(args: argparse.Namespace, view: View, grid_hw: tuple[int, int]) -> Cell:
    if args.anchor_xy is not None:
        x, y = parse_pair(args.anchor_xy, "--anchor-xy", float)
        return anchor_patch(x, y, tuple(view.pixels.shape), grid_hw)
    row, col = parse_pair(args.anchor, "--anchor")
    if not (0 <= row < grid_hw[0] and 0 <= col < grid_hw[1]):
        raise UserError(
            f"--anchor {row},{col} is outside the {grid_hw[0]}x{grid_hw[1]} patch grid (rows x cols) "
            f"of view {view.name}"
        )
    return row, col


# --- command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    anchor = parser.add_mutually_exclusive_group(required=True)
    anchor.add_argument("--anchor", metavar="ROW,COL", help="anchor patch on the first view's patch grid")
    anchor.add_argument("--anchor-xy", metavar="X,Y", help="anchor point in source pixels of the first view")
    parser.add_argument("--top-k", type=int, default=5, help="most similar patches boxed per view")


def check_arguments(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")


def analyse(checkpoint: Checkpoint, views: Sequence[View], args: argparse.Namespace) -> SimilarityResult:
    """Anchor on the first view; targets are the other views (the first one itself if it is alone)."""
    features = [checkpoint.patch_features(checkpoint.inputs(view, args.image_size)[1]) for view in views]
    grid_hw = tuple(features[0].shape[:2])
    anchor = _anchor(args, views[0], grid_hw)
    anchor_embedding = features[0][anchor]
    matches = []
    for index in range(1, len(views)) if len(views) > 1 else [0]:
        similarity = cosine_similarity_map(anchor_embedding, features[index])
        matches.append(Match(index, similarity, *top_k_patches(similarity, args.top_k)))
    return SimilarityResult(anchor, grid_hw, matches)


def write_similarity_figure(
    path: str | Path, views: Sequence[View], results: Mapping[str, SimilarityResult], panel_height: int = PANEL_PX
) -> Path:
    """Per checkpoint: the first view with its anchor in red, then each target's heat map and top-k boxes."""
    targets = [match.view for match in next(iter(results.values())).matches]
    grid = PanelGrid(list(results), [tuple(views[i].pixels.shape) for i in [0, *targets]], panel_height)
    for row, result in enumerate(results.values()):
        first = views[0]
        show_gray(grid.axes[row][0], first.pixels, f"{first.name}: anchor patch {result.anchor}")
        draw_patches(grid.axes[row][0], [result.anchor], result.anchor_grid, tuple(first.pixels.shape), ANCHOR_COLOR)
        for ax, match in zip(grid.axes[row][1:], result.matches):
            view = views[match.view]
            shape = tuple(view.pixels.shape)
            show_gray(ax, view.pixels, f"{view.name}: cosine, best {match.scores[0]:.2f}")
            show_map(ax, match.similarity, shape, cmap="magma", alpha=0.55, smooth=True)
            draw_patches(ax, match.top, tuple(match.similarity.shape), shape, MATCH_COLOR, numbered=True)
            if match.view == 0:
                draw_patches(ax, [result.anchor], result.anchor_grid, shape, ANCHOR_COLOR)
    return grid.save(path)


def write_outputs(
    out_dir: Path, views: Sequence[View], results: Mapping[str, SimilarityResult], args: argparse.Namespace
) -> tuple[list[Path], dict[str, Any]]:
    files = [write_similarity_figure(out_dir / FIGURE_FILE, views, results)]
    details = {
        "features": "final normed patch tokens (x_norm_patchtokens)",
        "checkpoints": {
            name: {
                "anchor": {"view": views[0].name, "row_col": list(result.anchor), "grid": list(result.anchor_grid)},
                "matches": {
                    views[match.view].name: [
                        {"row_col": list(cell), "cosine": round(score, 4)}
                        for cell, score in zip(match.top, match.scores)
                    ]
                    for match in result.matches
                },
            }
            for name, result in results.items()
        },
    }
    return files, details
