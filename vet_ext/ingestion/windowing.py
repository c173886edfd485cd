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


def percentile_sample(image: np.ndarray) -> np.ndarray:
    """The strided view of a 2-D image the robust range is read from (about PERCENTILE_SAMPLE pixels)."""
    stride = max(1, int(np.sqrt(image.size / PERCENTILE_SAMPLE)))
    return image[::stride, ::stride]


def percentile_bounds(sample: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(np.asarray(sample, dtype=np.float64), ROBUST_PERCENTILES)
    return float(low), float(high)


def linear_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] mapped linearly to [0, 1] (float64), clipped; a flat range maps to 0."""
    values = np.asarray(values, dtype=np.float64)
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def percentile_window(image: np.ndarray) -> np.ndarray:
    """The 0.5-99.5 % range of a 2-D image mapped to [0, 1] (float64); a flat image maps to 0."""
    return linear_window(image, *percentile_bounds(percentile_sample(image)))
