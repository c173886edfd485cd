"""Multi-view augmentation, collate and pipeline: which view each crop comes from, what the teacher
sees, where the iBOT masks go, which crop pairs the loss compares, and the shipped configs."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.configs import get_default_config
from dinov2.data import make_pipeline
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import get_cfg
from dinov2.utils.errors import UserError
from vet_ext.pretraining.augment import MultiViewAugmentation
from vet_ext.pretraining.pipelines import select_studies

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "vetdino").glob("*.yaml"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_PHOTOMETRY = ["multiview.intensity_probability=0", "multiview.solarize_probability=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(*opts: str):
    """Defaults with vet_ext's keys, multiview pipeline, small crops (2 global + 2 local per view)."""
    base = ["train.pipeline=multiview", "student.patch_size=14", "crops.global_crops_size=56",
            "crops.local_crops_size=28", "crops.local_crops_number=2"]
    return get_cfg(opts=[*base, *opts])


def constant_study(*values: int, size: int = 64) -> list[torch.Tensor]:
    """One view per value, every pixel that gray level: a crop's mean tells which view it came from."""
    return [torch.full((1, size, size + 8 * k), value, dtype=torch.uint8) for k, value in enumerate(values)]


def gray_level(crop: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: the crop's [0, 255] gray value per channel, averaged over pixels."""
    pixels = crop * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return pixels.mean(dim=(1, 2)) * 255


def source_value(crop: torch.Tensor) -> int:
    levels = gray_level(crop)
    assert torch.allclose(levels, levels[0], atol=1e-3), "channels differ"
    return int(round(float(levels[0])))


def augment(augmentation, views, seed: int) -> dict:
    return augmentation(views, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ augmentation


def test_two_different_views_and_the_teacher_sees_one_of_them():
    augmentation = MultiViewAugmentation.from_config(config(*NO_PHOTOMETRY))
    values = (30, 120, 210)
    pairs, teacher_views = set(), set()
    for seed in range(60):
        out = augment(augmentation, constant_study(*values), seed)
        i, j = out["view_indices"]
        assert i != j
        pairs.add((i, j))
        teacher_views.add(out["teacher_view"])
        assert [source_value(c) for c in out["global_crops"]] == [values[i]] * 2 + [values[j]] * 2
        assert [source_value(c) for c in out["local_crops"]] == [values[i]] * 2 + [values[j]] * 2
        teacher_crops = out["global_crops"][2 * out["teacher_view"] : 2 * out["teacher_view"] + 2]
        assert {source_value(c) for c in teacher_crops} == {values[(i, j)[out["teacher_view"]]]}
    assert pairs == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert teacher_views == {0, 1}


def test_one_view_study_pairs_its_image_with_itself():
    augmentation = MultiViewAugmentation.from_config(config(*NO_PHOTOMETRY))
    out = augment(augmentation, constant_study(77), seed=3)
    assert out["view_indices"] == (0, 0)
    assert {source_value(c) for c in out["global_crops"] + out["local_crops"]} == {77}


def ramp_study(n_views: int = 2, size: int = 80) -> list[torch.Tensor]:
    """Views that brighten from left to right, with texture: a flip or a colour change would show."""
    ramp = torch.linspace(20, 150, size).expand(size, size)  # room for brightening without saturating
    texture = torch.rand(size, size, generator=torch.Generator().manual_seed(0)) * 10
    return [(ramp + texture + 5 * k).clamp(0, 255).to(torch.uint8)[None] for k in range(n_views)]


def _left_right_difference(crop: torch.Tensor) -> float:
    width = crop.shape[-1]
    return float(crop[..., width // 2 :].mean() - crop[..., : width // 2].mean())


@pytest.mark.parametrize("flip, expected_sign", [(0.0, 1), (1.0, -1)])
def test_horizontal_flip_follows_its_probability(flip, expected_sign):
    """Default 0: a flip swaps left and right, i.e. the laterality a radiograph records."""
    cfg = config("multiview.solarize_probability=0", f"multiview.hflip_probability={flip}")
    augmentation = MultiViewAugmentation.from_config(cfg)
    for seed in range(10):
        out = augment(augmentation, ramp_study(), seed)
        for crop in out["global_crops"]:  # brightness, contrast, gamma and blur keep the ramp's direction
            assert np.sign(_left_right_difference(crop)) == expected_sign


def test_full_photometry_changes_gray_levels_but_keeps_the_three_channels_equal():
    """No hue or saturation change: every crop stays gray (source_value checks the channels agree)."""
    augmentation = MultiViewAugmentation.from_config(config())
    values = (60, 200)
    levels = []
    for seed in range(20):
        out = augment(augmentation, constant_study(*values), seed)
        i, j = out["view_indices"]
        sources = [values[i]] * 2 + [values[j]] * 2 + [values[i]] * 2 + [values[j]] * 2
        levels += [source_value(c) - source for c, source in zip(out["global_crops"] + out["local_crops"], sources)]
    changed = np.abs(levels) > 1
    assert 0.6 < changed.mean() < 0.95  # intensity p 0.8, solarisation p 0.2 on second global crops
    assert np.std(levels) > 10


def test_same_seed_same_crops_other_seed_other_crops():
    augmentation = MultiViewAugmentation.from_config(config())
    first, again, other = (augment(augmentation, ramp_study(3), seed) for seed in (5, 5, 6))
    for key in ("global_crops", "local_crops"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], again[key]))
    assert (first["view_indices"], first["teacher_view"]) == (again["view_indices"], again["teacher_view"])
    assert not all(torch.equal(a, b) for a, b in zip(first["global_crops"], other["global_crops"]))


@pytest.mark.parametrize(
    "opt, key",
    [
        ("multiview.gamma_range=[0,1]", "multiview.gamma_range"),
        ("multiview.global_blur_probability=[0.1,0.2,0.3]", "multiview.global_blur_probability"),
        ("multiview.solarize_probability=1.5", "multiview.solarize_probability"),
    ],
)
def test_bad_multiview_settings_name_the_key(opt, key):
    with pytest.raises(UserError, match=key):
        MultiViewAugmentation.from_config(config(opt))


# ------------------------------------------------------------------------------------ study selection


class FakeStudies:
    """A study-level dataset whose studies have 1, 2, 1 and 3 views."""

    study_offsets = np.array([0, 1, 3, 4, 7])

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return constant_study(*[index] * int(np.diff(self.study_offsets)[index])), index


def test_min_views_per_study_drops_studies_with_fewer_views():
    dataset = FakeStudies()
    assert select_studies(dataset, config()) is dataset  # default 1 keeps every study
    two = select_studies(dataset, config("crops.min_views_per_study=2"))
    assert len(two) == 2
    assert [two[i][1] for i in range(len(two))] == [1, 3]
    assert [len(two[i][0]) for i in range(len(two))] == [2, 3]
    with pytest.raises(UserError, match="crops.min_views_per_study=4"):
        select_studies(dataset, config("crops.min_views_per_study=4"))
    with pytest.raises(UserError, match="crops.min_views_per_study"):
        select_studies(dataset, config("crops.min_views_per_study=0"))
    with pytest.raises(UserError, match="study-level"):
        select_studies([("image", 0)], config("crops.min_views_per_study=2"))


# ------------------------------------------------------------------------------------ collate


def collated_batch(n_studies: int, *opts: str, seed: int = 0) -> tuple[dict, list[dict]]:
    """A batch from the registered "multiview" pipeline; study b's views have gray levels 10b+1, 10b+5."""
    pipeline = make_pipeline(config(*NO_PHOTOMETRY, *opts))
    samples = [
        (pipeline.transform(constant_study(10 * b + 1, 10 * b + 5), torch.Generator().manual_seed(seed + b)), b)
        for b in range(n_studies)
    ]
    return pipeline.collate(samples, random.Random(seed)), [crops for crops, _ in samples]


def test_collate_stacks_both_views_crop_major_and_indexes_the_teacher_view():
    n_studies = 6
    batch, crops = collated_batch(n_studies)
    assert batch["collated_global_crops"].shape == (4 * n_studies, 3, 56, 56)
    assert batch["collated_local_crops"].shape == (4 * n_studies, 3, 28, 28)
    assert batch["n_global_crops"] == 4
    teacher_views = [c["teacher_view"] for c in crops]
    assert len(set(teacher_views)) == 2, "seeds chosen so that both teacher views occur"
    rows = batch["collated_global_crops"]
    for b, sample in enumerate(crops):
        i, j = sample["view_indices"]
        own_values = [10 * b + 1, 10 * b + 5]
        assert [source_value(rows[crop * n_studies + b]) for crop in range(4)] == [own_values[i]] * 2 + [own_values[j]] * 2
    expected = [(2 * teacher_views[b] + j) * n_studies + b for j in range(2) for b in range(n_studies)]
    assert batch["teacher_global_index"].tolist() == expected
    # the teacher's crop j of study b is the global crop j of the study's teacher view
    teacher_rows = rows.index_select(0, batch["teacher_global_index"])
    for j in range(2):
        for b, sample in enumerate(crops):
            view = sample["view_indices"][sample["teacher_view"]]
            assert source_value(teacher_rows[j * n_studies + b]) == [10 * b + 1, 10 * b + 5][view]


def test_masks_only_on_teacher_rows_stratified_and_consistent():
    n_studies = 8
    batch, _ = collated_batch(n_studies, "crops.global_crops_size=112", seed=1)
    masks = batch["collated_masks"]
    assert masks.shape == (4 * n_studies, (112 // 14) ** 2) and masks.dtype == torch.bool
    teacher = torch.zeros(4 * n_studies, dtype=torch.bool)
    teacher[batch["teacher_global_index"]] = True
    assert not masks[~teacher].any()
    masked_rows = masks.sum(1)
    assert int((masked_rows > 0).sum()) == int(2 * n_studies * 0.5)  # mask_sample_probability of the teacher rows
    # stratified ratios: the masked counts spread over [0.1, 0.5] of the 64 tokens, one per stratum
    counts = sorted(masked_rows[masked_rows > 0].tolist())
    assert counts[0] <= 64 * (0.1 + 0.4 / 8) and counts[-1] >= 64 * (0.5 - 0.4 / 8) - 3
    assert torch.equal(batch["mask_indices_list"], masks.flatten().nonzero().flatten())
    row_of_token = batch["mask_indices_list"] // masks.shape[1]
    torch.testing.assert_close(batch["masks_weight"], 1.0 / masked_rows[row_of_token].float())
    assert int(batch["n_masked_patches"]) == int(masks.sum()) <= batch["upperbound"]


def test_every_student_crop_pairs_with_each_teacher_crop_but_itself():
    n_studies = 4
    batch, _ = collated_batch(n_studies, "crops.local_crops_number=10", "crops.local_crops_size=14")
    assert (batch.n_images, batch.n_global_crops, batch.n_local_crops, batch.n_teacher_crops) == (4, 4, 20, 2)
    assert batch.n_loss_terms == 4 * 2 - 2 + 20 * 2
    pairs = SSLMetaArch._distinct_crop_pairs(batch)  # [student global crop, teacher crop, study]
    assert pairs.shape == (4, 2, n_studies)
    assert torch.equal(pairs.sum(dim=(0, 1)), torch.full((n_studies,), 4 * 2 - 2.0))
    for b in range(n_studies):
        for j in range(2):
            student_crop_equal_to_teacher = int(batch["teacher_global_index"][j * n_studies + b]) // n_studies
            assert pairs[student_crop_equal_to_teacher, j, b] == 0


def test_collate_is_deterministic_for_a_seed():
    first, _ = collated_batch(4, seed=2)
    again, _ = collated_batch(4, seed=2)
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "teacher_global_index"):
        assert torch.equal(first[key], again[key])


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_pass_the_strict_key_check(path):
    cfg = get_cfg(path)
    assert cfg.student.patch_size == 14
    assert (cfg.student.num_register_tokens, cfg.student.interpolate_antialias, cfg.student.interpolate_offset) == (4, True, 0.0)
    assert cfg.crops.global_crops_size % 14 == 0 and cfg.crops.local_crops_size % 14 == 0
    expected = {"multiview": ("VetStudies:", "multiview"), "singleview": ("VetImages:", "dino"), "demo": ("VetStudies:", "multiview")}
    prefix, pipeline = expected[path.stem.split("_")[0]]
    assert cfg.train.dataset_path.startswith(prefix) and cfg.train.pipeline == pipeline
    make_pipeline(cfg)  # the crop and mask settings build


def test_release_configs_fine_tune_gently():
    for path in CONFIGS:
        if path.stem.startswith(("multiview", "singleview")):
            cfg = get_cfg(path)
            assert cfg.optim.base_lr < get_default_config().optim.base_lr / 10
            assert cfg.train.head_warmup_iterations > 0 and cfg.optim.layerwise_decay < 1
            assert 0.994 <= cfg.teacher.momentum_teacher <= 0.996
            assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number) == (224, 98, 10)
            assert list(cfg.crops.mean) == list(MEAN) and list(cfg.crops.std) == list(STD)
