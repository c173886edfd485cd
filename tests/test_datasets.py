"""Dataset strings, the dataset/pipeline registries, extensions, Synthetic and ImageFolder."""
import importlib.metadata
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dinov2 import extensions
from dinov2.configs import dinov2_default_config
from dinov2.data import registry
from dinov2.data.datasets import ImageFolder, SyntheticImages
from dinov2.data.registry import make_dataset, make_pipeline, parse_dataset_str
from dinov2.utils.errors import UserError


@pytest.fixture(autouse=True)
def _no_installed_extensions(monkeypatch):
    """Tests see only the built-ins, whatever plug-ins are installed in the environment."""
    monkeypatch.setattr(extensions, "_loaded", True)


def test_parse_dataset_str_keeps_values_as_strings():
    assert parse_dataset_str("ImageFolder:root=/data/a=b:split=TRAIN") == (
        "ImageFolder",
        {"root": "/data/a=b", "split": "TRAIN"},
    )
    assert parse_dataset_str("Synthetic") == ("Synthetic", {})


def test_parse_dataset_str_collects_repeated_keys_in_order():
    name, kwargs = parse_dataset_str("Vet:label=a:split=train:label=b:label=c")
    assert name == "Vet"
    assert kwargs == {"label": ["a", "b", "c"], "split": "train"}


@pytest.mark.parametrize("bad, part", [("Synthetic:n", "'n'"), ("Synthetic:=3", "'=3'"), ("Synthetic:n=2:", "''")])
def test_parse_dataset_str_malformed_part_quotes_string_and_part(bad, part):
    with pytest.raises(UserError) as error:
        parse_dataset_str(bad)
    assert f"'{bad}'" in str(error.value) and part in str(error.value)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UserError) as error:
        make_dataset("ImageNet21k:split=TRAIN")
    message = str(error.value)
    assert message.startswith("unknown dataset 'ImageNet21k' in 'ImageNet21k:split=TRAIN'; known: ")
    assert "ImageFolder" in message and "ImageNet" in message and "Synthetic" in message


def test_upstream_default_imagenet_string_names_the_missing_key():
    """Upstream's default `ImageNet:split=TRAIN` is a known dataset that still needs root and extra."""
    with pytest.raises(UserError, match=r"dataset 'ImageNet' in 'ImageNet:split=TRAIN': .*'root'"):
        make_dataset("ImageNet:split=TRAIN")


def test_unknown_dataset_key_is_named_with_dataset():
    with pytest.raises(UserError, match=r"dataset 'Synthetic' in 'Synthetic:n=4:colour=red': unknown key 'colour'"):
        make_dataset("Synthetic:n=4:colour=red")


def test_missing_required_key_is_a_user_error():
    with pytest.raises(UserError, match="root"):
        make_dataset("ImageFolder")


def test_bad_synthetic_value_names_key():
    with pytest.raises(UserError, match="'n' must be a positive integer, got 'many'"):
        make_dataset("Synthetic:n=many")


def test_unknown_pipeline_lists_known():
    cfg = OmegaConf.create(dinov2_default_config)
    cfg.train.pipeline = "multiview_typo"
    with pytest.raises(UserError, match=r"unknown train.pipeline 'multiview_typo'; known: .*dino"):
        make_pipeline(cfg)


def _entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=extensions.EXTENSIONS_GROUP)


def test_extensions_are_loaded_once_and_a_broken_one_only_warns(monkeypatch, tmp_path):
    (tmp_path / "fake_dinov2_plugin.py").write_text(
        "from dinov2.data.registry import register_dataset\n"
        "calls = []\n"
        "def register():\n"
        "    calls.append(1)\n"
        "    register_dataset('PluginData')(lambda transform=None, target_transform=None, size='3': [size])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points = [
        _entry_point("broken", "no_such_module_for_dinov2:register"),
        _entry_point("fake", "fake_dinov2_plugin:register"),
    ]
    monkeypatch.setattr(
        extensions.importlib.metadata,
        "entry_points",
        lambda group: entry_points if group == extensions.EXTENSIONS_GROUP else [],
    )
    with registry.DATASETS.scope():  # entered while extensions count as loaded, so the plug-in's entry is undone
        monkeypatch.setattr(extensions, "_loaded", False)
        with pytest.warns(RuntimeWarning, match="'broken'"):
            assert make_dataset("PluginData:size=5") == ["5"]
        make_dataset("PluginData")
    assert sys.modules["fake_dinov2_plugin"].calls == [1]


def test_synthetic_is_deterministic_per_index():
    first = SyntheticImages(n=50, size=32)
    second = SyntheticImages(n=50, size=32)
    images = [first[i] for i in range(50)]
    for i in reversed(range(50)):  # other instance, other access order
        image, target = second[i]
        assert torch.equal(image, images[i][0]) and target == images[i][1] == i % 10
    assert images[0][0].dtype == torch.uint8 and images[0][0].shape == (3, 32, 32)
    assert not torch.equal(images[0][0], images[10][0])  # same class, different draw


def test_synthetic_via_string_and_transforms():
    dataset = make_dataset("Synthetic:n=7:size=16:classes=3", transform=lambda x: x.float(), target_transform=str)
    image, target = dataset[5]
    assert len(dataset) == 7 and image.dtype == torch.float32 and image.shape == (3, 16, 16) and target == "2"
    with pytest.raises(IndexError):
        dataset[7]


def test_synthetic_classes_are_separable_by_nearest_class_mean():
    dataset = SyntheticImages(n=600, size=32)
    features = torch.stack([torch.nn.functional.avg_pool2d(dataset.image(i).float(), 4).flatten() for i in range(600)])
    targets = torch.arange(600) % 10
    train, test = slice(0, 400), slice(400, 600)
    means = torch.stack([features[train][targets[train] == c].mean(0) for c in range(10)])
    predicted = torch.cdist(features[test], means).argmin(1)
    assert (predicted == targets[test]).float().mean() > 0.6  # chance is 0.1


def _write_tree(root):
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deep").mkdir(parents=True)
    rgb = np.zeros((5, 7, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 200, 255
    Image.fromarray(rgb).save(root / "cats" / "rgb.png")
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    Image.fromarray(gray).save(root / "dogs" / "deep" / "gray.PNG")
    wide = np.array([[0, 257, 65535], [32896, 514, 1000]], dtype=np.uint16)
    Image.fromarray(wide).save(root / "dogs" / "wide16.png")
    Image.fromarray(rgb).save(root / "dogs" / "photo.jpg", quality=95)
    (root / "dogs" / "notes.txt").write_text("not an image")
    Image.fromarray(gray).save(root / "loose.png")
    return rgb, gray, wide


def test_image_folder_reads_tree_with_classes_and_bit_depths(tmp_path):
    rgb, gray, wide = _write_tree(tmp_path)
    dataset = make_dataset(f"ImageFolder:root={tmp_path}")
    assert isinstance(dataset, ImageFolder) and len(dataset) == 5
    assert dataset.classes == ["cats", "dogs"]
    items = {path.relative_to(tmp_path).as_posix(): dataset[i] for i, path in enumerate(dataset.paths)}
    image, target = items["cats/rgb.png"]
    assert target == 0 and torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1))
    image, target = items["dogs/deep/gray.PNG"]
    assert target == 1 and image.shape == (1, 5, 7) and torch.equal(image[0], torch.from_numpy(gray))
    image, target = items["dogs/wide16.png"]
    assert image.dtype == torch.uint8 and image[0].tolist() == [[0, 1, 255], [128, 2, 4]]
    image, target = items["dogs/photo.jpg"]
    assert image.shape == (3, 5, 7) and (image.int() - torch.tensor([10, 200, 255])[:, None, None]).abs().max() <= 3
    assert items["loose.png"][1] == -1


def test_image_folder_without_subfolders_is_unlabelled(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    dataset = ImageFolder(str(tmp_path))
    assert dataset.classes == [] and dataset[0][1] == -1


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="missing_dir"):
        make_dataset(f"ImageFolder:root={tmp_path / 'missing_dir'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .* images under"):
        make_dataset(f"ImageFolder:root={tmp_path / 'empty'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    dataset = make_dataset(f"ImageFolder:root={tmp_path / 'bad'}")
    with pytest.raises(UserError, match="broken.png"):
        dataset[0]
