"""Test helper for runs in other processes (torchrun workers, SLURM tasks): registers the tiny ViT
the in-process tests use, then runs the training command or serves as the submitted callable.

`python tests/tiny_vit_run.py TRAIN-ARGS...` is `python -m dinov2.train.train TRAIN-ARGS...` with
`student.arch=vit_test_tiny` available.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from dinov2.models.vision_transformer import ARCHITECTURES
from dinov2.run.train.train import Trainer
from dinov2.train import train
from dinov2.utils.cli import run_cli
from tiny import TINY_ARCH, make_tiny_vit


def register_tiny_vit() -> None:
    """Make `student.arch=vit_test_tiny` known in a launched process, for its lifetime (an
    in-process test takes conftest's `tiny_vit` fixture instead, which undoes it afterwards)."""
    ARCHITECTURES.register(TINY_ARCH, make_tiny_vit)


# 56-pixel global crops (4x4 patches, so iBOT masks have room), no stochastic depth and no KoLeo:
# what remains depends only on the global batch, not on how it is split over processes.
# Sinkhorn-Knopp reduces its statistics over ranks exactly; softmax centring of the iBOT centre
# averages per-rank means (upstream's rule), which differs slightly when ranks mask differently.
TINY_RUN = [
    f"student.arch={TINY_ARCH}", "student.drop_path_rate=0", "dino.koleo_loss_weight=0",
    "train.dataset_path=Synthetic:n=64:size=64", "crops.global_crops_size=56", "crops.local_crops_size=28",
    "train.log_period_iterations=1", "optim.warmup_epochs=1", "train.num_workers=0", "train.centering=sinkhorn_knopp",
    "ibot.mask_ratio_min_max=[0.3,0.5]",  # at least 4 of the 16 patches, so masks are never empty
]
GLOBAL_BATCH = 8
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SMOKE = REPO / "dinov2" / "configs" / "train" / "vits14_cpu_smoke.yaml"
# 10 iterations, a teacher export every 5
SHORT_RUN = [*TINY_RUN, "train.OFFICIAL_EPOCH_LENGTH=5", "optim.epochs=2", "evaluation.eval_period_iterations=5"]


def launch(script_args: list[str], n_processes: int, timeout: float = 180, **torchrun: str) -> subprocess.CompletedProcess:
    """`python SCRIPT_ARGS...` in `n_processes` fresh processes on this machine: torchrun for more
    than one (`--standalone` unless other torchrun flags are given, e.g. nnodes and a rendezvous).

    The processes run in their own session, so that a hung run is killed with all its workers,
    whether `timeout` expires or pytest's per-test timeout interrupts the wait; a failure shows
    the end of their stderr.
    """
    if n_processes == 1 and not torchrun:
        launcher = [sys.executable]
    else:
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in torchrun.items()] or ["--standalone"]
        launcher = [sys.executable, "-m", "torch.distributed.run", *flags, "--nproc-per-node", str(n_processes)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with subprocess.Popen([*launcher, *script_args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def train_processes(output_dir: Path, n_processes: int, *opts: str) -> subprocess.CompletedProcess:
    """SHORT_RUN in `n_processes` fresh processes (torchrun for more than one), global batch fixed."""
    return launch(["tests/tiny_vit_run.py", "--config-file", str(SMOKE), "--output-dir", str(output_dir), *SHORT_RUN,
                   f"train.batch_size_per_gpu={GLOBAL_BATCH // n_processes}", *opts], n_processes)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "training_metrics.json").read_text().splitlines()]


def teacher_export(output_dir: Path, iteration: int) -> dict:
    path = output_dir / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"
    return torch.load(path, weights_only=True)["teacher"]


def assert_same_teacher(a: dict, b: dict) -> None:
    """Teacher exports of two runs that should agree: to float32 rounding, for the processes sum
    their gradients in another order than one process does."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def interrupted_copy(run: Path, target: Path, checkpoint: str, last_iteration: int) -> Path:
    """The run as if killed right after saving `checkpoint`: what only the end of the run writes
    (the final checkpoint, the last teacher export) removed, the pointer on `checkpoint`."""
    shutil.copytree(run, target)
    for later in [*target.glob("model_final*"), target / "eval" / f"training_{last_iteration}"]:
        shutil.rmtree(later) if later.is_dir() else later.unlink()
    (target / "last_checkpoint.rank_0").write_text(checkpoint)
    return target


class TinyTrainer(Trainer):
    """The SLURM launcher's callable, importable in the job (tests/ is put on its PYTHONPATH)."""

    def __call__(self) -> dict:
        register_tiny_vit()
        return super().__call__()


if __name__ == "__main__":
    register_tiny_vit()
    run_cli(lambda: train.main(sys.argv[1:]))
