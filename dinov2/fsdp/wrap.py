"""How the student and the teacher are spread over processes: DDP replicas or FSDP2 shards.

`train.distributed_strategy`:
- `ddp`: every rank holds the whole model; the student's gradients are averaged by
  DistributedDataParallel (one wrapper per student submodule). Works on CPU (gloo) and CUDA.
- `fsdp`: FSDP2 `fully_shard` on every transformer block (or block chunk) and on every student and
  teacher submodule, each with its policy from the run's `Precision` (see dinov2.fsdp.precision).
  Student and teacher are sharded identically, so the EMA update stays shard-local.
- `auto`: `fsdp` on CUDA, `ddp` on CPU (FSDP2 runs on CPU too, but only costs there: no memory
  to save). A single process without a launcher is not wrapped under `auto`;
  naming `ddp` or `fsdp` wraps it in a process group of one (the sharded path on one GPU).
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from dinov2 import distributed
from dinov2.fsdp.precision import Precision
from dinov2.utils.errors import UserError

STRATEGIES = ("auto", "ddp", "fsdp")
# FSDP1's names, kept in the config for upstream compatibility: resharding after forward is the
# difference between FULL_SHARD and SHARD_GRAD_OP.
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


def resolve_strategy(requested: str, device: torch.device) -> str:
    """`none`, `ddp` or `fsdp` for this run (see the module docstring)."""
    if requested not in STRATEGIES:
        raise UserError(f"train.distributed_strategy must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if not distributed.is_enabled():
        return "none"
    if requested == "auto":
        return "fsdp" if device.type == "cuda" else "ddp"
    return requested


def broadcast_from_main(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers: ranks are seeded differently (seed + rank),
    and a run must start from the weights a single process with the same seed would draw."""
    if not distributed.is_enabled():
        return
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=0)


def replicate(modules: nn.ModuleDict, device: torch.device) -> None:
    """Wrap each submodule in DDP, in place (for the student: the teacher needs no gradients)."""
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    for name in list(modules.keys()):
        modules[name] = DistributedDataParallel(modules[name], device_ids=device_ids)


def shard(modules: nn.ModuleDict, owner: str, sharding_cfg, precision: Precision, forward_only: bool = False) -> None:
    """FSDP2 on each block and each submodule of `owner` (student or teacher), in place.

    `sharding_cfg` is `compute_precision.<owner>` (upstream keeps the sharding strategies there).
    `forward_only` modules (the teacher) are resharded after every forward whatever the sharding
    strategy: with no backward to come, nothing else would free their gathered parameters, and
    the EMA update must find them in the student's shard layout.
    """
    for name, module in modules.items():
        strategy = sharding_cfg[name].sharding_strategy
        if strategy not in RESHARD_AFTER_FORWARD:
            raise UserError(
                f"compute_precision.{owner}.{name}.sharding_strategy={strategy} is not supported with "
                f"train.distributed_strategy=fsdp (use FULL_SHARD or SHARD_GRAD_OP, or ddp for NO_SHARD)"
            )
        policy = precision.policy(owner, name)
        # FSDP2 leaves buffers alone (they are not sharded), so their dtype is applied here.
        buffer_dtype = precision.buffer_dtype(owner, name)
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(buffer_dtype)
        reshard = forward_only or RESHARD_AFTER_FORWARD[strategy]
        for block in getattr(module, "blocks", ()):
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(module, mp_policy=policy, reshard_after_forward=reshard)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are not wrappers: they stay themselves)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def distribute(model: nn.Module, strategy: str, sharding_cfg, device: torch.device, precision: Precision) -> None:
    """Spread a model with `student` and `teacher` ModuleDicts over the ranks, in place.

    `sharding_cfg` is the `compute_precision` node (its sharding strategies); the dtypes come from
    `precision` alone."""
    if strategy == "none":
        return
    broadcast_from_main(model)
    if strategy == "ddp":
        replicate(model.student, device)
    else:
        shard(model.student, "student", sharding_cfg.student, precision)
        shard(model.teacher, "teacher", sharding_cfg.teacher, precision, forward_only=True)
