"""Submitting a dinov2 command to SLURM with submitit: upstream's launcher flags plus the ones a
CPU cluster or a shared one needs (`--ngpus 0`, `--ntasks-per-node`, `--qos`, `--account`, ...).

One SLURM task per GPU (or per `--ntasks-per-node` on CPU); each task joins the process group
from SLURM's variables (dinov2.distributed.enable). On the time-limit warning or a preemption,
SLURM signals the tasks `--slurm-signal-delay` seconds ahead; the task saves a checkpoint at the
end of its current iteration and requeues the job, which resumes from it.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import submitit

from dinov2.utils.cli import ConfigArgumentParser
from dinov2.utils.errors import UserError

logger = logging.getLogger("dinov2")


def get_args_parser(parents: Sequence[argparse.ArgumentParser] | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    parser = ConfigArgumentParser("Submit to SLURM", parents=list(parents or []), add_help=add_help)
    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--ngpus", "--gpus", "--gpus-per-node", default=8, type=int, help="GPUs per node; 0 runs on CPUs")
    slurm.add_argument("--nodes", "--nnodes", default=1, type=int, help="number of nodes")
    slurm.add_argument("--ntasks-per-node", default=0, type=int,
                       help="processes per node (default: one per GPU, or 1 with --ngpus 0)")
    slurm.add_argument("--cpus-per-task", default=10, type=int, help="CPU cores per process")
    slurm.add_argument("--mem-gb", default=0, type=int, help="memory per node in GiB (0: all of the node's)")
    slurm.add_argument("--timeout", default=2800, type=int, help="duration of one job in minutes (it requeues itself)")
    slurm.add_argument("--partition", default=os.environ.get("SLURM_PARTITION", ""), type=str,
                       help="partition (default: $SLURM_PARTITION, else the cluster's default)")
    slurm.add_argument("--use-volta32", action="store_true", help="request V100-32GB nodes (constraint volta32gb)")
    slurm.add_argument("--comment", default="", type=str, help="job comment")
    slurm.add_argument("--exclude", default="", type=str, help="nodes to exclude")
    slurm.add_argument("--nodelist", default="", type=str, help="nodes to run on")
    slurm.add_argument("--qos", default="", type=str, help="quality of service")
    slurm.add_argument("--account", default="", type=str, help="account to charge")
    slurm.add_argument("--slurm-signal-delay", default=120, type=int,
                       help="seconds between the warning signal and the end of the time limit (time to checkpoint)")
    slurm.add_argument("--max-requeues", default=30, type=int, help="times a job may time out and requeue itself")
    return parser


def default_output_dir() -> str:
    """Upstream's shared checkpoint folder when it exists, else ./experiments; `%j` becomes the job id."""
    shared = Path("/checkpoint") / os.environ.get("USER", "user")
    root = shared / "experiments" if shared.is_dir() else Path("experiments")
    return str((root / "%j").resolve())


def tasks_per_node(args: argparse.Namespace) -> int:
    if args.ntasks_per_node < 0 or args.ngpus < 0:
        raise UserError("--ngpus and --ntasks-per-node must not be negative")
    if args.ntasks_per_node:
        return args.ntasks_per_node
    return args.ngpus if args.ngpus > 0 else 1


def executor_parameters(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """submitit's parameters for these flags (kept apart from submission so they can be checked)."""
    extra: dict[str, str] = {}
    for flag in ("comment", "exclude", "nodelist", "qos", "account"):
        if getattr(args, flag):
            extra[flag] = getattr(args, flag)
    if args.use_volta32:
        extra["constraint"] = "volta32gb"
    params: dict[str, Any] = dict(
        name=name,
        nodes=args.nodes,
        tasks_per_node=tasks_per_node(args),
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout,
        slurm_signal_delay_s=args.slurm_signal_delay,
        slurm_additional_parameters=extra,
    )
    if args.ngpus > 0:
        params["gpus_per_node"] = args.ngpus
    if args.partition:
        params["slurm_partition"] = args.partition
    return params


def submit_jobs(task: Any, args: argparse.Namespace, name: str) -> submitit.Job:
    """Submit `task` (a picklable callable with a `checkpoint` method) with the SLURM flags of `args`.

    The job's files (submitit's pickles and logs) go to `args.output_dir`, like upstream.
    """
    if not args.output_dir:
        args.output_dir = default_output_dir()
    executor = submitit.AutoExecutor(folder=args.output_dir, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**executor_parameters(args, name))
    job = executor.submit(task)
    logger.info("submitted job %s; outputs in %s", job.job_id, args.output_dir)
    print(f"submitted job {job.job_id} ({name}); logs and outputs in {args.output_dir.replace('%j', str(job.job_id))}")
    return job
