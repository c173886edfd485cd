"""Worker of the multi-process test matrix: several training commands in one launch.

`python tests/matrix_run.py SPEC.json` (alone, or under torchrun) runs each entry of the JSON list
as `python -m dinov2.train.train ENTRY...` would, one after the other, in one process group: the
launch (interpreter start, torch import, rendezvous) is paid once for the whole matrix instead of
once per run, which is what keeps 24 two-process runs inside the suite's time budget.
"""
import json
import sys

from dinov2 import distributed
from dinov2.train import train
from dinov2.utils.cli import run_cli
from tiny_vit_run import register_tiny_vit


def main() -> int:
    register_tiny_vit()
    runs = json.loads(open(sys.argv[1], encoding="utf-8").read())
    distributed.enable()
    try:
        for argv in runs:
            train.run(train.get_args_parser().parse_args(argv))
    finally:
        distributed.disable()
    return 0


if __name__ == "__main__":
    run_cli(main)
