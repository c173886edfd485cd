"""The phantom's body: materials, analytic primitives, and one quadruped built from a study plan.

A body is a list of primitives (ellipsoids, rods, capsules) with an attenuation each; projection
(`phantom_projection`) integrates them along rays. Individual anatomy (size, proportions, pose)
and the findings are decided once per study in a `StudyPlan`, so every view of the study is a
projection of the same body. A finding changes the body itself (an enlarged heart, fluid in the
pleural space, a mass, a broken bone), never a mark on the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from dinov2.utils.errors import UserError

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


def rotation(axis: str, degrees: float) -> np.ndarray:
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
    body_rotation = rotation("z", rng.uniform(-4, 4)) @ rotation("y", rng.uniform(-3, 3)) @ rotation("x", rng.uniform(-6, 6))
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
        body_rotation=body_rotation,
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
        ellipsoid(_scaled(HEART_CENTER, plan), heart_axes, MU_SOFT - MU_AIR, rotation("y", 35)),
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
        ellipsoid((0.08 * L, 0, -0.03 * H), (0.07 * L, 0.36 * W, 0.30 * H), -fat, rotation("y", -15)),
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
            parts.append(ellipsoid((middle - 0.01 * L, 0, z + 0.09 * H), (0.008 * L, 0.005 * L, 0.08 * H), MU_CANCELLOUS, rotation("y", 25)))
        else:  # lumbar: transverse processes
            parts += [ellipsoid((middle, side * 0.05 * L, z - 0.01 * H), (0.01 * L, 0.035 * L, 0.005 * L), MU_CANCELLOUS) for side in (-1, 1)]
    parts.append(rod("capsule", (0.385 * L, 0, z), (0.46 * L, 0, z - 0.02 * H), 0.024 * L, MU_CANCELLOUS))
    parts += [ellipsoid((0.40 * L, side * 0.08 * L, 0.12 * H), (0.09 * L, 0.015 * L, 0.04 * L), MU_CANCELLOUS, rotation("y", -30)) for side in (-1, 1)]
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
FRACTURED_BONE = 0  # the upper long bone (humerus or femur) breaks: inside a thoracic or abdominal lateral's field
# (the lower one, radius/ulna or tibia, lies below the trunk, outside every view but a whole-body one)


def _limb_joints(plan: StudyPlan, limb: int) -> list[np.ndarray]:
    """Shoulder/hip, elbow/stifle, carpus/tarsus and toe positions of one limb."""
    x, side = LIMB_ROOTS[limb]
    hind = limb >= 2
    lengths = np.array(BONE_LENGTHS) * plan.length * (1.15 if plan.species == "feline" else 1.0)
    joints = [np.array([x * plan.length, side * 0.30 * plan.width, -0.05 * plan.height])]
    heading = 0.0
    for bone in range(3):
        heading += plan.limb_angles[limb, bone] * (-1 if hind and bone == 1 else 1)
        direction = rotation("x", side * plan.limb_abduction[limb]) @ rotation("y", heading) @ np.array([0.0, 0.0, -1.0])
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
            parts.append(ellipsoid(((x - 0.03) * L, side * 0.36 * W, 0.15 * H), (0.07 * L, 0.008 * L, 0.14 * H), MU_CANCELLOUS, rotation("y", -25)))
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
