"""The typed SSL batch (dinov2/data/batch.py): upstream's dict in and out, the crop layout it
implies, the move to a device, and the masking collate every pipeline asks dinov2 for."""
import random

import pytest
import torch

from conftest import FIXTURES
from dinov2.data import SSLBatch, SSLMasks, make_pipeline, make_training_loader
from dinov2.data import collate as collate_module
from dinov2.data import pipelines as dino_pipelines
from dinov2.data.datasets import SyntheticImages
from dinov2.utils.config import get_cfg

UPSTREAM_KEYS = {"collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight",
                 "n_masked_patches", "upperbound"}  # fmt: skip
SMALL_CROPS = ["student.patch_size=14", "crops.global_crops_size=56", "crops.local_crops_size=28",
               "crops.local_crops_number=3"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def pipeline(name: str):
    return make_pipeline(get_cfg(opts=[f"train.pipeline={name}", *SMALL_CROPS]))


def upstream_batch() -> dict:
    return torch.load(FIXTURES / "meta_arch_centering.pt", weights_only=True)["steps"][0]["batch"]


class Studies:
    """Studies of 2 uint8 views of different sizes: items for the multi-view pipelines."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return [torch.randint(0, 256, (1, 60 + 4 * k + index, 70 - 3 * k), dtype=torch.uint8, generator=generator) for k in range(2)], index


def first_batch(name: str, batch_size: int = 4):
    """The first batch of the training loader (the run's real collate path), before any device stage."""
    data = Studies() if name.startswith("multiview") else SyntheticImages(n=8, size=64)
    return next(iter(make_training_loader(data, pipeline(name), batch_size=batch_size, num_workers=0, seed=3)))


# ------------------------------------------------------------------------------------ upstream's dict


def test_an_upstream_dict_round_trips_through_the_typed_batch():
    stored = upstream_batch()
    assert set(stored) == UPSTREAM_KEYS
    batch = SSLBatch.from_mapping(stored)
    for key in UPSTREAM_KEYS:
        assert batch[key] is stored[key] and getattr(batch, key) is stored[key]
    # what upstream's format leaves out: 2 global crops per image, all seen by the teacher
    assert batch.n_global_crops == 2 and batch.teacher_global_index.tolist() == list(range(8))
    assert set(batch) == set(batch.keys()) == UPSTREAM_KEYS | {"teacher_global_index", "n_global_crops"}
    as_dict = dict(batch.items())
    assert {key: as_dict[key] for key in UPSTREAM_KEYS} == stored
    again = SSLBatch.from_mapping(as_dict)
    assert all(again[key] is value for key, value in as_dict.items())
    assert SSLBatch.from_mapping(batch) is batch
    assert "collated_masks" in batch and "views" not in batch
    with pytest.raises(KeyError, match="views"):
        batch["views"]


def test_a_dict_without_a_batch_field_is_refused_naming_it():
    stored = upstream_batch()
    del stored["masks_weight"]
    with pytest.raises(KeyError, match="masks_weight"):
        SSLBatch.from_mapping(stored)


# ------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize(
    "name, n_global, n_teacher",
    [("dino", 2, 2), ("multiview", 4, 2)],  # multiview: 2 views x 2 global crops, the teacher sees one view's
)
def test_layout_properties_are_the_layout_the_meta_architecture_reads(name, n_global, n_teacher):
    batch = first_batch(name, batch_size=4)
    n_local = 3 * (2 if name == "multiview" else 1)
    assert isinstance(batch, SSLBatch)
    assert (batch.n_images, batch.n_global_crops, batch.n_local_crops, batch.n_teacher_crops) == (4, n_global, n_local, n_teacher)
    assert len(batch.collated_global_crops) == 4 * n_global and len(batch.collated_local_crops) == 4 * n_local
    assert len(batch.teacher_global_index) == 4 * n_teacher
    assert batch.n_loss_terms == (n_global + n_local) * n_teacher - n_teacher


def test_layout_of_an_upstream_dict():
    batch = SSLBatch.from_mapping(upstream_batch())
    assert (batch.n_images, batch.n_global_crops, batch.n_local_crops, batch.n_teacher_crops) == (4, 2, 2, 2)
    assert torch.equal(batch.teacher_global_index, torch.arange(8))  # upstream's teacher sees every global crop


# ------------------------------------------------------------------------------------ transfer


@pytest.mark.parametrize("name", ["dino", "multiview_device"])
def test_to_moves_every_tensor_and_keeps_the_counts(name):
    batch = first_batch(name)
    moved = batch.to("meta", non_blocking=True)
    assert type(moved) is type(batch) and moved.keys() == batch.keys()
    tensors = [value for _, value in moved.items() if isinstance(value, torch.Tensor)]
    if name == "multiview_device":  # the crop plans move with the views
        tensors += [getattr(plan, field) for plan in (moved.global_plan, moved.local_plan) for field in plan.__dataclass_fields__]
    assert len(tensors) >= 5 and all(tensor.is_meta for tensor in tensors)
    assert (moved.upperbound, moved.n_global_crops) == (batch.upperbound, batch.n_global_crops)
    assert all(value.device.type == "cpu" for _, value in batch.items() if isinstance(value, torch.Tensor))


def test_pipeline_to_device_types_an_upstream_dict_from_a_users_collate():
    moved = pipeline("dino").to_device(upstream_batch(), torch.device("cpu"))
    assert isinstance(moved, SSLBatch) and moved.n_images == 4


@pytest.mark.cuda
def test_pinning_keeps_the_type_of_the_batch():
    from torch.utils.data._utils.pin_memory import pin_memory

    for name in ("dino", "multiview_device"):
        pinned = pin_memory(first_batch(name))
        assert isinstance(pinned, SSLMasks) and pinned.collated_masks.is_pinned()
        assert isinstance(pipeline(name).to_device(pinned, torch.device("cuda")), SSLBatch)


# ------------------------------------------------------------------------------------ collates


@pytest.mark.parametrize("name", ["dino", "multiview", "multiview_device"])
def test_every_pipeline_gives_the_typed_batch(name):
    batch = first_batch(name)
    finish = pipeline(name).on_device
    if finish is not None:  # its collate draws the masks only; the crops come on the device
        assert isinstance(batch, SSLMasks) and not isinstance(batch, SSLBatch)
        batch = finish(batch)
    assert type(batch) is SSLBatch


def test_the_multiview_pipelines_never_build_the_dino_pipeline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("DINOv2's augmentation built")

    monkeypatch.setattr(dino_pipelines, "DataAugmentationDINO", refuse)
    with pytest.raises(AssertionError, match="augmentation built"):
        pipeline("dino")
    for name in ("multiview", "multiview_device"):
        assert first_batch(name).collated_masks.any()


def test_the_device_collate_stacks_no_crops(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("crops stacked")

    monkeypatch.setattr(collate_module, "_stack_crop_major", refuse)
    batch = first_batch("multiview_device")
    assert batch.collated_masks.shape == (4 * 4, 16) and batch.n_global_crops == 4


def test_masks_without_crops_are_the_masks_with_crops():
    """The masking collate's `masks` is what its full collate draws for the same samples and rng."""
    masking = collate_module.masking_collate(get_cfg(opts=SMALL_CROPS))
    crops = {"global_crops": [torch.zeros(3, 56, 56)] * 3, "local_crops": []}
    for samples in ([(crops, 0)] * 5, [(dict(crops, sample_seed=10 + i), 0) for i in range(5)]):
        rows = torch.tensor([0, 6, 12, 3, 9, 1, 7, 13, 4, 10])
        whole = masking(samples, random.Random(1), teacher_global_index=rows)
        masks = masking.masks(samples, random.Random(1), 3, teacher_global_index=rows)
        assert type(masks) is SSLMasks and whole.collated_masks.any()
        assert set(masks.keys()) == set(whole.keys()) - {"collated_global_crops", "collated_local_crops"}
        for key, value in masks.items():
            assert torch.equal(value, whole[key]) if isinstance(value, torch.Tensor) else value == whole[key], key
