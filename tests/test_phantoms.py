"""Phantom studies: exact projections, one body seen in every view, findings, DICOM round trip."""
import csv
import subprocess
import sys
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest

from conftest import single_error_line
from vet_ext.ingestion.dicom import read_dicom
from vet_ext.ingestion.phantom_anatomy import FINDINGS, LATERAL, MU_BONE, MU_SOFT, draw_plan, ellipsoid, rod
from vet_ext.ingestion.phantom_projection import Detector, project
from vet_ext.ingestion.phantoms import generate_studies, make_study

NO_FINDINGS = {name: False for name in FINDINGS}


def _detector(ray, col, row, shape=(41, 41), spacing=0.5) -> Detector:
    ray, col, row = (np.asarray(v, float) for v in (ray, col, row))
    origin = -(shape[1] // 2) * spacing * col - (shape[0] // 2) * spacing * row
    return Detector(origin, col, row, ray, spacing, shape)


SIDE_ON = _detector(ray=(0, 1, 0), col=(1, 0, 0), row=(0, 0, -1))
END_ON = _detector(ray=(1, 0, 0), col=(0, 1, 0), row=(0, 0, -1))
FINE_END_ON = _detector(ray=(1, 0, 0), col=(0, 1, 0), row=(0, 0, -1), shape=(101, 101), spacing=0.05)


def test_sphere_projection_is_the_analytic_chord():
    image = project([ellipsoid((0, 0, 0), (5, 5, 5), mu=1.0)], SIDE_ON)
    assert image[20, 20] == pytest.approx(10.0)  # diameter through the centre
    assert image[20, 26] == pytest.approx(2 * np.sqrt(25 - 3.0**2))  # 6 pixels = 3 mm off-centre
    assert image[20, 31] == 0.0 and image[0, 0] == 0.0
    # Parallel projection keeps volume: sum of chords * pixel area = sphere volume.
    assert image.sum() * 0.25 == pytest.approx(4 / 3 * np.pi * 125, rel=0.01)


def test_capsule_and_cylinder_chords_side_on_and_end_on():
    capsule = rod("capsule", (-4, 0, 0), (4, 0, 0), 2.0, mu=1.0)
    cylinder = rod("cylinder", (-4, 0, 0), (4, 0, 0), 2.0, mu=1.0)
    side_capsule, side_cylinder = project([capsule], SIDE_ON), project([cylinder], SIDE_ON)
    assert side_capsule[20, 20] == pytest.approx(4.0) and side_cylinder[20, 20] == pytest.approx(4.0)
    assert side_capsule[20, 20 + 10] == pytest.approx(2 * np.sqrt(4 - 1))  # 5 mm: inside the end cap
    assert side_cylinder[20, 20 + 10] == 0.0
    end_capsule, end_cylinder = project([capsule], END_ON), project([cylinder], END_ON)
    assert end_capsule[20, 20] == pytest.approx(12.0) and end_cylinder[20, 20] == pytest.approx(8.0)
    assert end_capsule[20, 23] == pytest.approx(8 + 2 * np.sqrt(4 - 1.5**2))
    volume = project([capsule], FINE_END_ON).sum() * 0.05**2
    assert volume == pytest.approx(np.pi * 4 * 8 + 4 / 3 * np.pi * 8, rel=0.01)


def test_same_seed_same_pixels_other_seed_other_pixels():
    first, again, other = make_study(3, seed=7, size=48), make_study(3, seed=7, size=48), make_study(3, seed=8, size=48)
    assert first.study_uid == again.study_uid != other.study_uid
    for a, b in zip(first.views, again.views):
        assert a.sop_uid == b.sop_uid and np.array_equal(a.pixels, b.pixels)
    assert not np.array_equal(first.views[0].line_integral, other.views[0].line_integral)


@lru_cache(maxsize=None)
def _whole_body_index() -> int:
    """A whole-body study with a lateral and a VD/DV view (seed 0), found by scanning cheaply."""
    for index in range(200):
        study = make_study(index, 0, 32)
        kinds = {view.view in LATERAL for view in study.views}
        if study.body_part == "WHOLE BODY" and kinds == {True, False}:
            return index
    raise AssertionError("no whole-body study with both view kinds among 200")


@lru_cache(maxsize=None)
def _study(size: int, **findings) -> object:
    return make_study(_whole_body_index(), 0, size, findings=dict(NO_FINDINGS, **findings))


def _lateral_and_ventral(study):
    lateral = next(view for view in study.views if view.view in LATERAL)
    ventral = next(view for view in study.views if view.view not in LATERAL)
    return lateral, ventral


def test_views_of_a_study_agree_along_the_spine_axis():
    """Both beams are perpendicular to the spine axis, so each slice across it has one total
    attenuation whichever way it is projected: the column profile of the lateral must match the
    row profile of the VD, and so must the body length."""
    lateral, ventral = _lateral_and_ventral(_study(128))
    for image in (lateral.line_integral, ventral.line_integral):  # nothing cut off across the axis
        across = image if image is lateral.line_integral else image.T
        assert across[[0, -1], :].max() < 1e-6
    along_lateral, along_ventral = lateral.line_integral.sum(axis=0), ventral.line_integral.sum(axis=1)
    assert np.abs(along_lateral - along_ventral).sum() < 0.02 * along_lateral.sum()
    extent = [np.flatnonzero(profile > 1e-3)[[0, -1]] for profile in (along_lateral, along_ventral)]
    np.testing.assert_array_equal(extent[0], extent[1])
    assert extent[0][1] - extent[0][0] > 64  # the animal spans most of a whole-body image


def _change(finding: str, size: int = 128):
    healthy, sick = _study(size), _study(size, **{finding: True})
    assert sick.labels[finding] == 1 and healthy.labels[finding] == 0
    return sick, [(s.line_integral - h.line_integral, s) for s, h in zip(sick.views, healthy.views)]


def _centroid(weights: np.ndarray) -> np.ndarray:
    rows, cols = np.indices(weights.shape)
    return np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()


@pytest.mark.parametrize("finding, landmark", [("cardiomegaly", "heart"), ("mass", "mass")])
def test_denser_findings_sit_where_the_anatomy_is_in_every_view(finding, landmark):
    study, changes = _change(finding)
    totals = [diff.sum() for diff, _ in changes]
    for diff, view in changes:
        assert diff.min() > -1e-9  # only adds density
        at = view.detector.pixel_of(study.landmarks[landmark])
        assert np.linalg.norm(_centroid(diff) - at) < 0.04 * max(diff.shape)
    assert max(totals) == pytest.approx(min(totals), rel=0.01)  # one body: same added mass in every view


def test_pleural_effusion_densifies_the_thorax_base():
    study, changes = _change("pleural_effusion")
    for diff, view in changes:
        assert diff.min() > -1e-9 and diff.max() > 0.5
        if view.view in LATERAL:
            centre_row = view.detector.pixel_of(study.landmarks["thorax"])[0]
            assert _centroid(diff)[0] > centre_row + 3  # rows grow ventrally in a lateral


def test_fracture_opens_a_gap_in_the_bone_profile():
    study, changes = _change("fracture", size=256)
    for diff, view in changes:
        row, col = np.round(view.detector.pixel_of(study.landmarks["fracture"])).astype(int)
        near = diff[max(row - 6, 0) : row + 7, max(col - 6, 0) : col + 7]
        # Bone is missing in the gap: at least a few millimetres of cortex less along some ray.
        assert near.min() < -0.1 * (MU_BONE - MU_SOFT) * 10


def test_findings_prevalence_and_independence():
    plans = [draw_plan(np.random.default_rng([0, index]), None) for index in range(400)]
    table = np.array([[plan.findings[name] for name in FINDINGS] for plan in plans])
    assert np.all((table.mean(axis=0) > 0.15) & (table.mean(axis=0) < 0.40))
    correlation = np.corrcoef(table.T)[np.triu_indices(len(FINDINGS), 1)]
    assert np.abs(correlation).max() < 0.15


@pytest.mark.slow
def test_study_mix_over_many_studies():
    studies = [make_study(index, 0, 32) for index in range(40)]
    view_counts = Counter(len(study.views) for study in studies)
    assert view_counts[1] > 0 and view_counts[3] + view_counts[4] > 0
    views = [view for study in studies for view in study.views]
    assert {view.photometric for view in views} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({view.bits_stored for view in views}) >= 3 and all(12 <= v.bits_stored <= 16 for v in views)
    assert len({view.transfer_syntax for view in views}) == 3
    recorded = Counter(view.recorded_view for view in views)
    assert recorded["UNKNOWN"] > 0 and sum(recorded[v] for v in ("LL", "RL", "VD", "DV")) > 0.8 * len(views)
    assert {study.species for study in studies} == {"canine", "feline"}
    assert {study.body_part for study in studies} == {"THORAX", "ABDOMEN", "WHOLE BODY"}
    assert {view.file_name.endswith(".dcm") for view in views} == {True, False}


def test_written_studies_read_back(tmp_path):
    summary = generate_studies(tmp_path, 6, seed=1, size=48, workers=1)
    studies = [make_study(index, 1, 48) for index in range(6)]
    assert summary["studies"] == 6 and summary["images"] == sum(len(s.views) for s in studies)
    with open(tmp_path / "labels.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["study_id"] for row in rows] == [s.study_uid for s in studies]
    assert all(int(row[name]) == s.labels[name] for row, s in zip(rows, studies) for name in FINDINGS)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "labels.csv")
    assert len(files) == summary["images"]
    for study in studies:
        for view in study.views:
            image = read_dicom(tmp_path / study.study_uid / view.file_name)
            assert (image.study_id, image.image_id, image.view) == (study.study_uid, view.sop_uid, view.recorded_view)
            assert image.phi["PatientName"] and image.species == study.species
            # Whatever the photometric and window, dense anatomy must display bright (the centre
            # crop stays clear of collimation borders, which display white over empty air).
            rows, cols = view.line_integral.shape
            inner = np.s_[rows // 10 : rows - rows // 10, cols // 10 : cols - cols // 10]
            assert np.corrcoef(image.frames[0][inner].ravel(), view.line_integral[inner].ravel())[0, 1] > 0.8


def test_parallel_generation_writes_the_same_pixels(tmp_path):
    generate_studies(tmp_path / "serial", 3, seed=2, size=40, workers=1)
    generate_studies(tmp_path / "parallel", 3, seed=2, size=40, workers=2)
    serial = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file())
    parallel = sorted(p.relative_to(tmp_path / "parallel") for p in (tmp_path / "parallel").rglob("*") if p.is_file())
    assert serial == parallel
    for relative in serial:
        if relative.name != "labels.csv":
            a, b = read_dicom(tmp_path / "serial" / relative), read_dicom(tmp_path / "parallel" / relative)
            np.testing.assert_array_equal(a.frames[0], b.frames[0])


@pytest.mark.slow
def test_command_line(tmp_path):
    command = [sys.executable, "-m", "vet_ext.phantoms", "--out", str(tmp_path / "raw"), "--size", "32", "--workers", "1"]
    done = subprocess.run(command + ["--studies", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 studies" in done.stdout and (tmp_path / "raw" / "labels.csv").exists()
    refused = subprocess.run(command + ["--studies", "0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert single_error_line(refused.stderr).startswith("error: --studies")


def test_labels_are_what_the_views_show():
    """A finding the body has but no view holds (the heart of an abdominal study) is not labelled."""
    parts = {}
    for index in range(60):
        study = make_study(index, 0, 32, findings={"cardiomegaly": True, "pleural_effusion": True})
        parts.setdefault(study.body_part, study)
        if len(parts) == 3:
            break
    for part, study in parts.items():
        assert study.present["cardiomegaly"] == 1 and study.present["pleural_effusion"] == 1
        expected = int(part != "ABDOMEN")
        assert study.labels["cardiomegaly"] == expected and study.labels["pleural_effusion"] == expected, part
