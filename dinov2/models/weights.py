"""Reading backbone weights from any DINOv2 file, whatever wrote it and whatever its layout.

Released hub files, teacher exports of evaluation steps, full training checkpoints, safetensors
files and transformers / timm / RAD-DINO folders (dinov2.models.formats) nest the backbone differently, and the backbone's blocks are stored flat (`blocks.{i}`) or chunked
(`blocks.{chunk}.{i}`) depending on `block_chunks`. These helpers hide all of that so a user
never edits keys by hand; keys are only renamed, and positional embeddings are resampled
only on request (`resize_pos_embed`).
"""
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.models.formats.files import ARCHITECTURE_KEY, read_weights_source
from dinov2.models.formats.spec import BLOCK_KEY, swiglu_mlp_ratio
from dinov2.utils.errors import UserError

# Path segments added by DDP/FSDP/activation checkpointing/torch.compile wrappers.
WRAPPER_SEGMENTS = frozenset({"module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
# Where the backbone sits in a training checkpoint's "model" or a teacher export, teacher first.
BACKBONE_PREFIXES = ("teacher.backbone.", "student.backbone.", "backbone.")
BACKBONE_MARKERS = ("cls_token", "patch_embed.proj.weight")
HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64 channels per head
SHOWN_KEYS = 5


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """The dict stored in a torch file, on CPU, without executing pickled code; a .safetensors file
    or a weights folder comes as a teacher export (see dinov2.models.formats.files)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return read_weights_source(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for foreign or corrupt files
        detail = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {detail[0]}" if detail else type(exc).__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({reason})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, expected a dict of weights")
    return obj


def _container(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    for name in ("model", "teacher"):
        if isinstance(obj.get(name), Mapping):
            return obj[name]
    return obj


def _strip_wrappers(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in WRAPPER_SEGMENTS)


def extract_backbone_state_dict(obj: Mapping[str, Any], source: str = "weights") -> dict[str, Tensor]:
    """Backbone keys only, from a hub file, a {"teacher": ...} export or a {"model": ...} checkpoint."""
    state = {_strip_wrappers(key): value for key, value in _container(obj).items()}
    for prefix in BACKBONE_PREFIXES:
        backbone = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if backbone:
            break
    else:
        if not any(marker in state for marker in BACKBONE_MARKERS):
            raise UserError(
                f"{source}: no backbone weights found (expected keys like 'cls_token', "
                f"'backbone.cls_token' or 'teacher.backbone.cls_token'; got {_preview(list(state))})"
            )
        backbone = state
    not_tensors = [key for key, value in backbone.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise UserError(f"{source}: backbone entries that are not tensors: {_preview(not_tensors)}")
    return backbone


def _global_block_index(match: re.Match) -> int:
    return int(match.group(2) if match.group(2) is not None else match.group(1))


def _block_prefixes(model: nn.Module) -> dict[int, str]:
    """Global block index -> the key prefix this model uses for it."""
    prefixes = {}
    for key in model.state_dict():
        match = BLOCK_KEY.match(key)
        if match:
            prefixes[_global_block_index(match)] = key[: match.start(3)]
    return prefixes


def match_block_layout(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename flat or chunked block keys to the model's layout; keys of absent blocks stay as they are."""
    prefixes = _block_prefixes(model)
    renamed = {}
    for key, value in state_dict.items():
        match = BLOCK_KEY.match(key)
        if match and _global_block_index(match) in prefixes:
            key = prefixes[_global_block_index(match)] + match.group(3)
        renamed[key] = value
    return renamed


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"{len(keys)}: {shown}" + (", ..." if len(keys) > SHOWN_KEYS else "")


@dataclass(frozen=True)
class StateDifferences:
    """How a state dict differs from the one a module expects; false when it fits."""

    missing: list[str]
    unexpected: list[str]
    reshaped: dict[str, tuple[list[int], list[int]]]  # key -> (shape found, shape expected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.reshaped)

    def describe(self) -> str:
        shapes = [f"{key} {found} in file vs {wanted} in model" for key, (found, wanted) in self.reshaped.items()]
        parts = [f"{label} {_preview(keys)}" for label, keys in
                 (("missing keys", self.missing), ("unexpected keys", self.unexpected), ("shape mismatches", shapes)) if keys]
        return "; ".join(parts)  # fmt: skip


def state_differences(expected: Mapping[str, Tensor | torch.Size], found: Mapping[str, Tensor]) -> StateDifferences:
    """Compare by key and shape; `expected` may hold tensors or shapes (a sharded module's full shapes)."""
    shape = lambda value: list(value.shape if isinstance(value, Tensor) else value)  # noqa: E731
    return StateDifferences(
        missing=[key for key in expected if key not in found],
        unexpected=[key for key in found if key not in expected],
        reshaped={key: (shape(value), shape(expected[key])) for key, value in found.items()
                  if key in expected and shape(value) != shape(expected[key])},
    )  # fmt: skip


def resample_pos_embed(pos_embed: Tensor, grid_size: int) -> Tensor:
    """[1, 1+M*M, D] -> [1, 1+grid*grid, D]: bicubic, antialiased, by size; cls row kept.

    The same resampling the register models apply at run time (offset 0), done once so weights
    released at 518 px can initialise a model trained at another crop size.
    """
    stored = math.isqrt(pos_embed.shape[1] - 1)
    if stored * stored != pos_embed.shape[1] - 1:
        raise UserError(f"pos_embed holds {pos_embed.shape[1] - 1} patch positions, not a square grid")
    grid = pos_embed[:, 1:].float().reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True)
    patches = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, -1)
    return torch.cat((pos_embed[:, :1].float(), patches), dim=1).to(pos_embed.dtype)


def load_backbone_weights(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    *,
    resize_pos_embed: bool = False,
    source: str | None = None,
):
    """Load backbone weights into `model`, renaming block keys to its layout.

    Shape mismatches are errors; by default nothing is interpolated (build the model with the
    file's img_size). `resize_pos_embed=True` resamples a square positional-embedding grid to the
    model's, for initialising training at another resolution. Missing/unexpected keys are errors
    when `strict`. `source` names already-read weights in errors. Returns torch's
    (missing_keys, unexpected_keys).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        obj = read_weights_file(path_or_state_dict)
    else:
        source, obj = source or "state dict", path_or_state_dict
    state = match_block_layout(extract_backbone_state_dict(obj, source), model)
    expected = model.state_dict()
    if resize_pos_embed and "pos_embed" in state and "pos_embed" in expected:
        wanted = expected["pos_embed"].shape
        if state["pos_embed"].shape != wanted:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], math.isqrt(wanted[1] - 1))
    differences = state_differences(expected, state)
    if differences.reshaped or (strict and differences):
        raise UserError(f"{source}: weights do not fit the model: {differences.describe()}")
    return model.load_state_dict(state, strict=strict)


def _require(state: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise UserError(f"weights have no '{key}': not a DINOv2 backbone")
    return state[key]


def _ffn_kwargs(block: Mapping[str, Tensor], embed_dim: int) -> dict[str, Any]:
    if "mlp.fc1.weight" in block:
        hidden = block["mlp.fc1.weight"].shape[0]
        return {"ffn_layer": "mlp", "mlp_ratio": hidden / embed_dim, "ffn_bias": "mlp.fc1.bias" in block}
    if "mlp.w12.weight" in block:
        hidden = block["mlp.w3.weight"].shape[1]
        return {
            "ffn_layer": "swiglufused",
            "mlp_ratio": swiglu_mlp_ratio(hidden, embed_dim),
            "ffn_bias": "mlp.w12.bias" in block,
        }
    return {"ffn_layer": "identity"}


def infer_backbone_kwargs(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """DinoVisionTransformer kwargs that recreate the architecture stored in `state_dict`.

    Lets a released or exported file be opened with no config. A transformers or timm folder's
    config says everything (heads, interpolation); otherwise interpolation settings (antialias,
    offset) are not stored in weights and keep the constructor defaults, and the number of heads
    assumes DINOv2's 64 channels per head.
    """
    state = extract_backbone_state_dict(state_dict)
    if isinstance(state_dict.get(ARCHITECTURE_KEY), Mapping):
        return dict(state_dict[ARCHITECTURE_KEY])
    embed_dim = _require(state, "cls_token").shape[-1]
    in_chans, patch_size = _require(state, "patch_embed.proj.weight").shape[1:3]
    positions = _require(state, "pos_embed").shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise UserError(f"pos_embed has {positions} patch positions, not a square grid")
    if embed_dim % HEAD_DIM:
        raise UserError(f"embed_dim {embed_dim} is not a multiple of {HEAD_DIM}: pass num_heads yourself")

    blocks: dict[int, dict[str, Tensor]] = {}
    chunks = set()
    for key, value in state.items():
        match = BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(_global_block_index(match), {})[match.group(3)] = value
            if match.group(2) is not None:
                chunks.add(int(match.group(1)))
    depth = len(blocks)
    if sorted(blocks) != list(range(depth)) or depth == 0:
        raise UserError(f"block indices {sorted(blocks)} are not 0..depth-1")
    first = blocks[0]
    registers = state.get("register_tokens")
    return {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": embed_dim // HEAD_DIM,
        "qkv_bias": "attn.qkv.bias" in first,
        "proj_bias": "attn.proj.bias" in first,
        "init_values": 1.0 if "ls1.gamma" in first else None,
        "block_chunks": len(chunks),
        "num_register_tokens": registers.shape[1] if registers is not None else 0,
        **_ffn_kwargs(first, embed_dim),
    }


def extract_head_state_dict(obj: Mapping[str, Any], head: str = "dino_head") -> dict[str, Tensor]:
    """The `head` module's keys (empty when the file has none): from a teacher export, a training
    checkpoint's teacher, or a RAD-DINO-layout folder."""
    state = {_strip_wrappers(key): value for key, value in _container(obj).items()}
    for prefix in (f"teacher.{head}.", f"{head}."):
        found = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if found:
            return found
    return {}


def load_head_weights(heads: Mapping[str, nn.Module], obj: Mapping[str, Any], source: str) -> list[str]:
    """Load each of `heads` (name -> module) that the weights hold, strictly; returns the names loaded.

    Continuing pretraining from a teacher export or RAD-DINO's release starts from its trained DINO
    head, so no head warm-up is needed; a head the file lacks keeps its fresh initialisation.
    """
    loaded = []
    for name, module in heads.items():
        state = extract_head_state_dict(obj, name)
        if not state:
            continue
        differences = state_differences(module.state_dict(), state)
        if differences:
            config = "dino" if name == "dino_head" else "ibot"
            raise UserError(f"{source}: {name} does not fit the configured head ({config}.head_n_prototypes, "
                            f"head_hidden_dim, head_bottleneck_dim, head_nlayers): {differences.describe()}")  # fmt: skip
        module.load_state_dict(state)
        loaded.append(name)
    return loaded
