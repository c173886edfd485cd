"""torch.hub entry points: released-model settings, local weights only."""
import json
from pathlib import Path

import pytest
import torch

import hubconf
from dinov2.utils.errors import UserError

REPO_DIR = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    "dinov2_vits14": "vit_small_p14_img518 (hub dinov2_vits14)",
    "dinov2_vits14_reg": "vit_small_p14_img518_reg4 (hub dinov2_vits14_reg)",
    "dinov2_vitb14": "vit_base_p14_img518 (hub dinov2_vitb14)",
    "dinov2_vitl14": "vit_large_p14_img518 (hub dinov2_vitl14)",
    "dinov2_vitg14": "vit_giant2_p14_img518_swiglufused (hub dinov2_vitg14)",
}
ALL_ENTRY_POINTS = [f"dinov2_vit{size}14{reg}" for size in "sblg" for reg in ("", "_reg")]


def test_hub_exposes_exactly_the_eight_models():
    # torch.hub.list's rule: every public callable of hubconf.py is an entry point.
    public = [name for name in dir(hubconf) if not name.startswith("_") and callable(getattr(hubconf, name))]
    assert sorted(public) == sorted(ALL_ENTRY_POINTS)
    assert hubconf.dependencies == ["torch"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_build_released_architectures(entry, fixtures_dir):
    expected = json.loads((fixtures_dir / "state_dict_keys.json").read_text())[ENTRY_POINTS[entry]]
    with torch.device("meta"):
        model = getattr(hubconf, entry)(pretrained=False)
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected["keys"]
    assert list(model.state_dict()) == list(expected["keys"])


@pytest.mark.parametrize("size", "sblg")
def test_register_variants_use_size_based_antialiased_interpolation(size):
    with torch.device("meta"):
        plain = getattr(hubconf, f"dinov2_vit{size}14")(pretrained=False)
        registers = getattr(hubconf, f"dinov2_vit{size}14_reg")(pretrained=False)
    assert (plain.num_register_tokens, plain.interpolate_offset, plain.interpolate_antialias) == (0, 0.1, False)
    assert (registers.num_register_tokens, registers.interpolate_offset, registers.interpolate_antialias) == (
        4, 0.0, True,
    )
    assert registers.embed_dim == plain.embed_dim and registers.n_blocks == plain.n_blocks


def test_pretrained_without_local_file_asks_for_one():
    with pytest.raises(UserError, match="never downloads weights; pass weights=PATH"):
        hubconf.dinov2_vits14()


def test_torch_hub_load_from_local_file(tmp_path):
    source = hubconf.dinov2_vits14(pretrained=False).eval()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(source.state_dict(), path)
    model = torch.hub.load(str(REPO_DIR), "dinov2_vits14", source="local", weights=str(path)).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_hub_rejects_mismatched_file(tmp_path):
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    with torch.device("meta"):
        state = hubconf.dinov2_vits14_reg(pretrained=False).state_dict()
    torch.save({key: torch.zeros(value.shape) for key, value in state.items() if key.startswith(("cls", "reg"))}, path)
    with pytest.raises(UserError, match="dinov2_vits14_reg4_pretrain.pth: weights do not fit the model"):
        hubconf.dinov2_vits14(weights=str(path))
