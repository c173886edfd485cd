"""Writing DX radiographs as real DICOM files, for phantoms and for tests that need odd files.

pydicom can encode RLE and (through openjpeg) JPEG 2000, but nothing installed here encodes
JPEG Lossless (Process 14), the most common syntax in clinic archives. A lossless JPEG encoder
is small (predict, Huffman-code the differences), so one lives here; the installed pylibjpeg
decoder then checks it on every phantom read-back. JPEG-LS codestreams come from CharLS
(through imagecodecs, when installed).
"""
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, UID("1.2.840.10008.1.2"))
PYDICOM_ENCODED = (RLELossless, JPEG2000Lossless)
JPEG_LOSSLESS = (JPEGLosslessSV1, JPEGLossless)


def write_dicom(path: str | os.PathLike, pixels_uint16: np.ndarray, **dataset_fields: Any) -> Path:
    """Write `make_dx_dataset(pixels_uint16, **dataset_fields)` atomically (temp file + rename), so a
    killed run leaves no half file."""
    ds = make_dx_dataset(pixels_uint16, **dataset_fields)
    return atomic_write(path, lambda stream: ds.save_as(stream, enforce_file_format=True))


def make_dx_dataset(
    pixels_uint16: np.ndarray,
    *,
    study_uid: str,
    sop_uid: str,
    view_position: str | None,
    photometric: str,
    bits_stored: int,
    transfer_syntax: str,
    **meta,
) -> Dataset:
    """A valid DX For Presentation dataset; `meta` sets further attributes by DICOM keyword.

    Stored values are taken as given (uint8/uint16, int8/int16 for signed data; frames x rows x
    columns for multi-frame; a trailing axis of 3 for RGB/YBR_FULL). Tests build on this and then
    break one thing at a time.
    """
    pixels = np.asarray(pixels_uint16)
    color = photometric in ("RGB", "YBR_FULL")
    frame_ndim = 3 if color else 2
    if pixels.ndim not in (frame_ndim, frame_ndim + 1) or pixels.dtype.kind not in "ui":
        raise UserError(f"write_dicom: pixels must be integer {frame_ndim}-D (or with a frame axis), "
                        f"got {pixels.dtype} {pixels.shape}")
    bits_allocated = 8 * pixels.dtype.itemsize
    if not 1 <= bits_stored <= bits_allocated or bits_allocated > 16:
        raise UserError(f"write_dicom: bits_stored={bits_stored} does not fit {pixels.dtype}")
    unknown = [key for key in meta if tag_for_keyword(key) is None]
    if unknown:
        raise UserError(f"write_dicom: unknown DICOM keyword(s) {', '.join(sorted(unknown))}")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[study_uid, sop_uid, "series"])
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if view_position:
        ds.ViewPosition = view_position
    frames = pixels if pixels.ndim == frame_ndim + 1 else pixels[None]
    ds.Rows, ds.Columns = frames.shape[1:3]
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if not color:
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    for keyword, value in meta.items():
        setattr(ds, keyword, value)
    _set_pixel_data(ds, frames, UID(transfer_syntax))
    return ds


def _set_pixel_data(ds: Dataset, frames: np.ndarray, syntax: UID) -> None:
    little = frames.astype(frames.dtype.newbyteorder("<"), copy=False)
    if syntax in NATIVE_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = little.tobytes()
        ds["PixelData"].VR = "OB" if frames.dtype.itemsize == 1 else "OW"
    elif syntax in PYDICOM_ENCODED:
        ds.compress(syntax, little if len(frames) > 1 else little[0], generate_instance_uid=False)
    elif syntax in (*JPEG_LOSSLESS, JPEGLSLossless):
        if ds.PixelRepresentation != 0 or ds.SamplesPerPixel != 1:
            raise UserError(f"write_dicom: the {syntax.name} writer handles unsigned grayscale only")
        encoded = [_encode_frame(frame, syntax, int(ds.BitsStored)) for frame in frames]
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        raise UserError(f"write_dicom: cannot encode transfer syntax {syntax} ({syntax.name})")


def _encode_frame(frame: np.ndarray, syntax: UID, bits_stored: int) -> bytes:
    if syntax != JPEGLSLossless:
        return encode_jpeg_lossless(frame, bits_stored, predictor=1 if syntax == JPEGLosslessSV1 else 7)
    try:
        import imagecodecs
    except ImportError as exc:
        raise UserError("write_dicom: JPEG-LS needs imagecodecs (pip install imagecodecs)") from exc
    return imagecodecs.jpegls_encode(np.ascontiguousarray(frame), level=0)


# --- JPEG Lossless (ITU T.81 Annex H), one component, point transform 0 ----------------------

_CATEGORY_BITS = 5  # every difference category 0..16 gets a 5-bit code: simple, valid, compact enough


def encode_jpeg_lossless(image: np.ndarray, precision: int, predictor: int = 1) -> bytes:
    """Encode an unsigned 2-D image as a lossless JPEG (SOF3) with selection value 1..7."""
    if image.ndim != 2 or not 2 <= precision <= 16 or not 1 <= predictor <= 7:
        raise UserError("JPEG lossless: need 2-D image, precision 2..16, predictor 1..7")
    samples = image.astype(np.int64)
    if samples.min() < 0 or samples.max() >= 2**precision:
        raise UserError(f"JPEG lossless: sample values exceed {precision} bits")
    difference = (samples - _prediction(samples, precision, predictor)) % 65536
    difference = np.where(difference > 32768, difference - 65536, difference).ravel()
    category = np.frexp(np.abs(difference))[1].astype(np.int64)  # bit length of |difference|
    extra = np.where(difference >= 0, difference, difference + (1 << category) - 1)
    extra = np.where(category == 16, 0, extra)
    extra_bits = np.where(category == 16, 0, category)
    words = (category << extra_bits) | extra
    scan = _pack_bits(words, _CATEGORY_BITS + extra_bits)
    rows, columns = image.shape
    header = b"".join(
        (
            b"\xff\xd8",
            _segment(0xC3, bytes([precision]) + rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + b"\x01\x01\x11\x00"),
            _segment(0xC4, b"\x00" + _huffman_bits_counts() + bytes(range(17))),
            _segment(0xDA, bytes([1, 1, 0x00, predictor, 0, 0])),
        )
    )
    return header + scan + b"\xff\xd9"


def _prediction(samples: np.ndarray, precision: int, predictor: int) -> np.ndarray:
    """T.81 H.1.2.1: the chosen predictor inside, Ra on the first row, Rb on the first column."""
    left = np.zeros_like(samples)
    left[:, 1:] = samples[:, :-1]
    above = np.zeros_like(samples)
    above[1:, :] = samples[:-1, :]
    diagonal = np.zeros_like(samples)
    diagonal[1:, 1:] = samples[:-1, :-1]
    inner = {
        1: left,
        2: above,
        3: diagonal,
        4: left + above - diagonal,
        5: left + ((above - diagonal) >> 1),
        6: above + ((left - diagonal) >> 1),
        7: (left + above) >> 1,
    }[predictor]
    prediction = inner.copy()
    prediction[0, :] = left[0, :]
    prediction[1:, 0] = above[1:, 0]
    prediction[0, 0] = 1 << (precision - 1)
    return prediction


def _huffman_bits_counts() -> bytes:
    counts = [0] * 16
    counts[_CATEGORY_BITS - 1] = 17
    return bytes(counts)


def _pack_bits(words: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length codes MSB first, pad with ones, stuff 0x00 after each 0xFF."""
    lengths = lengths.astype(np.int32)
    shifts = lengths[:, None] - 1 - np.arange(int(lengths.max()), dtype=np.int32)[None, :]
    present = shifts >= 0
    bits = ((words.astype(np.uint32)[:, None] >> np.maximum(shifts, 0).astype(np.uint32)) & 1).astype(np.uint8)[present]
    padding = (-bits.size) % 8
    packed = np.packbits(np.concatenate([bits, np.ones(padding, dtype=np.uint8)]))
    stuffed = np.insert(packed, np.flatnonzero(packed == 0xFF) + 1, 0)
    return stuffed.tobytes()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload
