"""Process-group facts every module may ask for, valid with or without torch.distributed.

Single-process runs (CPU tests, one GPU without a launcher) have no process group; these
helpers answer as rank 0 of a world of 1 so callers never branch on it themselves.
"""
import os

import torch.distributed as dist


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_global_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def get_global_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_enabled() else 0


def is_main_process() -> bool:
    return get_global_rank() == 0
