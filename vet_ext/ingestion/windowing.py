"""Stored pixel values -> display brightness in [0, 1]: the DICOM VOI window, or a robust stand-in.

Every image enters the cache as it would appear on a reading screen, because that is what a
radiologist's labels refer to. A DICOM file usually says how (its VOI window); a file that does
not (no window, or a 16-bit PNG/TIFF export) gets the robust range of its own values, computed
the same way whatever the source, so a study exported twice is cached alike.
"""
from __future__ import annotations

import numpy as np

ROBUST_PERCENTILES = (0.5, 99.5)
PERCENTILE_SAMPLE = 1_000_000  # pixels; a strided subsample keeps percentiles cheap on 40 MP images


def voi_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing (LINEAR, LINEAR_EXACT, SIGMOID) with the output range fixed to [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def percentile_window(values: np.ndarray) -> np.ndarray:
    """The 0.5-99.5 % range of a 2-D image mapped to [0, 1] (float32); a flat image maps to 0."""
    values = np.asarray(values, dtype=np.float64)
    stride = max(1, int(np.sqrt(values.size / PERCENTILE_SAMPLE)))
    low, high = np.percentile(values[::stride, ::stride], ROBUST_PERCENTILES)
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
