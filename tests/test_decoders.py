"""The fast decoders give pydicom's reference pixels; the display lookup table gives the per-pixel
display; JPEG 2000 at reduced resolution caches nearly the same image; prepare reports decoders."""
import json

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless,
)  # fmt: skip

from vet_ext.ingestion import decoders
from vet_ext.ingestion.cache import to_cache_image
from vet_ext.ingestion.dicom import _display, read_dicom
from vet_ext.ingestion.dicom_write import make_dx_dataset, write_dicom
from vet_ext.ingestion.prepare import PrepareConfig, prepare

pytest.importorskip("imagecodecs")

FAST = {JPEGLosslessSV1: "imagecodecs.jpeg8", JPEGLossless: "imagecodecs.jpeg8", JPEGLSLossless: "imagecodecs.jpegls"}


def _smooth(shape: tuple[int, int], bits: int, seed: int = 0) -> np.ndarray:
    """Anatomy-scale structure with noise: what a wavelet pyramid's coarse levels are meant for."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    top = 2**bits - 1
    body = top * (0.5 + 0.3 * np.sin(xx / 23.0) * np.cos(yy / 31.0)) + rng.normal(0, top * 0.01, shape)
    return np.clip(body, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def _write(path, pixels, syntax, bits, **meta):
    fields = dict(study_uid="1.2.3", sop_uid="1.2.3.4", view_position="LL", photometric="MONOCHROME2")
    return write_dicom(path, pixels, bits_stored=bits, transfer_syntax=syntax, **{**fields, **meta})


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLosslessSV1, JPEGLossless,
                                    JPEG2000Lossless, JPEGLSLossless], ids=lambda s: UID(s).keyword)  # fmt: skip
@pytest.mark.parametrize("bits, frames", [(8, 1), (12, 1), (16, 1), (12, 2)])
def test_decoded_pixels_equal_pydicoms_reference(tmp_path, syntax, bits, frames):
    pixels = np.stack([_smooth((70, 54), bits, seed) for seed in range(frames)])
    path = _write(tmp_path / "x.dcm", pixels if frames > 1 else pixels[0], syntax, bits)
    ds = pydicom.dcmread(path)
    decoded, name, _ = decoders.decode_pixels(ds)
    reference = pixel_array(pydicom.dcmread(path))
    assert decoded.dtype == reference.dtype and np.array_equal(decoded, reference), name
    assert np.array_equal(reference, pixels if frames > 1 else pixels[0])
    assert name == FAST.get(syntax, name) and (syntax in FAST or name.startswith("pydicom"))


def test_signed_data_takes_the_reference_path(tmp_path):
    pixels = (_smooth((40, 30), 12).astype(np.int16) - 2048)
    ds = make_dx_dataset(pixels, study_uid="1.2", sop_uid="1.2.3", view_position="LL", photometric="MONOCHROME2",
                         bits_stored=12, transfer_syntax=RLELossless)  # fmt: skip
    decoded, name, _ = decoders.decode_pixels(ds)
    assert name.startswith("pydicom") and np.array_equal(decoded, pixels)


@pytest.mark.parametrize(
    "meta",
    [
        {},  # robust percentile window
        {"WindowCenter": 1800, "WindowWidth": 2400},
        {"WindowCenter": 1800, "WindowWidth": 2400, "VOILUTFunction": "SIGMOID"},
        {"RescaleSlope": 0.5, "RescaleIntercept": -100, "WindowCenter": 700, "WindowWidth": 1500},
        {"photometric": "MONOCHROME1"},
    ],
    ids=["percentile", "window", "sigmoid", "rescale", "monochrome1"],
)
def test_display_table_equals_the_per_pixel_display(tmp_path, meta):
    pixels = _smooth((64, 48), 12)
    ds = pydicom.dcmread(_write(tmp_path / "x.dcm", pixels, ExplicitVRLittleEndian, 12, **meta))
    invert = meta.get("photometric") == "MONOCHROME1"
    by_table = _display(pixels, ds, invert)  # unsigned: through the table
    per_pixel = _display(pixels.astype(np.int32), ds, invert)  # the same values, mapped pixel by pixel
    assert by_table.dtype == np.float32 and np.array_equal(by_table, per_pixel)
    assert 0.0 <= by_table.min() < by_table.max() <= 1.0


def test_jpeg2000_at_reduced_resolution_caches_nearly_the_same_image(tmp_path):
    pixels = _smooth((1040, 832), 16)
    path = _write(tmp_path / "x.dcm", pixels, JPEG2000Lossless, 16, WindowCenter=32768, WindowWidth=50000)
    reduced = read_dicom(path, display_size=256)
    full = read_dicom(path)
    assert reduced.decoder == "pillow.openjpeg at 1/4 resolution" and full.decoder.startswith("pydicom")
    assert reduced.frames[0].shape == (260, 208)  # long side 1040 / 4 = 260 >= 256: never below the cache size
    small = to_cache_image(reduced.frames[0], 256, level=reduced.resolution_level, full_shape=(1040, 832))
    reference = to_cache_image(full.frames[0], 256)
    assert small.shape == reference.shape == (256, 205)
    difference = np.abs(small.astype(np.int16) - reference.astype(np.int16))
    # two antialiasing filters (the codec's wavelet, a box) disagree on the noise, not on the anatomy
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 6, (difference.mean(), difference.max())


def test_jpeg2000_at_reduced_resolution_keeps_edges_in_place(tmp_path):
    """Without the half-block offset a pyramid level shifts the image by (2**level - 1) / 2 pixels."""
    columns = np.arange(832)
    pixels = np.where(columns > 401.3, 50000, 10000).astype(np.uint16)[None].repeat(1040, axis=0)
    path = _write(tmp_path / "x.dcm", pixels, JPEG2000Lossless, 16, WindowCenter=32768, WindowWidth=65535)
    reduced = read_dicom(path, display_size=256)
    small = to_cache_image(reduced.frames[0], 256, level=reduced.resolution_level, full_shape=(1040, 832))
    reference = to_cache_image(read_dicom(path).frames[0], 256)

    def edge(row: np.ndarray) -> float:  # sub-pixel column where the row crosses mid grey
        row = row.astype(np.float64)
        middle = (row.min() + row.max()) / 2
        right = int(np.argmax(row > middle))
        return right - 1 + (middle - row[right - 1]) / (row[right] - row[right - 1])

    assert abs(edge(small[100]) - edge(reference[100])) < 0.1


def test_no_reduction_below_the_display_size():
    assert decoders._reduction_level(2560, 2048, 512) == 2  # 640 >= 512, 320 would be too small
    assert decoders._reduction_level(2560, 2048, 2560) == 0
    assert decoders._reduction_level(300, 200, 512) == 0


def test_prepare_reports_the_decoder_per_syntax(tmp_path):
    raw = tmp_path / "raw"
    for index, syntax in enumerate([JPEGLosslessSV1, JPEGLosslessSV1, JPEG2000Lossless, RLELossless]):
        _write(raw / f"{index}.dcm", _smooth((600, 480), 12, index), syntax, 12,
               study_uid=f"1.2.{index}", sop_uid=f"1.2.{index}.1")  # fmt: skip
    summary = prepare(PrepareConfig(out=tmp_path / "DATA", dicom_root=raw, cache_size=128, workers=1, progress=False))
    assert summary["decoders"] == {
        UID(JPEG2000Lossless).name: {"pillow.openjpeg at 1/4 resolution": 1},
        UID(JPEGLosslessSV1).name: {"imagecodecs.jpeg8": 2},
        UID(RLELossless).name: {"pydicom.pylibjpeg": 1},
    }
    assert json.loads((tmp_path / "DATA" / "prepare.json").read_text())["decoders"] == summary["decoders"]
