"""DICOM reading: display values for each pixel convention, view/study metadata, failure reasons."""
import io
import pickle

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dinov2.utils.errors import UserError
from vet_ext.ingestion.dicom import VIEW_CODES, DicomError, read_dicom, read_metadata
from vet_ext.ingestion.dicom_write import encode_jpeg_lossless, make_dx_dataset, write_dicom


def _dataset(pixels, *, photometric="MONOCHROME2", bits_stored=None, syntax=ExplicitVRLittleEndian, view="LL", **meta):
    pixels = np.asarray(pixels)
    bits = bits_stored or 8 * pixels.dtype.itemsize
    return make_dx_dataset(
        pixels,
        study_uid="1.2.826.0.1.3680043.8.498.1",
        sop_uid="1.2.826.0.1.3680043.8.498.1.1",
        view_position=view,
        photometric=photometric,
        bits_stored=bits,
        transfer_syntax=syntax,
        **meta,
    )


def _save(tmp_path, ds, name="image.dcm"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _read(tmp_path, pixels, **kwargs):
    return read_dicom(_save(tmp_path, _dataset(pixels, **kwargs)))


# Window centre 1000.5 / width 2001 maps x to (x - 1000) / 2000 + 0.5 (DICOM LINEAR), so:
RAMP = np.array([[0, 500, 1000, 1500, 2000, 3000]], dtype=np.uint16)
RAMP_SHOWN = np.array([[0.0, 0.25, 0.5, 0.75, 1.0, 1.0]])
WINDOW = dict(WindowCenter=1000.5, WindowWidth=2001)


def test_monochrome2_window_gives_known_values(tmp_path):
    image = _read(tmp_path, RAMP, bits_stored=12, **WINDOW)
    assert len(image.frames) == 1 and image.frames[0].dtype == np.float32
    np.testing.assert_allclose(image.frames[0], RAMP_SHOWN, atol=1e-6)


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    image = _read(tmp_path, RAMP, photometric="MONOCHROME1", bits_stored=12, **WINDOW)
    np.testing.assert_allclose(image.frames[0], 1.0 - RAMP_SHOWN, atol=1e-6)


def test_first_window_of_a_multivalued_window_is_used(tmp_path):
    image = _read(tmp_path, RAMP, bits_stored=12, WindowCenter=[1000.5, 40], WindowWidth=[2001, 400])
    np.testing.assert_allclose(image.frames[0], RAMP_SHOWN, atol=1e-6)


@pytest.mark.parametrize(
    "function, value, expected",
    [("LINEAR_EXACT", 1500, 0.75), ("LINEAR_EXACT", 500, 0.25), ("SIGMOID", 1000, 0.5), ("SIGMOID", 1500, 1 / (1 + np.exp(-1)))],
)
def test_voi_lut_functions(tmp_path, function, value, expected):
    pixels = np.array([[value, 0]], dtype=np.uint16)
    image = _read(tmp_path, pixels, bits_stored=12, WindowCenter=1000, WindowWidth=2000, VOILUTFunction=function)
    assert image.frames[0][0, 0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("bits_stored, dtype", [(8, np.uint8), (12, np.uint16), (16, np.uint16)])
def test_no_window_uses_robust_percentiles(tmp_path, bits_stored, dtype):
    top = min(999, 2**bits_stored - 1)
    pixels = np.linspace(0, top, 1000).round().astype(dtype).reshape(20, 50)
    shown = _read(tmp_path, pixels, bits_stored=bits_stored).frames[0]
    # Percentiles 0.5 / 99.5 of 1000 evenly spread values lie 0.5 % in from each end.
    low, high = 0.005 * 999 * top / 999, 0.995 * 999 * top / 999
    np.testing.assert_allclose(shown, np.clip((pixels - low) / (high - low), 0, 1), atol=2e-3)
    assert (shown == 0).sum() >= 5 and (shown == 1).sum() >= 5


def test_bits_stored_12_of_16_ignores_high_bits(tmp_path):
    dirty = RAMP | np.uint16(0xF000)
    image = _read(tmp_path, dirty, bits_stored=12, **WINDOW)
    np.testing.assert_allclose(image.frames[0], RAMP_SHOWN, atol=1e-6)


def test_signed_pixels_including_sign_extension(tmp_path):
    signed = np.array([[-1000, -500, 0, 500, 1000]], dtype=np.int16)
    image = _read(tmp_path, signed, WindowCenter=0.5, WindowWidth=2001)
    np.testing.assert_allclose(image.frames[0], [[0.0, 0.25, 0.5, 0.75, 1.0]], atol=1e-6)
    # 12-bit two's complement 0xFFB is -5: it must land just below the centre, not near the top.
    ds = _dataset(np.array([[0x0FFB, 5]], dtype=np.uint16), bits_stored=12, WindowCenter=0.5, WindowWidth=2001)
    ds.PixelRepresentation = 1
    shown = read_dicom(_save(tmp_path, ds, "signed12.dcm")).frames[0]
    np.testing.assert_allclose(shown, [[0.5 - 5 / 2000, 0.5 + 5 / 2000]], atol=1e-6)


def test_rescale_slope_intercept_before_window(tmp_path):
    pixels = np.array([[0, 250, 500, 750, 1000]], dtype=np.uint16)  # 2 * x - 1000 = -1000 .. 1000
    image = _read(tmp_path, pixels, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0.5, WindowWidth=2001)
    np.testing.assert_allclose(image.frames[0], [[0.0, 0.25, 0.5, 0.75, 1.0]], atol=1e-6)


def test_voi_lut_sequence_takes_precedence_over_window(tmp_path):
    lut = pydicom.Dataset()
    lut.add_new("LUTDescriptor", "US", [4, 10, 8])
    lut.add_new("LUTData", "US", [0, 100, 200, 255])
    pixels = np.array([[0, 10, 11, 12, 13, 4000]], dtype=np.uint16)
    image = _read(tmp_path, pixels, bits_stored=12, VOILUTSequence=Sequence([lut]), **WINDOW)
    np.testing.assert_allclose(image.frames[0], [[0, 0, 100 / 255, 200 / 255, 1, 1]], atol=1e-6)


def test_multi_frame_gives_one_display_frame_each(tmp_path):
    frames = np.stack([np.full((4, 6), value, np.uint16) for value in (0, 1000, 2000)])
    image = _read(tmp_path, frames, bits_stored=12, **WINDOW)
    assert [float(frame.mean()) for frame in image.frames] == pytest.approx([0.0, 0.5, 1.0])
    assert all(frame.shape == (4, 6) for frame in image.frames)


def _colour_image():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (4, 6, 3)).astype(np.uint8)


def _luma(rgb):
    return (rgb.astype(float) @ [0.299, 0.587, 0.114]) / 255


def test_rgb_becomes_luma(tmp_path):
    rgb = _colour_image()
    shown = _read(tmp_path, rgb, photometric="RGB").frames[0]
    np.testing.assert_allclose(shown, _luma(rgb), atol=1e-6)


def test_ybr_full_becomes_luma(tmp_path):
    rgb = _colour_image()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    shown = _read(tmp_path, ybr, photometric="YBR_FULL").frames[0]
    np.testing.assert_allclose(shown, _luma(rgb), atol=1.5 / 255)
    # Y of YBR_FULL is the luma itself: the grey image must equal the stored Y plane.
    np.testing.assert_allclose(shown, ybr[..., 0] / 255, atol=1.5 / 255)


def test_ybr_full_422_uncompressed_is_upsampled_then_luma(tmp_path):
    luma = np.array([[100, 200, 80, 120]], dtype=np.uint8)
    chroma = np.array([[128, 120], [128, 136]], dtype=np.uint8)  # Cb, Cr of each pixel pair; no RGB clipping
    ds = _dataset(np.zeros((1, 4, 3), np.uint8), photometric="RGB")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = np.stack([luma[:, 0::2], luma[:, 1::2], chroma[0][None], chroma[1][None]], -1).tobytes()
    shown = read_dicom(_save(tmp_path, ds)).frames[0]
    np.testing.assert_allclose(shown, luma / 255, atol=1.5 / 255)


def _reference_pixels():
    rng = np.random.default_rng(0)
    # openjpeg's encoder refuses images under 32 rows, so this stays at 32 x 40.
    smooth = np.add.outer(np.linspace(0, 3000, 32), np.linspace(0, 1000, 40))
    return (smooth + rng.integers(0, 50, smooth.shape)).astype(np.uint16)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLossless, RLELossless, JPEG2000Lossless, ImplicitVRLittleEndian])
def test_lossless_syntaxes_decode_to_the_same_display(tmp_path, syntax):
    pixels = _reference_pixels()
    reference = _read(tmp_path, pixels, bits_stored=12, **WINDOW).frames[0]
    path = _save(tmp_path, _dataset(pixels, bits_stored=12, syntax=syntax, **WINDOW), "compressed.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_dicom(path).frames[0], reference)


def test_own_jpeg_lossless_encoder_round_trips_16_bit_extremes(tmp_path):
    pixels = np.array([[0, 65535, 0, 65535], [32768, 1, 65534, 2]], dtype=np.uint16)
    ds = _dataset(pixels, bits_stored=16, syntax=JPEGLosslessSV1)
    assert np.array_equal(pydicom.dcmread(_save(tmp_path, ds)).pixel_array, pixels)
    with pytest.raises(UserError, match="exceed"):
        encode_jpeg_lossless(pixels, precision=12)


def test_multi_frame_rle(tmp_path):
    frames = np.stack([_reference_pixels(), _reference_pixels()[::-1]])
    image = _read(tmp_path, frames, bits_stored=12, syntax=RLELossless, **WINDOW)
    assert len(image.frames) == 2
    np.testing.assert_array_equal(image.frames[1], image.frames[0][::-1])


def test_jpeg_baseline_from_pillow_decodes_close_to_source(tmp_path):
    pixels = (np.add.outer(np.arange(32), np.arange(48)) * 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    ds = _dataset(pixels, WindowCenter=127.5, WindowWidth=256)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    shown = read_dicom(_save(tmp_path, ds)).frames[0]
    assert np.abs(shown - pixels / 255).mean() < 2 / 255


def test_jpeg_ls(tmp_path):
    try:
        ds = _dataset(_reference_pixels(), bits_stored=12)
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"no JPEG-LS encoder on this machine (pyjpegls not installed): {exc}")
    assert read_dicom(_save(tmp_path, ds)).frames[0].shape == (32, 40)


# --- metadata ----------------------------------------------------------------------------------


def _code(scheme, value, meaning):
    item = pydicom.Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = scheme, value, meaning
    return Sequence([item])


@pytest.mark.parametrize(
    "view_position, meta, expected",
    [
        ("LL", {}, "LL"),
        ("RL", {}, "RL"),
        ("VD", {}, "VD"),
        ("DV", {}, "DV"),
        ("RLD", {}, "RL"),
        ("AP", {}, "VD"),
        ("PA", {}, "DV"),
        (None, {"ViewCodeSequence": _code("SCT", "399173006", "left lateral")}, "LL"),
        (None, {"ViewCodeSequence": _code("SCT", "399198007", "right lateral")}, "RL"),
        (None, {"ViewCodeSequence": _code("SCT", "442441009", "Ventro-dorsal")}, "VD"),
        (None, {"ViewCodeSequence": _code("SCT", "441672003", "Dorso-ventral")}, "DV"),
        (None, {"ViewCodeSequence": _code("SRT", "R-10232", "right lateral")}, "RL"),
        (None, {"ViewCodeSequence": _code("99LOCAL", "X1", "Right lateral recumbency")}, "RL"),
        (None, {"ViewCodeSequence": _code("SCT", "399067008", "lateral")}, "OTHER"),
        (None, {"SeriesDescription": "Thorax L LAT"}, "LL"),
        (None, {"SeriesDescription": "THX Right-Lateral"}, "RL"),
        (None, {"SeriesDescription": "Abdomen V/D"}, "VD"),
        (None, {"SeriesDescription": "thorax dorsoventral"}, "DV"),
        (None, {"ProtocolName": "Abdomen VD"}, "VD"),
        (None, {"SeriesDescription": "Thorax LAT"}, "OTHER"),
        (None, {"SeriesDescription": "Capital"}, "OTHER"),
        ("VD", {"SeriesDescription": "Thorax R LAT"}, "VD"),
        ("LAT", {"SeriesDescription": "Thorax R LAT"}, "RL"),
        (None, {}, "UNKNOWN"),
    ],
)
def test_view_code_sources_in_priority_order(tmp_path, view_position, meta, expected):
    image = read_metadata(_save(tmp_path, _dataset(RAMP, bits_stored=12, view=view_position, **meta)))
    assert image.view == expected and expected in VIEW_CODES


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower-case body part, as archives have
def test_metadata_fields(tmp_path):
    meta = dict(
        BodyPartExamined="thorax",
        PatientSpeciesDescription="CANINE",
        PixelSpacing=[0.15, 0.2],
        PatientName="Smith^Rex",
        PatientID="P123",
        InstitutionName="Clinic",
        AccessionNumber="A1",
    )
    image = read_metadata(_save(tmp_path, _dataset(RAMP, bits_stored=12, **meta)))
    assert image.frames == []
    assert (image.body_part, image.species, image.pixel_spacing) == ("THORAX", "canine", (0.15, 0.2))
    assert (image.rows, image.columns) == RAMP.shape
    assert image.study_id == "1.2.826.0.1.3680043.8.498.1" and image.image_id == "1.2.826.0.1.3680043.8.498.1.1"
    assert image.phi == {
        "PatientName": "Smith^Rex",
        "PatientID": "P123",
        "PatientBirthDate": "",
        "InstitutionName": "Clinic",
        "ReferringPhysicianName": "",
        "AccessionNumber": "A1",
    }


def test_species_code_and_imager_spacing_fallbacks(tmp_path):
    species = _code("SCT", "448169003", "Felis catus")
    image = read_metadata(_save(tmp_path, _dataset(RAMP, bits_stored=12, PatientSpeciesCodeSequence=species, ImagerPixelSpacing=[0.1, 0.1])))
    assert image.species == "feline" and image.pixel_spacing == (0.1, 0.1)
    bare = read_metadata(_save(tmp_path, _dataset(RAMP, bits_stored=12), "bare.dcm"))
    assert bare.species == "" and bare.pixel_spacing is None and bare.body_part == ""


def test_study_id_falls_back_to_accession_then_folder(tmp_path):
    ds = _dataset(RAMP, bits_stored=12, AccessionNumber="ACC-7")
    del ds.StudyInstanceUID
    assert read_metadata(_save(tmp_path, ds)).study_id == "ACC-7"
    del ds.AccessionNumber
    folder = tmp_path / "study-folder-42"
    folder.mkdir()
    assert read_metadata(_save(folder, ds)).study_id == "study-folder-42"


def test_image_id_without_sop_uid_is_a_stable_path_hash(tmp_path):
    ds = _dataset(RAMP, bits_stored=12)
    del ds.SOPInstanceUID
    first, second = _save(tmp_path, ds, "a.dcm"), _save(tmp_path, ds, "b.dcm")
    assert read_metadata(first).image_id == read_metadata(first).image_id
    assert read_metadata(first).image_id != read_metadata(second).image_id


def test_dataset_without_preamble_is_accepted(tmp_path):
    ds = _dataset(RAMP, bits_stored=12, **WINDOW)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.preamble = None
    path = tmp_path / "raw"
    ds.save_as(path, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_dicom(path).frames[0], RAMP_SHOWN, atol=1e-6)


# --- failures ------------------------------------------------------------------------------------


def _reason(path):
    with pytest.raises(DicomError) as caught:
        read_dicom(path)
    assert caught.value.path == str(path)
    assert str(caught.value).startswith(f"{path}: {caught.value.reason} (")
    return caught.value.reason


def test_random_bytes_and_text_are_not_dicom(tmp_path):
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.txt").write_text("owner called about the x-ray\n" * 40)
    assert _reason(tmp_path / "noise.dcm") == "not DICOM"
    assert _reason(tmp_path / "notes.txt") == "not DICOM"


def test_missing_pixel_data(tmp_path):
    ds = _dataset(RAMP, bits_stored=12)
    del ds.PixelData
    path = _save(tmp_path, ds)
    assert _reason(path) == "no pixel data"
    assert read_metadata(path).view == "LL"  # metadata scanning still works


def test_unsupported_transfer_syntax(tmp_path):
    ds = _dataset(RAMP, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    assert _reason(_save(tmp_path, ds)) == "unsupported transfer syntax"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLosslessSV1])
def test_file_cut_in_half_is_truncated(tmp_path, syntax):
    data = _save(tmp_path, _dataset(_reference_pixels(), bits_stored=12, syntax=syntax)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    assert _reason(tmp_path / "cut.dcm") == "truncated"


def test_unsupported_photometric(tmp_path):
    ds = _dataset(RAMP, bits_stored=12)
    ds.PhotometricInterpretation = "HSV"
    assert _reason(_save(tmp_path, ds)) == "unsupported photometric interpretation"


def test_corrupt_compressed_stream_is_decode_failed(tmp_path):
    ds = _dataset(RAMP, bits_stored=12)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(200)) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    assert _reason(_save(tmp_path, ds)) == "decode failed"


def test_dicom_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DicomError("/a/b.dcm", "truncated", "12 of 40 bytes")))
    assert (error.path, error.reason, error.detail) == ("/a/b.dcm", "truncated", "12 of 40 bytes")
    assert str(error) == "/a/b.dcm: truncated (12 of 40 bytes)"


def test_write_dicom_rejects_unknown_keywords(tmp_path):
    with pytest.raises(UserError, match="NotAKeyword"):
        write_dicom(tmp_path / "x.dcm", RAMP, study_uid="1.2", sop_uid="1.2.3", view_position="LL",
                    photometric="MONOCHROME2", bits_stored=12, transfer_syntax=ExplicitVRLittleEndian, NotAKeyword=1)
    assert list(tmp_path.iterdir()) == []
