"""Loaders: upstream-style make_data_loader and the reproducible, resumable training loader."""
import itertools

import pytest
import torch

from dinov2.configs import load_and_merge_config
from dinov2.data import SamplerType, make_data_loader, make_dataset, make_pipeline, make_training_loader
from dinov2.data.datasets import SyntheticImages


@pytest.fixture(scope="module")
def pipeline():
    cfg = load_and_merge_config("train/vits14_cpu_smoke")
    cfg.crops.global_crops_size, cfg.crops.local_crops_size = 28, 14
    return make_pipeline(cfg)


@pytest.fixture(scope="module")
def dataset():
    return SyntheticImages(n=20, size=32)


def _batches(dataset, pipeline, *, start_iter=0, count=3, num_workers=0, seed=11, batch_size=4):
    loader = make_training_loader(dataset, pipeline, batch_size, num_workers, seed, start_iter=start_iter)
    return list(itertools.islice(loader, count))


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_training_batches_have_the_pipeline_layout(dataset, pipeline):
    (batch,) = _batches(dataset, pipeline, count=1)
    assert batch["collated_global_crops"].shape == (8, 3, 28, 28)
    assert batch["collated_local_crops"].shape == (8, 3, 14, 14)
    assert batch["collated_global_crops"].dtype == torch.float32
    assert batch["collated_masks"].shape == (8, 4) and batch["collated_masks"].dtype == torch.bool


def test_resumed_loader_reproduces_the_same_batches_across_a_pass_boundary(dataset, pipeline):
    # 20 samples / 4 per batch: batches 5 and 6 belong to the second pass over the data
    full = _batches(dataset, pipeline, count=7)
    resumed = _batches(dataset, pipeline, start_iter=4, count=3)
    for original, again in zip(full[4:], resumed):
        _assert_same_batch(original, again)
    # second pass reuses the indices with new augmentations
    first_pass = torch.cat([b["collated_global_crops"] for b in full[:5]])
    second_pass = torch.cat([b["collated_global_crops"] for b in full[5:]])
    assert not any(torch.equal(crop, other) for crop in second_pass for other in first_pass)


def test_batches_do_not_depend_on_worker_count_or_global_rng(dataset, pipeline):
    in_process = _batches(dataset, pipeline, count=3, num_workers=0)
    torch.manual_seed(999)
    with_workers = _batches(dataset, pipeline, count=3, num_workers=2)
    for a, b in zip(in_process, with_workers):
        _assert_same_batch(a, b)


def test_seed_changes_the_stream(dataset, pipeline):
    (a,) = _batches(dataset, pipeline, count=1, seed=1)
    (b,) = _batches(dataset, pipeline, count=1, seed=2)
    assert not torch.equal(a["collated_global_crops"], b["collated_global_crops"])


def test_make_data_loader_epoch_sampler_visits_every_sample_once():
    dataset = make_dataset("Synthetic:n=10:size=8")
    loader = make_data_loader(
        dataset, batch_size=5, num_workers=0, shuffle=True, seed=3, sampler_type=SamplerType.EPOCH, drop_last=False
    )
    images = torch.cat([images for images, _ in loader])
    expected = {dataset.image(i).numpy().tobytes() for i in range(10)}
    assert {image.numpy().tobytes() for image in images} == expected and len(images) == 10
    assert loader.pin_memory == torch.cuda.is_available()


def test_make_data_loader_without_sampler_keeps_order_and_global_rng():
    dataset = SyntheticImages(n=6, size=8)
    state = torch.random.get_rng_state()
    loader = make_data_loader(dataset, batch_size=4, num_workers=0, sampler_type=None, drop_last=False)
    targets = [t.tolist() for _, t in loader]
    assert targets == [[0, 1, 2, 3], [4, 5]]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_make_data_loader_infinite_sampler_with_advance_matches_unadvanced_stream():
    dataset = SyntheticImages(n=6, size=8)

    def targets(advance):
        loader = make_data_loader(
            dataset, batch_size=3, num_workers=0, seed=4, sampler_type=SamplerType.INFINITE, sampler_advance=advance
        )
        return [t.tolist() for _, t in itertools.islice(loader, 4 - advance // 3)]

    assert targets(6) == targets(0)[2:]
