"""LoRA: a fresh adapter is a no-op, only adapters and head learn, merging keeps the function and keys."""
import pytest
import torch
from torch import nn

from dinov2.models.weights import load_backbone_weights
from dinov2.utils.errors import UserError
from tiny import make_tiny_vit
from vet_ext.downstream.lora import LoRALinear, apply_lora, lora_parameters, merge_lora


def tiny_vit(block_chunks: int = 1):
    return make_tiny_vit(img_size=32, patch_size=8, block_chunks=block_chunks).eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("block_chunks", [0, 1])
def test_every_attention_projection_is_wrapped(block_chunks):
    model = apply_lora(tiny_vit(block_chunks), rank=4, alpha=8)
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    prefix = "blocks.0." if block_chunks else "blocks."
    assert wrapped == [f"{prefix}{i}.attn.{p}" for i in range(2) for p in ("proj", "qkv")]
    # two matrices per adapter: A [r, in] and B [out, r]
    shapes = [tuple(p.shape) for p in lora_parameters(model)]
    assert shapes == [(4, 64), (192, 4), (4, 64), (64, 4)] * 2


def test_fresh_adapter_changes_nothing():
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        before = model.forward_features(x)["x_norm_patchtokens"]
        after = apply_lora(model, rank=4, alpha=16).forward_features(x)["x_norm_patchtokens"]
    assert torch.equal(before, after)


def test_adapter_is_the_scaled_low_rank_update():
    base = nn.Linear(6, 5)
    adapter = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(7, 6)
    expected = x @ (base.weight + 1.5 * adapter.lora_B @ adapter.lora_A).t() + base.bias
    torch.testing.assert_close(adapter(x), expected)


def train_a_few_steps(model: nn.Module, head: nn.Module, steps: int = 3) -> None:
    trainable = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.05)
    targets = torch.tensor([0, 1, 0, 1])
    for _ in range(steps):
        logits = head(model(images()))
        loss = nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_only_adapters_and_head_are_trained():
    model = tiny_vit()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8).train()
    head = nn.Linear(64, 2)
    head_before = head.weight.detach().clone()
    adapters_before = [p.detach().clone() for p in lora_parameters(model)]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(model)}

    train_a_few_steps(model, head)

    frozen = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert frozen.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(frozen[key], value), f"{key} changed although frozen"
    assert not torch.equal(head.weight, head_before)
    b_matrices = [p for p, before in zip(lora_parameters(model), adapters_before) if before.abs().sum() == 0]
    assert b_matrices and all(p.abs().sum() > 0 for p in b_matrices), "B matrices should leave zero"


def test_merge_keeps_the_forward_and_the_backbone_keys():
    model = tiny_vit()
    keys = list(model.state_dict())
    apply_lora(model, rank=4, alpha=8).train()
    train_a_few_steps(model, nn.Linear(64, 2))
    model.eval()
    x = images()
    with torch.no_grad():
        adapted = model.forward_features(x)["x_norm_patchtokens"]
        merged_model = merge_lora(model)
        merged = merged_model.forward_features(x)["x_norm_patchtokens"]
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert list(merged_model.state_dict()) == keys
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    fresh = tiny_vit()
    load_backbone_weights(fresh, merged_model.state_dict())  # strict: the keys of a plain backbone
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(x)["x_norm_patchtokens"], adapted, atol=1e-5, rtol=0)


def test_bad_rank_and_unknown_targets_are_user_errors():
    with pytest.raises(UserError, match="rank"):
        apply_lora(tiny_vit(), rank=0, alpha=1)
    with pytest.raises(UserError, match="match no nn.Linear"):
        apply_lora(tiny_vit(), rank=2, alpha=1, targets=("attn.nope",))
