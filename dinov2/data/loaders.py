"""Data loaders: upstream's generic `make_data_loader` and the reproducible training loader.

The training loader fixes what makes upstream's resume inexact: every sample's augmentation is
seeded from (seed, dataset index, pass number) and every batch's collate (masks) from the seeds
of its samples. Batch k is then bit-identical whether the run started at 0 or resumed at k, and
whatever the number of workers, because no random state is shared between samples.

It is also independent of the number of processes: global batch k is the same samples on any
number of ranks (`GlobalBatchSampler`), and each sample's crops dict carries its `sample_seed`,
from which pipelines that support it (the built-in "dino" one) draw that image's iBOT masks.
"""
import hashlib
import random
import struct
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler

from dinov2 import distributed
from dinov2.data.registry import Pipeline
from dinov2.data.samplers import EpochSampler, GlobalBatchSampler, InfiniteSampler, SamplerType, ShardedInfiniteSampler
from dinov2.utils.errors import UserError


def derive_seed(*numbers: int) -> int:
    """A 63-bit seed from integers, identical in every process (unlike Python's hash())."""
    digest = hashlib.blake2b(struct.pack(f"<{len(numbers)}q", *numbers), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _make_sampler(dataset, sampler_type: SamplerType | None, shuffle: bool, seed: int, size: int, advance: int):
    sample_count = len(dataset)
    if sampler_type in (SamplerType.INFINITE, SamplerType.SHARDED_INFINITE, SamplerType.SHARDED_INFINITE_NEW):
        if size > 0:
            raise UserError(f"sampler {sampler_type.name}: sampler_size is not supported for infinite samplers")
        if sampler_type == SamplerType.INFINITE:
            return InfiniteSampler(sample_count=sample_count, shuffle=shuffle, seed=seed, advance=advance)
        return ShardedInfiniteSampler(
            sample_count=sample_count,
            shuffle=shuffle,
            seed=seed,
            advance=advance,
            use_new_shuffle_tensor_slice=sampler_type == SamplerType.SHARDED_INFINITE_NEW,
        )
    if sampler_type == SamplerType.EPOCH:
        if advance > 0:
            raise UserError("sampler EPOCH: sampler_advance is not supported")
        size = size if size > 0 else sample_count
        return EpochSampler(size=size, sample_count=sample_count, shuffle=shuffle, seed=seed)
    if sampler_type == SamplerType.DISTRIBUTED:
        if size > 0 or advance > 0:
            raise UserError("sampler DISTRIBUTED: sampler_size and sampler_advance are not supported")
        return DistributedSampler(
            dataset,
            num_replicas=distributed.get_global_size(),
            rank=distributed.get_global_rank(),
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
    return None


def make_data_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = True,
    seed: int = 0,
    sampler_type: SamplerType | None = SamplerType.INFINITE,
    sampler_size: int = -1,
    sampler_advance: int = 0,
    drop_last: bool = True,
    persistent_workers: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` with one of upstream's samplers (None: plain sequential order)."""
    sampler = _make_sampler(dataset, sampler_type, shuffle, seed, sampler_size, sampler_advance)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
        # keeps the loader from drawing its worker seeds out of the global torch RNG
        generator=torch.Generator().manual_seed(seed),
    )


class _AugmentedSamples:
    """dataset[(index, pass)] -> (crops, target, sample seed), augmented with its own generator."""

    def __init__(self, dataset, transform: Callable, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __getitem__(self, index_and_pass: tuple[int, int]) -> tuple[dict, Any, int]:
        index, pass_number = index_and_pass
        sample_seed = derive_seed(self.seed, index, pass_number)
        image, target = self.dataset[index]
        crops = self.transform(image, torch.Generator().manual_seed(sample_seed))
        return dict(crops, sample_seed=sample_seed), target, sample_seed


class _SeededCollate:
    """Collates a batch with a random.Random seeded from the run seed and its samples' seeds."""

    def __init__(self, collate: Callable, seed: int):
        self.collate, self.seed = collate, seed

    def __call__(self, samples: Sequence[tuple[dict, Any, int]]) -> dict:
        rng = random.Random(derive_seed(self.seed, *(sample_seed for _, _, sample_seed in samples)))
        return self.collate([(crops, target) for crops, target, _ in samples], rng)


def make_training_loader(
    dataset,
    pipeline: Pipeline,
    batch_size: int,
    num_workers: int,
    seed: int,
    start_iter: int = 0,
) -> Iterable[dict]:
    """Endless batches of `batch_size` for this rank (its slice of each global batch), starting
    at iteration `start_iter` of the run seeded `seed`."""
    batch_sampler = GlobalBatchSampler(sample_count=len(dataset), batch_size=batch_size, seed=seed, start_batch=start_iter)
    return DataLoader(
        _AugmentedSamples(dataset, pipeline.transform, seed),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=_SeededCollate(pipeline.collate, seed),
        generator=torch.Generator().manual_seed(seed),
    )
