"""Upstream's ImageNet dataset: the extra .npy files (written here or by upstream's dump_extra) and the image tree."""
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2 import extensions
from dinov2.data.datasets import image_net
from dinov2.data.registry import make_dataset
from dinov2.utils.errors import UserError

# labels.txt order is not the class-id order: class indices follow the sorted ids, as upstream's folder order does
LABELS = {"n02119789": "kit fox, Vulpes macrotis", "n01440764": "tench, Tinca tinca", "n01443537": "goldfish"}
CLASS_IDS = sorted(LABELS)
# train numbers are not zero-padded, so "_10" sorts before "_9" (upstream's order)
TRAIN_NUMBERS = (9, 10)
# a subset: val has no image of n01443537, yet n02119789 keeps its train class index (2)
VAL_FILES = {"n01440764": (7, 293), "n02119789": (49174,)}
TEST_NUMBERS = (3, 1)

# Upstream's dtypes, from facebookresearch/dinov2 dinov2/data/datasets/image_net.py (_dump_entries and
# _dump_class_ids_and_names): widths are the longest class id / name written.
ID_WIDTH, NAME_WIDTH = 9, len("kit fox, Vulpes macrotis")
INDEX_FIELDS = [("actual_index", "<u4"), ("class_index", "<u4")]
ENTRIES_DTYPE = np.dtype(INDEX_FIELDS + [("class_id", f"<U{ID_WIDTH}"), ("class_name", f"<U{NAME_WIDTH}")])
TEST_ENTRIES_DTYPE = np.dtype(INDEX_FIELDS + [("class_id", "<U0"), ("class_name", "<U0")])
TEST_CLASS_INDEX = 2**32 - 1  # upstream stores np.uint32(-1)


@pytest.fixture(autouse=True)
def _no_installed_extensions(monkeypatch):
    monkeypatch.setattr(extensions, "_loaded", True)


def _write_image(path, seed: int, grayscale: bool = False) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(6, 8) if grayscale else (6, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")


def _pixels(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@pytest.fixture
def imagenet_root(tmp_path):
    root = tmp_path / "imagenet"
    root.mkdir()
    (root / "labels.txt").write_text("".join(f'{cid},"{name}"\n' for cid, name in LABELS.items()))
    for c, class_id in enumerate(CLASS_IDS):
        for number in TRAIN_NUMBERS:
            _write_image(root / "train" / class_id / f"{class_id}_{number}.JPEG", seed=100 * c + number)
    for class_id, numbers in VAL_FILES.items():
        for number in numbers:
            path = root / "val" / class_id / f"ILSVRC2012_val_{number:08d}.JPEG"
            _write_image(path, seed=number, grayscale=number == 7)
    for number in TEST_NUMBERS:
        _write_image(root / "test" / f"ILSVRC2012_test_{number:08d}.JPEG", seed=7000 + number)
    return root


def _expected_train_items(root):
    """(path, class index) in upstream's order: class folders sorted, then file names sorted as strings."""
    items = []
    for class_index, class_id in enumerate(CLASS_IDS):
        names = sorted(f"{class_id}_{number}.JPEG" for number in TRAIN_NUMBERS)
        items += [(root / "train" / class_id / name, class_index) for name in names]
    return items


def test_dump_writes_upstream_dtypes_and_the_dataset_reads_the_tree(imagenet_root, tmp_path, capsys):
    extra = tmp_path / "extra"
    assert image_net.main(["--root", str(imagenet_root), "--extra", str(extra)]) == 0
    assert "TRAIN 6 images, VAL 3 images, TEST 2 images" in capsys.readouterr().out
    assert sorted(path.name for path in extra.iterdir()) == sorted(
        [f"entries-{s}.npy" for s in ("TRAIN", "VAL", "TEST")]
        + [f"{kind}-{s}.npy" for kind in ("class-ids", "class-names") for s in ("TRAIN", "VAL")]
    )
    assert np.load(extra / "entries-TRAIN.npy").dtype == ENTRIES_DTYPE
    assert np.load(extra / "class-ids-TRAIN.npy").dtype == np.dtype(f"<U{ID_WIDTH}")
    assert np.load(extra / "class-names-VAL.npy").dtype == np.dtype(f"<U{NAME_WIDTH}")
    test_entries = np.load(extra / "entries-TEST.npy")
    assert test_entries.dtype == TEST_ENTRIES_DTYPE
    assert test_entries["actual_index"].tolist() == sorted(TEST_NUMBERS)
    assert set(test_entries["class_index"].tolist()) == {TEST_CLASS_INDEX}

    train = make_dataset(f"ImageNet:split=TRAIN:root={imagenet_root}:extra={extra}")
    expected = _expected_train_items(imagenet_root)
    assert len(train) == len(expected) == 6
    for index, (path, class_index) in enumerate(expected):
        image, target = train[index]
        assert image.dtype == torch.uint8 and torch.equal(image, _pixels(path))
        assert target == class_index and train.get_class_id(index) == path.parent.name
    assert train.get_targets().tolist() == [class_index for _, class_index in expected]
    assert train.get_class_ids().tolist() == CLASS_IDS
    assert train.classes == [LABELS[class_id] for class_id in CLASS_IDS]  # names with commas round-trip
    names = [train.find_class_name(train.get_target(i)) for i in range(6)]
    assert names == [LABELS[path.parent.name] for path, _ in expected]

    val = make_dataset(f"ImageNet:split=VAL:root={imagenet_root}:extra={extra}")
    val_items = [(class_id, number) for class_id in sorted(VAL_FILES) for number in sorted(VAL_FILES[class_id])]
    assert len(val) == 3
    for index, (class_id, number) in enumerate(val_items):
        image, target = val[index]
        path = imagenet_root / "val" / class_id / f"ILSVRC2012_val_{number:08d}.JPEG"
        assert torch.equal(image, _pixels(path)) and image.shape[0] == 3  # grayscale files come as RGB, like upstream
        assert target == CLASS_IDS.index(class_id) and val.get_class_name(index) == LABELS[class_id]

    test = make_dataset(f"ImageNet:split=TEST:root={imagenet_root}:extra={extra}")
    image, target = test[1]
    assert target == -1 and test.get_targets().tolist() == [-1, -1] and test.get_class_id(1) is None
    assert torch.equal(image, _pixels(imagenet_root / "test" / f"ILSVRC2012_test_{max(TEST_NUMBERS):08d}.JPEG"))


def test_files_written_as_upstream_dump_extra_does_load(imagenet_root, tmp_path):
    """Hand-built like upstream's dump: class indices may differ from ours, class-ids cover max index + 1 only."""
    extra = tmp_path / "upstream_extra"
    extra.mkdir()
    rows = [(10, 1, "n01440764", LABELS["n01440764"]), (9, 0, "n02119789", LABELS["n02119789"])]
    np.save(extra / "entries-TRAIN.npy", np.array(rows, dtype=ENTRIES_DTYPE))
    np.save(extra / "class-ids-TRAIN.npy", np.array(["n02119789", "n01440764"], dtype=f"U{ID_WIDTH}"))
    names = [LABELS["n02119789"], LABELS["n01440764"]]
    np.save(extra / "class-names-TRAIN.npy", np.array(names, dtype=f"U{NAME_WIDTH}"))
    np.save(extra / "entries-TEST.npy", np.array([(1, TEST_CLASS_INDEX, "", "")], dtype=TEST_ENTRIES_DTYPE))

    train = make_dataset(f"ImageNet:split=TRAIN:root={imagenet_root}:extra={extra}")
    assert len(train) == 2
    for index, (number, class_index, class_id, name) in enumerate(rows):
        image, target = train[index]
        assert torch.equal(image, _pixels(imagenet_root / "train" / class_id / f"{class_id}_{number}.JPEG"))
        assert target == class_index
        assert train.find_class_id(target) == class_id and train.find_class_name(target) == name

    test = make_dataset(f"ImageNet:split=TEST:root={imagenet_root}:extra={extra}", target_transform=str)
    image, target = test[0]
    assert target == "-1" and test.classes == [] and test.get_class_names() is None
    assert torch.equal(image, _pixels(imagenet_root / "test" / "ILSVRC2012_test_00000001.JPEG"))

    restored = pickle.loads(pickle.dumps(train))  # what a spawned loader worker receives
    assert isinstance(restored._entries, np.memmap) and torch.equal(restored[1][0], train[1][0])


def test_missing_extra_file_names_it_and_the_command(imagenet_root, tmp_path):
    extra = tmp_path / "empty_extra"
    extra.mkdir()
    with pytest.raises(UserError) as error:
        make_dataset(f"ImageNet:split=VAL:root={imagenet_root}:extra={extra}")
    assert f"'{extra / 'entries-VAL.npy'}' not found" in str(error.value)
    assert f"python -m dinov2.data.datasets.image_net --root {imagenet_root} --extra {extra}" in str(error.value)

    np.save(extra / "entries-VAL.npy", np.array([(293, 0, "n01440764", "tench")], dtype=ENTRIES_DTYPE))
    np.save(extra / "class-ids-VAL.npy", np.array(["n01440764"]))
    with pytest.raises(UserError, match="class-names-VAL.npy' not found"):
        make_dataset(f"ImageNet:split=VAL:root={imagenet_root}:extra={extra}")


@pytest.mark.parametrize(
    "string, message",
    [
        ("ImageNet:split=train:root={root}:extra={root}", "unknown split 'train'; accepted: TRAIN, VAL, TEST"),
        ("ImageNet:split=TRAIN:root={root}/absent:extra={root}", "root '{root}/absent' is not a directory"),
        ("ImageNet:split=TRAIN:root={root}", "missing a required argument: 'extra'"),
    ],
)
def test_bad_dataset_string_is_one_clear_error(imagenet_root, string, message):
    with pytest.raises(UserError) as error:
        make_dataset(string.format(root=imagenet_root))
    assert message.format(root=imagenet_root) in str(error.value)


def test_dump_rejects_what_the_dataset_could_not_read_back(imagenet_root, tmp_path):
    extra = tmp_path / "extra"
    padded = imagenet_root / "train" / "n01440764" / "n01440764_0009.JPEG"  # would be looked up as ..._9.JPEG
    _write_image(padded, seed=1)
    with pytest.raises(UserError) as error:
        image_net.dump_extra(imagenet_root, extra)
    assert f"'{padded}'" in str(error.value) and "train/n01440764/n01440764_<number>.JPEG" in str(error.value)
    padded.unlink()

    _write_image(imagenet_root / "val" / "n09999999" / "ILSVRC2012_val_00000001.JPEG", seed=2)
    with pytest.raises(UserError, match=r"class folder '.*n09999999' is not listed in '.*labels.txt'"):
        image_net.dump_extra(imagenet_root, extra)
    assert not extra.exists()  # TRAIN was fine, but a failed run writes nothing

    (imagenet_root / "labels.txt").unlink()
    with pytest.raises(UserError, match="labels.txt' not found"):
        image_net.dump_extra(imagenet_root, extra, [image_net.Split.TRAIN])


@pytest.mark.slow
def test_command_line_runs_as_module_and_reports_errors(imagenet_root, tmp_path):
    """`python -m` runs a module its package already imported: no warning may reach the user."""
    extra = tmp_path / "extra"
    command = [sys.executable, "-m", "dinov2.data.datasets.image_net", "--root", str(imagenet_root), "--splits", "TEST"]
    done = subprocess.run([*command, "--extra", str(extra)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    assert done.stdout.strip() == f"wrote extra files to {extra}: TEST 2 images"

    (imagenet_root / "test").rename(imagenet_root / "moved")
    with pytest.raises(UserError, match=f"split folder '{imagenet_root / 'test'}' not found"):
        image_net.main(["--root", str(imagenet_root), "--extra", str(extra), "--splits", "TEST"])
