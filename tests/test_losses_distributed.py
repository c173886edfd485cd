"""The losses give the same teacher targets and centres when the batch is split over 2 ranks
(gloo, CPU) as on one process holding the whole batch."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import SHORT_SUM_EPS, assert_close_scaled, free_port
from dinov2.loss import DINOLoss, iBOTPatchLoss

pytestmark = pytest.mark.slow  # every test reads the results of 2 spawned processes

WORLD_SIZE = 2
N_PROTOTYPES = 64
TEACHER_TEMP = 0.05
MASKED_TOKENS_PER_RANK = (7, 15)  # ranks hold different numbers of masked tokens


def make_inputs():
    """The whole batch, as every process can rebuild it."""
    generator = torch.Generator().manual_seed(123)
    cls_logits = torch.randn(2 * 6, N_PROTOTYPES, generator=generator) * 2
    patch_logits = torch.randn(sum(MASKED_TOKENS_PER_RANK), N_PROTOTYPES, generator=generator) * 2
    return cls_logits, patch_logits


def _worker(rank: int, port: int, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        cls_logits, patch_logits = make_inputs()
        cls_rows = cls_logits.chunk(WORLD_SIZE)[rank]
        token_start = sum(MASKED_TOKENS_PER_RANK[:rank])
        tokens = patch_logits[token_start : token_start + MASKED_TOKENS_PER_RANK[rank]]

        dino = DINOLoss(N_PROTOTYPES)
        dino.update_center(cls_rows)
        dino_sinkhorn = dino.sinkhorn_knopp_teacher(cls_rows, TEACHER_TEMP)  # runs while the reduce is pending
        dino.apply_center_update()

        ibot = iBOTPatchLoss(N_PROTOTYPES)
        n_masked = torch.tensor([len(tokens)])
        ibot_sinkhorn = ibot.sinkhorn_knopp_teacher(tokens, TEACHER_TEMP, n_masked)
        ibot.update_center(tokens)
        ibot.apply_center_update()

        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, (dino_sinkhorn, ibot_sinkhorn, dino.center, n_masked, ibot.center))
        if rank == 0:
            torch.save(gathered, result_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    result_path = tmp_path_factory.mktemp("dist") / "results.pt"
    mp.spawn(_worker, args=(free_port(), str(result_path)), nprocs=WORLD_SIZE, join=True)
    return torch.load(result_path, weights_only=True)


def test_dino_center_over_two_ranks_equals_single_process(two_rank_results):
    cls_logits, _ = make_inputs()
    single = DINOLoss(N_PROTOTYPES)
    single.update_center(cls_logits)
    single.apply_center_update()
    torch.testing.assert_close(single.center, 0.1 * cls_logits.mean(dim=0, keepdim=True))
    for _, _, rank_center, _, _ in two_rank_results:
        assert_close_scaled(rank_center, single.center, rtol=1e-5, eps=SHORT_SUM_EPS)


def test_dino_sinkhorn_over_two_ranks_equals_single_process(two_rank_results):
    cls_logits, _ = make_inputs()
    single = DINOLoss(N_PROTOTYPES).sinkhorn_knopp_teacher(cls_logits, TEACHER_TEMP)
    split = torch.cat([dino for dino, _, _, _, _ in two_rank_results])
    assert_close_scaled(split, single, rtol=1e-5, eps=SHORT_SUM_EPS)
    # not trivially per-rank: each half alone gives different targets
    alone = DINOLoss(N_PROTOTYPES).sinkhorn_knopp_teacher(cls_logits.chunk(2)[0], TEACHER_TEMP)
    assert not torch.allclose(alone, single[: len(alone)], rtol=1e-3)


def test_ibot_sinkhorn_over_two_ranks_equals_single_process(two_rank_results):
    _, patch_logits = make_inputs()
    single = iBOTPatchLoss(N_PROTOTYPES).sinkhorn_knopp_teacher(patch_logits, TEACHER_TEMP, torch.tensor([len(patch_logits)]))
    split = torch.cat([ibot for _, ibot, _, _, _ in two_rank_results])
    assert_close_scaled(split, single, rtol=1e-5, eps=SHORT_SUM_EPS)
    # each rank's own count tensor was left as it was
    assert [int(n) for _, _, _, n, _ in two_rank_results] == list(MASKED_TOKENS_PER_RANK)


def test_ibot_center_over_two_ranks_is_the_mean_of_every_masked_token(two_rank_results):
    _, patch_logits = make_inputs()
    single = iBOTPatchLoss(N_PROTOTYPES)
    single.update_center(patch_logits)
    single.apply_center_update()
    torch.testing.assert_close(single.center.flatten(), 0.1 * patch_logits.mean(dim=0))
    for *_, rank_center in two_rank_results:
        assert_close_scaled(rank_center, single.center, rtol=1e-5, eps=SHORT_SUM_EPS)
    # the ranks mask 7 and 15 tokens: averaging their two means (upstream's rule) would differ
    halves = patch_logits.split(MASKED_TOKENS_PER_RANK)
    mean_of_means = 0.1 * torch.stack([h.mean(dim=0) for h in halves]).mean(dim=0)
    assert not torch.allclose(single.center.flatten(), mean_of_means, rtol=1e-3)
