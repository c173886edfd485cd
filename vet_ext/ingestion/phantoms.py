"""Procedural quadruped phantoms, projected into radiographic views and written as DICOM studies.

VET-DINO needs data it may ship: demo runs, tests and benchmarks cannot use clinic images. A
phantom is built from analytic primitives (ellipsoids, cylinders, capsules) whose attenuation
adds up, so a view is the exact line integral through ONE body (Beer-Lambert plus quantum
noise): the lateral and ventro-dorsal views of a study agree geometrically, the way the
multi-view objective assumes real studies do. Findings are study-level changes to the body, so
they show in every view whose field holds them; a study is labelled with the findings one of its
views shows (`readable_findings`), as a radiologist would report it.

The body comes from `phantom_anatomy`, its line integrals from `phantom_projection`; this module
exposes the views (dose, noise, detector saturation), writes them as DICOM studies in the ways
archives record views, and writes the labels.

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
from vet_ext.ingestion.phantom_anatomy import BODY_PARTS, FINDINGS, LATERAL, StudyPlan, build_body, draw_plan, landmarks
from vet_ext.ingestion.phantom_projection import Detector, detector_for, project
from vet_ext.ingestion.views import VIEW_CODE_ITEMS

EXPOSURE_PHOTONS = 20000.0  # unattenuated quanta per pixel
MAX_LINE_INTEGRAL = 9.0  # detector saturation: stored value = line integral / this * full scale
UID_ROOT = "vet-dino-phantom"


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
    labels: dict[str, int]  # what a reader can see in the study's views (`readable_findings`)
    views: list[PhantomView]
    landmarks: dict[str, np.ndarray]
    present: dict[str, int]  # what the body has, seen or not


# the landmark that must be in a view's field for a reader to see the finding there
FINDING_LANDMARK = {"cardiomegaly": "heart", "pleural_effusion": "thorax", "mass": "mass", "fracture": "fracture"}
FIELD_MARGIN = 0.08  # collimation hides up to 7 % of each side: a landmark must sit inside the inner 84 %
FRACTURE_MIN_GAP_PIXELS = 1.5  # a narrower gap is lost in the pixels


def in_field(point: np.ndarray, detector: Detector, margin: float = FIELD_MARGIN) -> bool:
    """Whether a world point projects inside the view's field, clear of any collimation border."""
    row, col = detector.pixel_of(point)
    rows, cols = detector.shape
    return margin * rows <= row <= (1 - margin) * rows - 1 and margin * cols <= col <= (1 - margin) * cols - 1


def readable_findings(plan: StudyPlan, points: Mapping[str, np.ndarray], detectors: Mapping[str, Detector]) -> dict[str, int]:
    """The study's labels: a finding is 1 when the body has it AND some view shows it.

    An abdominal study of a dog with cardiomegaly shows no heart, so a reader (and a model)
    cannot call it: labelling it 1 there would teach and score the impossible. A fracture counts
    only on a lateral (the long bones run along a VD/DV beam, end-on) and only when its gap spans
    a pixel and a half.
    """
    labels = {}
    for name in FINDINGS:
        seen = False
        for view, detector in detectors.items():
            too_fine = plan.fracture_gap * plan.length < FRACTURE_MIN_GAP_PIXELS * detector.spacing
            if name == "fracture" and (view not in LATERAL or too_fine):
                continue
            seen = seen or in_field(points[FINDING_LANDMARK[name]], detector)
        labels[name] = int(bool(plan.findings[name]) and seen)
    return labels


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
    points = landmarks(plan)
    labels = readable_findings(plan, points, {view.view: view.detector for view in out})
    return PhantomStudy(study_uid, plan.species, body_part, labels, out, points, dict(plan.findings))


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
