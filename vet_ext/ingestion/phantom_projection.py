"""Parallel-beam projection of a phantom body: the exact line integral of attenuation per pixel.

Each primitive contributes its chord length times its attenuation along every ray that crosses
it, computed in closed form (sphere and cylinder intervals after mapping the primitive to a unit
shape), and only over the pixel window its bounding box covers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vet_ext.ingestion.phantom_anatomy import LATERAL, VENTRODORSAL, Primitive, rotation

# --- projection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detector:
    """A parallel-beam exposure: pixel (r, c) integrates along `ray` through origin + c*col + r*row."""

    origin: np.ndarray  # world position of the centre of pixel (0, 0)
    col_axis: np.ndarray
    row_axis: np.ndarray
    ray: np.ndarray
    spacing: float
    shape: tuple[int, int]

    def pixel_of(self, point: np.ndarray) -> np.ndarray:
        """(row, column) where the ray through a world point meets the detector."""
        offset = np.asarray(point, float) - self.origin
        return np.array([offset @ self.row_axis, offset @ self.col_axis]) / self.spacing


def detector_for(view: str, center: np.ndarray, spacing: float, shape: tuple[int, int], roll: float) -> Detector:
    """Display conventions: laterals head-left and dorsum up; VD/DV cranial up, patient's right on the left.

    `roll` turns the beam about the spine axis (patient obliquity); it never changes where a
    body point falls along the spine axis, which is what makes a study's views consistent.
    """
    turn = rotation("x", roll)
    if view in LATERAL:
        col, row, ray = np.array([1.0, 0, 0]), turn @ [0, 0, -1.0], turn @ [0, 1.0, 0]
    elif view in VENTRODORSAL:
        col, row, ray = turn @ [0, 1.0, 0], np.array([1.0, 0, 0]), turn @ [0, 0, 1.0]
    else:
        raise ValueError(f"no detector geometry for view {view!r}")
    rows, columns = shape
    origin = center - (columns / 2 - 0.5) * spacing * col - (rows / 2 - 0.5) * spacing * row
    return Detector(origin, col, row, ray, spacing, shape)


def project(parts: list[Primitive], detector: Detector) -> np.ndarray:
    """Noise-free line integral of attenuation through every pixel (the exponent of Beer-Lambert)."""
    total = np.zeros(detector.shape, dtype=np.float64)
    for part in parts:
        window = _pixel_window(part, detector)
        if window is None:
            continue
        (r0, r1), (c0, c1) = window
        base = part.to_unit @ (detector.origin - part.center)
        step_col = part.to_unit @ detector.col_axis * detector.spacing
        step_row = part.to_unit @ detector.row_axis * detector.spacing
        rows = np.arange(r0, r1, dtype=np.float64)[:, None]
        cols = np.arange(c0, c1, dtype=np.float64)[None, :]
        start = [base[k] + rows * step_row[k] + cols * step_col[k] for k in range(3)]
        total[r0:r1, c0:c1] += part.mu * _chord(part, start, part.to_unit @ detector.ray)
    return total


def _pixel_window(part: Primitive, detector: Detector) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The detector rows/columns the part's bounding box can shadow, or None if off the detector."""
    to_world = np.linalg.inv(part.to_unit)
    extent = np.sqrt((to_world**2).sum(axis=1)) + np.abs(to_world[:, 0]) * part.half_length
    offset = part.center - detector.origin
    window = []
    for axis, size in zip((detector.row_axis, detector.col_axis), detector.shape):
        middle = offset @ axis / detector.spacing
        reach = np.abs(axis) @ extent / detector.spacing
        low, high = max(0, int(np.floor(middle - reach))), min(size, int(np.ceil(middle + reach)) + 1)
        if low >= high:
            return None
        window.append((low, high))
    return window[0], window[1]


_EMPTY = (np.inf, -np.inf)


def _chord(part: Primitive, start: list[np.ndarray], direction: np.ndarray) -> np.ndarray:
    """Length of each ray inside the part; rays are start + t * direction in canonical coordinates,
    with t in world millimetres because the canonical map is linear."""
    ox, oy, oz = start
    if part.kind == "ellipsoid":
        a = direction @ direction
        half_b = ox * direction[0] + oy * direction[1] + oz * direction[2]
        discriminant = half_b**2 - a * (ox**2 + oy**2 + oz**2 - 1.0)
        return 2.0 * np.sqrt(np.maximum(discriminant, 0.0)) / a
    intervals = [_cylinder_interval(start, direction, part.half_length)]
    if part.kind == "capsule":
        intervals += [_sphere_interval(start, direction, end) for end in (-part.half_length, part.half_length)]
    entry = np.minimum.reduce([low for low, _ in intervals])
    exit_ = np.maximum.reduce([high for _, high in intervals])
    return np.maximum(exit_ - entry, 0.0)


def _sphere_interval(start, direction, center_x: float):
    ox, oy, oz = start[0] - center_x, start[1], start[2]
    a = direction @ direction
    half_b = ox * direction[0] + oy * direction[1] + oz * direction[2]
    discriminant = half_b**2 - a * (ox**2 + oy**2 + oz**2 - 1.0)
    root = np.sqrt(np.maximum(discriminant, 0.0))
    hit = discriminant > 0
    return np.where(hit, (-half_b - root) / a, np.inf), np.where(hit, (-half_b + root) / a, -np.inf)


def _cylinder_interval(start, direction, half_length: float):
    """Ray inside the radius-1 tube AND between the end planes; parallel rays handled exactly."""
    ox, oy, oz = start
    dx, dy, dz = direction
    radial_a = dy * dy + dz * dz
    if radial_a < 1e-12:
        inside = oy**2 + oz**2 < 1.0
        low, high = np.where(inside, -np.inf, np.inf), np.where(inside, np.inf, -np.inf)
    else:
        half_b = oy * dy + oz * dz
        discriminant = half_b**2 - radial_a * (oy**2 + oz**2 - 1.0)
        root = np.sqrt(np.maximum(discriminant, 0.0))
        hit = discriminant > 0
        low = np.where(hit, (-half_b - root) / radial_a, np.inf)
        high = np.where(hit, (-half_b + root) / radial_a, -np.inf)
    if abs(dx) < 1e-12:
        between = np.abs(ox) <= half_length
        low, high = np.where(between, low, np.inf), np.where(between, high, -np.inf)
    else:
        t1, t2 = (-half_length - ox) / dx, (half_length - ox) / dx
        low, high = np.maximum(low, np.minimum(t1, t2)), np.minimum(high, np.maximum(t1, t2))
    empty = low >= high
    return np.where(empty, _EMPTY[0], low), np.where(empty, _EMPTY[1], high)
