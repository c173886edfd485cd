"""The speed levers change no result: 20 training iterations with them give the losses of the plain path.

Levers: `train.compile` (torch.compile of every block) and `optim.fused_adamw` (PyTorch's fused
AdamW kernel). Inductor draws its own random numbers unless told to use eager's, so the test
asks for eager's: stochastic depth then drops the same samples on both paths and the comparison
is of the arithmetic alone. A few 1e-3 of relative drift over 20 steps is float reordering
amplified by Adam's normalised updates, far below what one training step changes (~1e-2).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinov2 import distributed
from dinov2.data import make_dataset, make_pipeline, make_training_loader
from dinov2.train import train as train_module
from dinov2.utils.config import setup

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "dinov2" / "configs" / "train" / "vits14_cpu_smoke.yaml"
ITERATIONS = 20
FAST = ["train.compile=true", "optim.fused_adamw=true"]
PLAIN = ["train.compile=false", "optim.fused_adamw=false"]


def _trainer_and_batches(output_dir: Path, device: str, *opts: str):
    args = train_module.get_args_parser().parse_args([
        "--config-file", str(SMOKE), "--output-dir", str(output_dir), "--no-resume",
        "student.arch=vit_test_tiny", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=2", "optim.warmup_epochs=1",
        "train.batch_size_per_gpu=4", "student.drop_path_rate=0.3", f"train.device={device}", *opts,
    ])
    cfg = setup(args)
    trainer = train_module.Trainer(cfg)
    trainer.model.train()
    pipeline = make_pipeline(cfg)
    loader = make_training_loader(pipeline.dataset_for(make_dataset(cfg.train.dataset_path)), pipeline,
                                  batch_size=4, num_workers=0, seed=cfg.train.seed)
    batches = ({k: v.to(trainer.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in loader)
    return trainer, batches


def _losses(output_dir: Path, device: str, *opts: str) -> np.ndarray:
    trainer, batches = _trainer_and_batches(output_dir, device, *opts)
    losses = []
    for iteration in range(ITERATIONS):
        torch.manual_seed(iteration)
        step = trainer.train_step(next(batches), dict(trainer.schedules.at(iteration), freeze_backbone=False))
        assert step.stepped
        losses.append(float(step.loss.detach()))
    return np.array(losses)


@pytest.fixture
def eager_random(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)


@pytest.mark.usefixtures("tiny_vit", "eager_random")
@pytest.mark.slow
def test_compiled_blocks_and_fused_adamw_match_the_plain_path_on_cpu(tmp_path):
    plain = _losses(tmp_path / "plain", "cpu", *PLAIN)
    fast = _losses(tmp_path / "fast", "cpu", *FAST)
    # the same weights give the same loss: the first step (and the zero-lr first update) exactly
    np.testing.assert_allclose(fast[:2], plain[:2], rtol=1e-5)
    np.testing.assert_allclose(fast, plain, rtol=5e-3)
    assert np.abs(np.diff(plain)).max() > 5 * 5e-3 * np.abs(plain).max()  # a step moves the loss far more than that


@pytest.mark.cuda
@pytest.mark.usefixtures("tiny_vit", "eager_random")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # fp16: upstream's default, with the gradient scaler
@pytest.mark.slow
def test_fast_path_matches_the_plain_path_on_cuda(tmp_path, precision):
    dtype = f"compute_precision.precision={precision}"
    plain = _losses(tmp_path / "plain", "cuda", *PLAIN, dtype)
    fast = _losses(tmp_path / "fast", "cuda", *FAST, dtype)
    np.testing.assert_allclose(fast, plain, rtol=2e-2)  # bf16: 8 mantissa bits


@pytest.mark.cuda
@pytest.mark.usefixtures("tiny_vit")
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_a_training_step_waits_for_the_gpu_once(tmp_path, centering):
    """The non-finite check is the step's one read-back; nothing else in the step waits on the GPU."""
    trainer, batches = _trainer_and_batches(tmp_path, "cuda", *FAST[1:], f"train.centering={centering}", "compute_precision.precision=bf16")
    values = dict(trainer.schedules.at(1), freeze_backbone=False)
    trainer.train_step(next(batches), values)  # warm-up: lazy initialisations may sync once
    batch = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as warned:
            trainer.train_step(batch, values)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in warned if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# Operations that make the host wait for the GPU: reading a value back, tensors made from Python
# data (a copy from pageable host memory), and shapes that depend on values.
HOST_WAITS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.nonzero", "aten.masked_select", "aten._unique",
              "aten.unique", "aten.repeat_interleave")


class _StepOperations(TorchDispatchMode):
    """Counts the host-waiting operations and the collectives a step issues. The optimizer's step
    counters are host tensors on CUDA too (unless fused), so reading them is not a wait."""

    def __init__(self, host_counters: set[int]) -> None:
        super().__init__()
        self.host_counters = host_counters
        self.waits: list[str] = []
        self.all_reduces = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(HOST_WAITS) and not (args and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.host_counters):
            self.waits.append(name)
        self.all_reduces += name.startswith("c10d.allreduce_")
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("tiny_vit")
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_a_training_step_issues_one_host_wait_on_cpu(tmp_path, centering):
    """The CPU image of the CUDA test above: what the step asks of the device, counted as operations.

    A process group of one (ddp named) makes the collectives real; asking to stop adds no
    collective, because the stop vote travels with the non-finite one.
    """
    trainer, batches = _trainer_and_batches(tmp_path, "cpu", f"train.centering={centering}", "train.distributed_strategy=ddp")
    values = dict(trainer.schedules.at(1), freeze_backbone=False)
    trainer.train_step(next(batches), values)  # the optimizer's state exists from here on
    counters = {state["step"].data_ptr() for state in trainer.optimizer.state.values()}
    counts = {}
    try:
        for stop in (False, True):
            batch = next(batches)
            with _StepOperations(counters) as operations:
                result = trainer.train_step(batch, values, stop_requested=lambda: stop)
            assert result.stepped and result.stop == stop
            assert operations.waits == ["aten._local_scalar_dense.default"], operations.waits
            counts[stop] = operations.all_reduces
    finally:
        distributed.disable()
    assert counts[True] == counts[False] > 0


def test_fused_adamw_setting_is_checked(tmp_path, tiny_vit):
    args = train_module.get_args_parser().parse_args(
        ["--config-file", str(SMOKE), "--output-dir", str(tmp_path), f"student.arch={tiny_vit}", "optim.fused_adamw=sometimes"])
    with pytest.raises(ValueError, match="optim.fused_adamw"):
        train_module.Trainer(setup(args))
