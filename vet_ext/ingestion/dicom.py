"""One DICOM radiograph -> display-ready float frames plus the study/view facts we index on.

Clinic archives mix vendors, transfer syntaxes and photometric conventions; the model must see
every image the way a radiologist's viewer shows it (bone white, air black). This module owns
that conversion and turns every way a file can be unusable into one `DicomError` whose
`reason` is a short category, so a scan of millions of files can count failures by kind
instead of dying on the first odd file.
"""
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pydicom.multival
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels.processing import apply_voi
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from vet_ext.ingestion.decoders import DecodedPixels, decode_pixels
from vet_ext.ingestion.views import VIEW_CODES, derive_view
from vet_ext.ingestion.windowing import linear_window, percentile_bounds, percentile_sample, voi_window

__all__ = ["VIEW_CODES", "DicomError", "DicomImage", "read_dicom", "read_metadata"]

PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "InstitutionName",
    "ReferringPhysicianName",
    "AccessionNumber",
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
# Files lacking the DICM preamble are only trusted when they describe an image fully.
REQUIRED_IMAGE_TAGS = ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
_SPECIES_SYNONYMS = {
    "canine": ("canine", "dog", "canis"),
    "feline": ("feline", "cat", "felis"),
}


class DicomError(Exception):
    """Any reason a file cannot be used; `reason` is a category fit for counting."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason} ({detail})")

    def __reduce__(self):
        # Keeps the error intact when it crosses a multiprocessing boundary.
        return (DicomError, (self.path, self.reason, self.detail))


@dataclass
class DicomImage:
    """A decoded radiograph; `frames` is empty when read without pixels, `decoder` names what decoded them."""

    frames: list[np.ndarray]
    transfer_syntax: str
    decoder: str
    resolution_level: int  # > 0: frames decoded at 1 / 2**level of rows x columns (see decoders)
    study_id: str
    image_id: str
    view: str
    body_part: str
    species: str
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    phi: dict[str, str] = field(default_factory=dict)


def read_metadata(path: str | os.PathLike) -> DicomImage:
    """Identity and view facts only; stops before the pixel data, so scanning stays cheap."""
    return read_dicom(path, read_pixels=False)


def read_dicom(path: str | os.PathLike, *, read_pixels: bool = True, display_size: int | None = None) -> DicomImage:
    """Read one file; raises `DicomError` for anything that keeps it from being displayed.

    `display_size`: the long side the caller will shrink the frames to; a codec that can decode
    at a reduced resolution still at least that large (JPEG 2000) then does.
    """
    ds = _open(path, read_pixels)
    _check_image_description(path, ds, read_pixels)
    frames, decoded = _display_frames(path, ds, display_size) if read_pixels else ([], DecodedPixels(None, ""))
    return DicomImage(
        frames=frames,
        transfer_syntax=UID(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)).name,
        decoder=decoded.decoder,
        resolution_level=decoded.level,
        study_id=_study_id(path, ds),
        image_id=_text(ds, "SOPInstanceUID") or _path_hash(path),
        view=_view(ds),
        body_part=_text(ds, "BodyPartExamined").upper(),
        species=_species(ds),
        pixel_spacing=_pixel_spacing(ds),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        phi={keyword: _text(ds, keyword) for keyword in PHI_KEYWORDS},
    )


# --- opening -------------------------------------------------------------------------------


def _open(path: str | os.PathLike, read_pixels: bool) -> Dataset:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=not read_pixels)
            except InvalidDicomError:
                ds = _open_without_preamble(path, read_pixels)
    except DicomError:
        raise
    except (EOFError, pydicom.errors.BytesLengthException) as exc:
        raise DicomError(path, "truncated", str(exc)) from exc
    except OSError as exc:
        raise DicomError(path, "unreadable", str(exc)) from exc
    except Exception as exc:  # pydicom raises many types for garbage; all mean the same here
        raise DicomError(path, "not DICOM", f"{type(exc).__name__}: {exc}") from exc
    # pydicom only warns when a file ends inside an element (it then drops that element).
    ended_early = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if ended_early:
        raise DicomError(path, "truncated", ended_early[0])
    return ds


def _open_without_preamble(path: str | os.PathLike, read_pixels: bool) -> Dataset:
    """Accept raw datasets (no 128-byte preamble / DICM) only when they describe a full image."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=not read_pixels)
        missing = [tag for tag in REQUIRED_IMAGE_TAGS if tag not in ds]
    except Exception as exc:
        raise DicomError(path, "not DICOM", f"{type(exc).__name__}: {exc}") from exc
    if missing or (read_pixels and "PixelData" not in ds):
        raise DicomError(path, "not DICOM", "no DICM preamble and not a complete image dataset")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _check_image_description(path: str | os.PathLike, ds: Dataset, read_pixels: bool) -> None:
    if read_pixels and "PixelData" not in ds:
        kind = "FloatPixelData" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else "PixelData"
        raise DicomError(path, "no pixel data", f"no {kind} element")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric and photometric not in MONOCHROME + COLOR:
        raise DicomError(path, "unsupported photometric interpretation", photometric)


# --- pixels --------------------------------------------------------------------------------


def _display_frames(path: str | os.PathLike, ds: Dataset, display_size: int | None) -> tuple[list[np.ndarray], DecodedPixels]:
    decoded = _decode(path, ds, display_size)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric in COLOR:
        return [_luma(frame, ds) for frame in _split_frames(decoded.values, ds, color=True)], decoded
    invert = photometric == "MONOCHROME1"
    return [_display(frame, ds, invert) for frame in _split_frames(decoded.values, ds, color=False)], decoded


def _display(frame: np.ndarray, ds: Dataset, invert: bool) -> np.ndarray:
    """Stored values -> display brightness (float32): modality LUT, VOI or robust window, MONOCHROME1.

    Every step maps each stored value on its own, so an unsigned frame goes through a table over
    0..max computed with the same float64 arithmetic: identical output, at the cost of one
    lookup per pixel instead of several passes of float64 over 5 million pixels.
    """
    if frame.dtype.kind == "u" and frame.dtype.itemsize <= 2:
        table = apply_modality_lut(np.arange(int(frame.max()) + 1, dtype=frame.dtype), ds)
        shown = _apply_voi(table, ds, sample=lambda: table[percentile_sample(frame)])
        return _invert(shown, invert).astype(np.float32)[frame]
    values = apply_modality_lut(frame, ds)
    return _invert(_apply_voi(values, ds, sample=lambda: percentile_sample(values)), invert).astype(np.float32)


def _invert(shown: np.ndarray, invert: bool) -> np.ndarray:
    return 1.0 - shown if invert else shown


def _decode(path: str | os.PathLike, ds: Dataset, display_size: int | None) -> DecodedPixels:
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    if not syntax.is_compressed:
        _check_native_length(path, ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomError(path, "unsupported transfer syntax", f"{syntax} ({syntax.name})") from exc
    if not decoder.is_available:
        raise DicomError(path, "unsupported transfer syntax", f"no decoder installed for {syntax.name}")
    try:
        return decode_pixels(ds, display_size)
    except Exception as exc:
        raise DicomError(path, "decode failed", f"{type(exc).__name__}: {exc}") from exc


def _check_native_length(path: str | os.PathLike, ds: Dataset) -> None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1))
        if _text(ds, "PhotometricInterpretation").upper() == "YBR_FULL_422":
            samples = 2  # chroma is stored once per pixel pair
        expected_bits = int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomError(path, "decode failed", f"incomplete image description: {exc}") from exc
    expected = (frames * expected_bits + 7) // 8
    if len(ds.PixelData) < expected:
        raise DicomError(path, "truncated", f"pixel data has {len(ds.PixelData)} of {expected} bytes")


def _split_frames(stored: np.ndarray, ds: Dataset, *, color: bool) -> list[np.ndarray]:
    single_frame_ndim = 3 if color else 2
    if stored.ndim == single_frame_ndim:
        return [stored]
    return list(stored)


def _luma(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Rec. 601 luma of RGB (pydicom has already turned YCbCr into RGB)."""
    full_scale = float(2 ** int(ds.BitsStored) - 1)
    rgb = frame.astype(np.float64) / full_scale
    return (rgb @ np.array([0.299, 0.587, 0.114])).astype(np.float32)


def _apply_voi(values: np.ndarray, ds: Dataset, sample: Callable[[], np.ndarray]) -> np.ndarray:
    """Map modality values to [0, 1] (float64) with the file's own VOI, else the robust range of `sample()`
    (the image's values, read only when no VOI is given)."""
    if ds.get("VOILUTSequence"):
        return _apply_voi_lut_sequence(values, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = _first_number(ds.WindowCenter)
        width = _first_number(ds.WindowWidth)
        function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
        if width >= 1 or (width > 0 and function != "LINEAR"):
            return voi_window(values, center, width, function)
    return linear_window(values, *percentile_bounds(sample()))


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    entries, first_mapped, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    entries = entries or 2**16
    # pydicom indexes the LUT with integer input; clip first so no float wraps around.
    indices = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1).astype(np.int64)
    mapped = apply_voi(indices, ds).astype(np.float64)
    return mapped / float(2**bits - 1)


def _first_number(value) -> float:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


# --- metadata ------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _study_id(path: str | os.PathLike, ds: Dataset) -> str:
    return _text(ds, "StudyInstanceUID") or _text(ds, "AccessionNumber") or Path(path).resolve().parent.name


def _path_hash(path: str | os.PathLike) -> str:
    """Stable for the same path string, so re-scans of a tree give the same ids."""
    return hashlib.sha256(os.fsencode(os.path.normpath(path))).hexdigest()[:32]


def _view(ds: Dataset) -> str:
    codes = [
        (_text(item, "CodingSchemeDesignator"), _text(item, "CodeValue"), _text(item, "CodeMeaning"))
        for item in ds.get("ViewCodeSequence", [])
    ]
    return derive_view(
        _text(ds, "ViewPosition"),
        codes,
        (_text(ds, "SeriesDescription"), _text(ds, "ProtocolName")),
    )


def _species(ds: Dataset) -> str:
    text = _text(ds, "PatientSpeciesDescription")
    if not text and ds.get("PatientSpeciesCodeSequence"):
        text = _text(ds.PatientSpeciesCodeSequence[0], "CodeMeaning")
    lowered = text.lower()
    for species, synonyms in _SPECIES_SYNONYMS.items():
        if any(word in lowered for word in synonyms):
            return species
    return lowered


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            return (float(value[0]), float(value[1]))
    return None
