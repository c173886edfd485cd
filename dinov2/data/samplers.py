"""Index samplers for training and evaluation loaders, sequence-compatible with upstream DINOv2.

Training samplers are infinite: the trainer counts iterations, not epochs. Each rank reads its
own shard (`start` = rank, `step` = world size). The infinite samplers can also say which pass
over the data every index belongs to (`iter_with_pass`), so a loader can seed each sample's
augmentation from (seed, index, pass): the stream of augmented samples is then the same whatever
the number of workers, and resuming at sample k with `advance=k` reproduces it exactly.
"""
import itertools
import warnings
from enum import Enum
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data.sampler import Sampler

from dinov2 import distributed
from dinov2.utils.errors import UserError


class SamplerType(Enum):
    DISTRIBUTED = 0
    EPOCH = 1
    INFINITE = 2
    SHARDED_INFINITE = 3
    SHARDED_INFINITE_NEW = 4


def _resolve_shard(sample_count: int, start: int | None, step: int | None) -> tuple[int, int]:
    """This rank's (start, step), defaulting to (rank, world size), after checking them."""
    start = distributed.get_global_rank() if start is None else start
    step = distributed.get_global_size() if step is None else step
    if sample_count < 1:
        raise UserError(f"sampler: the dataset has no samples (sample_count={sample_count})")
    if step < 1 or not 0 <= start < step:
        raise UserError(f"sampler: need 0 <= start < step, got start={start}, step={step}")
    return start, step


def _check_advance(advance: int) -> int:
    if advance < 0:
        raise UserError(f"sampler: advance must be >= 0, got {advance}")
    return advance


class EpochSampler(Sampler[int]):
    """`size` indices per epoch drawn from `sample_count` samples tiled as often as needed,
    reshuffled every epoch (`set_epoch`); for finite, epoch-based loops."""

    def __init__(
        self,
        *,
        size: int,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        start: int | None = None,
        step: int | None = None,
    ):
        self._size = size
        self._sample_count = sample_count
        self._shuffle = shuffle
        self._seed = seed
        self._start, self._step = _resolve_shard(sample_count, start, step)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[int]:
        n_tiles = -(-self._size // self._sample_count)
        tiled = np.tile(np.arange(self._sample_count), n_tiles)
        if self._shuffle:
            # upstream's epoch seed: a zero seed must still change with the epoch
            epoch_seed = self._seed * self._epoch if self._seed != 0 else self._epoch
            order = np.random.default_rng(epoch_seed).choice(tiled, self._size, replace=False)
        else:
            order = tiled[: self._size]
        yield from (int(i) for i in order[self._start :: self._step])

    def __len__(self) -> int:
        return (self._size - self._start + self._step - 1) // self._step


class _EndlessPasses(Sampler[int]):
    """What the infinite samplers share: this rank's shard of endless passes over `sample_count`
    samples, resumable at `advance` (indices this rank has already consumed), which a subclass
    yields with their pass number from `iter_with_pass`."""

    def __init__(
        self,
        *,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        start: int | None = None,
        step: int | None = None,
        advance: int = 0,
    ):
        self._sample_count = sample_count
        self._shuffle = shuffle
        self._seed = seed
        self._start, self._step = _resolve_shard(sample_count, start, step)
        self._advance = _check_advance(advance)

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.iter_with_pass())

    def iter_with_pass(self) -> Iterator[tuple[int, int]]:
        raise NotImplementedError


class InfiniteSampler(_EndlessPasses):
    """Endless passes over the data, each a fresh permutation (when shuffling) of which this rank
    takes every `step`-th element from `start`. One generator seeded once drives all passes, so
    resuming has to replay the skipped passes' draws (cheap only for small datasets)."""

    def iter_with_pass(self) -> Iterator[tuple[int, int]]:
        """(index, pass number) pairs, after skipping the first `advance` of them."""
        # the generator is made here, not in __init__, so the sampler stays picklable
        generator = torch.Generator().manual_seed(self._seed) if self._shuffle else None
        return itertools.islice(self._all_passes(generator), self._advance, None)

    def _all_passes(self, generator: torch.Generator | None) -> Iterator[tuple[int, int]]:
        for pass_number in itertools.count():
            order = _lazy_randperm(self._sample_count, generator) if generator else range(self._sample_count)
            for index in itertools.islice(order, self._start, None, self._step):
                yield index, pass_number


def _lazy_randperm(size: int, generator: torch.Generator) -> Iterator[int]:
    """Fisher-Yates permutation yielded element by element, drawing like PyTorch's CPU randperm
    (one randint in [i, size) per position) so that it consumes the generator as upstream does.
    Always runs to the end once started, so each pass draws exactly `size` numbers."""
    perm = list(range(size))
    for i in range(size):
        j = int(torch.randint(i, size, (1,), generator=generator))
        perm[i], perm[j] = perm[j], perm[i]
        yield perm[i]


class ShardedInfiniteSampler(_EndlessPasses):
    """Endless passes over one global permutation, of which each rank shuffles its own disjoint
    slice `perm[start::step]` anew in every pass.

    Each pass re-seeds from (seed, start, pass), so any pass can be produced directly: `advance`
    (the number of indices this rank has already consumed) costs nothing however large. When
    shuffling, a pass has `sample_count // step` indices per rank (the tail that does not divide
    evenly is dropped, with a warning, so that all ranks stay in step). `use_new_shuffle_tensor_slice`
    selects upstream's faster randperm-based slice shuffle (a different sequence); the other
    arguments are InfiniteSampler's.
    """

    def __init__(self, *, use_new_shuffle_tensor_slice: bool = False, **passes: Any):
        super().__init__(**passes)
        self._use_new_shuffle = use_new_shuffle_tensor_slice
        if self._shuffle and self._sample_count < self._step:
            raise UserError(f"sampler: {self._sample_count} samples cannot be shared among {self._step} ranks")
        if self._shuffle and self._sample_count % self._step:
            unused = self._sample_count % self._step
            warnings.warn(f"sampler: {unused} samples per pass are never used (not divisible by {self._step} ranks)")

    def iter_with_pass(self) -> Iterator[tuple[int, int]]:
        """(index, pass number) pairs, after skipping the first `advance` of them."""
        if self._shuffle:
            pass_length = self._sample_count // self._step
        else:
            pass_length = len(range(self._start, self._sample_count, self._step))
        first_pass, offset = divmod(self._advance, pass_length)
        global_perm = self._global_permutation() if self._shuffle else None
        for pass_number in itertools.count(first_pass):
            if global_perm is None:
                order = range(self._start, self._sample_count, self._step)
            else:
                order = self._shuffled_slice(global_perm, pass_number)
            for index in itertools.islice(order, offset, None):
                yield int(index), pass_number
            offset = 0

    def _global_permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self._seed)
        dtype = torch.int32 if self._sample_count <= 2**31 else torch.int64
        return torch.randperm(self._sample_count, dtype=dtype, generator=generator)

    def _shuffled_slice(self, global_perm: torch.Tensor, pass_number: int) -> list[int]:
        """This rank's slice of the global permutation in the order of the given pass."""
        # upstream's seed schedule; the shift keeps passes of different ranks apart
        generator = torch.Generator().manual_seed(self._seed + self._start + (pass_number << 24))
        count = self._sample_count // self._step
        rank_slice = global_perm[self._start :: self._step][:count].tolist()
        if self._use_new_shuffle:
            return [rank_slice[i] for i in torch.randperm(count, generator=generator).tolist()]
        return _inside_out_shuffle(rank_slice, generator)


def _inside_out_shuffle(values: list[int], generator: torch.Generator) -> list[int]:
    """Shuffled copy built by the inside-out Fisher-Yates variant: each new value goes to a random
    slot j <= i and the slot's previous value moves to the end (one draw per value after the first)."""
    result: list[int] = []
    for i, value in enumerate(values):
        j = int(torch.randint(0, i + 1, (1,), generator=generator)) if i > 0 else 0
        result.append(value)
        result[i], result[j] = result[j], value
    return result


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, pass) for one rank, such that global batch k holds the same samples
    whatever the number of ranks.

    The stream is the single-rank `ShardedInfiniteSampler` stream (randperm shuffle); global batch k
    is its items [k*G, (k+1)*G) with G = `batch_size` * world size, and rank r takes the contiguous
    slice [r*B, (r+1)*B). A run can then continue on another number of processes (keeping the
    global batch) and read exactly the samples it would have read.
    """

    def __init__(
        self,
        *,
        sample_count: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        start_batch: int = 0,
    ):
        if batch_size < 1:
            raise UserError(f"sampler: batch_size must be >= 1, got {batch_size}")
        self._rank, self._world_size = _resolve_shard(sample_count, rank, world_size)
        self._batch_size = batch_size
        self._stream = ShardedInfiniteSampler(
            sample_count=sample_count,
            shuffle=shuffle,
            seed=seed,
            start=0,
            step=1,
            advance=_check_advance(start_batch) * batch_size * self._world_size,
            use_new_shuffle_tensor_slice=True,
        )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stream = self._stream.iter_with_pass()
        global_batch_size = self._batch_size * self._world_size
        first = self._rank * self._batch_size
        while True:
            global_batch = list(itertools.islice(stream, global_batch_size))
            yield global_batch[first : first + self._batch_size]
