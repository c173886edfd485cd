"""Every shipped training config, as users run it: 2 processes (gloo, CPU) under FSDP2 and DDP.

Each config keeps its own losses, centring, head warm-up, masking and pipeline; only what makes
it fit 2 cores is overridden (a tiny ViT and head, crops of 4 and 2 patches, a global batch of 4,
4 iterations, the phantom data or synthetic images for upstream's ImageNet paths). Head warm-up
is shortened to 2 iterations, so a run crosses it.

What must hold:
- every run ends, under fsdp and ddp;
- fsdp and ddp take the same steps (the same losses, the same teacher updates);
- the loss curve does not depend on the number of processes: 2 processes = 1 process holding
  the same global batch. KoLeo and stochastic depth are per-rank by definition (upstream's
  nearest neighbours and dropped samples are drawn within each process's share of the batch),
  so this comparison turns those two off; the fsdp = ddp comparison keeps them;
- a run killed after a checkpoint and resumed on the other world size ends where the
  uninterrupted run ended;
- two torchrun agents (2 nodes x 1 process, one rendezvous) train like one agent with 2 processes.

All runs of one world size share one launch (tests/matrix_run.py), which keeps the matrix within
the suite's time budget.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_vit_run import REPO, interrupted_copy, launch, metrics, teacher_export  # noqa: E402

pytestmark = pytest.mark.slow

CONFIGS = sorted((REPO / "configs" / "vetdino").glob("*.yaml")) + sorted((REPO / "dinov2" / "configs" / "train").glob("*.yaml"))
STRATEGIES = ("fsdp", "ddp")
GLOBAL_BATCH = 4
CHECKPOINT_AFTER = 1  # checkpoints after iterations 1 and 3 (the final one); teacher exports at the same two
LAST = 3
SPLIT_INVARIANT = ("student.drop_path_rate=0", "dino.koleo_loss_weight=0")
FP32 = ("compute_precision.precision=fp32",)


def shrink(config_file: Path, world_size: int, data: Path) -> list[str]:
    """Overrides that make a shipped config run in seconds, leaving its training recipe alone."""
    cfg = OmegaConf.load(config_file)
    train, student = cfg.get("train") or {}, cfg.get("student") or {}
    dataset = str(train.get("dataset_path", ""))
    kind = dataset.split(":")[0]
    dataset = f"{kind}:root={data}:split=train" if kind in ("VetStudies", "VetImages") else "Synthetic:n=64:size=64"
    patch = student.get("patch_size", 16)
    opts = [
        "student.arch=vit_test_tiny", f"crops.global_crops_size={4 * patch}", f"crops.local_crops_size={2 * patch}",
        f"train.batch_size_per_gpu={GLOBAL_BATCH // world_size}", f"train.dataset_path={dataset}",
        "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=2", "optim.warmup_epochs=1",
        f"train.checkpoint_period_iterations={CHECKPOINT_AFTER + 1}", f"evaluation.eval_period_iterations={CHECKPOINT_AFTER + 1}",
        "train.log_period_iterations=1", "train.device=cpu", "train.num_workers=0", *FP32,
    ]
    for head in ("dino", "ibot"):
        opts += [f"{head}.head_n_prototypes=256", f"{head}.head_hidden_dim=64", f"{head}.head_bottleneck_dim=32"]
    if train.get("head_warmup_iterations", 0):
        opts.append("train.head_warmup_iterations=2")
    if student.get("block_chunks", 0):
        opts.append("student.block_chunks=2")  # the tiny ViT has 2 blocks
    return opts


def command(config_file: Path, output_dir: Path, world_size: int, data: Path, *opts: str) -> list[str]:
    return ["--config-file", str(config_file), "--output-dir", str(output_dir), *shrink(config_file, world_size, data), *opts]


def run_all(root: Path, name: str, runs: list[list[str]], n_processes: int, **torchrun: str) -> None:
    spec = root / f"{name}.json"
    spec.write_text(json.dumps(runs))
    launch(["tests/matrix_run.py", str(spec)], n_processes, timeout=600, **torchrun)


def interrupted_after_first_checkpoint(run: Path, target: Path) -> Path:
    first = next(p.name for p in run.glob(f"model_{CHECKPOINT_AFTER:07d}*"))  # a file or a sharded folder
    return interrupted_copy(run, target, first, LAST)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, phantom_data) -> Path:
    """OUT/<config>/<run> for runs: one, fsdp, ddp (split-invariant, fp32), fsdp_full, ddp_full
    (the config's own KoLeo and stochastic depth), and the resumed copies."""
    root = tmp_path_factory.mktemp("matrix")
    out = lambda config, run: root / config.stem / run  # noqa: E731
    run_all(root, "one", [command(c, out(c, "one"), 1, phantom_data, *SPLIT_INVARIANT) for c in CONFIGS], 1)
    run_all(root, "two", [
        command(c, out(c, run), 2, phantom_data, f"train.distributed_strategy={strategy}", *extra)
        for c in CONFIGS for strategy in STRATEGIES
        for run, extra in ((strategy, SPLIT_INVARIANT), (f"{strategy}_full", ()))
    ], 2)
    resumed_in_two, resumed_in_one = [], []
    for c in CONFIGS:
        for strategy in STRATEGIES:
            copy = interrupted_after_first_checkpoint(out(c, "one"), out(c, f"one_resumed_{strategy}"))
            resumed_in_two.append(command(c, copy, 2, phantom_data, f"train.distributed_strategy={strategy}", *SPLIT_INVARIANT))
            copy = interrupted_after_first_checkpoint(out(c, strategy), out(c, f"{strategy}_resumed_one"))
            resumed_in_one.append(command(c, copy, 1, phantom_data, *SPLIT_INVARIANT))
    run_all(root, "resumed_in_two", resumed_in_two, 2)
    run_all(root, "resumed_in_one", resumed_in_one, 1)
    return root


def assert_same_teacher_updates(run: Path, reference: Path) -> None:
    """The teacher moved the same way from its first export to its last, tensor by tensor.

    Compared as the update's error relative to the update's size: float32 sums taken in another
    order (all-reduce vs reduce-scatter, 2 ranks vs 1) differ in the last bits, and AdamW turns
    those into differences proportional to the step, not to the weights. 1e-3 is 20x the worst
    seen on CPUs here; a wrong gradient reduction or a missed EMA is off by order 1.
    """
    start, end = teacher_export(run, CHECKPOINT_AFTER), teacher_export(run, LAST)
    ref_start, ref_end = teacher_export(reference, CHECKPOINT_AFTER), teacher_export(reference, LAST)
    assert end.keys() == ref_end.keys()
    for name in ref_end:
        update, ref_update = end[name] - start[name], ref_end[name] - ref_start[name]
        error = (update - ref_update).norm()
        assert error <= 1e-3 * ref_update.norm() + 1e-7 * ref_end[name].norm(), (run, name, float(error), float(ref_update.norm()))


def assert_same_losses(run: Path, reference: Path) -> None:
    lines, ref_lines = metrics(run), metrics(reference)
    assert [m["iteration"] for m in lines] == [m["iteration"] for m in ref_lines] == list(range(LAST + 1))
    for line, ref in zip(lines, ref_lines):
        for key in (k for k in ref if k.endswith("_loss")):
            assert line[key] == pytest.approx(ref[key], rel=1e-5), (run, line["iteration"], key)


def test_every_shipped_config_is_in_the_matrix():
    assert len(CONFIGS) >= 12
    assert {c.parent.name for c in CONFIGS} == {"vetdino", "train"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_each_config_ends_under_fsdp_and_ddp(matrix, config):
    for run in ("one", *STRATEGIES, *(f"{s}_full" for s in STRATEGIES)):
        lines = metrics(matrix / config.stem / run)
        assert [m["iteration"] for m in lines] == list(range(LAST + 1)), run
        assert lines[-1]["nonfinite_steps"] == 0
        assert (matrix / config.stem / run / "eval" / f"training_{LAST}" / "teacher_checkpoint.pth").exists()
    sharded = matrix / config.stem / "fsdp" / "model_final"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2
    assert (matrix / config.stem / "ddp" / "model_final.rank_0.pth").is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_fsdp_and_ddp_take_the_same_steps(matrix, config):
    """With the config's own KoLeo and stochastic depth, and through the head warm-up."""
    runs = matrix / config.stem
    assert_same_losses(runs / "fsdp_full", runs / "ddp_full")
    assert_same_teacher_updates(runs / "fsdp_full", runs / "ddp_full")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_two_processes_train_like_one_with_the_same_global_batch(matrix, config):
    runs = matrix / config.stem
    for strategy in STRATEGIES:
        assert_same_losses(runs / strategy, runs / "one")
        assert_same_teacher_updates(runs / strategy, runs / "one")
    # the losses move, so agreeing is not trivial
    assert len({round(m["total_loss"], 6) for m in metrics(runs / "one")}) > 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_a_killed_run_resumes_on_the_other_world_size(matrix, config):
    runs = matrix / config.stem
    for strategy in STRATEGIES:
        assert_same_teacher_updates(runs / f"one_resumed_{strategy}", runs / "one")
        assert_same_teacher_updates(runs / f"{strategy}_resumed_one", runs / strategy)
        resumed_log = (runs / f"one_resumed_{strategy}" / "logs" / "log.txt").read_text()
        assert f"resumed from {runs / f'one_resumed_{strategy}' / f'model_{CHECKPOINT_AFTER:07d}.rank_0.pth'}" in resumed_log


def test_two_nodes_of_one_process_train_like_one_node_of_two(matrix, phantom_data, tmp_path):
    """Two torchrun agents, as on two SLURM nodes, meet at one c10d rendezvous and agree on ranks."""
    config = next(c for c in CONFIGS if c.stem == "multiview_vitb14")
    run = tmp_path / "two_nodes"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([command(config, run, 2, phantom_data, "train.distributed_strategy=fsdp", *SPLIT_INVARIANT)]))
    rendezvous = dict(nnodes="2", rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id="matrix")
    results: dict[int, object] = {}

    def agent(node_rank: int) -> None:
        try:
            results[node_rank] = launch(["tests/matrix_run.py", str(spec)], 1, timeout=300, node_rank=str(node_rank), **rendezvous)
        except BaseException as exc:  # reported below, from the test's thread
            results[node_rank] = exc

    agents = [threading.Thread(target=agent, args=(rank,)) for rank in (0, 1)]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join()
    for rank in (0, 1):
        assert not isinstance(results[rank], BaseException), results[rank]
    assert sum("on 2 process(es)" in results[rank].stdout for rank in (0, 1)) == 1  # one rank 0 between them
    assert_same_losses(run, matrix / config.stem / "fsdp")
    assert_same_teacher_updates(run, matrix / config.stem / "fsdp")
