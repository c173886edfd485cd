"""Two processes (gloo, CPU) train exactly like one process holding the whole global batch:
same samples per global batch, same augmentations and iBOT masks, same losses and weights."""
import sys
from pathlib import Path

import pytest
import torch

from dinov2.data import make_pipeline
from dinov2.configs import load_and_merge_config
from dinov2.data.samplers import GlobalBatchSampler
from dinov2.distributed import first_slurm_host, launch_environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_vit_run import GLOBAL_BATCH, assert_same_teacher, metrics, teacher_export, train_processes  # noqa: E402

LOSSES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    period = ("train.checkpoint_period_iterations=5",)
    train_processes(root / "one", 1, *period)
    two = train_processes(root / "two", 2, *period)
    return root / "one", root / "two", two


@pytest.mark.slow
def test_two_processes_give_the_single_process_loss_curve(runs):
    one, two, _ = runs
    single, double = metrics(one), metrics(two)
    assert [m["iteration"] for m in double] == list(range(10))  # rank 0 alone writes, once per iteration
    assert [m["current_batch_size"] for m in double] == [GLOBAL_BATCH // 2] * 10
    for a, b in zip(single, double):
        for key in LOSSES:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
    # the losses move, so agreeing is not trivial
    assert len({round(m["total_loss"], 4) for m in single}) > 3


@pytest.mark.slow
def test_two_processes_end_with_the_single_process_teacher(runs):
    one, two, _ = runs
    assert_same_teacher(teacher_export(one, 9), teacher_export(two, 9))


@pytest.mark.slow
def test_only_rank_0_writes_the_run_outputs(runs):
    _, two, proc = runs
    assert (two / "logs" / "log.txt").exists() and (two / "logs" / "log.txt.rank1").exists()
    assert sorted(p.name for p in two.glob("last_checkpoint*")) == ["last_checkpoint.rank_0"]
    assert sorted(p.name for p in two.glob("model_*")) == ["model_0000004.rank_0.pth", "model_final.rank_0.pth"]
    assert proc.stdout.count("done:") == 1 and "on 2 process(es)" in proc.stdout


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_hold_the_same_samples_on_any_world_size(world_size):
    def global_batches(world: int, start_batch: int = 0) -> list[list[tuple[int, int]]]:
        per_rank = [iter(GlobalBatchSampler(sample_count=10, batch_size=8 // world, seed=3, rank=r, world_size=world,
                                            start_batch=start_batch)) for r in range(world)]
        return [sum((next(ranks) for ranks in per_rank), []) for _ in range(4)]

    single = global_batches(1)
    assert global_batches(world_size) == single
    assert global_batches(world_size, start_batch=2) == single[2:] + global_batches(1, start_batch=4)[:2]
    stream = sum(single, [])
    assert sorted(i for i, p in stream if p == 0) == list(range(10))  # one pass = each sample once
    assert {p for _, p in stream} == {0, 1, 2, 3}


def test_per_sample_masks_do_not_depend_on_the_batch_split():
    cfg = load_and_merge_config("train/vits14_cpu_smoke")
    cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number = 56, 28, 0
    collate = make_pipeline(cfg).collate
    crops = {"global_crops": [torch.zeros(3, 56, 56)] * 2, "local_crops": []}
    samples = [(dict(crops, sample_seed=1000 + i), 0) for i in range(8)]
    whole = collate(samples, None)["collated_masks"].view(2, 8, -1)
    halves = [collate(half, None)["collated_masks"].view(2, 4, -1) for half in (samples[:4], samples[4:])]
    assert torch.equal(torch.cat(halves, dim=1), whole)
    assert whole.any(dim=-1).sum(dim=0).tolist() == [1] * 8  # upstream's count: one of each image's 2 crops
    assert 0 < whole[0].any(dim=-1).sum() < 8  # which one is drawn per image
    moved = collate(samples[1:] + samples[:1], None)["collated_masks"].view(2, 8, -1)
    assert torch.equal(moved, whole.roll(-1, dims=1))  # a sample's masks follow it


def test_launch_environment_from_torchrun_and_slurm_variables():
    assert launch_environment({}) is None
    assert launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # plain sbatch, one task
    torchrun = launch_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port) == (3, 4, 1, "h1", 1234)
    slurm = launch_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                "SLURM_JOB_NODELIST": "gpu[007-009,012]", "SLURM_JOB_ID": "123456"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (5, 8, 1, "gpu007")
    assert 20000 <= slurm.master_port < 60000
    assert first_slurm_host("node12,node3") == "node12"
    assert first_slurm_host("a-b[01-02],c") == "a-b01"
