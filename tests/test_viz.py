"""vet_ext.downstream.viz: attention probabilities, known-answer attention, patch similarity, PCA, figures, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import cli_error, single_error_line
from dinov2.models import build_model_from_cfg
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.config import get_cfg, write_config
from dinov2.utils.errors import UserError
from tiny import make_tiny_vit
from vet_ext.ingestion.dicom import read_dicom
from vet_ext.ingestion.phantoms import generate_studies
from vet_ext.ingestion.prepare import PrepareConfig, prepare
from vet_ext.pretraining.datasets import VetStudies
from vet_ext.downstream.viz import attention_maps, last_block_attention, mass_mask, pca_rgb
from vet_ext.downstream.viz.__main__ import main
from vet_ext.downstream.viz.attention import GRID_PANEL_PX, OVERLAY_PANEL_PX, top_heads, write_attention_grid
from vet_ext.downstream.viz.figures import GAP_PX, LABEL_PX, TITLE_PX, PanelGrid, show_gray
from vet_ext.downstream.viz.loading import View, load_checkpoint, model_input_size
from vet_ext.downstream.viz.similarity import PANEL_PX as SIMILARITY_PANEL_PX
from vet_ext.downstream.viz.similarity import anchor_patch, cosine_similarity_map, top_k_patches

REPO = Path(__file__).resolve().parents[1]


def tiny_vit(registers: int = 0, block_chunks: int = 0, **kwargs) -> DinoVisionTransformer:
    settings = dict(img_size=56, patch_size=14, block_chunks=block_chunks, num_register_tokens=registers, init_values=1.0)
    return make_tiny_vit(**{**settings, **kwargs}).eval()


# --- attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("registers, block_chunks, size", [(0, 0, (56, 56)), (4, 2, (42, 70)), (2, 1, (70, 28))])
def test_attention_rows_are_distributions_that_reproduce_the_block(registers, block_chunks, size):
    model = tiny_vit(registers, block_chunks)
    with torch.no_grad():
        model.cls_token.normal_()  # default init leaves cls ~0; make its row non-trivial
    image = torch.randn(1, 3, *size)
    probabilities = last_block_attention(model, image)
    tokens = 1 + registers + (size[0] // 14) * (size[1] // 14)
    assert probabilities.shape == (1, 2, tokens, tokens)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(1, 2, tokens))

    # The probabilities, applied to the values, must give what the block's real attention computes.
    with torch.no_grad():
        x = model.prepare_tokens_with_masks(image)
        for block in model.iter_blocks()[:-1]:
            x = block(x)
        last = model.iter_blocks()[-1]
        expected = last.attn(last.norm1(x))
        values = last.attn.qkv(last.norm1(x)).reshape(1, tokens, 3, 2, 32)[:, :, 2].transpose(1, 2)
        mixed = (probabilities @ values).transpose(1, 2).reshape(1, tokens, 64)
        torch.testing.assert_close(last.attn.proj(mixed), expected, atol=1e-5, rtol=1e-4)

    maps = attention_maps(model, image[0])
    assert maps.shape == (2, size[0] // 14, size[1] // 14)
    torch.testing.assert_close(maps.flatten(1), probabilities[0, :, 0, 1 + registers :])
    assert torch.all(maps.flatten(1).sum(1) < 1.0)  # raw: cls + registers keep their share


def hand_built_model(alpha: float) -> DinoVisionTransformer:
    """Head 0's cls query matches only a bright patch; head 1's query is zero (uniform attention).

    Patch tokens carry the patch's channel-0 sum in dimension 0 and nothing else; cls, registers
    and positions are zero; the first block is made the identity, so the last block sees exactly
    these tokens. Keys copy LayerNorm dimension 0 into each head's first channel.
    """
    model = tiny_vit(registers=2, block_chunks=2, init_values=None)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.patch_embed.proj.weight[0, 0] = 1.0
        first, last = model.iter_blocks()
        for norm in (first.norm1, first.norm2, last.norm1, last.norm2, model.norm):
            norm.weight.fill_(1.0)
        dim, head_dim = 64, 32
        for head in range(2):
            last.attn.qkv.weight[dim + head * head_dim, 0] = 1.0
        last.attn.qkv.bias[0] = alpha
    return model


def test_hand_built_attention_gives_the_known_maps():
    model = hand_built_model(alpha=40.0)
    image = torch.zeros(3, 42, 56)  # a 3 x 4 grid
    image[0, 14:28, 28:42] = 1.0  # patch (1, 2)
    maps = attention_maps(model, image)
    tokens = 1 + 2 + 12
    expected_focused = torch.zeros(3, 4)
    expected_focused[1, 2] = 1.0
    torch.testing.assert_close(maps[0], expected_focused, atol=1e-6, rtol=0)
    torch.testing.assert_close(maps[1], torch.full((3, 4), 1.0 / tokens))
    assert top_heads(maps, 2) == [0, 1]


def test_mass_mask_keeps_the_fewest_patches_holding_the_fraction():
    attention = torch.tensor([[0.0625, 0.25], [0.125, 0.0625]])  # mass 0.5 in total
    assert mass_mask(attention, 0.5).tolist() == [[False, True], [False, False]]
    assert mass_mask(attention, 0.6).tolist() == [[False, True], [True, False]]
    assert mass_mask(attention, 1.0).all()


# --- patch similarity, input size, PCA ------------------------------------------------------


def test_patch_similarity_of_the_anchor_to_itself_is_the_maximum():
    features = torch.randn(5, 6, 16)
    similarity = cosine_similarity_map(features[2, 3], features)
    assert similarity.shape == (5, 6)
    assert similarity[2, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert similarity.max().item() == pytest.approx(1.0, abs=1e-6)
    cells, scores = top_k_patches(similarity, 4)
    assert cells[0] == (2, 3) and scores == sorted(scores, reverse=True) and len(cells) == 4
    assert similarity[cells[1]].item() == pytest.approx(scores[1])


def test_anchor_pixel_maps_to_the_patch_covering_it():
    assert anchor_patch(0, 0, (100, 200), (5, 10)) == (0, 0)
    assert anchor_patch(199.9, 99.9, (100, 200), (5, 10)) == (4, 9)
    assert anchor_patch(45, 21, (100, 200), (5, 10)) == (1, 2)
    with pytest.raises(UserError, match="anchor-xy"):
        anchor_patch(200, 10, (100, 200), (5, 10))


@pytest.mark.parametrize(
    "height, width, long_side, patch", [(102, 128, 448, 14), (3000, 2400, 224, 16), (50, 500, 448, 14)]
)
def test_model_input_keeps_the_aspect_within_a_patch(height, width, long_side, patch):
    rows, cols = model_input_size(height, width, long_side, patch)
    assert rows % patch == 0 and cols % patch == 0 and rows >= patch
    assert max(rows, cols) == pytest.approx(long_side, abs=patch / 2)
    assert abs(rows - height * max(rows, cols) / max(height, width)) <= patch / 2 + 1e-9


def _two_region_features(body_bright: bool):
    """Two views whose body patches share one feature direction and background another."""
    generator = torch.Generator().manual_seed(0)
    body_vector, air_vector = torch.randn(2, 32, generator=generator) * 3
    bodies = [torch.zeros(4, 5, dtype=torch.bool), torch.zeros(6, 3, dtype=torch.bool)]
    bodies[0][1:3, 1:4] = True
    bodies[1][2:6, 0:2] = True
    features, brightness = [], []
    for body in bodies:
        noise = 0.05 * torch.randn(*body.shape, 32, generator=generator)
        features.append(torch.where(body[..., None], body_vector, air_vector) + noise)
        light = body.float() if body_bright else 1.0 - body.float()
        brightness.append(0.2 + 0.6 * light)
    return features, brightness, bodies


@pytest.mark.parametrize("body_bright", [True, False])
def test_pca_colours_and_foreground_follow_the_body(body_bright):
    features, brightness, bodies = _two_region_features(body_bright)
    result = pca_rgb(features, brightness, threshold=0.5)
    for rgb, mask, body in zip(result.rgb, result.foreground, bodies):
        assert rgb.shape == (*body.shape, 3) and rgb.min() >= 0 and rgb.max() <= 1
        expected = body if body_bright else ~body
        assert torch.equal(mask, expected)
        assert torch.all(rgb[~mask] == 0)
    assert len(result.explained_variance) == 3
    assert result.explained_variance[0] > 0.9  # two clusters: one dominant direction
    assert result.explained_variance == sorted(result.explained_variance, reverse=True)


# --- figures ------------------------------------------------------------------------------


def test_panels_are_pixel_exact_at_the_source_aspect(tmp_path):
    shapes = [(100, 200), (200, 100)]
    grid = PanelGrid(["first", "second"], shapes, panel_height=80)
    halves = []
    for shape in shapes:
        pixels = torch.zeros(shape)
        pixels[:, : shape[1] // 2] = 1.0  # left half white
        halves.append(View("X", pixels))
    for row in grid.axes:
        for ax, view in zip(row, halves):
            show_gray(ax, view.pixels)
    path = grid.save(tmp_path / "grid.png")
    png = Image.open(path).convert("L")
    assert png.size == (grid.width, grid.height)
    for row in grid.boxes:
        for box, (height, width) in zip(row, shapes):
            assert box.height == 80 and abs(box.width - 80 * width / height) <= 0.5
            middle = box.top + box.height // 2
            assert png.getpixel((box.left + box.width // 4, middle)) > 240
            assert png.getpixel((box.left + 3 * box.width // 4, middle)) < 15
            assert box.left + box.width <= grid.width and box.top + box.height <= grid.height


def test_attention_grid_png_has_one_panel_per_view_and_head(tmp_path):
    views = [View("LL", torch.rand(102, 128)), View("VD", torch.rand(128, 102))]
    maps = {"a": [torch.rand(3, 7, 9), torch.rand(3, 9, 7)], "b": [torch.rand(3, 7, 9), torch.rand(3, 9, 7)]}
    path = write_attention_grid(tmp_path / "heads.png", views, maps)
    width, height = Image.open(path).size
    panels = [round(GRID_PANEL_PX * 128 / 102)] * 4 + [round(GRID_PANEL_PX * 102 / 128)] * 4
    assert width == LABEL_PX + sum(panels) + GAP_PX * len(panels)
    assert height == 2 * (TITLE_PX + GRID_PANEL_PX) + GAP_PX


# --- command line -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def viz_data(tmp_path_factory):
    """A prepared DATA folder of three small phantom studies, and one study id with 2+ views."""
    root = tmp_path_factory.mktemp("viz")
    generate_studies(root / "RAW", 3, seed=0, size=128, workers=1)
    prepare(PrepareConfig(out=root / "DATA", dicom_root=root / "RAW", workers=1, cache_size=128, progress=False,
                          val_fraction=0.0, test_fraction=0.0))  # fmt: skip
    studies = VetStudies(root / "DATA", split="train")
    index = max(range(len(studies)), key=lambda i: len(studies.view_codes(i)))
    assert len(studies.view_codes(index)) >= 2
    return root, str(studies.study_ids[index]), studies.view_codes(index), studies[index][0]


@pytest.fixture(scope="session")
def teacher_export(tmp_path_factory):
    """OUT/config.yaml + OUT/eval/training_9/teacher_checkpoint.pth as a training run writes them."""
    out = tmp_path_factory.mktemp("run")
    opts = ["student.arch=vit_small", "student.patch_size=16", "crops.global_crops_size=32",
            "student.interpolate_offset=0.0", "student.num_register_tokens=1"]  # fmt: skip
    cfg = get_cfg(opts=opts)
    write_config(cfg, out)
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    state = {f"backbone.{key}": value for key, value in teacher.state_dict().items()}
    state["dino_head.last_layer.weight_g"] = torch.ones(8, 1)
    path = out / "eval" / "training_9" / "teacher_checkpoint.pth"
    path.parent.mkdir(parents=True)
    torch.save({"teacher": state}, path)
    return path, teacher


@pytest.fixture(scope="session")
def hub_file(tmp_path_factory):
    """A released-format backbone: flat keys, LayerScale, 4 registers, no config anywhere."""
    model = tiny_vit(registers=4, embed_dim=128, init_values=1.0)
    path = tmp_path_factory.mktemp("hub") / "dinov2_tiny14_reg4_pretrain.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_teacher_export_takes_its_architecture_from_the_run_config(teacher_export):
    path, teacher = teacher_export
    checkpoint = load_checkpoint(str(path), "run")
    assert checkpoint.config == str(path.parents[2] / "config.yaml")
    assert checkpoint.model.interpolate_offset == 0.0  # only the config knows this
    assert checkpoint.model.num_register_tokens == 1 and checkpoint.patch_size == 16
    image = torch.randn(1, 3, 48, 64)
    torch.testing.assert_close(
        checkpoint.model.forward_features(image)["x_norm_patchtokens"],
        teacher.eval().forward_features(image)["x_norm_patchtokens"],
    )


def test_released_file_is_built_from_its_keys(hub_file):
    path, model = hub_file
    checkpoint = load_checkpoint(str(path), "hub")
    assert checkpoint.config is None
    assert (checkpoint.model.num_heads, checkpoint.model.num_register_tokens) == (2, 4)
    image = torch.randn(1, 3, 42, 70)
    model.interpolate_offset, model.interpolate_antialias = 0.0, True  # the hub's register settings
    torch.testing.assert_close(attention_maps(checkpoint.model, image), attention_maps(model, image))


@pytest.mark.slow
def test_cli_attention_end_to_end(viz_data, teacher_export, hub_file, tmp_path, capsys):
    root, study, codes, views = viz_data
    out = tmp_path / "attention"
    main(["attention", "--weights", str(teacher_export[0]), str(hub_file[0]), "random:vit_small",
          "--data", str(root / "DATA"), "--study", study, "--out", str(out), "--image-size", "64"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "attention: 3 checkpoint(s)" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == ["attention_heads.png", "attention_overlay.png"]
    names = [c["name"] for c in summary["checkpoints"]]
    assert names == ["training_9", "dinov2_tiny14_reg4_pretrain", "random:vit_small"]
    assert summary["checkpoints"][0]["config"].endswith("config.yaml") and summary["checkpoints"][1]["config"] is None
    assert [v["name"] for v in summary["views"]] == codes
    details = summary["details"]["checkpoints"]
    assert len(details["random:vit_small"][codes[0]]["patch_mass_per_head"]) == 6
    assert details["training_9"][codes[0]]["grid"] == list(
        (torch.tensor(model_input_size(*views[0].shape[1:], 64, 16)) // 16).tolist()
    )
    overlay = Image.open(out / "attention_overlay.png")
    shapes = [tuple(v.shape[1:]) for v in views]
    panels = [round(OVERLAY_PANEL_PX * w / h) for h, w in shapes]
    assert overlay.size == (LABEL_PX + sum(panels) + GAP_PX * len(panels), 3 * (TITLE_PX + OVERLAY_PANEL_PX) + GAP_PX)


def test_cli_patch_similarity_and_pca_with_a_released_file(viz_data, hub_file, tmp_path):
    root, study, codes, views = viz_data
    common = ["--weights", str(hub_file[0]), "--names", "hub", "--data", str(root / "DATA"), "--study", study,
              "--split", "train", "--image-size", "56"]  # fmt: skip
    main(["patch-similarity", *common, "--anchor-xy", "10,20", "--top-k", "3", "--out", str(tmp_path / "sim")])
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    matches = summary["details"]["checkpoints"]["hub"]["matches"]
    assert list(matches) == codes[1:] and all(len(found) == 3 for found in matches.values())
    assert all(-1 <= m["cosine"] <= 1 for found in matches.values() for m in found)
    assert Image.open(tmp_path / "sim" / "patch_similarity.png").size[1] == TITLE_PX + SIMILARITY_PANEL_PX + GAP_PX

    main(["pca", *common, "--out", str(tmp_path / "pca")])
    summary = json.loads((tmp_path / "pca" / "summary.json").read_text())
    assert summary["files"] == ["pca.png"] and (tmp_path / "pca" / "pca.png").is_file()
    assert set(summary["details"]["checkpoints"]["hub"]["foreground_fraction"]) == set(codes)


def test_cli_reads_dicom_files_as_the_views(viz_data, hub_file, tmp_path):
    root, study = viz_data[0], viz_data[1]
    files = sorted(path for path in (root / "RAW" / study).iterdir() if path.is_file())
    main(["pca", "--weights", str(hub_file[0]), "--dicom", *map(str, files), "--out", str(tmp_path),
          "--image-size", "56"])  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["source"] == {"dicom": list(map(str, files))}
    assert [(v["height"], v["width"]) for v in summary["views"]] == [read_dicom(f).frames[0].shape for f in files]


@pytest.mark.parametrize(
    "extra, message",
    [(["--names", "a", "b"], "--names gives 2 labels for 1"), (["--study", "x"], "--study and --split select")],
)
def test_cli_inconsistent_flags_are_user_errors(hub_file, tmp_path, extra, message):
    argv = ["pca", "--weights", str(hub_file[0]), "--dicom", "f.dcm", "--out", str(tmp_path), *extra]
    with pytest.raises(UserError, match=message):
        main(argv)


@pytest.mark.slow
def test_cli_missing_study_is_one_error_line(viz_data, hub_file, tmp_path):
    root = viz_data[0]
    result = subprocess.run(
        [sys.executable, "-m", "vet_ext.viz", "pca", "--weights", str(hub_file[0]), "--data", str(root / "DATA"),
         "--study", "1.2.3.nope", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert single_error_line(result.stderr).startswith("error: --study 1.2.3.nope: no such study")


@pytest.mark.parametrize("weights, message", [("not_weights.pth", "not a readable PyTorch weights file"),
                                              ("random:vit_nosuch", "unknown architecture")])  # fmt: skip
def test_cli_bad_weights_are_one_error_line(viz_data, tmp_path, capsys, monkeypatch, weights, message):
    root, study = viz_data[0], viz_data[1]
    (tmp_path / "not_weights.pth").write_text("hello")
    monkeypatch.chdir(tmp_path)
    argv = ["attention", "--weights", weights, "--data", str(root / "DATA"), "--study", study, "--out", "o"]
    assert message in cli_error(lambda: main(argv), capsys, after_progress=True)  # a progress bar over the checkpoints runs first
