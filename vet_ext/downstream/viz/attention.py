"""Where the [CLS] token looks: per-head attention of the last block, as maps over the patch grid.

The maps are the raw softmax probabilities of the [CLS] query restricted to the patch keys: the
share that goes to [CLS] itself and to the register tokens is left out, not redistributed, so a
map sums to less than one and its sum (the "patch mass") tells how much a head looks at the
image at all. Probabilities are recomputed from the block's own norm1 and qkv with the kernel's
1/sqrt(head_dim) scale, so the attention kernel that the forward pass uses is never patched.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.errors import UserError
from vet_ext.downstream.viz.figures import PanelGrid, distinct_colors, set_title, show_gray, show_map, show_mask
from vet_ext.downstream.viz.loading import Checkpoint, View

GRID_PANEL_PX = 160
OVERLAY_PANEL_PX = 320
GRID_FILE = "attention_heads.png"
OVERLAY_FILE = "attention_overlay.png"


def _as_batch(image: Tensor) -> Tensor:
    return image.unsqueeze(0) if image.dim() == 3 else image


@torch.inference_mode()
def last_block_attention(model: DinoVisionTransformer, image: Tensor) -> Tensor:
    """Attention probabilities [B, heads, T, T] of the last block; tokens are cls, registers, patches."""
    x = model.prepare_tokens_with_masks(_as_batch(image))
    blocks = model.iter_blocks()
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    batch, tokens, dim = x.shape
    heads = last.attn.num_heads
    head_dim = dim // heads
    qkv = last.attn.qkv(last.norm1(x)).reshape(batch, tokens, 3, heads, head_dim)
    queries, keys = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    logits = queries @ keys.transpose(-2, -1) * head_dim**-0.5
    return logits.float().softmax(dim=-1)


def attention_maps(model: DinoVisionTransformer, image: Tensor) -> Tensor:
    """[CLS]-to-patch attention [heads, H/p, W/p] of one normalised image [3, H, W] (or [1, 3, H, W]).

    Raw probabilities, not renormalised over the patches (see the module docstring).
    """
    image = _as_batch(image)
    if image.shape[0] != 1:
        raise ValueError(f"attention_maps takes one image, got a batch of {image.shape[0]}")
    grid_h, grid_w = image.shape[-2] // model.patch_size, image.shape[-1] // model.patch_size
    first_patch = 1 + model.num_register_tokens
    cls_row = last_block_attention(model, image)[0, :, 0, first_patch:]
    return cls_row.reshape(-1, grid_h, grid_w).cpu()


def attention_entropy(maps: Tensor) -> Tensor:
    """Entropy (nats) of each head's map renormalised over the patches: low = focused head."""
    flat = maps.flatten(1).double()
    probabilities = flat / flat.sum(dim=1, keepdim=True)
    return -(probabilities * probabilities.clamp_min(1e-30).log()).sum(dim=1).float()


def top_heads(maps: Tensor, count: int) -> list[int]:
    """The `count` most focused heads (lowest entropy), most focused first."""
    return attention_entropy(maps).argsort()[:count].tolist()


def mass_mask(attention_map: Tensor, fraction: float) -> Tensor:
    """DINO's thresholding: the fewest patches that together hold `fraction` of the map's mass."""
    flat = attention_map.flatten().double()
    values, order = flat.sort(descending=True)
    mass_before = torch.cat((values.new_zeros(1), values.cumsum(0)[:-1])) / flat.sum()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = mass_before < fraction
    return keep.reshape(attention_map.shape)


def write_attention_grid(
    path: str | Path, views: Sequence[View], maps: Mapping[str, Sequence[Tensor]], panel_height: int = GRID_PANEL_PX
) -> Path:
    """One row per checkpoint (`maps`: name -> per view [heads, h, w]): each view's image, then its heads."""
    columns = max(len(per_view[0]) for per_view in maps.values())
    shapes = [tuple(view.pixels.shape) for view in views for _ in range(1 + columns)]
    grid = PanelGrid(list(maps), shapes, panel_height)
    for row, per_view in enumerate(maps.values()):
        for index, (view, view_maps) in enumerate(zip(views, per_view)):
            axes = grid.axes[row][index * (1 + columns) : (index + 1) * (1 + columns)]
            show_gray(axes[0], view.pixels, view.name)
            for head, (ax, head_map) in enumerate(zip(axes[1:], view_maps)):
                show_map(ax, head_map, tuple(view.pixels.shape))
                set_title(ax, f"{view.name} head {head}")
    return grid.save(path)


def write_attention_overlay(
    path: str | Path, views: Sequence[View], maps: Mapping[str, Sequence[Tensor]], threshold: float = 0.6,
    count: int = 3, panel_height: int = OVERLAY_PANEL_PX,
) -> Path:  # fmt: skip
    """The `count` most focused heads of each view, each the patches holding `threshold` of its mass."""
    grid = PanelGrid(list(maps), [tuple(view.pixels.shape) for view in views], panel_height)
    colors = distinct_colors(count)
    for row, per_view in enumerate(maps.values()):
        for ax, view, view_maps in zip(grid.axes[row], views, per_view):
            shape = tuple(view.pixels.shape)
            show_gray(ax, view.pixels, f"{view.name}: top heads, {threshold:.0%} of mass")
            entropy = attention_entropy(view_maps)
            for color, head in zip(colors, top_heads(view_maps, count)):
                show_mask(ax, mass_mask(view_maps[head], threshold), shape, color)
                ax.plot([], [], "s", color=color, label=f"head {head} (H={entropy[head]:.2f})")
            ax.legend(loc="lower right", fontsize=6, framealpha=0.7, handletextpad=0.2, borderpad=0.3)
    return grid.save(path)


# --- command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=0.6, help="attention mass kept in the overlay (DINO: 0.6)")
    parser.add_argument("--top-heads", type=int, default=3, help="heads drawn in the overlay (lowest entropy first)")


def check_arguments(args: argparse.Namespace) -> None:
    if not 0.0 < args.threshold <= 1.0:
        raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.top_heads < 1:
        raise UserError(f"--top-heads must be >= 1, got {args.top_heads}")


def analyse(checkpoint: Checkpoint, views: Sequence[View], args: argparse.Namespace) -> list[Tensor]:
    return [attention_maps(checkpoint.model, checkpoint.inputs(view, args.image_size)[1]) for view in views]


def write_outputs(
    out_dir: Path, views: Sequence[View], results: Mapping[str, list[Tensor]], args: argparse.Namespace
) -> tuple[list[Path], dict[str, Any]]:
    files = [
        write_attention_grid(out_dir / GRID_FILE, views, results),
        write_attention_overlay(out_dir / OVERLAY_FILE, views, results, args.threshold, args.top_heads),
    ]
    details = {
        "maps": "raw softmax of the [CLS] query over patch keys (cls and registers excluded, not renormalised)",
        "threshold": args.threshold,
        "checkpoints": {
            name: {
                view.name: {
                    "grid": list(view_maps.shape[1:]),
                    "patch_mass_per_head": [round(float(m.sum()), 4) for m in view_maps],
                    "entropy_per_head": [round(float(e), 4) for e in attention_entropy(view_maps)],
                    "top_heads": top_heads(view_maps, args.top_heads),
                }
                for view, view_maps in zip(views, per_view)
            }
            for name, per_view in results.items()
        },
    }
    return files, details
