"""The manifest module (schema, writer, reader) and the one display-window function both decoders use."""
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from dinov2.utils.errors import UserError
from vet_ext.ingestion.dicom import read_dicom
from vet_ext.ingestion.dicom_write import write_dicom
from vet_ext.ingestion.manifest import (
    FORMAT_VERSION, MANIFEST_NAME, SCHEMA_METADATA_KEY, build_manifest, open_manifest, read_manifest, write_manifest,
)  # fmt: skip
from vet_ext.ingestion.sources import read_image_frames
from vet_ext.ingestion.windowing import PERCENTILE_SAMPLE, percentile_window


def _rows(n_studies: int = 6) -> dict[str, list]:
    views = ["VD", "LL", "RL"]
    rows = [(f"s{i}", f"i{i}{v}", v) for i in range(n_studies) for v in views]
    return {
        "study_id": [r[0] for r in rows], "image_id": [r[1] for r in rows], "frame": [0] * len(rows),
        "view": [r[2] for r in rows], "body_part": ["THORAX"] * len(rows), "species": ["canine"] * len(rows),
        "pixel_spacing_x": [0.2] * len(rows), "pixel_spacing_y": [0.2] * len(rows),
        "source_path": [f"{r[1]}.dcm" for r in rows], "shard": [0] * len(rows),
        "offset": [100 * k for k in range(len(rows))], "height": [10] * len(rows), "width": [10] * len(rows),
        "phi": [{"PatientName": f"pet{k}"} for k in range(len(rows))],
    }  # fmt: skip


def test_build_write_open_read_round_trip(tmp_path):
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"study_id": ["s0", "s1", "s2"], "effusion": [1, 0, 1]}).to_csv(labels, index=False)
    frame, info = build_manifest(_rows(), seed=0, val_fraction=0.3, test_fraction=0.0, labels=labels, keep_phi=True)
    assert info["columns"] == ["effusion"] and info["studies_without_labels"] == 3
    assert list(frame["view"][:3]) == ["LL", "RL", "VD"]  # a study's views in VIEW_CODES order
    assert frame.loc[frame.study_id == "s5", "effusion"].tolist() == [-1, -1, -1]  # missing label
    write_manifest(frame, tmp_path, cache_size=256, label_columns=info["columns"])

    manifest = open_manifest(tmp_path, "test")
    assert manifest.label_columns == ["effusion"] and manifest.phi_columns == ["phi_PatientName"]
    assert manifest.cache_size == 256 and manifest.shards_dir == tmp_path / "shards"
    val = read_manifest(manifest, ["study_id", "split"], "val")
    assert set(val.column("split").to_pylist()) == {"val"} and 0 < val.num_rows < len(frame)
    assert read_manifest(manifest, ["study_id"]).num_rows == len(frame)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary file left


def test_hashed_ids_drop_the_source_path(tmp_path):
    frame, _ = build_manifest(_rows(2), seed=0, val_fraction=0.0, test_fraction=0.0, salt="pepper")
    assert "source_path" not in frame and all(len(v) == 64 for v in frame["study_id"])
    assert frame["study_id"].nunique() == 2


def test_open_manifest_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match=f"VetStudies: no {MANIFEST_NAME} in '{tmp_path}'.*vet_ext.prepare"):
        open_manifest(tmp_path, "VetStudies")
    frame, _ = build_manifest(_rows(1), seed=0, val_fraction=0.0, test_fraction=0.0)
    write_manifest(frame, tmp_path, cache_size=64, label_columns=[])
    table = pq.read_table(tmp_path / MANIFEST_NAME)
    metadata = {**json.loads(table.schema.metadata[SCHEMA_METADATA_KEY]), "format_version": FORMAT_VERSION + 1}
    pq.write_table(table.replace_schema_metadata({SCHEMA_METADATA_KEY: json.dumps(metadata).encode()}),
                   tmp_path / MANIFEST_NAME)  # fmt: skip
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}.*upgrade"):
        open_manifest(tmp_path, "VetStudies")


def test_a_16_bit_export_and_a_dicom_without_window_display_alike(tmp_path):
    """The two decoders share one window: the same stored values give the same display image."""
    rng = np.random.default_rng(0)
    pixels = (rng.gamma(2.0, 600.0, size=(48, 40))).clip(0, 4095).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "export.png")  # a 16-bit grayscale PNG
    write_dicom(tmp_path / "image.dcm", pixels, study_uid="1.2", sop_uid="1.2.3", view_position="LL",
                photometric="MONOCHROME2", bits_stored=12, transfer_syntax=ExplicitVRLittleEndian)  # fmt: skip
    from_png = read_image_frames(str(tmp_path / "export.png"))[0]
    from_dicom = read_dicom(tmp_path / "image.dcm").frames[0]
    assert from_png.dtype == from_dicom.dtype == np.float32
    np.testing.assert_array_equal(from_png, from_dicom)
    low, high = np.percentile(pixels, (0.5, 99.5))
    np.testing.assert_allclose(from_png, np.clip((pixels - low) / (high - low), 0, 1), atol=1e-6)


def test_percentile_window_subsamples_large_images_and_maps_flat_ones_to_zero():
    assert not percentile_window(np.full((8, 8), 7.0)).any()
    side = int(np.sqrt(PERCENTILE_SAMPLE)) * 3  # strided by 3: the window is read off 1/9 of the pixels
    image = np.tile(np.linspace(0.0, 1000.0, side), (side, 1))
    shown = percentile_window(image)
    assert shown.dtype == np.float64 and shown.min() == 0.0 and shown.max() == 1.0
    assert abs(float(np.median(shown)) - 0.5) < 0.01
