"""Pure-torch augmentation ops and DataAugmentationDINO: geometry, colour maths, randomness."""
import colorsys
import math

import pytest
import torch

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.transforms import (
    ColorJitter,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSolarize,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    random_resized_crop_params,
    resized_crop,
    to_float_rgb,
)

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coordinate_image(height: int, width: int) -> torch.Tensor:
    """Float image whose channel 0 is the column, channel 1 the row (in pixels / 100)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack((cols, rows, torch.zeros_like(rows))).float() / 100


def test_to_float_rgb_scales_and_repeats_gray():
    gray = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    rgb = to_float_rgb(gray)
    assert rgb.shape == (3, 2, 2) and rgb.dtype == torch.float32
    assert torch.equal(rgb[0], rgb[2]) and torch.allclose(rgb[0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_float_rgb(torch.zeros(2, 4, 4))


def test_crop_params_stay_inside_and_respect_scale_and_ratio():
    generator = _generator()
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(60, 80, (0.2, 0.6), (3 / 4, 4 / 3), generator)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        # rounding h and w moves area and aspect by at most one pixel
        assert 0.2 * 4800 - (h + w) <= h * w <= 0.6 * 4800 + (h + w)
        assert 3 / 4 - 1 / h <= w / h <= 4 / 3 + 1 / h


def test_crop_falls_back_to_centre_crop_with_clamped_ratio():
    # no crop of the full area with aspect <= 4/3 fits a 10 x 100 strip: 10 tries fail
    assert random_resized_crop_params(10, 100, (1.0, 1.0), (3 / 4, 4 / 3), _generator()) == (0, 43, 10, 13)
    assert random_resized_crop_params(100, 10, (1.0, 1.0), (3 / 4, 4 / 3), _generator()) == (43, 0, 13, 10)


def test_resized_crop_without_resize_is_exact_sub_image():
    image = _coordinate_image(20, 30)
    crop = resized_crop(image, top=3, left=5, h=8, w=8, size=8)
    assert torch.equal(crop, image[:, 3:11, 5:13])


def test_resized_crop_downscales_a_linear_ramp_to_its_pixel_centres():
    image = _coordinate_image(16, 16) / 2  # values in [0, 0.075]: no clamping
    crop = resized_crop(image, 0, 0, 16, 16, size=8)
    # area-averaging a linear ramp by 2 gives the mean of each pixel pair (interior columns)
    expected = (torch.arange(8) * 2 + 0.5) / 200
    assert torch.allclose(crop[0, 4, 2:6], expected[2:6], atol=1e-6)


def test_full_crop_of_square_image_is_the_image():
    image = _coordinate_image(12, 12)
    crop = RandomResizedCrop(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image, _generator())
    assert torch.equal(crop, image)


def test_horizontal_flip_mirrors_columns_about_half_the_time():
    image = _coordinate_image(4, 6)
    flip = RandomHorizontalFlip(p=0.5)
    generator = _generator(1)
    outcomes = [flip(image, generator) for _ in range(400)]
    flipped = [torch.equal(out[0], image[0].flip(-1)) for out in outcomes]
    assert all(f or torch.equal(out, image) for f, out in zip(flipped, outcomes))
    assert 160 < sum(flipped) < 240
    assert torch.equal(outcomes[flipped.index(True)][0, 0], torch.tensor([5, 4, 3, 2, 1, 0]) / 100)


def test_hue_shift_matches_colorsys():
    pixels = torch.rand(3, 5, 5, generator=_generator(2))
    shifted = adjust_hue(pixels, 0.25)
    for y, x in [(0, 0), (1, 3), (4, 4), (2, 2)]:
        h, s, v = colorsys.rgb_to_hsv(*pixels[:, y, x].tolist())
        expected = colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v)
        assert torch.allclose(shifted[:, y, x], torch.tensor(expected), atol=1e-5)


def test_saturation_and_contrast_zero_give_gray_and_flat_images():
    image = torch.rand(3, 6, 6, generator=_generator(3))
    gray = adjust_saturation(image, 0.0)
    luma = 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    assert torch.allclose(gray, luma.expand(3, -1, -1), atol=1e-6)
    flat = adjust_contrast(image, 0.0)
    assert torch.allclose(flat, luma.mean().expand_as(image), atol=1e-6)


def test_colour_jitter_leaves_a_gray_image_gray():
    gray = torch.rand(1, 8, 8, generator=_generator(4)).expand(3, -1, -1)
    out = ColorJitter(0.4, 0.4, 0.2, 0.1)(gray, _generator(5))
    assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[1], out[2], atol=1e-6)


def test_gaussian_blur_preserves_constant_and_mass_and_matches_kernel():
    constant = torch.full((3, 12, 12), 0.3)
    assert torch.allclose(gaussian_blur(constant, 9, 1.5), constant, atol=1e-6)
    impulse = torch.zeros(3, 21, 21)
    impulse[:, 10, 10] = 1.0
    blurred = gaussian_blur(impulse, 9, 1.0)
    assert math.isclose(blurred[0].sum().item(), 1.0, rel_tol=1e-5)
    weights = torch.exp(-0.5 * torch.arange(-4.0, 5.0) ** 2)
    weights = weights / weights.sum()
    assert torch.allclose(blurred[0, 10, 6:15], weights * weights[4], atol=1e-7)


def test_solarize_inverts_above_threshold_only():
    image = torch.tensor([0.0, 0.5, 127 / 255, 128 / 255, 1.0]).view(1, 1, 5).expand(3, -1, -1)
    out = RandomSolarize(threshold=128, p=1.0)(image, _generator())
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.5, 127 / 255, 127 / 255, 0.0]))


@pytest.fixture
def augmentation():
    return DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, global_crops_size=28, local_crops_size=14)


def test_dino_augmentation_shapes_dtypes_and_ranges(augmentation):
    image = torch.randint(0, 256, (1, 50, 40), dtype=torch.uint8, generator=_generator(6))
    out = augmentation(image, _generator(7))
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3 and out["offsets"] == ()
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"]))
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.dtype == torch.float32
        pixels = crop * STD + MEAN  # undo the normalisation
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert [c.shape for c in out["global_crops"]] == [(3, 28, 28)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 14, 14)] * 3


def test_dino_augmentation_is_a_function_of_the_generator(augmentation):
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=_generator(8))
    first = augmentation(image, _generator(9))
    torch.manual_seed(123)  # the global RNG must not matter
    second = augmentation(image, _generator(9))
    other = augmentation(image, _generator(10))
    for a, b in zip(first["global_crops"] + first["local_crops"], second["global_crops"] + second["local_crops"]):
        assert torch.equal(a, b)
    assert not torch.equal(first["global_crops"][0], other["global_crops"][0])


def test_first_global_crop_is_never_blurred_and_second_mostly_is():
    """Upstream's inverted blur probabilities: 0 for the first global crop, 0.9 for the second.

    A full-image crop of a 0/1 checkerboard has mean neighbour difference 1; colour jitter can
    shrink it to 0.6 * 0.6 = 0.36 at worst, while a blur with sigma >= 0.6 (3/4 of the sigma
    range) or solarisation (p 0.2) takes it below 0.3.
    """
    checker = torch.zeros(1, 32, 32, dtype=torch.uint8)
    checker[:, ::2, 1::2] = checker[:, 1::2, ::2] = 255
    augmentation = DataAugmentationDINO((1.0, 1.0), (0.5, 0.5), 0, global_crops_size=32, local_crops_size=16)
    n_draws = 100
    flattened = [0, 0]
    for seed in range(n_draws):
        out = augmentation(checker, _generator(seed))
        for index, crop in enumerate(out["global_crops"]):
            pixels = crop * STD
            flattened[index] += (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean().item() < 0.3
    assert flattened[0] == 0
    assert 0.55 * n_draws < flattened[1] < 0.95 * n_draws
