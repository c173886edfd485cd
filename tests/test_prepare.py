"""The prepare tool end to end on small DICOM trees: outputs, splits, labels, PHI, resumption."""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from conftest import cli_error
from dinov2.utils.errors import UserError
from vet_ext.ingestion.cache import ShardReader, ShardWriter, read_records, shard_path, to_cache_image
from vet_ext.ingestion.dicom import read_dicom
from vet_ext.ingestion.dicom_write import write_dicom
from vet_ext.ingestion.manifest import assign_split
from vet_ext.ingestion.phantoms import generate_studies
from vet_ext.ingestion.prepare import KILL_HOOK_ENV, PrepareConfig, main, prepare

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CACHE_SIZE = 64
PHI_VALUES = ("Doe^Rex", "PID-SECRET", "Secret Vet Clinic")
LABELS = ("cardiomegaly", "mass")


def study_uid(index: int) -> str:
    return f"1.2.826.0.1.3680043.10.{index}"


def write_study(raw: Path, index: int, views: tuple[str, ...] = ("LL", "VD"), frames: int = 1) -> list[Path]:
    """One study of 96x128 12-bit images with a known window; the last view may be multi-frame."""
    rng = np.random.default_rng(index)
    paths = []
    for number, view in enumerate(views):
        shape = (frames, 96, 128) if frames > 1 and number == len(views) - 1 else (96, 128)
        pixels = rng.integers(0, 4096, shape, dtype=np.uint16)
        name = f"{study_uid(index)}.{number}" + (".dcm" if number % 2 == 0 else "")  # some without extension
        paths.append(
            write_dicom(
                raw / f"study{index:03d}" / name, pixels, study_uid=study_uid(index), sop_uid=f"{study_uid(index)}.{number}",
                view_position=view, photometric="MONOCHROME2", bits_stored=12, transfer_syntax=EXPLICIT_LE,
                WindowCenter=2048, WindowWidth=4096, PixelSpacing=[0.2, 0.1], BodyPartExamined="THORAX",
                PatientName=f"{PHI_VALUES[0]}{index}", PatientID=f"{PHI_VALUES[1]}-{index}",
                InstitutionName=PHI_VALUES[2],
            )  # fmt: skip
        )
    return paths


def write_labels(path: Path, studies: range) -> dict[str, tuple[int, int]]:
    """Labels for every study but the last; plus one row for a study that has no images."""
    labels = {study_uid(i): (i % 2, (i // 2) % 2) for i in studies[:-1]}
    labels["1.2.999"] = (1, 1)
    rows = [f"{uid},{a},{b}" for uid, (a, b) in labels.items()]
    path.write_text("study_id," + ",".join(LABELS) + "\n" + "\n".join(rows) + "\n")
    return labels


def plant_bad_files(raw: Path, good: Path) -> dict[str, str]:
    """A text file without extension, a truncated DICOM, a DICOM without pixels -> expected reasons."""
    (raw / "bad").mkdir()
    (raw / "bad" / "notes").write_text("not an image at all\n")
    data = good.read_bytes()
    (raw / "bad" / "half.dcm").write_bytes(data[: len(data) // 2])
    dataset = pydicom.dcmread(good)
    del dataset.PixelData
    dataset.save_as(raw / "bad" / "nopixels.dcm")
    (raw / "readme.txt").write_text("skipped without an error")
    return {"bad/notes": "not DICOM", "bad/half.dcm": "truncated", "bad/nopixels.dcm": "no pixel data"}


def make_tree(raw: Path, n_studies: int = 6) -> dict:
    """Studies 0..n-1: study 1 has three views, study 2 a 2-frame image; labels.csv; bad files."""
    files = []
    for i in range(n_studies):
        files += write_study(raw, i, views=("LL", "RL", "VD") if i == 1 else ("VD", "LL"), frames=2 if i == 2 else 1)
    labels = write_labels(raw / "labels.csv", range(n_studies))
    bad = plant_bad_files(raw, files[0])
    return {"files": files, "labels": labels, "bad": bad, "images": len(files) + 1, "studies": n_studies}


def config(raw: Path, out: Path, **overrides) -> PrepareConfig:
    settings = dict(out=out, dicom_root=raw, labels=raw / "labels.csv", cache_size=CACHE_SIZE, workers=1, progress=False)
    return PrepareConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    tree = make_tree(root / "RAW")
    summary = prepare(config(root / "RAW", root / "DATA", workers=2, val_fraction=0.3, test_fraction=0.3))
    return root, tree, summary


def read_manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


def cached_pixels(out: Path, row) -> np.ndarray:
    return np.array(ShardReader(out / "shards").read(row.shard, row.offset, row.height, row.width))


# ----------------------------------------------------------------------------- phantom archive


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """Phantom studies (mixed syntaxes, photometrics, view sources, fake PHI) plus planted bad files."""
    root = tmp_path_factory.mktemp("phantoms")
    generated = generate_studies(root / "RAW", 6, seed=3, size=128, workers=1)
    files = sorted(p for p in (root / "RAW").rglob("*") if p.is_file() and p.name != "labels.csv")
    bad = plant_bad_files(root / "RAW", files[0])
    summary = prepare(config(root / "RAW", root / "DATA", workers=2))
    return root, generated, files, bad, summary


def test_phantom_archive_end_to_end(phantom_run):
    root, generated, files, bad, summary = phantom_run
    counts = summary["counts"]
    assert (counts["images"], counts["studies"]) == (generated["images"], generated["studies"])
    assert counts["views"] == generated["recorded_views"]
    errors = pd.read_csv(root / "DATA" / "errors.csv")
    assert dict(zip(errors["path"], errors["reason"])) == bad
    manifest = read_manifest(root / "DATA")
    labels = pd.read_csv(root / "RAW" / "labels.csv", dtype={"study_id": str}).set_index("study_id")
    pd.testing.assert_frame_equal(
        manifest.drop_duplicates("study_id").set_index("study_id")[list(labels.columns)].sort_index(), labels.sort_index()
    )
    assert summary["labels"]["studies_without_labels"] == 0
    phi_values = set()
    for row in manifest.itertuples():
        source = read_dicom(root / "RAW" / row.source_path)
        np.testing.assert_array_equal(cached_pixels(root / "DATA", row), to_cache_image(source.frames[row.frame], CACHE_SIZE))
        assert max(row.height, row.width) == CACHE_SIZE and (row.study_id, row.view) == (source.study_id, source.view)
        phi_values |= {v for v in source.phi.values() if len(v) >= 4}
    assert phi_values, "phantoms carry fake PHI"
    for path in (root / "DATA").rglob("*"):
        if path.is_file() and "shards" not in path.parts:
            assert not [v for v in phi_values if v.encode() in path.read_bytes()], path


# ----------------------------------------------------------------------------- cache format


def test_cache_image_is_the_area_mean_and_never_upsamples():
    blocks = np.array([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]], dtype=np.float32)
    big = np.kron(blocks, np.ones((4, 4), dtype=np.float32))  # 8 x 12, long side 12 -> 3
    np.testing.assert_array_equal(to_cache_image(big, 3), np.round(blocks * 255).astype(np.uint8))
    small = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    assert to_cache_image(small, 512).shape == (30, 20)
    assert to_cache_image(np.zeros((100, 41), np.float32), 50).shape == (50, 20)  # 20.5 rounds to even


def test_shard_writer_discards_uncommitted_bytes_and_rolls_over(tmp_path):
    settings = {"cache_size": 8}
    writer = ShardWriter(tmp_path / "shards", tmp_path / "state", settings, shard_bytes=100)
    image = np.full((6, 8), 7, np.uint8)  # 48 bytes: two fit in a 100-byte shard, a third does not
    assert [writer.append_image(image) for _ in range(3)] == [(0, 0), (0, 48), (1, 0)]
    writer.append_record({"key": {"path": "a"}})
    writer.commit()
    assert [writer.append_image(image) for _ in range(2)] == [(1, 48), (2, 0)]
    writer.append_record({"key": {"path": "b"}})
    writer.close(commit=False)
    assert shard_path(tmp_path / "shards", 1).stat().st_size == 96  # uncommitted tail on disk

    reopened = ShardWriter(tmp_path / "shards", tmp_path / "state", settings, shard_bytes=100)
    assert shard_path(tmp_path / "shards", 1).stat().st_size == 48
    assert not shard_path(tmp_path / "shards", 2).exists()
    assert [r["key"]["path"] for r in read_records(tmp_path / "state")] == ["a"]
    assert reopened.append_image(image) == (1, 48)
    reopened.close()
    with pytest.raises(UserError, match="cache_size"):
        ShardWriter(tmp_path / "shards", tmp_path / "state", {"cache_size": 16})


# ----------------------------------------------------------------------------- one run


def test_counts_views_and_error_reasons(prepared):
    root, tree, summary = prepared
    counts = summary["counts"]
    assert counts["images"] == tree["images"]
    assert counts["studies"] == tree["studies"]
    assert counts["views"] == {"LL": 7, "RL": 1, "VD": 6}  # study 2's 2-frame image is an LL
    assert counts["files_skipped_non_dicom"] == 2  # readme.txt and labels.csv
    errors = pd.read_csv(root / "DATA" / "errors.csv")
    assert dict(zip(errors["path"], errors["reason"])) == tree["bad"]
    assert counts["errors_by_reason"] == {"no pixel data": 1, "not DICOM": 1, "truncated": 1}
    on_disk = json.loads((root / "DATA" / "prepare.json").read_text())
    assert on_disk["counts"]["images"] == tree["images"] and on_disk["settings"]["cache_size"] == CACHE_SIZE


def test_cached_pixels_are_the_resized_source_frames(prepared):
    root, _, _ = prepared
    manifest = read_manifest(root / "DATA")
    assert manifest["frame"].max() == 1
    for row in manifest.itertuples():
        source = read_dicom(root / "RAW" / row.source_path)
        expected = to_cache_image(source.frames[row.frame], CACHE_SIZE)
        np.testing.assert_array_equal(cached_pixels(root / "DATA", row), expected)
        assert (row.height, row.width) == (48, 64)
        assert (row.study_id, row.image_id, row.view) == (source.study_id, source.image_id, source.view)
    # source 0.2 mm rows / 0.1 mm columns, shrunk 2x: the cached image has 0.2 mm x, 0.4 mm y
    assert np.allclose(manifest["pixel_spacing_x"], 0.2) and np.allclose(manifest["pixel_spacing_y"], 0.4)
    assert set(manifest["body_part"]) == {"THORAX"}


def test_manifest_rows_are_grouped_by_study_in_view_order(prepared):
    manifest = read_manifest(prepared[0] / "DATA")
    assert list(manifest["study_id"]) == sorted(manifest["study_id"])
    study = manifest[manifest["study_id"] == study_uid(1)]
    assert list(study["view"]) == ["LL", "RL", "VD"]


def test_splits_are_per_study_and_follow_the_fractions():
    studies = [f"1.2.3.{i}" for i in range(20000)]
    splits = pd.Series([assign_split(s, 0, 0.1, 0.2) for s in studies]).value_counts(normalize=True)
    assert abs(splits["val"] - 0.1) < 0.01 and abs(splits["test"] - 0.2) < 0.01
    reseeded = [assign_split(s, 1, 0.1, 0.2) for s in studies[:200]]
    assert reseeded != [assign_split(s, 0, 0.1, 0.2) for s in studies[:200]]
    assert {assign_split(s, 0, 0.0, 0.0) for s in studies[:200]} == {"train"}


def test_manifest_assigns_each_study_one_split(prepared):
    manifest = read_manifest(prepared[0] / "DATA")
    assert (manifest.groupby("study_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) <= {"train", "val", "test"}


def test_labels_are_joined_by_study(prepared):
    root, tree, summary = prepared
    manifest = read_manifest(root / "DATA")
    for row in manifest.itertuples():
        expected = tree["labels"].get(row.study_id, (-1, -1))
        assert (row.cardiomegaly, row.mass) == expected
    assert manifest["cardiomegaly"].dtype == np.int64
    assert summary["labels"] == {"columns": list(LABELS), "studies_without_labels": 1, "label_rows_without_images": 1}


def test_no_phi_in_any_output_by_default(prepared):
    out = prepared[0] / "DATA"
    assert not [c for c in read_manifest(out).columns if c.startswith("phi")]
    for path in [out / "manifest.parquet", out / "errors.csv", out / "prepare.json", *(out / ".state").iterdir()]:
        data = path.read_bytes()
        assert not [v for v in PHI_VALUES if v.encode() in data], path


def test_keep_phi_adds_phi_columns(tmp_path):
    write_study(tmp_path / "RAW", 3)
    (tmp_path / "RAW" / "labels.csv").write_text("study_id\n")
    prepare(config(tmp_path / "RAW", tmp_path / "DATA", keep_phi=True))
    manifest = read_manifest(tmp_path / "DATA")
    assert set(manifest["phi_PatientName"]) == {f"{PHI_VALUES[0]}3"}
    assert set(manifest["phi_InstitutionName"]) == {PHI_VALUES[2]}


def test_hash_ids_replace_ids_after_joining_labels(prepared, tmp_path):
    root, tree, _ = prepared
    plain = read_manifest(root / "DATA")
    prepare(config(root / "RAW", tmp_path / "H", hash_ids=True, val_fraction=0.3, test_fraction=0.3))
    hashed = read_manifest(tmp_path / "H")
    salt = (tmp_path / "H" / ".salt").read_text().strip()
    assert "source_path" not in hashed.columns and len(salt) >= 32
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in hashed["study_id"])
    assert not set(hashed["study_id"]) & set(plain["study_id"])
    # Same decode order in both runs: rows correspond; labels and splits follow the original study.
    pairs = plain.merge(hashed, on=["offset", "shard"], suffixes=("", "_h"))
    assert len(pairs) == len(plain)
    assert pairs.groupby("study_id")["study_id_h"].nunique().eq(1).all()
    assert pairs.groupby("study_id_h")["study_id"].nunique().eq(1).all()
    assert (pairs["cardiomegaly"] == pairs["cardiomegaly_h"]).all() and (pairs["split"] == pairs["split_h"]).all()
    for path in (tmp_path / "H" / "manifest.parquet", tmp_path / "H" / "prepare.json"):
        assert salt.encode() not in path.read_bytes()

    prepare(config(root / "RAW", tmp_path / "H", hash_ids=True, val_fraction=0.3, test_fraction=0.3))
    assert read_manifest(tmp_path / "H")["study_id"].equals(hashed["study_id"])  # stored salt reused
    prepare(config(root / "RAW", tmp_path / "S", hash_ids=True, salt="pepper"))
    given = read_manifest(tmp_path / "S")
    assert not (tmp_path / "S" / ".salt").exists()
    expected = hashlib.sha256(b"pepper\x00" + study_uid(0).encode()).hexdigest()
    assert expected in set(given["study_id"])


# ----------------------------------------------------------------------------- re-runs


def test_rerun_decodes_nothing_and_keeps_outputs(tmp_path):
    make_tree(tmp_path / "RAW", n_studies=3)
    first = prepare(config(tmp_path / "RAW", tmp_path / "DATA"))
    before = read_manifest(tmp_path / "DATA")
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "DATA" / "shards").iterdir()}
    second = prepare(config(tmp_path / "RAW", tmp_path / "DATA"))
    assert second["counts"]["files_decoded"] == 0 and second["counts"]["images_decoded"] == 0
    assert second["counts"]["files_reused"] == first["counts"]["files_decoded"]
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "DATA"), before)
    assert {p.name: p.stat().st_size for p in (tmp_path / "DATA" / "shards").iterdir()} == sizes
    assert second["counts"]["errors_by_reason"] == first["counts"]["errors_by_reason"]


def test_grown_tree_appends_only_new_files_and_keeps_splits(tmp_path):
    make_tree(tmp_path / "RAW", n_studies=4)
    prepare(config(tmp_path / "RAW", tmp_path / "DATA", val_fraction=0.4, test_fraction=0.3))
    before = read_manifest(tmp_path / "DATA")
    new_files = write_study(tmp_path / "RAW", 10) + write_study(tmp_path / "RAW", 11)
    summary = prepare(config(tmp_path / "RAW", tmp_path / "DATA", val_fraction=0.4, test_fraction=0.3))
    after = read_manifest(tmp_path / "DATA")
    assert summary["counts"]["files_decoded"] == len(new_files)
    assert summary["counts"]["images"] == len(before) + len(new_files)
    old = after[after["study_id"].isin(before["study_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, before)  # same offsets, splits and labels as before
    new = after[~after["study_id"].isin(before["study_id"])]
    assert new["offset"].min() >= (before["offset"] + before["height"] * before["width"]).max()


def test_changed_file_is_decoded_again(tmp_path):
    files = write_study(tmp_path / "RAW", 0)
    (tmp_path / "RAW" / "labels.csv").write_text("study_id\n")
    prepare(config(tmp_path / "RAW", tmp_path / "DATA"))
    replacement = write_study(tmp_path / "other", 5)[0]
    os.replace(replacement, files[0])
    summary = prepare(config(tmp_path / "RAW", tmp_path / "DATA"))
    assert summary["counts"]["files_decoded"] == 1 and summary["counts"]["images"] == 2
    assert study_uid(5) in set(read_manifest(tmp_path / "DATA")["study_id"])


def run_and_kill(raw: Path, out: Path, kill_after: int, **settings) -> None:
    """prepare() in a child process that SIGKILLs itself after writing file `kill_after`'s bytes."""
    settings = dict(out=out, dicom_root=raw, labels=raw / "labels.csv", cache_size=CACHE_SIZE, workers=1, progress=False, **settings)
    arguments = ", ".join(f"{k}={v!r}" for k, v in settings.items()).replace("PosixPath", "Path")
    script = f"from pathlib import Path; from vet_ext.ingestion.prepare import PrepareConfig, prepare; prepare(PrepareConfig({arguments}))"
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, KILL_HOOK_ENV: str(kill_after)}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()


@pytest.mark.parametrize("kill_after", [4, 8])  # files 1-3 are the bad ones (no pixels)
@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, kill_after):
    tree = make_tree(tmp_path / "RAW", n_studies=5)
    reference = prepare(config(tmp_path / "RAW", tmp_path / "REF", shard_bytes=20000, commit_every=3))
    run_and_kill(tmp_path / "RAW", tmp_path / "DATA", kill_after, shard_bytes=20000, commit_every=3)
    assert not (tmp_path / "DATA" / "manifest.parquet").exists()
    journal = json.loads((tmp_path / "DATA" / ".state" / "journal.json").read_text())
    on_disk = sum(p.stat().st_size for p in (tmp_path / "DATA" / "shards").glob("shard-*.bin"))
    assert on_disk > sum(journal["shards"])  # the kill left uncommitted pixel bytes behind

    resumed = prepare(config(tmp_path / "RAW", tmp_path / "DATA", shard_bytes=20000, commit_every=3))
    committed_files = kill_after // 3 * 3
    assert resumed["counts"]["files_decoded"] == reference["counts"]["files_decoded"] - committed_files
    expected, actual = read_manifest(tmp_path / "REF"), read_manifest(tmp_path / "DATA")
    pd.testing.assert_frame_equal(actual, expected)
    assert expected["shard"].nunique() > 1 and len(actual) == tree["images"]
    for row in actual.itertuples():
        np.testing.assert_array_equal(cached_pixels(tmp_path / "DATA", row), cached_pixels(tmp_path / "REF", row))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "DATA" / "errors.csv"), pd.read_csv(tmp_path / "REF" / "errors.csv"))


def test_checkpoints_leave_a_usable_manifest_of_committed_files(tmp_path):
    tree = make_tree(tmp_path / "RAW", n_studies=3)
    run_and_kill(tmp_path / "RAW", tmp_path / "DATA", 7, commit_every=2, checkpoint_seconds=0.0)
    manifest = read_manifest(tmp_path / "DATA")  # the checkpoint after file 6: 3 bad files, then 3 good ones
    first_good = sorted(p.relative_to(tmp_path / "RAW").as_posix() for p in tree["files"])[:3]
    assert sorted(manifest["source_path"]) == first_good
    for row in manifest.itertuples():
        np.testing.assert_array_equal(
            cached_pixels(tmp_path / "DATA", row),
            to_cache_image(read_dicom(tmp_path / "RAW" / row.source_path).frames[row.frame], CACHE_SIZE),
        )
    assert len(pd.read_csv(tmp_path / "DATA" / "errors.csv")) == 3


# ----------------------------------------------------------------------------- image exports


def test_images_csv_exports(tmp_path):
    exports = tmp_path / "export"
    exports.mkdir()
    gray8 = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1))  # 64 x 128
    Image.fromarray(gray8).save(exports / "a.png")
    ramp16 = np.tile(np.linspace(1000, 60000, 100).astype(np.uint16), (50, 1))
    Image.fromarray(ramp16).save(exports / "b.png")
    Image.fromarray(gray8).save(exports / "c.tif")
    (exports / "d.png").write_text("not a png")
    (exports / "list.csv").write_text("path,study_id,view\na.png,S1,ll\nb.png,S1,\nc.tif,S2,VD\nd.png,S2,DV\ngone.png,S3,LL\n")
    summary = prepare(PrepareConfig(out=tmp_path / "DATA", images_csv=exports / "list.csv", cache_size=CACHE_SIZE, workers=1, progress=False))
    manifest = read_manifest(tmp_path / "DATA").set_index("source_path")
    assert list(manifest.index) == ["a.png", "b.png", "c.tif"]
    assert list(manifest["view"]) == ["LL", "UNKNOWN", "VD"] and list(manifest["study_id"]) == ["S1", "S1", "S2"]
    errors = pd.read_csv(tmp_path / "DATA" / "errors.csv")
    assert dict(zip(errors["path"], errors["reason"])) == {"d.png": "not an image", "gone.png": "missing file"}
    a = cached_pixels(tmp_path / "DATA", manifest.loc["a.png"])
    np.testing.assert_array_equal(a, to_cache_image(gray8.astype(np.float32) / 255, CACHE_SIZE))
    low, high = np.percentile(ramp16, [0.5, 99.5])  # 16-bit: robust range mapped to black..white
    windowed = np.clip((ramp16 - low) / (high - low), 0, 1).astype(np.float32)
    b = cached_pixels(tmp_path / "DATA", manifest.loc["b.png"])
    np.testing.assert_allclose(b, to_cache_image(windowed, CACHE_SIZE), atol=1)
    assert summary["counts"]["images"] == 3

    (exports / "bad.csv").write_text("path,study_id,view\na.png,S1,sideways\n")
    with pytest.raises(UserError, match="bad.csv line 2: view 'sideways'"):
        prepare(PrepareConfig(out=tmp_path / "X", images_csv=exports / "bad.csv", workers=1, progress=False))


# ----------------------------------------------------------------------------- user errors


def test_bad_input_is_a_user_error(tmp_path):
    (tmp_path / "RAW").mkdir()
    with pytest.raises(UserError, match="exactly one source"):
        prepare(PrepareConfig(out=tmp_path / "D"))
    with pytest.raises(UserError, match="nowhere: not a directory"):
        prepare(PrepareConfig(out=tmp_path / "D", dicom_root=tmp_path / "nowhere"))
    with pytest.raises(UserError, match="sum <= 1"):
        prepare(PrepareConfig(out=tmp_path / "D", dicom_root=tmp_path / "RAW", val_fraction=0.6, test_fraction=0.6))
    (tmp_path / "labels.csv").write_text("study,x\n1,0\n")
    with pytest.raises(UserError, match=r"labels.csv: missing column\(s\) study_id"):
        prepare(PrepareConfig(out=tmp_path / "D", dicom_root=tmp_path / "RAW", labels=tmp_path / "labels.csv", progress=False))
    prepare(PrepareConfig(out=tmp_path / "D", dicom_root=tmp_path / "RAW", progress=False))
    with pytest.raises(UserError, match="cache was built with"):
        prepare(PrepareConfig(out=tmp_path / "D", dicom_root=tmp_path / "RAW", cache_size=256, progress=False))


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    refusal = cli_error(lambda: main(["--dicom-root", str(tmp_path / "missing"), "--out", str(tmp_path / "D")]), capsys)
    assert refusal == f"error: --dicom-root {tmp_path / 'missing'}: not a directory"


def test_cli_prints_a_summary(tmp_path, capsys):
    write_study(tmp_path / "RAW", 0)
    main(["--dicom-root", str(tmp_path / "RAW"), "--out", str(tmp_path / "D"), "--cache-size", "32", "--workers", "1"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"prepared 2 images of 1 studies in {tmp_path / 'D'}") and "views: LL 1, VD 1" in line


FAULT_PROBE = """
import resource, sys
import numpy as np
from vet_ext.ingestion.sources import keep_frame_buffers
tuned = sys.argv[1] == "1" and keep_frame_buffers()
def frame():  # a worker's buffers for one file: stored values, display values, the resize's input
    buffers = [np.empty((2560, 2048), dtype) for dtype in (np.uint16, np.float32, np.float32)]
    for buffer in buffers:
        buffer.fill(1)
frame()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    frame()
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_decode_workers_reuse_frame_buffers_instead_of_faulting_fresh_pages():
    """A file's buffers are 50 MiB, 12,800 pages: untuned, glibc gives them back on free and every
    file faults them in again (the cost that kept 2 workers at 1.4x one); tuned, they are reused."""
    runs = {}
    for tuned in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", FAULT_PROBE, tuned], capture_output=True, text=True, check=True)
        applied, faults = map(int, out.stdout.split())
        runs[tuned] = (applied, faults)
    pages_per_frame = 2560 * 2048 * (2 + 4 + 4) // 4096
    if not runs["1"][0]:
        pytest.skip("no glibc mallopt in this environment")
    # untuned, glibc 2.36 here faults ~15,000 pages for these ten files (how many depends on its
    # dynamic thresholds, hence not asserted); tuned, the buffers of the first file are reused
    assert runs["1"][1] < pages_per_frame // 10, f"tuned: {runs['1'][1]} faults, untuned: {runs['0'][1]}"
