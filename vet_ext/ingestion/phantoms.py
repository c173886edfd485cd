"""Procedural quadruped phantoms, projected into radiographic views and written as DICOM studies.

VET-DINO needs data it may ship: demo runs, tests and benchmarks cannot use clinic images. A
phantom is built from analytic primitives (ellipsoids, cylinders, capsules) whose attenuation
adds up, so a view is the exact line integral through ONE body (Beer-Lambert plus quantum
noise): the lateral and ventro-dorsal views of a study agree geometrically, the way the
multi-view objective assumes real studies do. Findings are study-level changes to the body, so
they show in every view.

Every random draw comes from a generator seeded by (seed, study index), in a fixed order that does
not depend on which findings are present; forcing a finding on or off therefore changes only the
anatomy it concerns, which is what the tests compare.
"""
import argparse
import csv
import io
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless
from tqdm import tqdm

from dinov2.utils.cli import run_cli
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_write_text
from vet_ext.ingestion.dicom_write import write_dicom
from vet_ext.ingestion.views import VIEW_CODE_ITEMS

# --- materials: effective linear attenuation per mm at a ~60 keV spectrum --------------------
MU_SOFT = 0.020
MU_FAT = 0.017
MU_BONE = 0.050  # cortical
MU_CANCELLOUS = 0.036
MU_AIR = 0.0
MU_MASS = 0.026  # a mineralising mass: denser than soft tissue, far below bone

FINDINGS = ("cardiomegaly", "pleural_effusion", "mass", "fracture")
PREVALENCE = {"cardiomegaly": 0.30, "pleural_effusion": 0.22, "mass": 0.25, "fracture": 0.22}
BODY_PARTS = ("THORAX", "ABDOMEN", "WHOLE BODY")
LATERAL = ("LL", "RL")
VENTRODORSAL = ("VD", "DV")

EXPOSURE_PHOTONS = 20000.0  # unattenuated quanta per pixel
MAX_LINE_INTEGRAL = 9.0  # detector saturation: stored value = line integral / this * full scale
UID_ROOT = "vet-dino-phantom"


# --- primitives ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Primitive:
    """An analytic solid whose attenuation `mu` adds to whatever encloses it.

    `to_unit` maps a world offset from `center` into the canonical shape: the unit sphere
    (ellipsoid), or a radius-1 cylinder along x with |x| <= half_length (capsules add unit
    spheres at both ends). Nesting with negative `mu` gives cavities (lungs, marrow, brain).
    """

    kind: str
    center: np.ndarray
    to_unit: np.ndarray
    half_length: float
    mu: float

    def moved(self, rotation: np.ndarray, offset: np.ndarray) -> "Primitive":
        return Primitive(self.kind, rotation @ self.center + offset, self.to_unit @ rotation.T, self.half_length, self.mu)


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def _frame(direction: np.ndarray) -> np.ndarray:
    """A rotation whose first column is `direction` (the shape's long axis)."""
    u = direction / np.linalg.norm(direction)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = np.cross(helper, u)
    v /= np.linalg.norm(v)
    return np.column_stack([u, v, np.cross(u, v)])


def ellipsoid(center, semi_axes, mu: float, rotation: np.ndarray | None = None) -> Primitive:
    rotation = np.eye(3) if rotation is None else rotation
    return Primitive("ellipsoid", np.asarray(center, float), np.diag(1.0 / np.asarray(semi_axes, float)) @ rotation.T, 0.0, mu)


def rod(kind: str, start, end, radius: float, mu: float) -> Primitive:
    """A capsule or cylinder of circular section from `start` to `end` (bones, ribs, limbs)."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    to_unit = np.eye(3) / radius @ _frame(end - start).T
    return Primitive(kind, (start + end) / 2, to_unit, np.linalg.norm(end - start) / (2 * radius), mu)


def elliptic_capsule(center, half_length_mm: float, cap: float, width: float, height: float, mu: float) -> Primitive:
    """Barrel-shaped trunk: an elliptic cylinder along x with ellipsoidal end caps."""
    return Primitive("capsule", np.asarray(center, float), np.diag([1 / cap, 2 / width, 2 / height]), half_length_mm / cap, mu)


# --- anatomy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyPlan:
    """Everything random about one study, drawn up front in a fixed order."""

    species: str
    length: float  # trunk length, mm
    width: float
    height: float
    limb_angles: np.ndarray  # (4, 3) degrees: upper, lower, paw per limb
    limb_abduction: np.ndarray  # (4,) degrees
    tail_curl: float
    gas: np.ndarray  # (n, 4): bowel gas bubbles x, y, z (fractions) and size
    heart_scale: float
    effusion_scale: float
    mass_site: np.ndarray  # (4,): thorax?, x, y/z fractions
    mass_radius: float
    fracture_limb: int
    fracture_at: float
    fracture_gap: float
    fracture_shift: float
    body_rotation: np.ndarray
    body_offset: np.ndarray
    findings: dict[str, int]


def draw_plan(rng: np.random.Generator, findings: Mapping[str, bool] | None) -> StudyPlan:
    species = "feline" if rng.random() < 0.3 else "canine"
    if species == "canine":
        length = rng.uniform(380, 720)
        height = length * rng.uniform(0.40, 0.50)
        width = height * rng.uniform(0.70, 0.92)
    else:
        length = rng.uniform(280, 380)
        height = length * rng.uniform(0.34, 0.40)
        width = height * rng.uniform(0.80, 0.95)
    limb_angles = np.column_stack(
        [rng.uniform(-25, 25, 4), rng.uniform(-20, 20, 4), rng.uniform(45, 80, 4)]
    )
    drawn = {name: bool(rng.random() < PREVALENCE[name]) for name in FINDINGS}
    if findings:
        unknown = set(findings) - set(FINDINGS)
        if unknown:
            raise UserError(f"make_study: unknown finding(s) {sorted(unknown)}; known: {FINDINGS}")
        drawn.update({name: bool(value) for name, value in findings.items()})
    rotation = _rotation("z", rng.uniform(-4, 4)) @ _rotation("y", rng.uniform(-3, 3)) @ _rotation("x", rng.uniform(-6, 6))
    return StudyPlan(
        species=species,
        length=length,
        width=width,
        height=height,
        limb_angles=limb_angles,
        limb_abduction=rng.uniform(-8, 8, 4),
        tail_curl=rng.uniform(-40, 25),
        gas=rng.uniform([0.0, -0.6, -0.6, 0.02], [0.4, 0.6, 0.5, 0.05], size=(10, 4)),
        heart_scale=rng.uniform(1.30, 1.45),
        effusion_scale=rng.uniform(0.30, 0.45),
        mass_site=rng.uniform([0, -0.5, -0.5, -0.4], [1, 0.5, 0.5, 0.4]),
        mass_radius=rng.uniform(0.04, 0.07),
        fracture_limb=int(rng.integers(4)),
        fracture_at=rng.uniform(0.35, 0.65),
        fracture_gap=rng.uniform(0.008, 0.016),
        fracture_shift=rng.uniform(0.3, 0.9),
        body_rotation=rotation,
        body_offset=rng.uniform(-0.04, 0.04, 3) * length,
        findings={name: int(drawn[name]) for name in FINDINGS},
    )


def build_body(plan: StudyPlan) -> list[Primitive]:
    """The phantom in world millimetres: x caudal, y to the animal's left, z dorsal."""
    L, W, H = plan.length, plan.width, plan.height
    cap = 0.25 * L
    parts = [elliptic_capsule((0, 0, 0), L / 2 - cap, cap, W, H, MU_SOFT)]
    parts += _thorax(plan)
    parts += _abdomen(plan)
    parts += _spine_and_tail(plan)
    parts += _head_and_neck(plan)
    parts += _limbs(plan)
    if plan.findings["mass"]:
        parts.append(_mass(plan))
    return [part.moved(plan.body_rotation, plan.body_offset) for part in parts]


def _scaled(fractions, plan: StudyPlan) -> np.ndarray:
    """Anatomy is specified as fractions of trunk length, width and height."""
    return np.asarray(fractions, float) * [plan.length, plan.width, plan.height]


CAVITY_CENTER, CAVITY_AXES = (-0.20, 0.0, 0.04), (0.25, 0.40, 0.39)
HEART_CENTER, HEART_AXES = (-0.21, 0.02, -0.12), (0.10, 0.19, 0.19)


def _thorax(plan: StudyPlan) -> list[Primitive]:
    L, H = plan.length, plan.height
    cavity_center, cavity_axes = _scaled(CAVITY_CENTER, plan), _scaled(CAVITY_AXES, plan)
    heart_axes = _scaled(HEART_AXES, plan) * (plan.heart_scale if plan.findings["cardiomegaly"] else 1.0)
    parts = [
        ellipsoid(cavity_center, cavity_axes, MU_AIR - MU_SOFT),
        ellipsoid(_scaled(HEART_CENTER, plan), heart_axes, MU_SOFT - MU_AIR, _rotation("y", 35)),
    ]
    if plan.findings["pleural_effusion"]:
        parts += _effusion(cavity_center, cavity_axes, plan.effusion_scale)
    for i, x in enumerate(np.linspace(-0.42 * L, -0.02 * L, 13)):
        parts += _rib_pair(x, plan, thickness=0.009 * L * (1.0 if i < 10 else 0.8))
    parts += [ellipsoid((x, 0, -0.40 * H), (0.022 * L, 0.012 * L, 0.012 * L), MU_CANCELLOUS) for x in np.linspace(-0.40 * L, -0.06 * L, 7)]
    return parts


def _effusion(cavity_center: np.ndarray, cavity_axes: np.ndarray, depth: float) -> list[Primitive]:
    """Fluid pooled in the ventral thorax, one flat pool each side of the heart.

    In the cavity's unit-sphere coordinates a pool is an ellipsoid tangent to the wall at a
    ventrolateral point, `depth` thick along the wall normal and at most sqrt(depth) wide: that
    keeps it inside the cavity, so it only ever replaces air by fluid.
    """
    pools = []
    to_cavity = np.diag(1.0 / cavity_axes)
    for side in (-1, 1):
        normal = np.array([0.0, side * np.sin(np.radians(25)), -np.cos(np.radians(25))])
        spread = 0.95 * np.sqrt(depth)
        to_unit = np.diag(1.0 / np.array([depth, spread, spread])) @ _frame(normal).T @ to_cavity
        center = cavity_center + cavity_axes * normal * (1.0 - depth)
        pools.append(Primitive("ellipsoid", center, to_unit, 0.0, MU_SOFT - MU_AIR))
    return pools


def _rib_pair(x: float, plan: StudyPlan, thickness: float) -> list[Primitive]:
    """A rib follows the body wall from the spine to the sternum, sweeping caudally as it descends."""
    W, H = plan.width, plan.height
    angles = np.radians([75, 35, -5, -45, -75])
    ribs = []
    for side in (-1, 1):
        points = [
            np.array([x + 0.12 * H * (1 - np.sin(a)), side * 0.44 * W * np.cos(a), 0.44 * H * np.sin(a)]) for a in angles
        ]
        ribs += [rod("capsule", p, q, thickness, MU_BONE * 0.9) for p, q in zip(points, points[1:])]
    return ribs


def _abdomen(plan: StudyPlan) -> list[Primitive]:
    L, W, H = plan.length, plan.width, plan.height
    fat = MU_FAT - MU_SOFT
    parts = [
        ellipsoid((0.24 * L, 0, -0.02 * H), (0.20 * L, 0.40 * W, 0.38 * H), fat),
        ellipsoid((0.08 * L, 0, -0.03 * H), (0.07 * L, 0.36 * W, 0.30 * H), -fat, _rotation("y", -15)),
        ellipsoid((0.40 * L, 0, -0.22 * H), (0.05 * L, 0.05 * L, 0.045 * L), -fat),
        ellipsoid((0.12 * L, 0.05 * W, 0.18 * H), (0.035 * L, 0.2 * W, 0.08 * H), MU_AIR - MU_SOFT),
    ]
    for side in (-1, 1):
        parts.append(ellipsoid((0.21 * L, side * 0.18 * W, 0.22 * H), (0.05 * L, 0.03 * L, 0.035 * L), -fat))
    for gx, gy, gz, size in plan.gas:
        center = (0.18 * L + gx * L * 0.5, gy * 0.3 * W, gz * 0.3 * H)
        parts.append(ellipsoid(center, (size * L, 0.7 * size * L, 0.7 * size * L), MU_AIR - MU_FAT))
    return parts


def _spine_and_tail(plan: StudyPlan) -> list[Primitive]:
    L, H = plan.length, plan.height
    z = 0.30 * H
    parts = []
    edges = np.concatenate([np.linspace(-0.46 * L, -0.02 * L, 14), np.linspace(-0.02 * L, 0.38 * L, 8)[1:]])
    for i, (start, end) in enumerate(zip(edges, edges[1:])):
        gap = 0.12 * (end - start)
        parts.append(rod("cylinder", (start + gap / 2, 0, z), (end - gap / 2, 0, z), 0.022 * L, MU_CANCELLOUS))
        middle = (start + end) / 2
        if i < 13:  # thoracic: tall spinous processes
            parts.append(ellipsoid((middle - 0.01 * L, 0, z + 0.09 * H), (0.008 * L, 0.005 * L, 0.08 * H), MU_CANCELLOUS, _rotation("y", 25)))
        else:  # lumbar: transverse processes
            parts += [ellipsoid((middle, side * 0.05 * L, z - 0.01 * H), (0.01 * L, 0.035 * L, 0.005 * L), MU_CANCELLOUS) for side in (-1, 1)]
    parts.append(rod("capsule", (0.385 * L, 0, z), (0.46 * L, 0, z - 0.02 * H), 0.024 * L, MU_CANCELLOUS))
    parts += [ellipsoid((0.40 * L, side * 0.08 * L, 0.12 * H), (0.09 * L, 0.015 * L, 0.04 * L), MU_CANCELLOUS, _rotation("y", -30)) for side in (-1, 1)]
    # Tail: a curling chain of small vertebrae in a soft sleeve.
    tail_length = (0.9 if plan.species == "feline" else 0.6) * L
    segments = 12
    heading, point = np.radians(-10.0), np.array([0.47 * L, 0.0, z - 0.02 * H])
    for _ in range(segments):
        step = tail_length / segments
        nxt = point + step * np.array([np.cos(heading), 0.0, np.sin(heading)])
        parts.append(rod("capsule", point, nxt, 0.035 * L, MU_SOFT))
        parts.append(rod("capsule", point + 0.1 * (nxt - point), nxt - 0.1 * (nxt - point), 0.010 * L, MU_CANCELLOUS))
        heading += np.radians(plan.tail_curl) / segments
        point = nxt
    return parts


def _head_and_neck(plan: StudyPlan) -> list[Primitive]:
    L, H = plan.length, plan.height
    feline = plan.species == "feline"
    skull = np.array([-0.70 * L, 0.0, 0.50 * H])
    skull_axes = np.array([0.11, 0.085, 0.08]) * L * (1.1 if feline else 1.0)
    neck_start, neck_end = np.array([-0.40 * L, 0, 0.15 * H]), skull + np.array([0.06 * L, 0, -0.05 * L])
    parts = [rod("capsule", neck_start, neck_end, 0.10 * L, MU_SOFT)]
    for a, b in zip(np.linspace(0, 1, 8), np.linspace(0, 1, 8)[1:]):
        start = neck_start + a * (neck_end - neck_start) + np.array([0, 0, 0.04 * L])
        end = neck_start + b * (neck_end - neck_start) + np.array([0, 0, 0.04 * L])
        parts.append(rod("cylinder", start + 0.08 * (end - start), end - 0.08 * (end - start), 0.02 * L, MU_CANCELLOUS))
    snout_length = (0.10 if feline else 0.22) * L
    nose = skull + np.array([-0.08 * L - snout_length, 0, -0.05 * L])
    parts += [
        ellipsoid(skull, skull_axes * 1.25, MU_SOFT),
        ellipsoid(skull, skull_axes, MU_BONE * 0.8 - MU_SOFT),
        ellipsoid(skull + [0.01 * L, 0, 0.005 * L], skull_axes * 0.85, MU_SOFT - MU_BONE * 0.8),
        rod("capsule", skull + [-0.06 * L, 0, -0.02 * L], nose, 0.045 * L, MU_SOFT),
        rod("capsule", skull + [-0.06 * L, 0, -0.02 * L], nose + [0.01 * L, 0, 0.005 * L], 0.03 * L, MU_CANCELLOUS - MU_SOFT),
        rod("capsule", skull + [-0.02 * L, 0, -0.07 * L], nose + [0.01 * L, 0, -0.025 * L], 0.012 * L, MU_BONE - MU_SOFT),
    ]
    return parts


LIMB_ROOTS = ((-0.30, -1), (-0.30, 1), (0.34, -1), (0.34, 1))  # (x fraction of length, side): fore, hind
BONE_LENGTHS = (0.27, 0.27, 0.10)  # upper, lower, paw; fraction of trunk length
FRACTURED_BONE = 1  # the lower long bone (radius/ulna or tibia) is the one that breaks


def _limb_joints(plan: StudyPlan, limb: int) -> list[np.ndarray]:
    """Shoulder/hip, elbow/stifle, carpus/tarsus and toe positions of one limb."""
    x, side = LIMB_ROOTS[limb]
    hind = limb >= 2
    lengths = np.array(BONE_LENGTHS) * plan.length * (1.15 if plan.species == "feline" else 1.0)
    joints = [np.array([x * plan.length, side * 0.30 * plan.width, -0.05 * plan.height])]
    heading = 0.0
    for bone in range(3):
        heading += plan.limb_angles[limb, bone] * (-1 if hind and bone == 1 else 1)
        direction = _rotation("x", side * plan.limb_abduction[limb]) @ _rotation("y", heading) @ np.array([0.0, 0.0, -1.0])
        joints.append(joints[-1] + lengths[bone] * direction)
    return joints


def _limbs(plan: StudyPlan) -> list[Primitive]:
    """Four limbs as chains of hollow long bones (cortex minus marrow) in soft-tissue sleeves."""
    L, W, H = plan.length, plan.width, plan.height
    radii = np.array([0.020, 0.016, 0.010]) * L
    parts = []
    for limb, (x, side) in enumerate(LIMB_ROOTS):
        joints = _limb_joints(plan, limb)
        for bone, (start, end) in enumerate(zip(joints, joints[1:])):
            parts.append(rod("capsule", start, end, radii[bone] * (2.6 if bone < 2 else 1.8), MU_SOFT))
            fractured = plan.findings["fracture"] and limb == plan.fracture_limb and bone == FRACTURED_BONE
            parts += _long_bone(start, end, radii[bone], plan if fractured else None)
        if limb < 2:  # scapula, flat against the thoracic wall
            parts.append(ellipsoid(((x - 0.03) * L, side * 0.36 * W, 0.15 * H), (0.07 * L, 0.008 * L, 0.14 * H), MU_CANCELLOUS, _rotation("y", -25)))
    return parts


def _long_bone(start: np.ndarray, end: np.ndarray, radius: float, fracture: StudyPlan | None) -> list[Primitive]:
    """Cortex and marrow; a fracture splits the shaft with a gap and shifts the distal piece sideways."""
    pieces = [(start, end)]
    if fracture is not None:
        axis = end - start
        gap = fracture.fracture_gap * fracture.length
        split = start + fracture.fracture_at * axis
        unit = axis / np.linalg.norm(axis)
        shift = fracture.fracture_shift * radius * _frame(axis)[:, 1]
        pieces = [(start, split - unit * gap / 2), (split + unit * gap / 2 + shift, end + shift)]
    bone = []
    for a, b in pieces:
        bone.append(rod("capsule", a, b, radius, MU_BONE - MU_SOFT))
        bone.append(rod("capsule", a, b, 0.55 * radius, MU_SOFT - MU_BONE))
    return bone


def _mass(plan: StudyPlan) -> Primitive:
    center, contrast = _mass_site(plan)
    return ellipsoid(center, (plan.mass_radius * plan.length,) * 3, contrast)


def _mass_site(plan: StudyPlan) -> tuple[np.ndarray, float]:
    """Centre and contrast: a nodule in the dorsal lung field replaces air, an abdominal one fat."""
    in_thorax, fx, fy, fz = plan.mass_site
    if in_thorax < 0.5:
        return _scaled((-0.2 + fx * 0.25, fy * 0.4, 0.15 + fz * 0.2), plan), MU_MASS - MU_AIR
    return _scaled((0.22 + fx * 0.2, fy * 0.4, fz * 0.3), plan), MU_MASS - MU_FAT


def landmarks(plan: StudyPlan) -> dict[str, np.ndarray]:
    """World positions where each finding sits (present or not), for tests and annotated demos."""
    joints = _limb_joints(plan, plan.fracture_limb)
    start, end = joints[FRACTURED_BONE], joints[FRACTURED_BONE + 1]
    body = {
        "thorax": _scaled(CAVITY_CENTER, plan),
        "heart": _scaled(HEART_CENTER, plan),
        "mass": _mass_site(plan)[0],
        "fracture": start + plan.fracture_at * (end - start),
    }
    return {name: plan.body_rotation @ point + plan.body_offset for name, point in body.items()}


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
    turn = _rotation("x", roll)
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


# --- exposure and the study --------------------------------------------------------------------


@dataclass
class PhantomView:
    """One radiograph of a study: its geometry-true view and how its DICOM file records it."""

    view: str
    recorded_view: str  # what read_dicom must report from the written tags: view, OTHER or UNKNOWN
    line_integral: np.ndarray  # noise-free, float32
    pixels: np.ndarray  # stored detector values, uint16
    photometric: str
    bits_stored: int
    transfer_syntax: str
    sop_uid: str
    file_name: str
    meta: dict
    detector: Detector


@dataclass
class PhantomStudy:
    study_uid: str
    species: str
    body_part: str
    labels: dict[str, int]
    views: list[PhantomView]
    landmarks: dict[str, np.ndarray]


_PART_X_RANGE = {"THORAX": (-0.62, 0.12), "ABDOMEN": (-0.12, 0.62), "WHOLE BODY": (-1.08, 0.95)}
_PART_WORD = {"THORAX": "Thorax", "ABDOMEN": "Abdomen", "WHOLE BODY": "Whole body"}
_VIEW_WORDS = {
    "LL": ("L LAT", "Left lateral", "LLAT", "Lateral left"),
    "RL": ("R LAT", "Right lateral", "RLAT", "Lateral right"),
    "VD": ("VD", "V/D", "Ventrodorsal"),
    "DV": ("DV", "D/V", "Dorsoventral"),
}
_SPECIES_CODES = {"canine": ("448771007", "Canis lupus familiaris"), "feline": ("448169003", "Felis catus")}
_PET_NAMES = ("Rex", "Bella", "Milo", "Luna", "Max", "Nala", "Oscar", "Kira", "Toby", "Mochi")
_OWNERS = ("Smith", "Garcia", "Muller", "Rossi", "Dubois", "Jansen", "Kowalski", "Silva")
ASPECT = 0.8  # short side / long side of the detector


def make_study(study_index: int, seed: int = 0, size: int = 512, *, findings: Mapping[str, bool] | None = None) -> PhantomStudy:
    """Build, project and expose one study in memory (no files); `findings` forces labels on/off."""
    if size < 32:
        raise UserError(f"phantom size must be >= 32 pixels, got {size}")
    rng = np.random.default_rng([seed, study_index])
    plan = draw_plan(rng, findings)
    parts = build_body(plan)
    body_part = BODY_PARTS[rng.choice(3, p=[0.45, 0.30, 0.25])]
    views = _draw_view_set(rng)
    study_uid = pydicom.uid.generate_uid(entropy_srcs=[UID_ROOT, str(seed), str(study_index)])
    shared = _study_meta(rng, plan, body_part, study_index)
    low, high = (np.array(_PART_X_RANGE[body_part]) * plan.length)
    spacing = (high - low) / size
    perpendicular = int(round(size * ASPECT))
    lateral_z = -0.12 * plan.length if body_part == "WHOLE BODY" else 0.0
    out = []
    for number, view in enumerate(views):
        roll = rng.uniform(-8, 8)
        jitter = rng.uniform(-0.03, 0.03) * plan.length
        center = np.array([(low + high) / 2, jitter, lateral_z + jitter])
        shape = (perpendicular, size) if view in LATERAL else (size, perpendicular)
        detector = detector_for(view, center, spacing, shape, roll)
        line_integral = project(parts, detector)
        sop_uid = pydicom.uid.generate_uid(entropy_srcs=[UID_ROOT, str(seed), str(study_index), str(number)])
        out.append(_expose_view(rng, view, number, line_integral, sop_uid, detector, body_part, shared))
    return PhantomStudy(study_uid, plan.species, body_part, dict(plan.findings), out, landmarks(plan))


def _draw_view_set(rng: np.random.Generator) -> list[str]:
    count = int(rng.choice([1, 2, 3, 4], p=[0.12, 0.53, 0.30, 0.05]))
    lateral = LATERAL[int(rng.integers(2))]
    ventral = "VD" if rng.random() < 0.75 else "DV"
    if count == 1:
        return [lateral if rng.random() < 0.6 else ventral]
    return {2: [lateral, ventral], 3: ["LL", "RL", ventral], 4: ["LL", "RL", "VD", "DV"]}[count]


def _study_meta(rng: np.random.Generator, plan: StudyPlan, body_part: str, study_index: int) -> dict:
    """Attributes shared by every file of the study, including fake PHI for the stripping tests."""
    meta = {
        "PatientName": f"{_OWNERS[rng.integers(len(_OWNERS))]}^{_PET_NAMES[rng.integers(len(_PET_NAMES))]}",
        "PatientID": f"PH{rng.integers(10**7):07d}",
        "PatientBirthDate": f"{rng.integers(2008, 2024)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        "InstitutionName": f"Phantom Veterinary Clinic {rng.integers(1, 9)}",
        "ReferringPhysicianName": f"Dr^{_OWNERS[rng.integers(len(_OWNERS))]}",
        "AccessionNumber": f"A{study_index:08d}",
        "StudyDate": f"2024{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        "StudyTime": "120000",
        "Manufacturer": "VET-DINO phantom",
        "BodyPartExamined": body_part,
        "RescaleIntercept": 0,
        "RescaleSlope": 1,
        "RescaleType": "US",
    }
    if rng.random() < 0.7:
        meta["PatientSpeciesDescription"] = plan.species.capitalize()
    else:
        code, meaning = _SPECIES_CODES[plan.species]
        meta["PatientSpeciesCodeSequence"] = Sequence([_code_item("SCT", code, meaning)])
    return meta


def _code_item(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _expose_view(rng, view, number, line_integral, sop_uid, detector, body_part, shared) -> PhantomView:
    """Detector physics (quantum noise, heel effect, collimation) and how the file describes itself."""
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    bits = int(rng.choice([12, 12, 14, 15, 16]))
    syntax = [ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless][rng.choice(3, p=[0.5, 0.25, 0.25])]
    source = rng.choice(["position", "description", "code", "ambiguous", "none"], p=[0.72, 0.1, 0.08, 0.03, 0.07])
    has_window, has_extension, imager_spacing = rng.random() < 0.85, rng.random() < 0.8, rng.random() < 0.2
    wording = int(rng.integers(4))
    collimated = rng.random() < 0.4
    margins = rng.uniform(0.02, 0.07, 4)

    heel = np.linspace(1.06, 0.94, line_integral.shape[1])[None, :]  # anode heel: intensity falls across
    photons = EXPOSURE_PHOTONS * heel * np.exp(-line_integral)
    counts = np.maximum(photons + np.sqrt(photons) * rng.standard_normal(line_integral.shape), 0.5)
    measured = np.log(EXPOSURE_PHOTONS * heel / counts)
    full_scale = 2**bits - 1
    stored = np.rint(np.clip(measured / MAX_LINE_INTEGRAL, 0.0, 1.0) * full_scale)
    if collimated:  # unexposed border reads as full attenuation
        rows, cols = stored.shape
        top, bottom, left, right = (margins * [rows, rows, cols, cols]).astype(int)
        mask = np.ones_like(stored, dtype=bool)
        mask[top : rows - bottom, left : cols - right] = False
        stored[mask] = full_scale
    meta = dict(shared, SeriesNumber=number + 1, InstanceNumber=number + 1)
    meta["ImagerPixelSpacing" if imager_spacing else "PixelSpacing"] = [round(detector.spacing, 4)] * 2
    body = measured[line_integral > 0.3]
    if has_window and body.size:
        low, high = np.percentile(body, [1.0, 99.7]) / MAX_LINE_INTEGRAL * full_scale
        center, width = round((low + high) / 2), max(2, round(high - low))
        # +1 keeps LINEAR windowing exactly mirror-symmetric, so both photometrics display alike.
        meta["WindowCenter"] = center if photometric == "MONOCHROME2" else full_scale - center + 1
        meta["WindowWidth"] = width
        meta["VOILUTFunction"] = "LINEAR"
    if photometric == "MONOCHROME1":
        stored = full_scale - stored
    view_position, recorded = _view_tags(view, source, wording, body_part, meta)
    extension = ".dcm" if has_extension else ""
    return PhantomView(
        view=view,
        recorded_view=recorded,
        line_integral=line_integral.astype(np.float32),
        pixels=stored.astype(np.uint16),
        photometric=photometric,
        bits_stored=bits,
        transfer_syntax=str(syntax),
        sop_uid=str(sop_uid),
        file_name=f"{sop_uid}{extension}",
        meta=dict(meta, view_position=view_position),
        detector=detector,
    )


def _view_tags(view: str, source: str, wording: int, body_part: str, meta: dict) -> tuple[str | None, str]:
    """Record the view the way archives do: a tag, a code, free text, an unsided label, or nothing."""
    words = _VIEW_WORDS[view]
    part = _PART_WORD[body_part]
    if source == "position":
        meta["SeriesDescription"] = part
        return view, view
    if source == "description":
        meta["SeriesDescription"] = f"{part} {words[wording % len(words)]}"
        return None, view
    if source == "code":
        meta["ViewCodeSequence"] = Sequence([_code_item(*VIEW_CODE_ITEMS[view])])
        meta["ProtocolName"] = part
        return None, view
    if source == "ambiguous":
        meta["SeriesDescription"] = f"{part} {'LAT' if view in LATERAL else 'XR'}"
        return None, "OTHER"
    return None, "UNKNOWN"


# --- writing many studies ------------------------------------------------------------------


def write_study(study: PhantomStudy, out_dir: Path) -> list[Path]:
    paths = []
    for view in study.views:
        meta = dict(view.meta)
        view_position = meta.pop("view_position")
        path = out_dir / study.study_uid / view.file_name
        write_dicom(
            path,
            view.pixels,
            study_uid=study.study_uid,
            sop_uid=view.sop_uid,
            view_position=view_position,
            photometric=view.photometric,
            bits_stored=view.bits_stored,
            transfer_syntax=view.transfer_syntax,
            **meta,
        )
        paths.append(path)
    return paths


def _generate_one(task: tuple[int, int, int, str]) -> dict:
    index, seed, size, out_dir = task
    study = make_study(index, seed, size)
    write_study(study, Path(out_dir))
    return {
        "study_id": study.study_uid,
        "labels": study.labels,
        "views": [view.view for view in study.views],
        "recorded_views": [view.recorded_view for view in study.views],
    }


def generate_studies(
    out_dir: str | os.PathLike, n_studies: int, seed: int = 0, size: int = 512, workers: int | None = None
) -> dict:
    """Write `n_studies` phantom studies and labels.csv; the same seed gives the same files' pixels."""
    if n_studies < 1:
        raise UserError(f"--studies must be >= 1, got {n_studies}")
    if size < 32:
        raise UserError(f"--size must be >= 32 pixels, got {size}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = [(index, seed, size, str(out)) for index in range(n_studies)]
    progress = dict(total=n_studies, desc="phantom studies", unit="study")
    if workers == 1:
        records = [_generate_one(task) for task in tqdm(tasks, **progress)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, n_studies // (workers * 8))
            records = list(tqdm(pool.map(_generate_one, tasks, chunksize=chunk), **progress))
    _write_labels(out / "labels.csv", records)
    views = Counter(view for record in records for view in record["views"])
    return {
        "out_dir": str(out),
        "studies": len(records),
        "images": sum(views.values()),
        "views": dict(sorted(views.items())),
        "recorded_views": dict(sorted(Counter(v for r in records for v in r["recorded_views"]).items())),
        "findings": {name: float(np.mean([r["labels"][name] for r in records])) for name in FINDINGS},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write_labels(path: Path, records: list[dict]) -> None:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["study_id", *FINDINGS])
    for record in records:
        writer.writerow([record["study_id"], *(record["labels"][name] for name in FINDINGS)])
    atomic_write_text(path, table.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m vet_ext.phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder RAW (studies and labels.csv)")
    parser.add_argument("--studies", type=int, required=True, help="number of studies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="long side of each image, pixels")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args()
    summary = generate_studies(args.out, args.studies, seed=args.seed, size=args.size, workers=args.workers)
    prevalence = ", ".join(f"{name} {value:.0%}" for name, value in summary["findings"].items())
    print(
        f"wrote {summary['studies']} studies / {summary['images']} images to {summary['out_dir']} "
        f"in {summary['seconds']} s; views {summary['views']}; findings {prevalence}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
