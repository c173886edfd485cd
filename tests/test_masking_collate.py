"""iBOT mask generator and SSL collate against upstream DINOv2 (masking.json, meta_arch_*.pt)."""
import json
import math
import random

import numpy as np
import pytest
import torch

from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator


@pytest.fixture(scope="module")
def masking_reference():
    from conftest import FIXTURES

    return json.loads((FIXTURES / "masking.json").read_text())


def train_generator(global_size: int = 224, patch_size: int = 14) -> MaskingGenerator:
    """The generator as DINOv2's train.py builds it: half the grid at most per mask."""
    grid = global_size // patch_size
    return MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)


def fake_samples(n_images, n_global=2, n_local=3, global_size=28, local_size=14):
    """Crops whose value encodes (image, kind, crop) so the collated order can be read back."""
    samples = []
    for image in range(n_images):
        crops = {
            "global_crops": [torch.full((3, global_size, global_size), 100.0 * image + c) for c in range(n_global)],
            "local_crops": [torch.full((3, local_size, local_size), 100.0 * image + 50 + c) for c in range(n_local)],
        }
        samples.append((crops, image))
    return samples


# ---------------------------------------------------------------- masking generator


def test_train_generator_parameters_match_upstream(masking_reference):
    ref = masking_reference["train_generator_224_p14"]
    generator = train_generator()
    assert generator.get_shape() == tuple(ref["input_size"])
    assert generator.num_patches == ref["num_patches"]
    assert generator.max_num_patches == ref["max_num_patches"]
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(generator.log_aspect_ratio, ref["log_aspect_ratio"]))
    assert "16, 16" in repr(generator)


def test_seeded_masks_are_bit_exact_with_module_random(masking_reference):
    ref = masking_reference["seeded_examples"]
    generator = train_generator()
    random.seed(ref["python_random_seed"])
    for example in ref["examples"]:
        mask = generator(example["requested"])
        assert mask.dtype == np.bool_ and mask.shape == (16, 16)
        np.testing.assert_array_equal(mask, np.array(example["mask"], dtype=bool))
        assert mask.sum() == example["count"]


def test_seeded_masks_are_bit_exact_with_private_rng(masking_reference):
    ref = masking_reference["seeded_examples"]
    generator = train_generator()
    rng = random.Random(ref["python_random_seed"])
    random.seed(0)  # the module-level state must not matter
    for example in ref["examples"]:
        np.testing.assert_array_equal(generator(example["requested"], rng=rng), np.array(example["mask"], dtype=bool))


@pytest.mark.parametrize("requested", [10, 51, 128])
def test_masked_count_never_exceeds_request_and_is_mostly_exact(masking_reference, requested):
    stats = masking_reference["masked_count_stats_224_p14"][str(requested)]
    generator = train_generator()
    rng = random.Random(requested)
    counts = np.array([generator(requested, rng=rng).sum() for _ in range(300)])
    assert counts.max() <= requested
    assert counts.min() >= stats["min"] - 1
    # upstream: exact 88-93 % of the time; 300 draws give a standard error of ~1.6 %
    assert abs((counts == requested).mean() - stats["fraction_exact"]) < 0.08


# ---------------------------------------------------------------- collate


def test_collate_keys_shapes_dtypes_match_upstream_example(masking_reference):
    ref = masking_reference["collate_example"]
    out = collate_data_and_cast(
        fake_samples(4), (0.1, 0.5), 0.5, torch.float32, n_tokens=4,
        mask_generator=MaskingGenerator((2, 2), max_num_patches=2.0), rng=random.Random(0),
    )
    for key, (shape, dtype) in ref["keys_shapes_dtypes"].items():
        if key == "upperbound":
            assert type(out[key]).__name__ == shape and out[key] == dtype
        elif key in ("mask_indices_list", "masks_weight"):  # length depends on the draws
            assert out[key].dtype == getattr(torch, dtype.split(".")[1])
            assert out[key].shape == (int(out["collated_masks"].sum()),)
        else:
            assert list(out[key].shape) == shape and str(out[key].dtype) == dtype
    assert set(out) == set(ref["keys_shapes_dtypes"]) | {"teacher_global_index", "n_global_crops"}


def test_collate_is_crop_major_and_casts():
    out = collate_data_and_cast(
        fake_samples(4), (0.1, 0.5), 0.5, torch.float16, mask_generator=MaskingGenerator((2, 2)), rng=random.Random(0)
    )
    global_ids = out["collated_global_crops"][:, 0, 0, 0].tolist()
    local_ids = out["collated_local_crops"][:, 0, 0, 0].tolist()
    assert global_ids == [100 * image + crop for crop in range(2) for image in range(4)]
    assert local_ids == [100 * image + 50 + crop for crop in range(3) for image in range(4)]
    assert out["collated_global_crops"].dtype == out["collated_local_crops"].dtype == torch.float16
    assert out["teacher_global_index"].dtype == torch.int64
    assert out["teacher_global_index"].tolist() == list(range(8))


def test_collate_handles_any_number_of_global_crops_and_no_local_crops():
    out = collate_data_and_cast(
        fake_samples(3, n_global=3, n_local=0), (0.1, 0.5), 0.5, torch.float32,
        mask_generator=MaskingGenerator((4, 4), max_num_patches=8.0), rng=random.Random(1),
    )
    assert out["collated_global_crops"].shape == (9, 3, 28, 28)
    assert out["collated_local_crops"].shape == (0, 3, 28, 28)
    assert out["collated_masks"].shape == (9, 16)
    assert (out["collated_masks"].sum(1) > 0).sum() <= int(9 * 0.5)
    assert out["teacher_global_index"].tolist() == list(range(9))
    assert out["n_global_crops"] == 3


@pytest.mark.parametrize("images_per_gpu", ["8", "32", "64"])
def test_collate_upperbound_matches_upstream(masking_reference, images_per_gpu):
    ref = masking_reference["collate_upperbound_224_p14"][images_per_gpu]
    samples = fake_samples(int(images_per_gpu), global_size=1, local_size=1, n_local=0)
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, 256, train_generator(), rng=random.Random(0))
    assert out["upperbound"] == ref["upperbound"]
    assert len(out["collated_masks"]) == ref["n_global_crops"]
    assert int(out["n_masked_patches"]) <= out["upperbound"]
    assert 0 < (out["collated_masks"].sum(1) > 0).sum() <= ref["n_samples_masked"]


@pytest.mark.parametrize("name", ["meta_arch_centering.pt", "meta_arch_sinkhorn.pt"])
def test_collate_reproduces_upstream_batch_masks(fixtures_dir, name):
    """The stored batch was collated right after random.seed(<generator seed>): same draws, same masks."""
    reference = torch.load(fixtures_dir / name, weights_only=True)
    batch = reference["steps"][0]["batch"]
    seed = json.loads((fixtures_dir / "masking.json").read_text())["meta"]["seed"]
    crops = reference["config"]["crops"]
    patch_size = reference["config"]["student"]["patch_size"]
    grid = crops["global_crops_size"] // patch_size
    samples = fake_samples(4, n_global=2, n_local=crops["local_crops_number"], global_size=2, local_size=1)
    ibot = reference["config"]["ibot"]
    out = collate_data_and_cast(
        samples, tuple(ibot["mask_ratio_min_max"]), ibot["mask_sample_probability"], torch.float32,
        n_tokens=grid * grid, mask_generator=train_generator(crops["global_crops_size"], patch_size), rng=random.Random(seed),
    )
    for key in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
        assert out[key].dtype == batch[key].dtype
        torch.testing.assert_close(out[key], batch[key], rtol=0, atol=0)
    assert out["upperbound"] == batch["upperbound"]
    assert out["collated_local_crops"].shape[0] == batch["collated_local_crops"].shape[0]


def test_collate_default_rng_is_module_random():
    kwargs = dict(mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32, mask_generator=train_generator())
    random.seed(7)
    with_module = collate_data_and_cast(fake_samples(4), **kwargs)
    with_private = collate_data_and_cast(fake_samples(4), **kwargs, rng=random.Random(7))
    assert torch.equal(with_module["collated_masks"], with_private["collated_masks"])
    assert with_module["collated_masks"].any()


def test_collate_weights_are_inverse_masked_count_of_each_image():
    out = collate_data_and_cast(fake_samples(8), (0.1, 0.5), 0.5, torch.float32, mask_generator=train_generator(), rng=random.Random(3))
    masks = out["collated_masks"]
    image_of_token = out["mask_indices_list"] // masks.shape[1]
    torch.testing.assert_close(out["masks_weight"], 1.0 / masks.sum(1)[image_of_token].float())
    assert torch.equal(masks.flatten().nonzero().flatten(), out["mask_indices_list"])
    # each masked image contributes weight 1 in total
    assert math.isclose(out["masks_weight"].sum().item(), (masks.sum(1) > 0).sum().item(), rel_tol=1e-5)


def test_collate_masks_only_the_rows_the_teacher_sees():
    """A teacher that sees a subset of the global crops: masks (probability, strata) over that subset only."""
    samples = fake_samples(6, n_global=4, n_local=0)
    teacher_rows = torch.tensor([12, 1, 8, 21, 4, 17, 2, 3, 0, 5, 23, 10])
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, mask_generator=train_generator(), rng=random.Random(4),
                                teacher_global_index=teacher_rows)
    masks = out["collated_masks"]
    assert masks.shape == (24, 256)
    outside = torch.ones(24, dtype=torch.bool)
    outside[teacher_rows] = False
    assert not masks[outside].any()
    assert int((masks.sum(1) > 0).sum()) == int(12 * 0.5)
    assert out["upperbound"] == sum(int(256 * high) for high in torch.linspace(0.1, 0.5, 7)[1:])
    assert torch.equal(out["teacher_global_index"], teacher_rows)
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())


@pytest.mark.parametrize("rows", [[0, 0, 1], [0, 8], [-1, 2], []])
def test_collate_refuses_teacher_rows_that_are_not_distinct_global_crops(rows):
    with pytest.raises(ValueError, match="teacher_global_index"):
        collate_data_and_cast(fake_samples(4), (0.1, 0.5), 0.5, torch.float32, mask_generator=train_generator(),
                              rng=random.Random(0), teacher_global_index=torch.tensor(rows, dtype=torch.int64))
