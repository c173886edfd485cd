"""Stored pixel data -> integer frames, with the fastest decoder measured for each transfer syntax.

Decoding is prepare's one cost that scales with the archive, and pydicom's plugins differ by up
to 5x on the same file (`bench/prepare_throughput.py`, table in docs/performance.md). Where a
faster codec gives the same pixels, it runs first: libjpeg-turbo (through imagecodecs) for
lossless JPEG, CharLS for JPEG-LS. pydicom's own `pixel_array` is the reference every fast
path is tested against, and the fallback for everything else (other syntaxes, signed or colour
data, anything a fast codec refuses), with its plugins tried in measured order.

JPEG 2000 stores a wavelet pyramid, so when the caller only needs a small image (the cache's
long side) the codec can stop at a coarser resolution level: the pixels are then the codec's
reduced image, not the full one, and the decoder name says so.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    UID, JPEG2000, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)  # fmt: skip

try:
    import imagecodecs
except ImportError:  # an optional speed-up: without it every file takes pydicom's path
    imagecodecs = None

# pydicom plugins in measured order, fastest first (2560 x 2048 16-bit, docs/performance.md).
PYDICOM_PLUGIN_ORDER = {
    RLELossless: ("pylibjpeg", "pydicom"),
    JPEG2000Lossless: ("pylibjpeg", "gdcm", "pillow"),
    JPEG2000: ("pylibjpeg", "gdcm", "pillow"),
    JPEGLosslessSV1: ("pylibjpeg", "gdcm"),
    JPEGLossless: ("pylibjpeg", "gdcm"),
    JPEGLSLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
    JPEGLSNearLossless: ("pyjpegls", "pylibjpeg", "gdcm"),
}


@dataclass(frozen=True)
class FrameCodec:
    """A codec that decodes one encapsulated frame of grayscale, unsigned data to its stored values."""

    name: str
    syntaxes: frozenset[str]
    decode: Callable[[bytes], np.ndarray]

    def available(self) -> bool:
        return imagecodecs is not None


FAST_CODECS = (
    FrameCodec("imagecodecs.jpeg8", frozenset({JPEGLosslessSV1, JPEGLossless}), lambda b: imagecodecs.jpeg8_decode(b)),
    FrameCodec("imagecodecs.jpegls", frozenset({JPEGLSLossless}), lambda b: imagecodecs.jpegls_decode(b)),
)
J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})


class DecodedPixels(NamedTuple):
    values: np.ndarray  # stored values, shaped as pydicom's `pixel_array` shapes them
    decoder: str
    level: int = 0  # resolution halvings: sample j of the result is pixel 2**level * j of the file


def decode_pixels(ds: Dataset, display_size: int | None = None) -> DecodedPixels:
    """The stored values and the decoder that produced them.

    `display_size`: the long side the caller reduces the image to anyway; JPEG 2000 then decodes
    at the coarsest resolution level still at least that large.
    """
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if _grayscale_unsigned(ds):
        for name, level, decode in _fast_paths(ds, syntax, display_size):
            try:
                decoded = _frames(ds, decode)
            except Exception:  # noqa: BLE001 - a codec's refusal is not the file's fault; the reference decides
                continue
            if decoded.dtype == _stored_dtype(ds):
                return DecodedPixels(decoded, name, level)
    return _reference(ds, syntax)


def _fast_paths(
    ds: Dataset, syntax: UID, display_size: int | None
) -> list[tuple[str, int, Callable[[bytes], np.ndarray]]]:
    paths = []
    if syntax in J2K_SYNTAXES and display_size:
        level = _reduction_level(int(ds.Rows), int(ds.Columns), display_size)
        if level > 0:
            paths.append((f"pillow.openjpeg at 1/{2**level} resolution", level, lambda f: _j2k_reduced(f, level)))
    paths += [(codec.name, 0, codec.decode) for codec in FAST_CODECS if syntax in codec.syntaxes and codec.available()]
    return paths


def _grayscale_unsigned(ds: Dataset) -> bool:
    return int(ds.get("SamplesPerPixel", 1)) == 1 and int(ds.get("PixelRepresentation", 0)) == 0


def _stored_dtype(ds: Dataset) -> np.dtype:
    return np.dtype(np.uint8 if int(ds.BitsAllocated) <= 8 else np.uint16)


def _frames(ds: Dataset, decode: Callable[[bytes], np.ndarray]) -> np.ndarray:
    count = int(ds.get("NumberOfFrames", 1) or 1)
    frames = [decode(frame) for frame in generate_frames(ds.PixelData, number_of_frames=count)]
    return frames[0] if count == 1 else np.stack(frames)


def _reduction_level(rows: int, columns: int, display_size: int) -> int:
    """How many halvings keep the long side (rounded up, as the codec rounds) at or above `display_size`."""
    long_side = max(rows, columns)
    if long_side <= display_size:
        return 0
    return max(0, int(math.floor(math.log2(long_side / display_size))))


def _j2k_reduced(frame: bytes, level: int) -> np.ndarray:
    """Pillow scales samples up to its mode's depth (12-bit values arrive << 4); shifted back here."""
    if frame[:4] != b"\xff\x4f\xff\x51":
        raise ValueError("not a raw JPEG 2000 codestream (SOC, SIZ)")
    precision = (frame[42] & 0x7F) + 1  # Ssiz of the first component: precision - 1, sign in the top bit
    with Image.open(io.BytesIO(frame)) as image:
        image.reduce = level  # openjpeg stops the inverse wavelet transform `level` levels early
        image.load()
        values = np.asarray(image)
    depth = values.dtype.itemsize * 8
    return values >> (depth - precision) if precision < depth else values


def _reference(ds: Dataset, syntax: UID) -> DecodedPixels:
    if not syntax.is_compressed:
        return DecodedPixels(pixel_array(ds), "pydicom")
    available = get_decoder(syntax).available_plugins
    plugin = next((p for p in PYDICOM_PLUGIN_ORDER.get(syntax, ()) if p in available), "")
    options = {"decoding_plugin": plugin} if plugin else {}
    return DecodedPixels(pixel_array(ds, **options), f"pydicom.{plugin or 'default'}")
