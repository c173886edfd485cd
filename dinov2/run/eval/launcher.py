"""Submitting an evaluation command (dinov2.eval.knn, .linear, .log_regression) to SLURM.

One mechanism for the three: the job runs the command's own `main(args)` in every task, with
the command's flags plus those of dinov2.run.submit. On a requeue (time limit, preemption) the
same command starts again: k-NN and logistic regression are short and simply rerun, the linear
evaluation resumes from its running checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import importlib
from pathlib import Path

import submitit

from dinov2.run.submit import get_args_parser as get_submit_args_parser
from dinov2.run.submit import submit_jobs


class Evaluator:
    """The submitted callable: `dinov2.eval.<command>.main` in a SLURM task."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args, self.command = args, command

    def __call__(self) -> int:
        from dinov2 import distributed

        evaluation = importlib.import_module(f"dinov2.eval.{self.command}")
        args = copy.copy(self.args)
        args.output_dir = str(args.output_dir).replace("%j", str(submitit.JobEnvironment().job_id))
        distributed.enable()
        try:
            return evaluation.main(args)
        finally:
            distributed.disable()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.args, self.command))


def get_args_parser(command: str) -> argparse.ArgumentParser:
    evaluation = importlib.import_module(f"dinov2.eval.{command}")
    return get_submit_args_parser(parents=[evaluation.get_args_parser(add_help=False)])


def launch(command: str, job_name: str, argv: list[str] | None = None) -> int:
    """Parse `argv` with the command's and the launcher's flags, then submit the job."""
    args = get_args_parser(command).parse_args(argv)
    if args.output_dir:
        args.output_dir = str(Path(args.output_dir).absolute())
    submit_jobs(Evaluator(args, command), args, name=job_name)
    return 0
