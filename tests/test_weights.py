"""Loading backbone weights from hub files, teacher exports and checkpoints, in either layout."""

import pytest
import torch

from conftest import SHORT_SUM_EPS, assert_close_scaled, state_dict_cases
from dinov2.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer
from dinov2.models.weights import (
    extract_backbone_state_dict,
    infer_backbone_kwargs,
    load_backbone_weights,
    read_weights_file,
)
from dinov2.utils.errors import UserError


@pytest.fixture(scope="module")
def mlp_reference():
    from conftest import FIXTURES

    return torch.load(FIXTURES / "vit_mlp.pt", weights_only=True)


def _model(ref, **overrides) -> DinoVisionTransformer:
    return DinoVisionTransformer(**{**ref["kwargs"], **overrides}).eval()


def _assert_same_weights(model, state):
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_hub_style_file_loads_strict_and_reproduces_features(mlp_reference, tmp_path):
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(mlp_reference["state_dict"], path)
    model = _model(mlp_reference)
    load_backbone_weights(model, path)
    with torch.no_grad():
        out = model.forward_features(mlp_reference["inputs"]["x98"])
    assert_close_scaled(out["x_prenorm"], mlp_reference["forward_features"]["x98"]["x_prenorm"], rtol=1e-4)


def test_teacher_export_with_wrapper_prefixes_loads(mlp_reference, tmp_path):
    teacher = {f"module.backbone.{key}": value for key, value in mlp_reference["state_dict"].items()}
    teacher["dino_head.last_layer.weight_g"] = torch.ones(4, 1)
    teacher["ibot_head.last_layer.weight_g"] = torch.ones(4, 1)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    model = _model(mlp_reference)
    load_backbone_weights(model, path)
    _assert_same_weights(model, mlp_reference["state_dict"])


def test_training_checkpoint_prefers_teacher(mlp_reference):
    state = mlp_reference["state_dict"]
    checkpoint = {
        "model": {
            **{f"student.backbone.{key}": torch.zeros_like(value) for key, value in state.items()},
            **{f"teacher.backbone.{key}": value for key, value in state.items()},
            "dino_loss.center": torch.zeros(1, 4),
        },
        "iteration": 7,
    }
    backbone = extract_backbone_state_dict(checkpoint)
    assert list(backbone) == list(state)
    model = _model(mlp_reference)
    load_backbone_weights(model, checkpoint)
    _assert_same_weights(model, state)


def test_flat_weights_load_into_chunked_model_and_back(mlp_reference):
    flat_state = mlp_reference["state_dict"]
    chunked = _model(mlp_reference, block_chunks=2)
    load_backbone_weights(chunked, flat_state)
    assert "blocks.1.1.attn.qkv.weight" in chunked.state_dict()
    assert torch.equal(chunked.state_dict()["blocks.1.1.attn.qkv.weight"], flat_state["blocks.1.attn.qkv.weight"])

    flat = _model(mlp_reference, block_chunks=0)
    load_backbone_weights(flat, chunked.state_dict())
    _assert_same_weights(flat, flat_state)


def test_wrong_keys_are_listed(mlp_reference):
    state = dict(mlp_reference["state_dict"])
    state["head.weight"] = torch.zeros(3)
    del state["norm.bias"], state["mask_token"]
    with pytest.raises(UserError) as error:
        load_backbone_weights(_model(mlp_reference), state)
    message = str(error.value)
    assert "missing keys 2: mask_token, norm.bias" in message
    assert "unexpected keys 1: head.weight" in message


def test_non_strict_returns_missing_keys(mlp_reference):
    state = dict(mlp_reference["state_dict"])
    del state["norm.bias"]
    result = load_backbone_weights(_model(mlp_reference), state, strict=False)
    assert result.missing_keys == ["norm.bias"] and result.unexpected_keys == []


def test_shape_mismatch_is_reported_not_interpolated(mlp_reference):
    model = _model(mlp_reference, img_size=98)
    with pytest.raises(UserError, match=r"pos_embed \[1, 257, 192\] in file vs \[1, 50, 192\] in model"):
        load_backbone_weights(model, mlp_reference["state_dict"])


def test_not_a_torch_file_names_the_path(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_text("these are not weights")
    with pytest.raises(UserError, match="weights.pth: not a readable PyTorch weights file"):
        read_weights_file(path)


def test_missing_file_and_non_dict_names_the_path(tmp_path):
    with pytest.raises(UserError, match="absent.pth: weights file not found"):
        read_weights_file(tmp_path / "absent.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(UserError, match="list.pth: holds a list"):
        read_weights_file(path)


def test_file_without_backbone_is_rejected(tmp_path):
    path = tmp_path / "head_only.pth"
    torch.save({"dino_head.mlp.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="head_only.pth: no backbone weights found"):
        load_backbone_weights(DinoVisionTransformer(depth=1, embed_dim=64, num_heads=1), path)


def test_infer_kwargs_of_fixture_model(mlp_reference):
    inferred = infer_backbone_kwargs(mlp_reference["state_dict"])
    for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "qkv_bias", "proj_bias", "ffn_bias", "ffn_layer", "block_chunks", "num_register_tokens"):
        assert inferred[key] == mlp_reference["kwargs"][key], key
    assert inferred["init_values"] is not None


STANDARD_WIDTHS = {"vit_small": (384, 6, 12), "vit_base": (768, 12, 12), "vit_large": (1024, 16, 24),
                   "vit_giant2": (1536, 24, 40)}


@pytest.mark.parametrize("case", state_dict_cases())
def test_infer_kwargs_round_trip(case):
    with torch.device("meta"):
        original = ARCHITECTURES.lookup(case["arch"])(**case["kwargs"])
        inferred = infer_backbone_kwargs(original.state_dict())
        rebuilt = DinoVisionTransformer(**inferred)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()
    }
    assert list(rebuilt.state_dict()) == list(original.state_dict())
    assert (inferred["embed_dim"], inferred["num_heads"], inferred["depth"]) == STANDARD_WIDTHS[case["arch"]]
    assert inferred["img_size"] == case["kwargs"]["img_size"] and inferred["patch_size"] == 14
    assert inferred["ffn_layer"] == case["kwargs"].get("ffn_layer", "mlp")
    assert inferred["block_chunks"] == case["kwargs"].get("block_chunks", 1)
    assert inferred["num_register_tokens"] == case["kwargs"].get("num_register_tokens", 0)
    assert (inferred["init_values"] is None) == (case["kwargs"]["init_values"] is None)


def test_opt_in_pos_embed_resampling_matches_upstream_runtime_interpolation(fixtures_dir):
    """Register models interpolate by size with antialias at run time; resampling on load must
    give exactly upstream's positional embeddings for that grid."""
    ref = torch.load(fixtures_dir / "vit_swiglu_reg4.pt", weights_only=True)
    model = DinoVisionTransformer(**{**ref["kwargs"], "img_size": 98})
    with pytest.raises(UserError, match="pos_embed"):
        load_backbone_weights(model, ref["state_dict"])
    load_backbone_weights(model, ref["state_dict"], resize_pos_embed=True)
    assert_close_scaled(model.pos_embed.detach(), ref["interpolated_pos_embed"]["x98"], eps=SHORT_SUM_EPS)
    assert torch.equal(model.blocks[1].mlp.w3.weight, ref["state_dict"]["blocks.1.mlp.w3.weight"])
