"""Submit DINOv2 training to SLURM:
`python -m dinov2.run.train.train --nodes N --ngpus G --partition P --config-file FILE --output-dir OUT [key=value ...]`.

The job runs `dinov2.train.train` in every task. When SLURM warns of the time limit or of a
preemption (submitit's signal), the run saves a checkpoint at the end of its current iteration
and the job requeues itself; the requeued job resumes from that checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
from pathlib import Path

import submitit

from dinov2.run.submit import get_args_parser as get_submit_args_parser
from dinov2.run.submit import submit_jobs
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError


class Trainer:
    """The submitted callable (upstream's name): runs training in a SLURM task, requeues on a signal."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> dict:
        from dinov2.train import train as training  # imported in the job, not at submission
        from dinov2.train.stop_signal import StopSignal

        args = self._args_for_this_job()
        preempt_signal = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")
        stop = StopSignal((signal.SIGUSR1, preempt_signal))
        try:
            summary = training.run(args, stop)
        finally:
            stop.restore()
        if summary.get("stopped_at") is not None and stop.received == preempt_signal:
            # submitit's own handler: on rank 0 it calls `checkpoint` below and requeues the job
            stop.forward()
        return summary

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """What the requeued job runs: the same command, resuming (the checkpoint is already saved)."""
        args = copy.copy(self.args)
        args.no_resume = False
        return submitit.helpers.DelayedSubmission(type(self)(args))

    def _args_for_this_job(self) -> argparse.Namespace:
        args = copy.copy(self.args)
        args.output_dir = str(args.output_dir).replace("%j", str(submitit.JobEnvironment().job_id))
        return args


def get_args_parser() -> argparse.ArgumentParser:
    from dinov2.train.train import get_args_parser as get_train_args_parser

    train_parser = get_train_args_parser(add_help=False)
    return get_submit_args_parser(parents=[train_parser])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.config_file or not os.path.isfile(args.config_file):
        raise UserError(f"--config-file {args.config_file or '(none)'}: config file not found")
    args.config_file = str(Path(args.config_file).resolve())
    if args.output_dir:
        args.output_dir = str(Path(args.output_dir).absolute())
    submit_jobs(Trainer(args), args, name="dinov2:train")
    return 0


if __name__ == "__main__":
    run_cli(main)
