"""Spreading the student and teacher over processes (DDP or FSDP2) and reading or writing their
state independently of that spread. See `wrap` for the strategies, `precision` for the
dtypes and `state` for the states."""
from dinov2.fsdp.state import (
    full_module_state,
    full_tensor,
    get_training_state,
    load_full_module_state,
    local_tensor,
    module_shapes,
    reshard,
    set_training_state,
)
from dinov2.fsdp.precision import Precision, resolve_precision
from dinov2.fsdp.wrap import STRATEGIES, broadcast_from_main, distribute, replicate, resolve_strategy, shard, unwrap

__all__ = [
    "Precision",
    "STRATEGIES",
    "broadcast_from_main",
    "distribute",
    "full_module_state",
    "full_tensor",
    "get_training_state",
    "load_full_module_state",
    "local_tensor",
    "module_shapes",
    "replicate",
    "reshard",
    "resolve_precision",
    "resolve_strategy",
    "set_training_state",
    "shard",
    "unwrap",
]
