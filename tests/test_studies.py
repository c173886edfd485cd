"""VetStudies / VetImages over a prepared folder: pixels, view order, targets, registry, errors."""
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from dinov2.data.registry import make_dataset
from dinov2.utils.errors import UserError
from test_prepare import CACHE_SIZE, LABELS, config, make_tree
from vet_ext.ingestion.cache import to_cache_image
from vet_ext.ingestion.dicom import read_dicom
from vet_ext.ingestion.prepare import prepare
from vet_ext.pretraining.datasets import VetImages, VetStudies
from vet_ext.ingestion.views import VIEW_CODES


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six studies split over train/val/test (study 1 has three views, study 2 a 2-frame image)."""
    root = tmp_path_factory.mktemp("studies")
    tree = make_tree(root / "RAW", n_studies=6)
    prepare(config(root / "RAW", root / "DATA", val_fraction=0.3, test_fraction=0.3))
    manifest = pd.read_parquet(root / "DATA" / "manifest.parquet")
    assert set(manifest["split"]) == {"train", "val", "test"}, "fixture needs every split populated"
    return root, tree, manifest


def source_image(root, row) -> torch.Tensor:
    """What the cache should hold for a manifest row, straight from the DICOM file."""
    frame = read_dicom(root / "RAW" / row.source_path).frames[row.frame]
    return torch.from_numpy(to_cache_image(frame, CACHE_SIZE)).unsqueeze(0)


def expected_target(tree, study_id: str, columns=LABELS) -> list[float]:
    values = dict(zip(LABELS, tree["labels"].get(study_id, (math.nan, math.nan))))
    return [float(values[c]) for c in columns]


def test_every_study_appears_once_across_splits(data):
    root, tree, manifest = data
    seen = []
    for split in ("train", "val", "test"):
        dataset = VetStudies(root / "DATA", split=split)
        assert len(dataset) == manifest.loc[manifest["split"] == split, "study_id"].nunique()
        seen += list(dataset.study_ids)
    assert sorted(seen) == sorted(manifest["study_id"].unique())


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_study_items_hold_the_source_pixels_in_view_order(data, split):
    root, tree, manifest = data
    dataset = VetStudies(root / "DATA", split=split)
    for index, study_id in enumerate(dataset.study_ids):
        rows = manifest[manifest["study_id"] == study_id]
        views, target = dataset[index]
        assert dataset.view_codes(index) == list(rows["view"])
        assert dataset.view_codes(index) == sorted(dataset.view_codes(index), key=VIEW_CODES.index)
        assert len(views) == len(rows)
        for view, row in zip(views, rows.itertuples()):
            assert view.dtype == torch.uint8 and view.shape == (1, row.height, row.width)
            assert torch.equal(view, source_image(root, row))
        assert target.dtype == torch.float32
        np.testing.assert_array_equal(target.numpy(), expected_target(tree, study_id))


def test_study_targets_follow_the_chosen_labels(data):
    root, tree, _ = data
    dataset = VetStudies(root / "DATA", split="train", label="mass")
    targets = dataset.get_targets()
    assert targets.shape == (len(dataset), 1)
    for study_id, row in zip(dataset.study_ids, targets):
        np.testing.assert_array_equal(row, expected_target(tree, study_id, ["mass"]))
    offsets = dataset.study_offsets
    assert np.array_equal(np.diff(offsets), [len(dataset[i][0]) for i in range(len(dataset))])
    assert len(dataset.image_ids) == offsets[-1]


def test_image_items_and_single_label_targets(data):
    root, tree, manifest = data
    dataset = VetImages(root / "DATA", split="val", label="cardiomegaly")
    rows = manifest[manifest["split"] == "val"]
    assert len(dataset) == len(rows)
    assert list(dataset.image_ids) == list(rows["image_id"]) and list(dataset.study_ids) == list(rows["study_id"])
    for index, row in enumerate(rows.itertuples()):
        image, target = dataset[index]
        assert torch.equal(image, source_image(root, row))
        expected = tree["labels"].get(row.study_id, (-1, -1))[0]
        assert isinstance(target, int) and target == expected
        assert dataset.view_codes(index) == [row.view]
    assert dataset.get_targets().dtype == np.int64
    assert list(dataset.get_targets()) == [tree["labels"].get(s, (-1, -1))[0] for s in rows["study_id"]]


@pytest.mark.parametrize("kwargs", [{"labels": "all"}, {}, {"label": ["cardiomegaly", "mass"]}, {"labels": "cardiomegaly,mass"}])
def test_image_multi_label_targets_are_float_vectors(data, kwargs):
    root, tree, manifest = data
    dataset = VetImages(root / "DATA", split="test", **kwargs)
    rows = manifest[manifest["split"] == "test"]
    for index, study_id in enumerate(rows["study_id"]):
        _, target = dataset[index]
        assert target.dtype == torch.float32
        np.testing.assert_array_equal(target.numpy(), expected_target(tree, study_id))
    assert dataset.get_targets().shape == (len(rows), 2)


def test_transforms_are_applied(data):
    root = data[0]
    dataset = VetStudies(root / "DATA", transform=lambda views: len(views), target_transform=lambda t: t.sum())
    views, target = dataset[0]
    assert views == len(VetStudies(root / "DATA")[0][0]) and target.ndim == 0


def test_registered_dataset_strings(data):
    root = data[0]
    studies = make_dataset(f"VetStudies:root={root / 'DATA'}:split=val")
    assert isinstance(studies, VetStudies) and len(studies) == len(VetStudies(root / "DATA", split="val"))
    images = make_dataset(f"VetImages:root={root / 'DATA'}:split=train:label=mass:label=cardiomegaly")
    assert isinstance(images, VetImages) and images.target_columns == ["mass", "cardiomegaly"]
    with pytest.raises(UserError, match="unknown key 'lable'"):
        make_dataset(f"VetImages:root={root / 'DATA'}:lable=mass")


def test_workers_and_pickling_read_the_same_pixels(data):
    root = data[0]
    dataset = VetImages(root / "DATA", split="train", label="mass")
    direct = [dataset[i][0] for i in range(len(dataset))]
    copy = pickle.loads(pickle.dumps(dataset))  # a spawned worker's copy reopens the shards itself
    assert all(torch.equal(copy[i][0], direct[i]) for i in range(len(dataset)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert all(torch.equal(image, direct[i]) for i, (image, _) in enumerate(loader))


def test_user_errors_name_the_problem(data, tmp_path):
    root = data[0] / "DATA"
    with pytest.raises(UserError, match=f"VetStudies: root '{tmp_path / 'nope'}' does not exist"):
        VetStudies(tmp_path / "nope")
    with pytest.raises(UserError, match=f"VetImages: no manifest.parquet in '{tmp_path}'"):
        VetImages(tmp_path)
    with pytest.raises(UserError, match="unknown split 'training'; valid splits: train, val, test"):
        VetStudies(root, split="training")
    with pytest.raises(UserError, match="unknown label 'fracture' .*; valid labels: cardiomegaly, mass"):
        VetImages(root, label="fracture")
    with pytest.raises(UserError, match="unknown label 'x'"):
        VetStudies(root, labels="mass,x")
    with pytest.raises(UserError, match="label= or labels=, not both"):
        VetImages(root, label="mass", labels="all")
