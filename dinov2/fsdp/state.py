"""Model and optimizer state in a form that does not depend on how the model is spread.

Keys are the plain module names (no DDP `module.` prefix, no FSDP wrapper names) and the
optimizer state is keyed by parameter name, so a state written by any number of processes with
any strategy loads into any other: `full` states hold whole tensors (on rank 0, on the CPU),
sharded ones hold each rank's DTensor shards for torch.distributed.checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def _options(full: bool, strict: bool = True) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=full, strict=strict)


def get_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> tuple[dict, dict]:
    """(model state, optimizer state); collective for FSDP: every rank must call it."""
    return get_state_dict(model, optimizer, options=_options(full))


def set_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict, full: bool) -> None:
    """Load a state from `get_training_state` (full states must be given on every rank)."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=_options(full))


def full_module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU, gathered from shards if needed (collective; complete on rank 0)."""
    return get_model_state_dict(module, options=_options(full=True))


def module_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Name -> global shape of every entry of the module's state, without gathering anything."""
    return {name: value.shape for name, value in get_model_state_dict(module).items()}


def load_full_module_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Load whole tensors into a module however it is spread (each rank passes the same state)."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded or partial tensor (e.g. a gradient norm under FSDP2)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def reshard(module: nn.Module) -> None:
    """Return every FSDP2 unit inside `module` to its sharded layout.

    A unit that kept its parameters gathered after forward (SHARD_GRAD_OP) is resharded by its
    backward; a forward run without gradients (the frozen backbone of a head warm-up) has no
    backward, so its whole parameters would stay in place and the EMA would meet them against
    the teacher's shards. A no-op for units already sharded and for modules not under FSDP2.
    """
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
