"""DINOHead against upstream's output and key layouts (fixtures/dinov2_reference/losses.pt)."""
import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm

from conftest import assert_close_scaled
from dinov2.layers import DINOHead, WeightNormLinear


@pytest.fixture(scope="module")
def head_reference():
    from conftest import FIXTURES

    return torch.load(FIXTURES / "losses.pt", weights_only=True)["dino_head"]


def _shapes(state: dict) -> dict:
    return {key: list(value.shape) for key, value in state.items()}


def test_head_output_matches_upstream(head_reference):
    head = DINOHead(**head_reference["kwargs"])
    head.load_state_dict(head_reference["state_dict"], strict=True)
    assert list(head.state_dict()) == list(head_reference["state_dict"])
    with torch.no_grad():
        out = head(head_reference["input"])
    assert_close_scaled(out, head_reference["output"], rtol=1e-4)


def test_single_layer_head_keys(head_reference):
    head = DINOHead(in_dim=16, out_dim=32, nlayers=1, hidden_dim=8, bottleneck_dim=4)
    assert _shapes(head.state_dict()) == head_reference["nlayers1_keys"]
    assert list(head.state_dict()) == list(head_reference["nlayers1_keys"])


def test_batchnorm_head_keys(head_reference):
    head = DINOHead(in_dim=16, out_dim=32, use_bn=True, nlayers=3, hidden_dim=8, bottleneck_dim=4)
    assert _shapes(head.state_dict()) == head_reference["bn_keys"]
    assert list(head.state_dict()) == list(head_reference["bn_keys"])


def test_weight_norm_equals_torch_parametrization():
    ours = WeightNormLinear(6, 5)
    with torch.no_grad():
        ours.weight_g.copy_(torch.rand(5, 1) + 0.5)
    reference = weight_norm(torch.nn.Linear(6, 5, bias=False), dim=0)
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(ours.weight_g)
        reference.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), reference(x))


def test_logits_bounded_by_trainable_norms():
    head = DINOHead(in_dim=12, out_dim=40, hidden_dim=16, bottleneck_dim=8)
    assert torch.all(head.last_layer.weight_g == 1)
    with torch.no_grad():
        head.last_layer.weight_g.mul_(3.0)
    out = head(100 * torch.randn(10, 12))
    assert out.abs().max() <= 3.0 + 1e-5
    out.sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_g.grad.abs().sum() > 0
    assert head.last_layer.weight_v.grad.abs().sum() > 0


def test_mlp_init_std_002_and_zero_bias():
    head = DINOHead(in_dim=64, out_dim=8, hidden_dim=512, bottleneck_dim=32)
    first = head.mlp[0]
    assert torch.all(first.bias == 0) and 0.018 < first.weight.std() < 0.022
