"""Weights that are not a torch file: a `.safetensors` file or a folder, in any layout we export.

Folders are recognised by their files, in this order:
- RAD-DINO's release (and our `--format safetensors` export): `backbone_compatible.safetensors`
  (upstream's keys), optionally `dino_head.safetensors` and a transformers `config.json`;
- a transformers folder: `config.json` + `model.safetensors` (transformers' keys);
- a timm folder we wrote: `config.json` with `architecture` + `model.safetensors` (timm's keys).
Everything becomes what `read_weights_file` returns for a teacher export, {"teacher":
{"backbone.*", "dino_head.*"}}, plus ARCHITECTURE_KEY when a config says how to build the model
(head count, interpolation), so every command that takes weights opens these without change.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from dinov2.models.formats import hf, timm
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write_bytes, atomic_write_text

ARCHITECTURE_KEY = "architecture"  # DinoVisionTransformer kwargs read from a config file
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"  # transformers' and timm's weights file name
BACKBONE_FILE = "backbone_compatible.safetensors"  # RAD-DINO's name for upstream-keyed backbone weights
HEAD_FILE = "dino_head.safetensors"
HEAD_PREFIX = "dino_head."
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> Path:
    from safetensors.torch import save

    data = save({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, SAFETENSORS_METADATA)
    return atomic_write_bytes(path, data)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: holds a {type(value).__name__}, expected a JSON object")
    return value


def write_json(path: Path, value: Mapping[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def to_upstream_keys(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any backbone layout we know (transformers, timm, upstream) -> upstream's flat keys."""
    if hf.is_hf_state(tensors):
        return hf.from_hf(tensors)
    if timm.is_timm_state(tensors):
        return timm.from_timm(tensors)
    return dict(tensors)


def _architecture(config_path: Path) -> dict[str, Any] | None:
    if not config_path.is_file():
        return None
    config = read_json(config_path)
    if "model_type" in config:
        return hf.kwargs_from_hf_config(config, str(config_path))
    if "architecture" in config:
        return timm.kwargs_from_timm_config(config)
    return None


def _head(path: Path) -> dict[str, Tensor]:
    """The DINO head's keys without prefix (plain DINOHead keys or 'dino_head.'-prefixed)."""
    tensors = read_safetensors(path)
    return {key.removeprefix(HEAD_PREFIX): value for key, value in tensors.items()}


def read_weights_source(path: Path) -> dict[str, Any]:
    """A folder or .safetensors file -> {"teacher": {...}} (+ ARCHITECTURE_KEY), as described above."""
    if path.is_dir():
        folder = path
        if (folder / BACKBONE_FILE).is_file():
            backbone = read_safetensors(folder / BACKBONE_FILE)
        elif (folder / MODEL_FILE).is_file():
            backbone = to_upstream_keys(read_safetensors(folder / MODEL_FILE))
        else:
            raise UserError(f"{folder}: no {BACKBONE_FILE} or {MODEL_FILE} in this folder "
                            "(expected a transformers, timm or RAD-DINO-layout folder)")  # fmt: skip
        head = _head(folder / HEAD_FILE) if (folder / HEAD_FILE).is_file() else {}
    elif path.suffix == ".safetensors":
        folder = path.parent if path.name in (MODEL_FILE, BACKBONE_FILE) else None  # a loose file takes no config
        backbone = read_safetensors(path)
        if any(key.startswith("backbone.") for key in backbone):  # a whole teacher in one file
            return {"teacher": backbone}
        backbone, head = to_upstream_keys(backbone), {}
    else:
        raise UserError(f"{path}: expected a .pth/.safetensors file or a weights folder")
    stored: dict[str, Any] = {"teacher": {**{f"backbone.{k}": v for k, v in backbone.items()},
                                          **{f"{HEAD_PREFIX}{k}": v for k, v in head.items()}}}  # fmt: skip
    architecture = _architecture(folder / CONFIG_FILE) if folder is not None else None
    if architecture is not None:
        stored[ARCHITECTURE_KEY] = architecture
    return stored
