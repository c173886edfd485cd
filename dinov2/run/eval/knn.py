"""Submit the k-NN evaluation to SLURM:
`python -m dinov2.run.eval.knn --ngpus G --config-file FILE --pretrained-weights W --output-dir OUT ...`
(the flags of dinov2.eval.knn plus those of dinov2.run.submit)."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import submitit

from dinov2.run.submit import get_args_parser as get_submit_args_parser
from dinov2.run.submit import submit_jobs
from dinov2.utils.cli import run_cli


class Evaluator:
    """The submitted callable: runs dinov2.eval.knn in a SLURM task; a requeued job starts over."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> int:
        from dinov2 import distributed
        from dinov2.eval import knn

        args = copy.copy(self.args)
        args.output_dir = str(args.output_dir).replace("%j", str(submitit.JobEnvironment().job_id))
        distributed.enable()
        try:
            return knn.main(args)
        finally:
            distributed.disable()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def get_args_parser() -> argparse.ArgumentParser:
    from dinov2.eval.knn import get_args_parser as get_knn_args_parser

    knn_parser = get_knn_args_parser(add_help=False)
    return get_submit_args_parser(parents=[knn_parser])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.output_dir:
        args.output_dir = str(Path(args.output_dir).absolute())
    submit_jobs(Evaluator(args), args, name="dinov2:knn")
    return 0


if __name__ == "__main__":
    run_cli(main)
