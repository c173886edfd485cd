"""The image cache: append-only shard files of raw uint8 pixels plus a crash-safe journal.

Millions of small image files are slow to open and to copy; a few ~1 GiB shards of raw pixel
rows are memory-mappable, so every DataLoader worker reads the same page-cache pages instead of
decoding or copying. An image is addressed by (shard, offset, height, width) and never spans two
shards.

Crash safety comes from one rule: bytes only count once the journal says so. The writer appends
pixels (and the caller's per-file record lines, see `RecordLog`) and only then atomically replaces
`journal.json` with the new committed lengths. A process killed at any moment leaves at most some
uncommitted tail bytes, which the next writer truncates away before appending again, so a resumed
run writes exactly the bytes an uninterrupted run would have written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write_text

JOURNAL_VERSION = 1
SHARD_BYTES = 1 << 30
JOURNAL_NAME = "journal.json"
RECORDS_NAME = "records.jsonl"


def cache_shape(height: int, width: int, cache_size: int) -> tuple[int, int]:
    """Long side scaled to `cache_size`, aspect kept; smaller images keep their size (no upsampling)."""
    long_side = max(height, width)
    if long_side <= cache_size:
        return height, width
    scale = cache_size / long_side
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_cache_image(
    frame: np.ndarray, cache_size: int, *, level: int = 0, full_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """A display-ready float frame in [0, 1] -> the uint8 image stored in the cache.

    Box (area) filtering averages every source pixel into the smaller grid, so fine structure
    is antialiased rather than aliased into moire as nearest/bilinear decimation would do.

    A frame a codec decoded `level` halvings down (JPEG 2000, see `decoders`) is already
    low-passed, and its sample j sits on pixel 2**level * j of the full image rather than at the
    centre of the block it stands for; it is resampled bilinearly onto the cache grid of the full
    image with that offset, so the cached image lands where a full decode would have put it.
    """
    height, width = frame.shape
    scale = 2**level
    target = cache_shape(height * scale, width * scale, cache_size) if level else cache_shape(height, width, cache_size)
    image = np.asarray(frame, dtype=np.float32)
    if level:
        offset = (scale - 1) / (2 * scale)  # full-image block centres in the reduced grid's coordinates
        padded = np.pad(image, ((0, 1), (0, 1)), mode="edge")
        box = (offset, offset, width + offset, height + offset)
        image = np.asarray(Image.fromarray(padded).resize((target[1], target[0]), Image.Resampling.BILINEAR, box=box))
    elif target != (height, width):
        resized = Image.fromarray(image).resize((target[1], target[0]), Image.Resampling.BOX)
        image = np.asarray(resized, dtype=np.float32)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def shard_path(shards_dir: Path, index: int) -> Path:
    return Path(shards_dir) / f"shard-{index:05d}.bin"


def _write_all(raw_file: Any, data: bytes) -> None:
    """Unbuffered writes may be short; loop so an append is never silently cut."""
    view = memoryview(data)
    while view:
        view = view[raw_file.write(view) :]


class ShardWriter:
    """Appends uint8 images to shards and a JSON-lines record log, committing both in one journal write.

    `settings` are the choices that make cached bytes incompatible (cache size, whether PHI is
    kept); reopening a cache built with other settings is a user error rather than a silent mix.
    """

    def __init__(self, shards_dir: Path, state_dir: Path, settings: dict[str, Any], shard_bytes: int = SHARD_BYTES):
        self.shards_dir = Path(shards_dir)
        self.state_dir = Path(state_dir)
        self.shard_bytes = int(shard_bytes)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        journal = read_journal(self.state_dir)
        if journal is not None and journal["settings"] != settings:
            raise UserError(
                f"{self.state_dir / JOURNAL_NAME}: the cache was built with {journal['settings']}, "
                f"this run asks for {settings}; use the same settings or a new --out directory"
            )
        self.settings = settings
        self.lengths: list[int] = list(journal["shards"]) if journal else []
        self.records_bytes: int = journal["records_bytes"] if journal else 0
        self._truncate_uncommitted()
        if not self.lengths:
            self.lengths.append(0)
        # Unbuffered: what is appended reaches the OS at once, so a kill leaves a real uncommitted tail.
        self._shard_file = open(shard_path(self.shards_dir, len(self.lengths) - 1), "ab", buffering=0)
        self._records_file = open(self.state_dir / RECORDS_NAME, "ab", buffering=0)
        if journal is None:
            self.commit()

    def _truncate_uncommitted(self) -> None:
        """Cut every file back to its committed length; shards beyond the journal are deleted."""
        committed = [(shard_path(self.shards_dir, i), n) for i, n in enumerate(self.lengths)]
        for path, length in [*committed, (self.state_dir / RECORDS_NAME, self.records_bytes)]:
            if length > (path.stat().st_size if path.exists() else 0):
                raise UserError(f"{path}: shorter than the {length} bytes its journal committed; cache damaged")
            with open(path, "ab") as f:
                f.truncate(length)
        stray = len(self.lengths)
        while shard_path(self.shards_dir, stray).exists():
            shard_path(self.shards_dir, stray).unlink()
            stray += 1

    def append_image(self, image: np.ndarray) -> tuple[int, int]:
        """Append one 2-D uint8 image; returns (shard index, byte offset). Not durable until `commit`."""
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"cache images are 2-D uint8, got {image.dtype} {image.shape}")
        data = np.ascontiguousarray(image).tobytes()
        if self.lengths[-1] > 0 and self.lengths[-1] + len(data) > self.shard_bytes:
            self._roll_over()
        offset = self.lengths[-1]
        _write_all(self._shard_file, data)
        self.lengths[-1] += len(data)
        return len(self.lengths) - 1, offset

    def append_record(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode("utf-8")
        _write_all(self._records_file, line)
        self.records_bytes += len(line)

    def _roll_over(self) -> None:
        self._shard_file.close()
        self.lengths.append(0)
        self._shard_file = open(shard_path(self.shards_dir, len(self.lengths) - 1), "ab", buffering=0)

    def commit(self) -> None:
        """Make everything appended so far durable: data first, then the journal that points at it."""
        for f in (self._shard_file, self._records_file):
            os.fsync(f.fileno())
        journal = {
            "version": JOURNAL_VERSION, "settings": self.settings,
            "shards": self.lengths, "records_bytes": self.records_bytes,
        }  # fmt: skip
        atomic_write_text(self.state_dir / JOURNAL_NAME, json.dumps(journal, indent=1))

    def close(self, commit: bool = True) -> None:
        """`commit=False` after a failure part-way through a file: its bytes stay uncommitted tail."""
        if commit:
            self.commit()
        self._shard_file.close()
        self._records_file.close()


def read_journal(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt cache journal ({exc})") from exc


def read_records(state_dir: Path) -> Iterator[dict[str, Any]]:
    """Committed per-file records in the order they were written (uncommitted tail ignored)."""
    journal = read_journal(state_dir)
    if journal is None:
        return
    remaining = journal["records_bytes"]
    with open(Path(state_dir) / RECORDS_NAME, "rb") as f:
        for line in f:
            if remaining < len(line):
                break
            remaining -= len(line)
            yield json.loads(line)


class ShardReader:
    """Read-only views into the shards, opened lazily in whichever process first reads.

    Opening per process (and dropping open maps when pickled) means forked or spawned DataLoader
    workers each map the files themselves and share the kernel's page cache, never a copy.
    """

    def __init__(self, shards_dir: Path):
        self.shards_dir = Path(shards_dir)
        self._maps: dict[int, np.memmap] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"shards_dir": self.shards_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shards_dir"])

    def _map(self, shard: int) -> np.memmap:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        mapped = self._maps.get(shard)
        if mapped is None:
            mapped = np.memmap(shard_path(self.shards_dir, shard), dtype=np.uint8, mode="r")
            self._maps[shard] = mapped
        return mapped

    def read(self, shard: int, offset: int, height: int, width: int) -> np.ndarray:
        """A read-only [height, width] view of the mapped bytes (copy it before modifying)."""
        mapped = self._map(int(shard))
        offset, size = int(offset), int(height) * int(width)
        if offset + size > mapped.shape[0]:
            raise UserError(
                f"{shard_path(self.shards_dir, shard)}: image at offset {offset} ({height}x{width}) "
                f"lies past the end of the shard ({mapped.shape[0]} bytes); the cache is incomplete"
            )
        return mapped[offset : offset + size].reshape(int(height), int(width))
