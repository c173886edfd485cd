"""Checkpoints resume on another number of processes: a sharded (FSDP, torch.distributed.checkpoint)
folder written by 2 processes in 1 process, a single-file one written by 1 process in 2 sharded
ones; the resumed run ends where the uninterrupted one did."""
import os
import sys
from pathlib import Path

import pytest
import torch

from dinov2.train.checkpointing import Checkpointer
from dinov2.utils.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_vit_run import assert_same_teacher, interrupted_copy, metrics, teacher_export, train_processes  # noqa: E402

PERIOD = "train.checkpoint_period_iterations=3"  # checkpoints after iterations 2, 5, 8 and the final one
LAST = 9


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    train_processes(out, 2, PERIOD, "train.distributed_strategy=fsdp")
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train_processes(out, 1, PERIOD)
    return out


@pytest.mark.slow
def test_fsdp_writes_sharded_folders_with_one_pointer(fsdp_run):
    folders = sorted(p.name for p in fsdp_run.glob("model_*"))
    assert folders == ["model_0000002", "model_0000005", "model_0000008", "model_final"]
    assert all((fsdp_run / name / ".metadata").exists() for name in folders)
    assert len(list((fsdp_run / "model_final").glob("*.distcp"))) == 2  # one shard file per rank
    assert (fsdp_run / "last_checkpoint.rank_0").read_text() == "model_final"
    assert not list(fsdp_run.glob(".model_*"))  # no staging folder left behind


@pytest.mark.slow
def test_sharded_checkpoint_of_two_processes_resumes_in_one(fsdp_run, tmp_path):
    resumed = interrupted_copy(fsdp_run, tmp_path / "resumed", "model_0000005", LAST)
    proc = train_processes(resumed, 1, PERIOD)
    assert "done: 4 iterations" in proc.stdout
    assert "resumed from" in (resumed / "logs" / "log.txt").read_text()
    assert [m["iteration"] for m in metrics(resumed)] == list(range(10))
    assert_same_teacher(teacher_export(fsdp_run, LAST), teacher_export(resumed, LAST))


@pytest.mark.slow
def test_single_process_checkpoint_resumes_in_two_sharded_processes(single_run, tmp_path):
    resumed = interrupted_copy(single_run, tmp_path / "resumed", "model_0000005.rank_0.pth", LAST)
    proc = train_processes(resumed, 2, PERIOD, "train.distributed_strategy=fsdp")
    assert "done: 4 iterations" in proc.stdout
    assert_same_teacher(teacher_export(single_run, LAST), teacher_export(resumed, LAST))
    assert (resumed / "model_final" / ".metadata").exists()


@pytest.mark.slow
def test_fsdp_named_for_one_process_runs_the_sharded_path_with_the_same_result(single_run, tmp_path):
    """One GPU measures the FSDP path this way: `train.distributed_strategy=fsdp` without a launcher."""
    out = tmp_path / "one_fsdp"
    train_processes(out, 1, PERIOD, "train.distributed_strategy=fsdp")
    assert len(list((out / "model_final").glob("*.distcp"))) == 1  # sharded folders, one rank
    assert_same_teacher(teacher_export(single_run, LAST), teacher_export(out, LAST))


@pytest.mark.slow
def test_sharded_checkpoint_resumes_with_ddp(fsdp_run, tmp_path):
    resumed = interrupted_copy(fsdp_run, tmp_path / "resumed", "model_0000002", LAST)
    train_processes(resumed, 2, PERIOD, "train.distributed_strategy=ddp")
    assert_same_teacher(teacher_export(fsdp_run, LAST), teacher_export(resumed, LAST))
    assert (resumed / "model_final.rank_0.pth").exists()


def test_sharded_saves_are_atomic_and_pruned(tmp_path):
    checkpointer = Checkpointer(tmp_path, rank=0, max_to_keep=2)
    (tmp_path / ".model_0000003.tmp").mkdir()  # left by a run killed while saving
    for iteration in range(4):
        checkpointer.save_sharded({"model": {"w": torch.full((3,), float(iteration))}}, iteration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint.rank_0", "model_0000002", "model_0000003"]
    last = checkpointer.last_checkpoint()
    assert last == tmp_path / "model_0000003"
    state = checkpointer.load_sharded(last, {"model": {"w": torch.zeros(3)}, "iteration": -1})
    assert state["iteration"] == 3 and torch.equal(state["model"]["w"], torch.full((3,), 3.0))
    checkpointer.save_sharded({"model": {"w": torch.ones(3)}}, 4, final=True)
    checkpointer.save_sharded({"model": {"w": torch.full((3,), 5.0)}}, 5, final=True)  # replaces model_final
    final = checkpointer.load_sharded(checkpointer.last_checkpoint(), {"model": {"w": torch.zeros(3)}, "iteration": -1})
    assert final["iteration"] == 5 and not list(tmp_path.glob(".model_final*"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_whole_checkpoint_is_memory_mapped_not_read(tmp_path):
    """Every rank of an FSDP run resuming from one whole file maps it (pages shared through the
    page cache) instead of reading a private copy; a damaged file is still one error naming it."""
    checkpointer = Checkpointer(tmp_path, rank=0)
    path = checkpointer.save({"model": {"w": torch.arange(4096.0)}, "optimizer": {}}, 7)

    state = checkpointer.load(checkpointer.last_checkpoint())
    assert state["iteration"] == 7 and torch.equal(state["model"]["w"], torch.arange(4096.0))
    assert os.path.realpath(path) in Path("/proc/self/maps").read_text()
    del state

    truncated = tmp_path / "model_0000008.rank_0.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError) as error:
        checkpointer.load(truncated)
    assert str(error.value) == f"cannot read checkpoint {truncated}: not a complete zip archive as torch.save writes (truncated, or another format)"
