"""Submit the linear-probe evaluation to SLURM:
`python -m dinov2.run.eval.linear --ngpus G --config-file FILE --pretrained-weights W --output-dir OUT ...`
(the flags of dinov2.eval.linear plus those of dinov2.run.submit)."""
from __future__ import annotations

from dinov2.run.eval.launcher import launch
from dinov2.utils.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    return launch("linear", "dinov2:linear", argv)


if __name__ == "__main__":
    run_cli(main)
