"""Process-group facts every module may ask for, valid with or without torch.distributed, and
`enable()`, which joins the process group a launcher (torchrun or SLURM's srun) set up.

Single-process runs (CPU tests, one GPU without a launcher) have no process group; these
helpers answer as rank 0 of a world of 1 so callers never branch on it themselves.
"""
import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("dinov2")

# SLURM gives no rendezvous port, so every task of a job derives the same one from the job id.
# They lie below Linux's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default),
# where the kernel picks the local ports of outgoing connections: a port drawn there may already
# be held by one on the first node, and the rendezvous would then fail to bind. The range is a
# constant, not read from /proc, because every node must arrive at the same port.
SLURM_MASTER_PORTS = range(20_000, 32_768)


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


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where this process sits in a multi-process job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: "gpu[007-009,012],cpu1" -> "gpu007".

    Parsed here rather than with `scontrol show hostnames` so that it works where the SLURM
    client tools are not installed (containers started by srun --container).
    """
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r} is not a SLURM node list")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of SLURM job `job_id`; consecutive jobs (which may share a node) get
    different ones."""
    return SLURM_MASTER_PORTS[job_id % len(SLURM_MASTER_PORTS)]


def launch_environment(environ: dict | None = None) -> LaunchEnvironment | None:
    """The torchrun (RANK, WORLD_SIZE, ...) or SLURM (SLURM_PROCID, SLURM_NTASKS, ...) description of
    this process; None when no launcher started several processes (a plain single-process run)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnvironment(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return LaunchEnvironment(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=first_slurm_host(env["SLURM_JOB_NODELIST"]),
            master_port=slurm_master_port(int(env["SLURM_JOB_ID"])),
        )
    return None


def enable(timeout: timedelta = timedelta(minutes=30), single_process: bool = False) -> bool:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU); True when one was joined.

    A single process without launcher variables is left alone, so the same entry point serves
    laptops, tests and clusters, unless `single_process` asks for a group of one anyway: that is
    how one GPU runs the sharded (FSDP) code path, to measure it or to test it. The variables
    torchrun would have set are exported for SLURM tasks too, so code reading LOCAL_RANK or
    MASTER_ADDR works under either launcher.
    """
    if is_enabled():
        return True
    launch = launch_environment()
    if launch is None or launch.world_size == 1:
        if not single_process:
            return False
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        logger.info("process group of one process (%s)", backend)
        return True
    os.environ.update(
        RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method="env://",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
    )
    logger.info("process group: rank %d of %d via %s:%d", launch.rank, launch.world_size, launch.master_addr, launch.master_port)
    return True


def disable() -> None:
    """Leave the process group (at the end of a run, so that the next one in this process can join)."""
    if is_enabled():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process), e.g. of logged losses."""
    if not is_enabled():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / get_global_size()


def barrier() -> None:
    if is_enabled():
        dist.barrier()
