"""ViT backbone and layers against upstream DINOv2's numbers (fixtures/dinov2_reference)."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import SHORT_SUM_EPS, assert_close_scaled, state_dict_cases
from dinov2.layers import attention as attention_module
from dinov2.layers import Block, DropPath, LayerScale, add_residual_on_random_subset
from dinov2.models.vision_transformer import ARCHITECTURES, DinoVisionTransformer
from dinov2.models.weights import load_backbone_weights
from dinov2.utils.errors import UserError

BACKBONE_RTOL = 1e-4
VIT_FIXTURES = ["vit_mlp.pt", "vit_swiglu_reg4.pt"]


@pytest.fixture(scope="module", params=VIT_FIXTURES)
def reference(request):
    from conftest import FIXTURES

    ref = torch.load(FIXTURES / request.param, weights_only=True)
    model = DinoVisionTransformer(**ref["kwargs"])
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval(), ref


def _assert_features_close(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert_close_scaled(actual[key], value, rtol=BACKBONE_RTOL, msg=key)


def test_state_dict_keys_in_upstream_order(reference):
    model, ref = reference
    assert list(model.state_dict()) == list(ref["state_dict"])


@pytest.mark.parametrize("name", ["x224", "x98", "x_rect"])
def test_forward_features_match_upstream(reference, name):
    model, ref = reference
    with torch.no_grad():
        out = model.forward_features(ref["inputs"][name])
    _assert_features_close(out, ref["forward_features"][name])
    assert out["masks"] is None


@pytest.mark.parametrize("name", ["x224", "x98", "x_rect"])
def test_interpolated_pos_embed_matches_upstream(reference, name):
    model, ref = reference
    x = ref["inputs"][name]
    grid = (x.shape[2] // model.patch_size) * (x.shape[3] // model.patch_size)
    tokens = torch.zeros(1, 1 + grid, model.embed_dim)
    with torch.no_grad():
        pos = model.interpolate_pos_encoding(tokens, x.shape[2], x.shape[3])
    assert_close_scaled(pos, ref["interpolated_pos_embed"][name], eps=SHORT_SUM_EPS)


def test_offset_interpolation_samples_with_scale_factor_not_size():
    """The x98 trap: a size-based resize would be a different function, not a rounding change."""
    from conftest import FIXTURES

    ref = torch.load(FIXTURES / "vit_mlp.pt", weights_only=True)
    pos = ref["state_dict"]["pos_embed"]
    grid = pos[:, 1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(7, 7), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 49, -1)
    expected = ref["interpolated_pos_embed"]["x98"][:, 1:]
    assert (by_size - expected).abs().max() > 1e-2


def test_eval_forward_is_cls_token(reference):
    model, ref = reference
    with torch.no_grad():
        assert_close_scaled(model(ref["inputs"]["x224"]), ref["forward_eval"], rtol=BACKBONE_RTOL)


def test_intermediate_layers_reshaped(reference):
    model, ref = reference
    with torch.no_grad():
        out = model.get_intermediate_layers(ref["inputs"]["x224"], n=2, reshape=True, norm=True)
    expected = ref["get_intermediate_layers"]["output"]
    assert len(out) == len(expected) == 2
    for actual, wanted in zip(out, expected):
        assert_close_scaled(actual, wanted, rtol=BACKBONE_RTOL)


def test_intermediate_layers_by_index_with_class_token(reference):
    model, ref = reference
    with torch.no_grad():
        out = model.get_intermediate_layers(
            ref["inputs"]["x98"], n=[0, 1], reshape=False, return_class_token=True, norm=False
        )
    expected = ref["get_intermediate_layers_idx"]["output"]
    assert len(out) == len(expected)
    for (patches, cls), (want_patches, want_cls) in zip(out, expected):
        assert_close_scaled(patches, want_patches, rtol=BACKBONE_RTOL)
        assert_close_scaled(cls, want_cls, rtol=BACKBONE_RTOL)


def test_masked_forward_matches_upstream(reference):
    model, ref = reference
    masks = ref["masked_forward"]["masks"]
    with torch.no_grad():
        out = model.forward_features(ref["inputs"]["x224"], masks=masks)
    _assert_features_close(out, ref["masked_forward"]["outputs"])
    assert out["masks"] is masks


def test_list_of_crops_equals_each_crop_alone(reference):
    model, ref = reference
    crops = [ref["inputs"]["x224"], ref["inputs"]["x98"], ref["inputs"]["x_rect"]]
    masks = [ref["masked_forward"]["masks"], None, None]
    with torch.no_grad():
        together = model.forward_features(crops, masks)
        alone = [model.forward_features(x, m) for x, m in zip(crops, masks)]
    assert isinstance(together, list) and len(together) == 3
    for joint, single in zip(together, alone):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert torch.equal(joint[key], single[key]), key
        assert joint["masks"] is single["masks"]


def test_training_forward_returns_feature_dict(reference):
    model, ref = reference
    with torch.no_grad():
        out = model(ref["inputs"]["x224"], is_training=True)
    _assert_features_close(out, ref["forward_features"]["x224"])


def test_block_chunks_only_rename_keys(fixtures_dir):
    ref = torch.load(fixtures_dir / "vit_mlp.pt", weights_only=True)
    expected = json.loads((fixtures_dir / "block_chunks.json").read_text())["block_chunks_2_equivalence"]
    flat = DinoVisionTransformer(**ref["kwargs"]).eval()
    flat.load_state_dict(ref["state_dict"], strict=True)
    chunked = DinoVisionTransformer(**{**ref["kwargs"], "block_chunks": 2}).eval()
    load_backbone_weights(chunked, ref["state_dict"], strict=True)

    assert list(chunked.state_dict()) == expected["chunked_keys"]
    assert chunked.chunked_blocks and not flat.chunked_blocks
    x = ref["inputs"]["x98"]
    with torch.no_grad():
        assert torch.equal(chunked.forward_features(x)["x_prenorm"], flat.forward_features(x)["x_prenorm"])
        for n in (2, [0], [0, 1]):
            for a, b in zip(chunked.get_intermediate_layers(x, n=n), flat.get_intermediate_layers(x, n=n)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("case", state_dict_cases())
def test_architectures_have_upstream_keys_shapes_and_sizes(case):
    with torch.device("meta"):
        model = ARCHITECTURES.lookup(case["arch"])(**case["kwargs"])
    state = model.state_dict()
    assert list(state) == list(case["keys"])
    assert {key: list(value.shape) for key, value in state.items()} == case["keys"]
    assert sum(p.numel() for p in model.parameters()) == case["n_params"]


def test_model_attributes():
    model = DinoVisionTransformer(
        img_size=56, patch_size=14, embed_dim=64, depth=4, num_heads=2, block_chunks=2, num_register_tokens=3
    )
    assert (model.num_features, model.embed_dim, model.num_tokens, model.n_blocks) == (64, 64, 1, 4)
    assert (model.patch_size, model.num_register_tokens, model.chunked_blocks) == (14, 3, True)
    assert model.mask_token.shape == (1, 64) and torch.all(model.mask_token == 0)
    # Init as upstream: tiny cls/register tokens, N(0, 0.02) Linear weights (upstream truncates at
    # +-2 absolute, i.e. not at all), zero biases, LayerScale off by default.
    assert model.cls_token.abs().max() < 1e-4 and model.register_tokens.abs().max() < 1e-4
    qkv = model.blocks[1][2].attn.qkv
    assert torch.all(qkv.bias == 0) and 0.018 < qkv.weight.std() < 0.022
    assert 0.01 < model.pos_embed.std() < 0.03
    assert isinstance(model.blocks[1][2].ls1, torch.nn.Identity)


def test_unknown_ffn_layer_is_a_user_error():
    with pytest.raises(UserError, match="ffn_layer 'gelu'"):
        DinoVisionTransformer(ffn_layer="gelu", depth=1)


def test_more_chunks_than_blocks_is_a_user_error():
    with pytest.raises(UserError, match="block_chunks must be between 0 and depth=2, got 4"):
        DinoVisionTransformer(depth=2, block_chunks=4)


def test_image_not_multiple_of_patch_is_a_user_error():
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=1)
    with pytest.raises(UserError, match="30x28 is not a multiple of the patch size 14"):
        model(torch.zeros(1, 3, 30, 28))


# --- stochastic depth --------------------------------------------------------------------------

def _small_vit(drop_path_rate: float, uniform: bool = True) -> DinoVisionTransformer:
    return DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2, init_values=1.0,
        drop_path_rate=drop_path_rate, drop_path_uniform=uniform, block_chunks=0,
    )


def test_drop_path_rates_per_block():
    assert [b.sample_drop_ratio for b in _small_vit(0.4, uniform=False).blocks] == pytest.approx([0, 0.2, 0.4])
    assert [b.sample_drop_ratio for b in _small_vit(0.3, uniform=True).blocks] == pytest.approx([0.3] * 3)


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_stochastic_depth_only_in_training(rate):
    model = _small_vit(rate)
    x = torch.randn(16, 3, 28, 28)
    with torch.no_grad():
        model.eval()
        first, second = model(x), model(x)
        model.train()
        trained = model(x)
    assert torch.equal(first, second)
    assert not torch.allclose(trained, first)


def test_subset_residual_keeps_expected_count_and_scale():
    x = torch.randn(10, 4, 3)
    seen = []

    def residual(subset):
        seen.append(subset.clone())
        return torch.ones_like(subset)

    out = add_residual_on_random_subset(x, residual, drop_ratio=0.3)
    kept = int(10 * (1 - 0.3))
    assert seen[0].shape[0] == kept
    changed = (out != x).flatten(1).any(dim=1)
    assert changed.sum() == kept
    torch.testing.assert_close(out[changed] - x[changed], torch.full_like(x[changed], 10 / kept))
    assert torch.equal(out[~changed], x[~changed])
    # The subset given to the residual is exactly the rows that changed.
    assert sorted(map(tuple, seen[0].flatten(1).tolist())) == sorted(map(tuple, x[changed].flatten(1).tolist()))
    # At least one sample always gets the residual.
    seen.clear()
    add_residual_on_random_subset(torch.randn(3, 2, 2), residual, drop_ratio=0.9)
    assert seen[0].shape[0] == 1


def test_subset_path_used_above_threshold_and_classic_below():
    calls = []
    for rate, expected_rows in ((0.5, 4), (0.1, 8)):
        block = Block(dim=8, num_heads=2, drop_path=rate).train()
        calls.clear()
        block.attn.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        block(torch.randn(8, 5, 8))
        assert calls == [expected_rows], rate


def test_classic_drop_path_drops_whole_samples():
    layer = DropPath(0.5).train()
    out = layer(torch.ones(2000, 3, 4))
    per_sample = out.flatten(1)
    assert torch.all((per_sample == 0).all(dim=1) | (per_sample == 2.0).all(dim=1))
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(layer.eval()(torch.ones(4, 2)), torch.ones(4, 2))


# --- attention backend -------------------------------------------------------------------------

def _qkv(batch=2, tokens=7, heads=3, head_dim=8):
    return [torch.randn(batch, tokens, heads, head_dim) for _ in range(3)]


def _pytorch_attention(q, k, v):
    """PyTorch's attention in the module's layout: it takes [batch, tokens, heads, dim], SDPA heads first."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_attention_is_scaled_softmax_over_tokens():
    q, k, v = _qkv()
    weights = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", weights.softmax(-1), v)
    torch.testing.assert_close(attention_module.scaled_dot_product(q, k, v), expected, atol=1e-6, rtol=1e-5)


class _FakeXformersOps:
    def __init__(self, fail: bool):
        self.fail, self.calls = fail, 0

    def memory_efficient_attention(self, q, k, v, p=0.0):
        self.calls += 1
        if self.fail:
            raise NotImplementedError("no kernel for these inputs")
        return torch.zeros_like(q)


@pytest.fixture
def fake_xformers(monkeypatch):
    """Pretend CPU tensors can use xformers, with a fake kernel installed."""
    def install(fail: bool) -> _FakeXformersOps:
        ops = _FakeXformersOps(fail)
        monkeypatch.setattr(attention_module, "XFORMERS_DEVICE_TYPES", ("cpu",))
        monkeypatch.setattr(attention_module, "_xformers_ops", lambda: ops)
        monkeypatch.setattr(attention_module, "_xformers_unsupported", False)
        monkeypatch.delenv("XFORMERS_DISABLED", raising=False)
        monkeypatch.setenv("DINOV2_ATTENTION", "xformers")
        return ops
    return install


@pytest.mark.parametrize(
    "environment",
    [lambda env: env.delenv("DINOV2_ATTENTION"), lambda env: env.setenv("XFORMERS_DISABLED", "1")],
    ids=["not asked for", "disabled by environment"],
)
def test_pytorch_attention_unless_xformers_is_asked_for_and_enabled(fake_xformers, monkeypatch, environment):
    ops = fake_xformers(fail=False)
    environment(monkeypatch)
    q, k, v = _qkv()
    expected = _pytorch_attention(q, k, v)
    torch.testing.assert_close(attention_module.scaled_dot_product(q, k, v), expected)
    assert ops.calls == 0


def test_xformers_used_when_asked_for_and_available(fake_xformers):
    ops = fake_xformers(fail=False)
    q, k, v = _qkv()
    assert torch.equal(attention_module.scaled_dot_product(q, k, v), torch.zeros_like(q))
    assert ops.calls == 1


def test_xformers_not_implemented_falls_back_once(fake_xformers):
    ops = fake_xformers(fail=True)
    q, k, v = _qkv()
    expected = _pytorch_attention(q, k, v)
    for _ in range(3):
        torch.testing.assert_close(attention_module.scaled_dot_product(q, k, v), expected)
    assert ops.calls == 1


def test_xformers_asked_for_but_not_importable_is_an_error(monkeypatch):
    """An explicit request that cannot be met says so; a silent PyTorch fallback would be timed as xformers."""
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers` now fails as when not installed
    monkeypatch.setattr(attention_module, "XFORMERS_DEVICE_TYPES", ("cpu",))
    monkeypatch.delenv("XFORMERS_DISABLED", raising=False)
    monkeypatch.setenv("DINOV2_ATTENTION", "xformers")
    attention_module._xformers_ops.cache_clear()  # a failed import is not cached: nothing to clear after
    with pytest.raises(UserError, match="DINOV2_ATTENTION=xformers but xformers cannot be imported") as error:
        attention_module.scaled_dot_product(*_qkv())
    assert "\n" not in str(error.value)


def test_unknown_attention_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("DINOV2_ATTENTION", "xformer")
    with pytest.raises(UserError, match="DINOV2_ATTENTION='xformer' is not an attention backend; known: sdpa, xformers"):
        attention_module.scaled_dot_product(*_qkv())


def test_xformers_asked_for_on_cpu_warns_once_and_uses_pytorch(monkeypatch):
    monkeypatch.setenv("DINOV2_ATTENTION", "xformers")
    monkeypatch.delenv("XFORMERS_DISABLED", raising=False)
    warnings = []
    # the logger's own calls, whatever handlers earlier tests' runs attached to it
    monkeypatch.setattr(attention_module.logger, "warning", lambda message, *args: warnings.append(message % args))
    attention_module._warn_no_xformers_kernel.cache_clear()
    q, k, v = _qkv()
    expected = _pytorch_attention(q, k, v)
    for _ in range(2):
        torch.testing.assert_close(attention_module.scaled_dot_product(q, k, v), expected)
    assert warnings == ["DINOV2_ATTENTION=xformers: xformers has no kernel for cpu tensors; using PyTorch attention there"]


@pytest.mark.cuda
@pytest.mark.usefixtures("no_tf32")
def test_cuda_forward_matches_upstream(reference):
    model, ref = reference
    model = model.cuda()
    with torch.no_grad():
        out = model.forward_features(ref["inputs"]["x98"].cuda())
    model.cpu()
    for key, value in ref["forward_features"]["x98"].items():
        assert_close_scaled(out[key].cpu(), value, rtol=1e-3, msg=key)


# --- build_model -------------------------------------------------------------------------------

def _default_cfg(**student):
    from omegaconf import OmegaConf

    from dinov2.configs import dinov2_default_config

    return OmegaConf.merge(dinov2_default_config, {"student": student})


def test_build_model_from_default_config():
    from dinov2.models import build_model_from_cfg

    cfg = _default_cfg()
    with torch.device("meta"):
        student, teacher, embed_dim = build_model_from_cfg(cfg)
    assert embed_dim == 1024 and student.n_blocks == teacher.n_blocks == 24  # vit_large
    assert student.patch_size == 16 and student.pos_embed.shape == (1, 1 + 14 * 14, 1024)
    assert [b.sample_drop_ratio for b in student.blocks] == pytest.approx([0.3] * 24)
    assert all(b.sample_drop_ratio == 0 for b in teacher.blocks)
    assert list(student.state_dict()) == list(teacher.state_dict())
    assert isinstance(student.blocks[0].ls1, LayerScale) and student.blocks[0].ls1.gamma.shape == (1024,)


@pytest.mark.parametrize("arch", ["vit_small", "small", "vit_small_memeff"])
def test_build_model_arch_spellings(arch):
    from dinov2.models import build_model

    cfg = _default_cfg(arch=arch, patch_size=14, block_chunks=4, num_register_tokens=4, ffn_layer="swiglufused")
    with torch.device("meta"):
        teacher, embed_dim = build_model(cfg.student, only_teacher=True, img_size=98)
    assert embed_dim == 384 and teacher.num_register_tokens == 4
    assert teacher.pos_embed.shape == (1, 1 + 7 * 7, 384)
    assert "blocks.3.11.mlp.w12.weight" in teacher.state_dict()


def test_build_model_unknown_arch_is_a_user_error():
    from dinov2.models import build_model

    with pytest.raises(UserError, match="student.arch 'vit_huge'"):
        build_model(_default_cfg(arch="vit_huge").student)
