"""Samplers: exact upstream DINOv2 sequences (samplers.json), sharding, resume and pass numbers."""
import itertools
import json
import re

import pytest

from dinov2.data.samplers import EpochSampler, InfiniteSampler, SamplerType, ShardedInfiniteSampler
from dinov2.utils.errors import UserError

SAMPLERS = {"InfiniteSampler": InfiniteSampler, "ShardedInfiniteSampler": ShardedInfiniteSampler}


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def _parse_value(text: str):
    return {"True": True, "False": False}[text] if text in ("True", "False") else int(text)


def _infinite_cases():
    from conftest import FIXTURES

    reference = json.loads((FIXTURES / "samplers.json").read_text())
    for key, expected in reference.items():
        match = re.fullmatch(r"(\w+)\((.*)\)\[:(\d+)\]", key)
        if match and match.group(1) in SAMPLERS:
            kwargs = {k: _parse_value(v) for k, v in (item.split("=") for item in match.group(2).split(", "))}
            yield pytest.param(SAMPLERS[match.group(1)], kwargs, int(match.group(3)), expected, id=key)


@pytest.mark.parametrize("sampler_class,kwargs,n,expected", list(_infinite_cases()))
def test_infinite_samplers_match_upstream(sampler_class, kwargs, n, expected):
    assert take(sampler_class(**kwargs), n) == expected


def test_epoch_sampler_matches_upstream(fixtures_dir):
    reference = json.loads((fixtures_dir / "samplers.json").read_text())
    expected = reference["EpochSampler(size=12, sample_count=5, shuffle=True, seed=0, start=0, step=1) epoch 0 and 1"]
    sampler = EpochSampler(size=12, sample_count=5, shuffle=True, seed=0, start=0, step=1)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert epochs == expected
    assert len(sampler) == 12


def test_epoch_sampler_shards_and_tiles():
    whole = EpochSampler(size=7, sample_count=3, shuffle=False, start=0, step=1)
    assert list(whole) == [0, 1, 2, 0, 1, 2, 0]
    shard = EpochSampler(size=7, sample_count=3, shuffle=False, start=1, step=2)
    assert list(shard) == [1, 0, 2] and len(shard) == 3


def test_sharded_ranks_read_disjoint_slices_covering_the_data():
    ranks = [ShardedInfiniteSampler(sample_count=12, shuffle=True, seed=3, start=r, step=3) for r in range(3)]
    first_pass = [take(sampler, 4) for sampler in ranks]
    assert sorted(sum(first_pass, [])) == list(range(12))
    for sampler, indices in zip(ranks, first_pass):
        second_pass = take(sampler, 8)[4:]
        assert sorted(second_pass) == sorted(indices) and second_pass != indices


@pytest.mark.parametrize(
    "sampler_class,kwargs",
    [
        (ShardedInfiniteSampler, dict(sample_count=11, shuffle=True, seed=5, start=1, step=2)),
        (ShardedInfiniteSampler, dict(sample_count=9, shuffle=True, seed=5, use_new_shuffle_tensor_slice=True)),
        (ShardedInfiniteSampler, dict(sample_count=7, shuffle=False, start=2, step=3)),
        (InfiniteSampler, dict(sample_count=7, shuffle=True, seed=1, start=1, step=2)),
        (InfiniteSampler, dict(sample_count=7, shuffle=False, start=0, step=2)),
    ],
)
def test_advance_resumes_the_exact_stream_with_pass_numbers(sampler_class, kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = take(sampler_class(**kwargs).iter_with_pass(), 60)
        for advance in (0, 3, 5, 17, 31):
            resumed = sampler_class(**kwargs, advance=advance)
            assert take(resumed.iter_with_pass(), 20) == stream[advance : advance + 20]
            assert take(resumed, 20) == [index for index, _ in stream[advance : advance + 20]]


@pytest.mark.parametrize(
    "sampler",
    [
        ShardedInfiniteSampler(sample_count=10, shuffle=True, seed=0, start=1, step=2),
        InfiniteSampler(sample_count=10, shuffle=True, seed=0, start=1, step=2),
    ],
)
def test_pass_numbers_count_whole_passes_over_the_rank_slice(sampler):
    stream = take(sampler.iter_with_pass(), 25)
    passes = [p for _, p in stream]
    assert passes == sorted(passes) and passes[0] == 0 and passes[-1] == 4
    for number in range(4):
        indices = [i for i, p in stream if p == number]
        assert len(indices) == 5 and len(set(indices)) == 5


def test_sharded_sampler_drops_the_uneven_tail_with_a_warning():
    with pytest.warns(UserWarning, match="never used"):
        sampler = ShardedInfiniteSampler(sample_count=11, shuffle=True, start=0, step=2)
    first_pass = [i for i, p in take(sampler.iter_with_pass(), 10) if p == 0]
    assert len(first_pass) == 5


def test_samplers_default_to_rank_and_world_size_without_process_group():
    assert take(InfiniteSampler(sample_count=4), 6) == [0, 1, 2, 3, 0, 1]
    assert take(ShardedInfiniteSampler(sample_count=4), 6) == [0, 1, 2, 3, 0, 1]
    assert list(EpochSampler(size=3, sample_count=4)) == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [dict(sample_count=0), dict(sample_count=5, start=2, step=2), dict(sample_count=5, step=0), dict(sample_count=5, advance=-1)],
)
def test_bad_sampler_arguments_raise_user_errors(kwargs):
    with pytest.raises(UserError, match="sampler"):
        ShardedInfiniteSampler(**kwargs)


def test_sampler_type_names():
    assert {t.name for t in SamplerType} == {"DISTRIBUTED", "EPOCH", "INFINITE", "SHARDED_INFINITE", "SHARDED_INFINITE_NEW"}
