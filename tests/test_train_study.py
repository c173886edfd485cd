"""train_study end to end on tiny phantom studies: results, falling loss, resume, the SSL option, bad input."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.data import make_dataset
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import get_cfg, write_config
from conftest import cli_error
from tiny import INFERRED_HEADS, TINY_ARCH, make_tiny_vit
from vet_ext.downstream import train_study
from vet_ext.ingestion.phantoms import generate_studies
from vet_ext.ingestion.prepare import PrepareConfig, prepare
from vet_ext.downstream.study_data import CONDITIONS

REPO = Path(__file__).resolve().parents[1]
ARCH = TINY_ARCH
TINY_RUN = [
    f"student.arch={ARCH}", "student.patch_size=8", "student.num_register_tokens=0", "student.drop_path_rate=0.0",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=1",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
]
FAST = ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0", "--layerwise-decay", "1.0"]


pytestmark = pytest.mark.usefixtures("tiny_vit")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """30 phantom studies (2-3 views, four findings) at 96 px, prepared with val and test splits."""
    root = tmp_path_factory.mktemp("study_phantoms")
    generate_studies(root / "raw", 30, seed=0, size=96, workers=1)
    prepare(PrepareConfig(out=root / "DATA", dicom_root=root / "raw", labels=root / "raw" / "labels.csv",
                          cache_size=96, workers=1, progress=False, val_fraction=0.3, test_fraction=0.2))
    val = make_dataset(f"VetStudies:root={root / 'DATA'}:split=val").get_targets()
    assert any(len(np.unique(val[:, j])) == 2 for j in range(val.shape[1])), "fixture needs both classes of a label in val"
    return root / "DATA"


@pytest.fixture
def weights(tmp_path):
    """A teacher export laid out as a pretraining run writes it (RUN/config.yaml beside RUN/eval/...)."""
    run = tmp_path / "pretrain"
    (run / "eval" / "training_0").mkdir(parents=True)
    cfg = get_cfg(REPO / "configs/vetdino/demo_cpu.yaml", TINY_RUN)
    write_config(cfg, run)
    torch.manual_seed(0)
    teacher = SSLMetaArch(cfg).teacher.state_dict()
    path = run / "eval" / "training_0" / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    return path


def run(weights, data, out, *extra) -> dict:
    assert train_study.main(["--weights", str(weights), "--data", str(data), "--output-dir", str(out), *FAST, *extra]) == 0
    return json.loads((out / "results.json").read_text())["study-level diagnosis"]


@pytest.mark.slow
def test_training_writes_the_comparison_table_its_loss_falls_and_a_rerun_resumes(weights, data, tmp_path):
    out = tmp_path / "study"
    payload = run(weights, data, out, "--epochs", "4", "--patience", "10", "--lr", "3e-3", "--fusion", "transformer")
    rows = payload["rows"]
    combos = {(row["split"], row["condition"], row["model"]) for row in rows}
    models = set(train_study.MODEL_LABELS.values())
    assert combos == {(split, condition, model) for split in ("val", "test") for condition in CONDITIONS for model in models}
    for row in rows:
        assert 0 <= row["macro AP"] <= 100 and row["evaluations"] > 0
    test_rows = {(row["condition"], row["model"]): row["evaluations"] for row in rows if row["split"] == "test"}
    n_test = test_rows[("all views", train_study.MODEL_LABELS["study"])]
    assert test_rows[("single view", train_study.MODEL_LABELS["study"])] > n_test  # 2-3 views per study

    for kind in train_study.MODEL_LABELS:
        history = payload["details"][f"epochs: {train_study.MODEL_LABELS[kind]}"]
        assert len(history) == 4
        assert history[-1]["train BCE"] < history[0]["train BCE"], [h["train BCE"] for h in history]
        directory = out / train_study.MODEL_DIRS[kind]
        assert (directory / "best.pth").is_file() and (directory / "last.pth").is_file()
    by_views = payload["details"]["test: macro AP by number of views used"]
    assert {row["views used"] for row in by_views} >= {1, 2}
    assert (out / "results.md").read_text().count("| test | one view dropped |") == 2

    stamp = (out / "study_model" / "last.pth").stat().st_mtime_ns
    again = run(weights, data, out, "--epochs", "4", "--patience", "10", "--lr", "3e-3", "--fusion", "transformer")
    assert (out / "study_model" / "last.pth").stat().st_mtime_ns == stamp, "a finished run must not train again"
    assert again["rows"] == rows


def test_semi_supervised_option_adds_a_finite_ssl_term_with_lora(weights, data, tmp_path):
    out = tmp_path / "semi"
    payload = run(weights, data, out, "--epochs", "1", "--unlabeled-weight", "0.5", "--peft", "lora",
                  "--lora-rank", "2", "--no-baseline")
    (epoch,) = payload["details"]["epochs: study model"]
    assert math.isfinite(epoch["train SSL"]) and epoch["train SSL"] > 0
    assert "every one is labelled" in payload["info"]["semi-supervised"]
    assert "dino_head" in payload["info"]["semi-supervised"]
    assert {row["model"] for row in payload["rows"]} == {train_study.MODEL_LABELS["study"]}
    checkpoint = torch.load(out / "study_model" / "last.pth", weights_only=True)
    assert any(key.startswith("teacher.backbone.") for key in checkpoint["ssl"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--view-drop", "1.0"], "--view-drop must be in [0, 1)"),
        (["--labels", "no_such_finding"], "unknown label 'no_such_finding'"),
    ],
)
def test_bad_input_is_one_error_line(weights, data, tmp_path, capsys, extra, message):
    argv = ["--weights", str(weights), "--data", str(data), "--output-dir", str(tmp_path / "bad"), *FAST, *extra]
    assert message in cli_error(lambda: train_study.main(argv), capsys)


def test_semi_supervised_needs_the_pretraining_configuration(data, tmp_path, capsys):
    torch.manual_seed(0)
    released = tmp_path / "backbone.pth"  # a released-style file: backbone keys only, no run beside it
    torch.save(make_tiny_vit(img_size=32, patch_size=8, num_heads=INFERRED_HEADS).state_dict(), released)
    argv = ["--weights", str(released), "--data", str(data), "--output-dir", str(tmp_path / "out"), *FAST,
            "--unlabeled-weight", "0.5"]
    assert "--config-file" in cli_error(lambda: train_study.main(argv), capsys)
