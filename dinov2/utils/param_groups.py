"""Per-parameter learning-rate and weight-decay multipliers for the ViT and its heads.

Layer-wise lr decay gives the embeddings the smallest learning rate and the last block the
largest, so pretrained low-level features move least. The rules (which names count as
embeddings, which get no weight decay) follow upstream DINOv2 exactly, so a run here uses the
same effective optimiser as upstream for the same config.
"""
from collections import defaultdict
from typing import Any, Iterable

from torch import nn

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_FSDP_PREFIX = "_fsdp_wrapped_module."


def _backbone_depth(model: nn.Module) -> tuple[int, bool]:
    """(number of blocks, whether block names carry a chunk index); (0, False) for heads."""
    if hasattr(model, "n_blocks"):
        return model.n_blocks, bool(getattr(model, "chunked_blocks", False))
    if hasattr(model, "blocks"):
        return len(model.blocks), False
    return 0, False


def _layer_id(name: str, depth: int, chunked: bool) -> int:
    """0 for embeddings, i+1 for block i, depth+1 for everything after the blocks."""
    if depth == 0:
        return 1
    if any(embedding in name for embedding in _EMBEDDING_NAMES):
        return 0
    parts = name.split(".")
    if "blocks" in parts and "residual" not in parts:
        block_index = parts.index("blocks") + (2 if chunked else 1)
        return int(parts[block_index]) + 1
    return depth + 1


def get_params_groups_with_decay(
    model: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """One group per trainable parameter, with its `lr_multiplier`, `wd_multiplier`, `is_last_layer`.

    Call it per submodule (backbone, dino_head, ibot_head): names are taken relative to `model`.
    Heads have no blocks and get lr multiplier 1.
    """
    depth, chunked = _backbone_depth(model)
    groups = []
    for name, param in model.named_parameters():
        name = name.replace(_FSDP_PREFIX, "")
        if not param.requires_grad:
            continue
        lr_multiplier = lr_decay_rate ** (depth + 1 - _layer_id(name, depth, chunked))
        if "patch_embed" in name:
            lr_multiplier *= patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        groups.append(
            {
                "name": name,
                "params": param,
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": 0.0 if no_decay else 1.0,
                "is_last_layer": "last_layer" in name,
            }
        )
    return groups


def fuse_params_groups(
    all_params_groups: Iterable[dict[str, Any]],
    keys: tuple[str, ...] = ("lr_multiplier", "wd_multiplier", "is_last_layer"),
) -> list[dict[str, Any]]:
    """Merge groups whose `keys` are equal (an optimiser with 175 groups steps slowly).

    Groups come out in the order their first parameter appeared.
    """
    fused: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"params": []})
    for group in all_params_groups:
        identifier = tuple(group[key] for key in keys)
        target = fused[identifier]
        for key in keys:
            target[key] = group[key]
        target["params"].append(group["params"])
    return list(fused.values())
