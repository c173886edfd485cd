"""Cross-view retrieval: planted study structure, chance level, and which images query and which are gallery."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import cli_error
from dinov2.data import make_dataset
from dinov2.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from dinov2.data.transforms import ClassificationEvalTransform
from test_suite import data, released_tiny_vit  # noqa: F401 - the prepared two-view studies fixture
from vet_ext.downstream.eval import retrieval
from vet_ext.downstream.eval.retrieval import cross_view_retrieval

VIEWS = ("LL", "VD", "RL")


def planted(n_studies: int, noise: float, dim: int = 32, seed: int = 0):
    """Every study has its own direction; each of its views is that direction plus noise."""
    generator = torch.Generator().manual_seed(seed)
    study_vectors = torch.randn(n_studies, dim, generator=generator)
    features, studies, views = [], [], []
    for s in range(n_studies):
        for view in VIEWS[: 2 + s % 2]:
            features.append(study_vectors[s] + noise * torch.randn(dim, generator=generator))
            studies.append(f"study{s}")
            views.append(view)
    return torch.stack(features), np.array(studies), np.array(views)


def test_planted_studies_are_found_across_views():
    features, studies, views = planted(40, noise=0.1)
    result = cross_view_retrieval(features, studies, views)
    assert result["top-1"] == 100.0 and result["top-5"] == 100.0
    assert result["queries"] == len(features)


def test_random_embeddings_score_near_chance():
    generator = torch.Generator().manual_seed(3)
    studies = np.repeat([f"s{i}" for i in range(300)], 2)
    views = np.tile(["LL", "VD"], 300)
    features = torch.randn(600, 64, generator=generator)
    result = cross_view_retrieval(features, studies, views)
    # each query's gallery: the 300 images of the other view, one of them from its own study
    assert result["chance top-1"] == pytest.approx(100 / 300)
    assert result["top-1"] < 2.0
    assert result["top-5"] < 5.0


def test_single_view_studies_give_no_queries_but_stay_in_the_gallery():
    # study a: LL + VD; study b: two LL images only (one view code -> no query)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [5.0, 0.2]])
    studies = ["a", "a", "b", "b"]
    views = ["LL", "VD", "LL", "LL"]
    result = cross_view_retrieval(features, studies, views, top_k=(1,))
    assert result["queries"] == 2
    # query a/VD [0,1]: gallery = the LL images {a[1,0], b[0.1,1], b[5,0.2]}; nearest is b -> a miss.
    # query a/LL [1,0]: gallery = {a/VD}; a hit.
    assert result["top-1"] == 50.0
    assert result["chance top-1"] == pytest.approx(100 * (1 / 1 + 1 / 3) / 2)


def test_same_view_images_are_never_in_the_gallery():
    # the query's twin with the same view is the closest image overall but must not be retrieved
    features = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.7, 0.7]])
    studies = ["a", "b", "b", "a"]
    views = ["LL", "LL", "VD", "VD"]
    result = cross_view_retrieval(features, studies, views, top_k=(1,))
    # a/LL -> nearest VD is a/VD (0.7,0.7): hit; b/LL -> a/VD: miss; b/VD -> nearest LL b/LL: hit;
    # a/VD -> nearest LL is b/LL (cos 0.714 > 0.707): miss
    assert result["top-1"] == 50.0


def test_small_galleries_do_not_count_excluded_images_as_hits():
    features = torch.randn(4, 8)
    result = cross_view_retrieval(features, ["a", "a", "a", "b"], ["LL", "LL", "VD", "LL"], top_k=(1, 5))
    # a/VD's gallery has three LL images (two its own); an LL query's gallery is the one VD image
    assert result["queries"] == 3
    assert result["top-5"] == 100.0


def test_no_multi_view_study_gives_nan_rates():
    result = cross_view_retrieval(torch.randn(3, 4), ["a", "b", "c"], ["LL", "VD", "LL"])
    assert result["queries"] == 0 and math.isnan(result["top-1"])


# ----------------------------------------------------------------------------- command line


def test_command_line_scores_the_backbone_on_a_prepared_split(data, tmp_path, capsys):
    torch.manual_seed(3)
    model = released_tiny_vit().eval()
    weights = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), weights)  # a released-style file: bare backbone keys
    retrieval.main(["--weights", str(weights), "--data", str(data), "--crop-size", "32", "--num-workers", "0",
                    "--output-dir", str(tmp_path)])
    row = json.loads((tmp_path / "results.json").read_text())["cross-view retrieval"]["rows"][0]

    transform = ClassificationEvalTransform(37, 32, IMAGENET_MEAN, IMAGENET_STD)
    dataset = make_dataset(f"VetImages:root={data}:split=val", transform=transform)
    with torch.no_grad():
        features = torch.stack([model(dataset[i][0][None])[0] for i in range(len(dataset))])
    expected = cross_view_retrieval(features, dataset.study_ids, [dataset.view_codes(i)[0] for i in range(len(dataset))])
    assert row == pytest.approx(expected)
    assert row["queries"] == len(dataset)  # every prepared study has an LL and a VD image
    assert f"{row['queries']} queries" in capsys.readouterr().out


@pytest.mark.parametrize(
    "swap, message",
    [({"--weights": "missing.pth"}, "missing.pth: weights file not found"), ({"--data": "/nonexistent"}, "does not exist")],
)
def test_command_line_bad_input_is_one_error_line(data, tmp_path, monkeypatch, capsys, swap, message):
    weights = tmp_path / "backbone.pth"
    torch.save(released_tiny_vit().state_dict(), weights)
    arguments = {"--weights": str(weights), "--data": str(data), "--crop-size": "32", **swap}
    monkeypatch.setattr(sys, "argv", ["retrieval", *[item for pair in arguments.items() for item in pair]])
    assert message in cli_error(retrieval.main, capsys)
