"""Exports for other libraries (`python -m dinov2.export`): the same features there, exact round trips.

Equality, not loading, is what is asserted: the exported folder, opened by transformers (and by
timm where it imports), computes our [CLS] and patch features on the same input; and every format
read back by our loader gives the exact tensors it was written from.
"""
import importlib.util
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close_scaled, cli_error
from dinov2 import export as export_module
from dinov2.eval.setup import load_backbone
from dinov2.models.formats import timm as timm_format
from dinov2.models.formats.spec import BackboneSpec, backbone_spec, flat_block_keys
from dinov2.models.weights import extract_head_state_dict, load_backbone_weights, read_weights_file
from dinov2.utils.errors import UserError
from tiny import make_tiny_vit

GRID = 4
PATCH = 14
IMG = GRID * PATCH
CASES = {  # constructor options of the tiny ViT (64 wide, 2 blocks, 2 heads) per architecture family
    "plain": dict(ffn_layer="mlp", num_register_tokens=0),
    "reg4": dict(ffn_layer="mlp", num_register_tokens=4),
    "swiglu": dict(ffn_layer="swiglufused", num_register_tokens=0),
    "reg4_swiglu": dict(ffn_layer="swiglufused", num_register_tokens=4),
}
TIMM_IMPORTS = importlib.util.find_spec("timm") is not None and importlib.util.find_spec("torchvision") is not None


def make_backbone(case: str, **overrides) -> torch.nn.Module:
    """A tiny ViT with every parameter random (LayerScale, norms and biases too), so that a
    misplaced or transposed tensor changes the features. Interpolation is set the way
    transformers does it, unless overridden."""
    options = dict(patch_size=PATCH, img_size=IMG, init_values=1e-5, interpolate_offset=0.0,
                   interpolate_antialias=CASES[case]["num_register_tokens"] > 0, **CASES[case])  # fmt: skip
    model = make_tiny_vit(**{**options, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def features(model, images):
    with torch.no_grad():
        return model.forward_features(images)


def hf_features(folder, images):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model, model(pixel_values=images).last_hidden_state


@pytest.mark.parametrize("case", CASES)
def test_transformers_gives_our_features(tmp_path, case):
    model = make_backbone(case)
    export_module.write_export(model, "hf", tmp_path / "hf")
    images = torch.randn(2, 3, IMG, IMG)
    ours = features(model, images)
    hf_model, tokens = hf_features(tmp_path / "hf", images)
    registers = CASES[case]["num_register_tokens"]
    assert type(hf_model).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    assert tokens.shape == (2, 1 + registers + GRID * GRID, 64)
    assert_close_scaled(tokens[:, 0], ours["x_norm_clstoken"], msg="[CLS]")
    assert_close_scaled(tokens[:, 1 + registers:], ours["x_norm_patchtokens"], msg="patches")
    assert_close_scaled(tokens[:, 1:1 + registers], ours["x_norm_regtokens"], msg="registers")


@pytest.mark.parametrize("case", ["plain", "reg4"])
def test_transformers_off_the_trained_grid_matches_only_its_interpolation(tmp_path, case, caplog):
    """transformers resamples positions by size (antialiased with registers): a model built that
    way matches at any size; upstream's offset 0.1 matches at the trained grid only, and the
    export says so."""
    images = torch.randn(1, 3, IMG + 2 * PATCH, IMG + 2 * PATCH)
    model = make_backbone(case)
    export_module.write_export(model, "hf", tmp_path / "same")
    _, tokens = hf_features(tmp_path / "same", images)
    assert_close_scaled(tokens[:, 0], features(model, images)["x_norm_clstoken"])

    offset = make_backbone(case, interpolate_offset=0.1)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        export_module.write_export(offset, "hf", tmp_path / "offset")
    assert "features are equal at 56x56 px only" in caplog.text
    _, tokens = hf_features(tmp_path / "offset", images)
    registers = CASES[case]["num_register_tokens"]
    difference = (tokens[:, 1 + registers:] - features(offset, images)["x_norm_patchtokens"]).abs().max()
    assert difference > 1e-4  # far beyond rounding (~1e-7): the positions differ


def _reloaded(folder_or_file, case: str) -> torch.nn.Module:
    """The exported weights read back by our loader into a flat-block model of the same build."""
    fresh = make_backbone(case, block_chunks=0)
    load_backbone_weights(fresh, read_weights_file(folder_or_file), strict=True)
    return fresh.eval()


EXPORTED = {"hf": "hf", "timm": "timm", "safetensors": "safetensors/backbone_compatible.safetensors",
            "dinov2": "dinov2/backbone.pth"}  # fmt: skip


@pytest.mark.parametrize("fmt", EXPORTED)
@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_exact(tmp_path, fmt, case):
    model = make_backbone(case, block_chunks=2)  # chunked keys go out flat
    export_module.write_export(model, fmt, tmp_path / fmt)
    back = _reloaded(tmp_path / EXPORTED[fmt], case)
    original = flat_block_keys(model.state_dict())
    reloaded = back.state_dict()
    assert sorted(reloaded) == sorted(original)
    for key, source in original.items():
        if fmt == "timm" and (key == "mask_token" or CASES[case]["num_register_tokens"] and key in ("cls_token", "pos_embed")):
            continue  # timm has no mask token (training only); with registers it folds the [CLS] position into cls_token
        assert torch.equal(reloaded[key], source), key
    images = torch.randn(2, 3, IMG, IMG)
    ours, theirs = features(model, images), features(back, images)
    for name in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert torch.equal(ours[name], theirs[name]), name


def test_timm_register_round_trip_moves_the_cls_position_into_the_token(tmp_path):
    model = make_backbone("reg4")
    export_module.write_export(model, "timm", tmp_path / "timm")
    back = _reloaded(tmp_path / "timm", "reg4")
    assert torch.equal(back.cls_token, model.cls_token + model.pos_embed[:, :1])
    assert torch.equal(back.pos_embed[:, :1], torch.zeros_like(model.pos_embed[:, :1]))
    assert torch.equal(back.pos_embed[:, 1:], model.pos_embed[:, 1:])


def _timm_table(spec: BackboneSpec, mlp_ratio: float) -> dict[str, list[int]]:
    """Keys and shapes of timm's VisionTransformer as its DINOv2 definitions build it (num_classes=0):
    reg_token [1, R, D] and no_embed_class with registers (pos_embed without the [CLS] row), fc1
    of width int(D * mlp_ratio), GluMlp's fc2 taking half of it; LayerScale ls1/ls2.gamma; no mask token."""
    d, r, grid = spec.embed_dim, spec.num_register_tokens, (spec.img_size // spec.patch_size) ** 2
    fc1 = int(d * mlp_ratio)
    table = {"cls_token": [1, 1, d], "pos_embed": [1, grid + (0 if r else 1), d],
             "patch_embed.proj.weight": [d, 3, spec.patch_size, spec.patch_size], "patch_embed.proj.bias": [d],
             "norm.weight": [d], "norm.bias": [d]}  # fmt: skip
    if r:
        table["reg_token"] = [1, r, d]
    for i in range(spec.depth):
        b = f"blocks.{i}."
        table.update({
            b + "norm1.weight": [d], b + "norm1.bias": [d], b + "attn.qkv.weight": [3 * d, d], b + "attn.qkv.bias": [3 * d],
            b + "attn.proj.weight": [d, d], b + "attn.proj.bias": [d], b + "ls1.gamma": [d],
            b + "norm2.weight": [d], b + "norm2.bias": [d], b + "mlp.fc1.weight": [fc1, d], b + "mlp.fc1.bias": [fc1],
            b + "mlp.fc2.weight": [d, fc1 // 2 if spec.ffn == "swiglu" else fc1], b + "mlp.fc2.bias": [d],
            b + "ls2.gamma": [d],
        })  # fmt: skip
    return table


@pytest.mark.parametrize("case", CASES)
def test_timm_export_has_timms_keys_and_shapes(tmp_path, case):
    model = make_backbone(case)
    export_module.write_export(model, "timm", tmp_path / "timm")
    spec = backbone_spec(model)
    written = json.loads((tmp_path / "timm" / "config.json").read_text())
    args = written["model_args"]
    assert written["architecture"] == timm_format.timm_name(spec)
    assert written["architecture"].endswith("_reg4_dinov2" if spec.num_register_tokens else "_patch14_dinov2")
    assert ("_giant_" in written["architecture"]) == (spec.ffn == "swiglu")  # timm's one SwiGLUPacked definition
    assert args["no_embed_class"] if spec.num_register_tokens else "no_embed_class" not in args
    state = load_file(tmp_path / "timm" / "model.safetensors")
    assert {k: list(v.shape) for k, v in state.items()} == _timm_table(spec, args["mlp_ratio"])


@pytest.mark.parametrize(
    "sizes, registers, name, fc1",
    [((384, 12, 6), 0, "vit_small_patch14_dinov2", 1536), ((768, 12, 12), 4, "vit_base_patch14_reg4_dinov2", 3072),
     ((1024, 24, 16), 4, "vit_large_patch14_reg4_dinov2", 4096), ((1536, 40, 24), 0, "vit_giant_patch14_dinov2", 8192)],
)  # fmt: skip
def test_released_sizes_get_timms_names_and_widths(sizes, registers, name, fc1):
    """timm's definitions: giant is SwiGLUPacked with mlp_ratio 2.66667 * 2 (fc1 8192 = 2 x upstream's 4096)."""
    d, depth, heads = sizes
    swiglu = d == 1536
    spec = BackboneSpec(embed_dim=d, depth=depth, num_heads=heads, patch_size=14, img_size=518, in_chans=3,
                        num_register_tokens=registers, ffn="swiglu" if swiglu else "mlp",
                        hidden_features=4096 if swiglu else 4 * d, qkv_bias=True, proj_bias=True, ffn_bias=True,
                        layerscale=True, interpolate_antialias=False, interpolate_offset=0.1)  # fmt: skip
    assert timm_format.timm_name(spec) == name
    assert int(d * timm_format.model_args(spec)["mlp_ratio"]) == fc1


@pytest.mark.skipif(not TIMM_IMPORTS, reason="timm (and torchvision) not importable here; runs on the GPU machine")
@pytest.mark.parametrize("case", CASES)
def test_timm_gives_our_features(tmp_path, case):
    import timm

    model = make_backbone(case)
    export_module.write_export(model, "timm", tmp_path / "timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    theirs = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    theirs.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        tokens = theirs.forward_features(images)
    ours, registers = features(model, images), CASES[case]["num_register_tokens"]
    assert_close_scaled(tokens[:, 0], ours["x_norm_clstoken"], msg="[CLS]")
    assert_close_scaled(tokens[:, 1 + registers:], ours["x_norm_patchtokens"], msg="patches")


def test_command_exports_a_teacher_that_automodel_loads_with_our_features(tmp_path, capsys):
    """The acceptance check: a teacher export (backbone + DINO head, as training writes it) through
    the command, opened with AutoModel, gives our features to 1e-5."""
    model = make_backbone("reg4", num_heads=1)  # a config-less export reads 64 channels per head
    teacher = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    teacher["dino_head.last_layer.weight_g"] = torch.ones(8, 1)
    weights = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, weights)
    assert export_module.main(["--weights", str(weights), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert str(tmp_path / "hf" / "config.json") in capsys.readouterr().out
    images = torch.randn(2, 3, IMG, IMG)
    _, tokens = hf_features(tmp_path / "hf", images)
    ours = features(load_backbone(None, str(weights)), images)
    torch.testing.assert_close(tokens[:, 0], ours["x_norm_clstoken"], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, 5:], ours["x_norm_patchtokens"], rtol=0, atol=1e-5)


def test_safetensors_export_keeps_the_dino_head(tmp_path):
    model = make_backbone("plain", num_heads=1)
    head = {"mlp.0.weight": torch.randn(16, 64), "last_layer.weight_g": torch.randn(8, 1)}
    weights = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in model.state_dict().items()},
                            **{f"dino_head.{k}": v for k, v in head.items()}}}, weights)  # fmt: skip
    export_module.export(str(weights), "safetensors", tmp_path / "st")
    stored = read_weights_file(tmp_path / "st")
    assert all(torch.equal(extract_head_state_dict(stored)[k], v) for k, v in head.items())


@pytest.mark.parametrize(
    "fmt, overrides, needle",
    [("hf", dict(proj_bias=False), "without attention-projection or FFN biases"),
     ("timm", dict(ffn_bias=False), "without attention-projection or FFN biases"),
     ("timm", dict(patch_size=16, img_size=64), "timm's DINOv2 definitions use patch 14")],
)  # fmt: skip
def test_architectures_a_target_cannot_express_are_refused(tmp_path, fmt, overrides, needle):
    model = make_backbone("plain", **overrides)
    with pytest.raises(UserError, match=needle):
        export_module.write_export(model, fmt, tmp_path / fmt)
    assert not (tmp_path / fmt / "config.json").exists()


def test_command_bad_weights_is_one_error_line(tmp_path, capsys):
    argv = ["--weights", str(tmp_path / "missing.safetensors"), "--format", "hf", "--out", str(tmp_path / "o")]
    assert "missing.safetensors" in cli_error(lambda: export_module.main(argv), capsys)
