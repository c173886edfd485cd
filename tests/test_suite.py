"""Comparison suite: one table over checkpoints, wired to the same numbers the single evaluations give."""
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import cli_error
from dinov2.data import make_dataset
from dinov2.eval.knn import eval_knn
from dinov2.eval.utils import extract_features
from tiny import INFERRED_HEADS, make_tiny_vit
from vet_ext.downstream.eval import retrieval, suite
from vet_ext.ingestion.prepare import PrepareConfig, prepare

LABELS = ("mass", "effusion")
N_STUDIES = 24


def released_tiny_vit():
    """The tiny ViT as a released file holds it: no config, so loading infers the architecture."""
    return make_tiny_vit(img_size=32, patch_size=8, num_heads=INFERRED_HEADS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 two-view studies (LL + VD PNG exports) with two findings, prepared into DATA/."""
    root = tmp_path_factory.mktemp("suite")
    exports = root / "exports"
    exports.mkdir()
    rng = np.random.default_rng(0)
    images, labels = [], []
    for study in range(N_STUDIES):
        findings = {"mass": study % 2, "effusion": (study // 2) % 2}
        labels.append({"study_id": f"S{study:02d}", **findings})
        for view in ("LL", "VD"):
            pixels = rng.normal(100 + 60 * findings["mass"], 20, (40, 48)).clip(0, 255).astype(np.uint8)
            name = f"S{study:02d}_{view}.png"
            Image.fromarray(pixels).save(exports / name)
            images.append({"path": name, "study_id": f"S{study:02d}", "view": view})
    pd.DataFrame(images).to_csv(exports / "images.csv", index=False)
    pd.DataFrame(labels).to_csv(exports / "labels.csv", index=False)
    prepare(PrepareConfig(
        out=root / "DATA", images_csv=exports / "images.csv", labels=exports / "labels.csv", cache_size=48,
        workers=1, progress=False, val_fraction=0.4, test_fraction=0.0,
    ))
    val = make_dataset(f"VetImages:root={root / 'DATA'}:split=val").get_targets()
    assert len(val) >= 12 and all(len(np.unique(val[:, j])) == 2 for j in range(2)), "fixture needs both classes in val"
    return root / "DATA"


@pytest.fixture
def weights(tmp_path):
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = released_tiny_vit().state_dict()
        paths.append(tmp_path / f"teacher_{seed}.pth")
        torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, paths[-1])
    return paths


FAST = [
    "--crop-size", "32", "--batch-size", "16", "--num-workers", "0", "--nb-knn", "5", "--c-grid-size", "3",
    "--linear-epochs", "1", "--epoch-length", "20", "--learning-rates", "0.01", "0.1",
]


def test_suite_writes_one_row_per_backbone_matching_the_single_evaluations(data, weights, tmp_path, capsys, tiny_vit):
    out = tmp_path / "out"
    suite.main([
        "--weights", *map(str, weights), "--names", "first", "second", "--data", str(data),
        "--random-init", tiny_vit, "--patch-size", "8", "--output-dir", str(out), *FAST,
    ])
    payload = json.loads((out / "results.json").read_text())["comparison"]
    rows = {row["checkpoint"]: row for row in payload["rows"]}
    assert list(rows) == ["first", "second", f"random {tiny_vit}"]
    columns = [f"{method} {key}" for method in ("k-NN", "log-reg", "linear") for key in ("macro AP", "macro AUC")]
    for row in rows.values():
        assert set(row) == {"checkpoint", *columns, "retrieval top-1", "retrieval top-5"}
        assert all(0 <= row[column] <= 100 for column in row if column != "checkpoint")
    printed = capsys.readouterr().out
    assert "| first |" in printed and f"| random {tiny_vit} |" in (out / "results.md").read_text()

    # the row of "first" is what the stand-alone evaluations compute on the same backbone
    model = released_tiny_vit()
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in torch.load(weights[0])["teacher"].items()})
    model.eval()
    transform = suite.make_eval_transform(suite.get_args_parser().parse_args(["--data", "x", "--output-dir", "y", *FAST]))
    split = {s: make_dataset(f"VetImages:root={data}:split={s}:labels=all", transform=transform) for s in ("train", "val")}
    features = {s: extract_features(model, d, 16, 0) for s, d in split.items()}
    expected = retrieval.cross_view_retrieval(features["val"][0], *retrieval.study_views(split["val"], "val"))
    assert rows["first"]["retrieval top-1"] == pytest.approx(expected["top-1"])
    knn_rows, _, _ = eval_knn(*features["train"], *features["val"], nb_knn=[5])
    assert rows["first"]["k-NN macro AP"] == pytest.approx(knn_rows[0]["macro AP"])


def test_planted_features_rank_the_informative_backbone_first(data, weights, tmp_path, monkeypatch):
    """Stubbed extraction: 'informative' embeds findings and the study, 'noise' is random."""

    def planted_embed(model, dataset, args, autocast_dtype, desc):
        generator = torch.Generator().manual_seed(len(dataset))
        targets = dataset.get_targets()
        study = np.unique(np.asarray(dataset.study_ids), return_inverse=True)[1]
        noise = torch.randn(len(dataset), 2, 32, generator=generator)
        if model == "noise":
            return suite.SplitFeatures(noise, targets)
        study_vectors = torch.randn(N_STUDIES, 32, generator=torch.Generator().manual_seed(7))
        signal = torch.zeros(len(dataset), 2, 32)
        signal[:, :, :2] = 10 * (2 * torch.from_numpy(targets)[:, None, :] - 1)
        signal[:, :, 2:] = study_vectors[study, None, 2:]
        return suite.SplitFeatures(signal + 0.05 * noise, targets)

    monkeypatch.setattr(suite, "build_candidate", lambda candidate, args: (candidate.name, None))
    monkeypatch.setattr(suite, "embed", planted_embed)
    out = tmp_path / "out"
    suite.main(["--weights", *map(str, weights), "--names", "informative", "noise", "--data", str(data),
                "--output-dir", str(out), *FAST])
    rows = {row["checkpoint"]: row for row in json.loads((out / "results.json").read_text())["comparison"]["rows"]}
    assert rows["informative"]["retrieval top-1"] == 100.0
    for column in ("k-NN macro AP", "log-reg macro AP", "linear macro AP"):
        assert rows["informative"][column] == pytest.approx(100.0), column
        assert rows["noise"][column] < 90.0, column
    assert rows["noise"]["retrieval top-1"] < 50.0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--weights", "missing.pth"], "missing.pth: weights file not found"),
        (["--weights", "WEIGHTS", "--names", "a", "b"], "2 names for 1 --weights"),
        (["--random-init", "vit_nope"], "vit_nope"),
        (["--weights", "WEIGHTS", "--data", "/nonexistent"], "does not exist"),
    ],
)
def test_bad_input_is_one_error_line(data, weights, tmp_path, monkeypatch, capsys, arguments, message):
    arguments = [str(weights[0]) if a == "WEIGHTS" else a for a in arguments]
    if "--data" not in arguments:
        arguments += ["--data", str(data)]
    monkeypatch.setattr(sys, "argv", ["suite", *arguments, "--output-dir", str(tmp_path), *FAST])
    assert message in cli_error(suite.main, capsys)
