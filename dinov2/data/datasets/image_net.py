"""Upstream DINOv2's `ImageNet` dataset, so `ImageNet:split=TRAIN:root=R:extra=E` works with the files users have.

Upstream indexes the image tree once into `extra` .npy files (per split: entries, class ids, class names) so that a
training job never lists 1.3 M files; the same files, with the same names, dtypes and fields, are read and written
here, so extra folders made by upstream's `dump_extra` load unchanged. Layout under `root` (upstream's):

    labels.txt                                 "class_id,class_name" lines (names may be quoted)
    train/<class_id>/<class_id>_<index>.JPEG
    val/<class_id>/ILSVRC2012_val_<index:08d>.JPEG      (the folder is the validation label)
    test/ILSVRC2012_test_<index:08d>.JPEG               (no labels)

Unlike upstream, subsets are accepted (users train on a few classes or images). A class index is the position of the
class id among the sorted ids of labels.txt: on the full dataset that is upstream's index (sorted class folders), and
on a subset train and val still agree. Create the extra files with
`python -m dinov2.data.datasets.image_net --root R --extra E`.
"""
import argparse
import csv
import os
import pathlib
from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dinov2.data.datasets.image_folder import load_image_uint8
from dinov2.data.registry import register_dataset, transform_item
from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write

LABELS_FILE = "labels.txt"
ENTRY_FIELDS = ("actual_index", "class_index", "class_id", "class_name")
UNLABELLED = -1
# what upstream stores as the class index of a TEST entry: uint32(-1)
_NO_CLASS_INDEX = np.iinfo(np.uint32).max


class Split(Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"

    @property
    def labelled(self) -> bool:
        return self is not Split.TEST

    def image_name(self, actual_index: int, class_id: str) -> str:
        number = str(actual_index) if self is Split.TRAIN else f"{actual_index:08d}"
        return self._name(number, class_id)

    def image_relpath(self, actual_index: int, class_id: str) -> str:
        """Where the layout keeps an image: entries store only its number and class, never its path."""
        return f"{self._folder(class_id)}/{self.image_name(actual_index, class_id)}"

    def layout(self, class_id: str) -> str:
        """The path pattern of this split's images, for messages."""
        return f"{self._folder(class_id)}/{self._name('<number>' if self is Split.TRAIN else '<8 digits>', class_id)}"

    def _name(self, number: str, class_id: str) -> str:
        return f"{class_id}_{number}.JPEG" if self is Split.TRAIN else f"ILSVRC2012_{self.value}_{number}.JPEG"

    def _folder(self, class_id: str) -> str:
        return f"{self.value}/{class_id}" if self.labelled else self.value

    def extra_name(self, kind: str) -> str:
        """`kind` is "entries", "class-ids" or "class-names"."""
        return f"{kind}-{self.name}.npy"


def dump_command(root: str | os.PathLike, extra: str | os.PathLike) -> str:
    return f"python -m dinov2.data.datasets.image_net --root {root} --extra {extra}"


def parse_split(value: str | Split) -> Split:
    if isinstance(value, Split):
        return value
    if value not in Split.__members__:
        raise UserError(f"dataset 'ImageNet': unknown split '{value}'; accepted: {', '.join(Split.__members__)}")
    return Split[value]


def _load_extra_file(path: pathlib.Path, root: str, extra: str) -> np.ndarray:
    """Memory-mapped, as upstream: forked loader workers share the pages of a 1.3 M-row table."""
    if not path.is_file():
        raise UserError(
            f"dataset 'ImageNet': extra file '{path}' not found; create it with: {dump_command(root, extra)}"
        )
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise UserError(f"dataset 'ImageNet': cannot read extra file '{path}': {exc}") from exc


class ImageNet:
    """Items are (uint8 RGB image [3, H, W], class index); TEST items have target -1 (no label).

    Upstream returns None as a TEST target; -1 is what every dataset here uses for "unlabelled", so a TEST loader
    batches and the evaluations skip those items.
    """

    def __init__(
        self,
        split: str | Split,
        root: str,
        extra: str,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        self.split = parse_split(split)
        self.root, self.extra = pathlib.Path(root), pathlib.Path(extra)
        if not self.root.is_dir():
            raise UserError(f"dataset 'ImageNet': root '{root}' is not a directory")
        self.transform, self.target_transform = transform, target_transform
        self._open()
        missing = [field for field in ENTRY_FIELDS if field not in (self._entries.dtype.names or ())]
        if missing:
            raise UserError(
                f"dataset 'ImageNet': extra file '{self.extra / self.split.extra_name('entries')}' lacks the "
                f"field(s) {', '.join(missing)}; recreate it with: {dump_command(root, extra)}"
            )

    def _open(self) -> None:
        root, extra = str(self.root), str(self.extra)
        self._entries = _load_extra_file(self.extra / self.split.extra_name("entries"), root, extra)
        self._class_ids = self._class_names = None
        if self.split.labelled:
            self._class_ids = _load_extra_file(self.extra / self.split.extra_name("class-ids"), root, extra)
            self._class_names = _load_extra_file(self.extra / self.split.extra_name("class-names"), root, extra)

    def __getstate__(self) -> dict[str, Any]:
        """Spawned workers reopen the maps instead of receiving a pickled copy of the tables."""
        state = dict(self.__dict__)
        del state["_entries"], state["_class_ids"], state["_class_names"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._entries)

    def image_path(self, index: int) -> pathlib.Path:
        entry = self._entries[index]
        return self.root / self.split.image_relpath(int(entry["actual_index"]), str(entry["class_id"]))

    def get_target(self, index: int) -> int:
        return int(self._entries[index]["class_index"]) if self.split.labelled else UNLABELLED

    def get_targets(self) -> np.ndarray:
        """int64 class index of every item (-1 for TEST): read without decoding a single image."""
        if not self.split.labelled:
            return np.full(len(self), UNLABELLED, dtype=np.int64)
        return self._entries["class_index"].astype(np.int64)

    def get_class_id(self, index: int) -> str | None:
        return str(self._entries[index]["class_id"]) if self.split.labelled else None

    def get_class_name(self, index: int) -> str | None:
        return str(self._entries[index]["class_name"]) if self.split.labelled else None

    def get_class_ids(self) -> np.ndarray | None:
        """Class id (e.g. "n01440764") of each class index; None for TEST, which has no classes."""
        return self._class_ids

    def get_class_names(self) -> np.ndarray | None:
        return self._class_names

    def find_class_id(self, class_index: int) -> str:
        return str(self._classes_or_raise(self._class_ids)[class_index])

    def find_class_name(self, class_index: int) -> str:
        return str(self._classes_or_raise(self._class_names)[class_index])

    def _classes_or_raise(self, classes: np.ndarray | None) -> np.ndarray:
        if classes is None:
            raise UserError("dataset 'ImageNet': the TEST split has no classes")
        return classes

    @property
    def classes(self) -> list[str]:
        """Readable class names by class index, as the evaluations' per-class tables show them."""
        return [] if self._class_names is None else [str(name) for name in self._class_names]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image_uint8(self.image_path(index))
        image = image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image  # as PIL .convert("RGB")
        target = self.get_target(index)
        return transform_item(image, target, self.transform, self.target_transform)


@register_dataset("ImageNet")
def make_image_net(
    split: str, root: str, extra: str, transform: Callable | None = None, target_transform: Callable | None = None
) -> ImageNet:
    return ImageNet(split=split, root=root, extra=extra, transform=transform, target_transform=target_transform)


# ---- creating the extra files (upstream's dump_extra) ----


def read_labels(root: pathlib.Path) -> dict[str, str]:
    """class id -> class name from `<root>/labels.txt`; an unquoted name with commas is kept whole."""
    path = root / LABELS_FILE
    if not path.is_file():
        raise UserError(f"'{path}' not found: it lists the classes as 'class_id,class_name' lines")
    labels: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as file:
        for line_number, row in enumerate(csv.reader(file), start=1):
            if not row:
                continue
            if len(row) < 2 or not row[0]:
                raise UserError(f"'{path}' line {line_number}: expected 'class_id,class_name', got {row}")
            class_id, class_name = row[0], ",".join(row[1:])
            if class_id in labels:
                raise UserError(f"'{path}' line {line_number}: class id '{class_id}' appears twice")
            labels[class_id] = class_name
    if not labels:
        raise UserError(f"'{path}' lists no classes")
    return labels


def _visible_children(folder: pathlib.Path) -> list[os.DirEntry]:
    """Sorted by name; directory entries carry the file type, so 1.3 M files cost no stat each."""
    with os.scandir(folder) as entries:
        return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda entry: entry.name)


def _actual_indices(split: Split, folder: pathlib.Path, class_id: str) -> list[int]:
    """Image numbers of the files in `folder`; a file the dataset could not find again by number is an error."""
    indices = []
    for entry in _visible_children(folder):
        digits = entry.name.removesuffix(".JPEG").rpartition("_")[2]
        if not (entry.is_file() and digits.isdigit() and split.image_name(int(digits), class_id) == entry.name):
            raise UserError(f"'{entry.path}' does not follow the ImageNet layout '<root>/{split.layout(class_id)}'")
        indices.append(int(digits))
    return indices


def _entries_array(rows: list[tuple[int, int, str, str]]) -> np.ndarray:
    """Upstream's structured dtype: string widths are the longest id and name in the split."""
    id_width = max(len(row[2]) for row in rows)
    name_width = max(len(row[3]) for row in rows)
    dtype = np.dtype(
        [
            ("actual_index", "<u4"),
            ("class_index", "<u4"),
            ("class_id", f"U{id_width}"),
            ("class_name", f"U{name_width}"),
        ]
    )
    return np.array(rows, dtype=dtype)


def scan_split(root: pathlib.Path, split: Split, labels: dict[str, str]) -> np.ndarray:
    """Entries of one split in upstream's order: class folders sorted, then file names sorted."""
    split_dir = root / split.value
    if not split.labelled:
        rows = [(index, _NO_CLASS_INDEX, "", "") for index in _actual_indices(split, split_dir, "")]
    else:
        rows = _labelled_rows(root, split, labels)
    if not rows:
        raise UserError(f"no images under '{split_dir}'")
    return _entries_array(rows)


def _labelled_rows(root: pathlib.Path, split: Split, labels: dict[str, str]) -> list[tuple[int, int, str, str]]:
    split_dir = root / split.value
    class_index = {class_id: i for i, class_id in enumerate(sorted(labels))}
    rows = []
    folders = tqdm(_visible_children(split_dir), desc=f"indexing {split.name}", unit="class", dynamic_ncols=True)
    for folder in folders:
        if not folder.is_dir():
            raise UserError(
                f"'{folder.path}': {split.value} images must be in class folders '<root>/{split.value}/<class_id>/'"
            )
        class_id = folder.name
        if class_id not in labels:
            raise UserError(f"class folder '{folder.path}' is not listed in '{root / LABELS_FILE}'")
        indices = _actual_indices(split, pathlib.Path(folder.path), class_id)
        rows += [(index, class_index[class_id], class_id, labels[class_id]) for index in indices]
    return rows


def save_npy_atomic(array: np.ndarray, path: pathlib.Path) -> None:
    """A crash mid-write leaves the previous file (or none), never a truncated table that loads wrong."""
    atomic_write(path, lambda file: np.save(file, array))


def dump_extra(
    root: str | os.PathLike, extra: str | os.PathLike, splits: Sequence[Split] | None = None
) -> dict[Split, int]:
    """Write the extra files of `splits` (default: every split folder present); returns entries per split."""
    root, extra = pathlib.Path(root), pathlib.Path(extra)
    if not root.is_dir():
        raise UserError(f"root '{root}' is not a directory")
    if splits:
        absent = [str(root / split.value) for split in splits if not (root / split.value).is_dir()]
        if absent:
            raise UserError(f"split folder '{absent[0]}' not found")
    else:
        splits = [split for split in Split if (root / split.value).is_dir()]
        if not splits:
            raise UserError(f"'{root}' has none of the split folders train/, val/, test/")
    labels = read_labels(root) if any(split.labelled for split in splits) else {}
    entries = {split: scan_split(root, split, labels) for split in splits}  # a bad tree writes nothing
    extra.mkdir(parents=True, exist_ok=True)
    class_ids = sorted(labels)
    class_names = [labels[class_id] for class_id in class_ids]
    for split, split_entries in entries.items():
        save_npy_atomic(split_entries, extra / split.extra_name("entries"))
        if split.labelled:
            save_npy_atomic(np.array(class_ids, dtype=str), extra / split.extra_name("class-ids"))
            save_npy_atomic(np.array(class_names, dtype=str), extra / split.extra_name("class-names"))
    return {split: len(split_entries) for split, split_entries in entries.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.data.datasets.image_net",
        description="Index an ImageNet tree into the 'extra' .npy files of ImageNet:split=...:root=...:extra=... "
        "(upstream DINOv2's dump_extra; its files and these are interchangeable).",
    )
    parser.add_argument("--root", required=True, help="folder with labels.txt and train/, val/, test/")
    parser.add_argument("--extra", required=True, help="folder for entries-*.npy, class-ids-*.npy, class-names-*.npy")
    parser.add_argument(
        "--splits", nargs="+", choices=list(Split.__members__), help="default: every split folder present under root"
    )
    args = parser.parse_args(argv)
    counts = dump_extra(args.root, args.extra, [Split[name] for name in args.splits or []])
    written = ", ".join(f"{split.name} {count:,} images" for split, count in counts.items())
    print(f"wrote extra files to {args.extra}: {written}")
    return 0


if __name__ == "__main__":
    run_cli(main)
