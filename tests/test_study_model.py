"""Study model: order and padding of views do not matter, view types do, masking keeps a view, LoRA trains adapters."""
import pytest
import torch

from tiny import make_tiny_vit
from vet_ext.downstream.finetune import Task, classification_loss
from vet_ext.downstream.lora import LoRALinear
from vet_ext.downstream.study_data import ALL_VIEWS, ONE_VIEW_DROPPED, SINGLE_VIEW, collate_studies, drop_views, view_subsets
from vet_ext.downstream.study_model import ImageLevelBaseline, StudyEncoder
from vet_ext.downstream.train_study import STUDY, StudyOptions, make_optimizer, trainable_model
from vet_ext.ingestion.views import VIEW_CODES

N_LABELS = 3
SIZE = 32
LL, VD, UNKNOWN = (VIEW_CODES.index(code) for code in ("LL", "VD", "UNKNOWN"))
ATOL = 1e-5


def tiny_backbone():
    # registers on purpose: the view-type embedding must skip them and the patch mean must too
    return make_tiny_vit(img_size=SIZE, patch_size=8, num_register_tokens=2)


def study_model(fusion: str) -> StudyEncoder:
    torch.manual_seed(0)
    return StudyEncoder(tiny_backbone(), N_LABELS, fusion, fusion_depth=2, fusion_heads=2).eval()


def random_study(n_views: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_views, 3, SIZE, SIZE, generator=generator)
    codes = torch.randint(len(VIEW_CODES), (n_views,), generator=generator)
    return images, codes


def alone(images: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One study as a batch of one with exactly its views (no padding)."""
    return images[None], codes[None], torch.ones(1, len(codes), dtype=torch.bool)


@pytest.mark.parametrize("fusion", ["mean", "transformer"])
def test_permuting_the_views_does_not_change_the_study_output(fusion):
    model = study_model(fusion)
    images, codes = random_study(3, seed=1)
    with torch.no_grad():
        reference = model(*alone(images, codes))
        for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
            permuted = model(*alone(images[order], codes[order]))
            torch.testing.assert_close(permuted, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fusion", ["mean", "transformer"])
def test_padding_views_have_no_effect(fusion):
    """Studies of 1, 2 and 3 views padded to 4 slots (garbage pixels and codes in the padding)
    give what each study gives alone."""
    model = study_model(fusion)
    studies = [random_study(n, seed=10 + n) for n in (1, 2, 3)]
    batch = collate_studies([(images, codes, torch.zeros(N_LABELS)) for images, codes in studies], n_slots=4)
    assert batch.present.sum(dim=1).tolist() == [1, 2, 3]
    garbage = torch.randn(batch.images.shape) * 50
    batch.images[~batch.present] = garbage[~batch.present]
    batch.view_codes[~batch.present] = LL
    with torch.no_grad():
        padded = model(batch.images, batch.view_codes, batch.present)
        for row, (images, codes) in enumerate(studies):
            torch.testing.assert_close(padded[row], model(*alone(images, codes))[0], atol=ATOL, rtol=0)


def test_one_view_study_and_mean_fusion_is_the_mean_of_single_view_predictions():
    """Mean fusion then a linear head: a two-view study's logits are the mean of its two one-view studies'."""
    model = study_model("mean")
    images, codes = random_study(2, seed=3)
    with torch.no_grad():
        singles = [model(*alone(images[[k]], codes[[k]])) for k in range(2)]
        both = model(*alone(images, codes))
    assert singles[0].shape == (1, N_LABELS) and torch.isfinite(singles[0]).all()
    torch.testing.assert_close(both, (singles[0] + singles[1]) / 2, atol=ATOL, rtol=0)
    transformer = study_model("transformer")
    with torch.no_grad():
        one_view = transformer(*alone(images[[0]], codes[[0]]))
    assert one_view.shape == (1, N_LABELS) and torch.isfinite(one_view).all()


@pytest.mark.parametrize("fusion", ["mean", "transformer"])
def test_the_view_type_embedding_changes_the_output_when_a_view_code_changes(fusion):
    model = study_model(fusion)
    images, _ = random_study(2, seed=4)
    with torch.no_grad():
        lateral = model(*alone(images, torch.tensor([LL, VD])))
        relabelled = model(*alone(images, torch.tensor([UNKNOWN, VD])))
    assert (lateral - relabelled).abs().max() > 1e-4
    torch.manual_seed(0)
    baseline = ImageLevelBaseline(tiny_backbone(), N_LABELS).eval()
    with torch.no_grad():
        study = (images[None], torch.tensor([[LL, VD]]), torch.ones(1, 2, dtype=torch.bool))
        features = baseline.view_features(*study)
        probabilities = baseline.probabilities(features, study[2])
        codes_changed = baseline.view_features(images[None], torch.tensor([[UNKNOWN, VD]]), study[2])
    torch.testing.assert_close(codes_changed, features)  # the baseline knows no view types
    torch.testing.assert_close(probabilities[0], baseline.view_logits(features)[0].sigmoid().mean(dim=0))


def test_whole_view_masking_never_drops_every_view():
    generator = torch.Generator().manual_seed(0)
    present = torch.rand(5000, 4, generator=generator) < 0.5
    present[torch.arange(5000), torch.randint(4, (5000,), generator=generator)] = True
    for probability in (0.3, 0.9):
        kept = drop_views(present, probability, generator)
        assert kept.any(dim=1).all()
        assert not (kept & ~present).any(), "a padding slot became present"


@pytest.mark.parametrize("n_views", [1, 2, 4])
def test_whole_view_masking_drops_at_the_expected_rate(n_views):
    """Each view is dropped with p, except that a study that lost all n views gets one back: p - p**n / n."""
    p, draws = 0.3, 40000
    present = torch.ones(draws, n_views, dtype=torch.bool)
    kept = drop_views(present, p, torch.Generator().manual_seed(1))
    dropped_rate = 1 - kept.float().mean().item()
    expected = p - p**n_views / n_views
    assert abs(dropped_rate - expected) < 4 * (expected * (1 - expected) / (draws * n_views)) ** 0.5 + 1e-9
    assert torch.equal(drop_views(present, 0.0), present)


def test_view_subsets_of_the_three_evaluation_conditions():
    present = torch.tensor([[True, True, True, False], [True, False, False, False]])
    rows, masks = view_subsets(present, ALL_VIEWS)
    assert rows.tolist() == [0, 1] and torch.equal(masks, present)
    rows, masks = view_subsets(present, ONE_VIEW_DROPPED)
    assert rows.tolist() == [0, 0, 0]  # the one-view study cannot lose a view
    assert masks.sum(dim=1).tolist() == [2, 2, 2] and (~masks).logical_and(present[0]).any(dim=1).all()
    assert not (masks & ~present[0]).any()
    rows, masks = view_subsets(present, SINGLE_VIEW)
    assert rows.tolist() == [0, 0, 0, 1] and masks.sum(dim=1).tolist() == [1, 1, 1, 1]
    assert torch.equal(masks[:3].any(dim=0), present[0])


def test_lora_mode_trains_only_adapters_and_the_study_layers():
    torch.manual_seed(0)
    task = Task("multilabel", N_LABELS, "macro AP")
    options = StudyOptions(peft="lora", lora_rank=4, lr=1e-2, weight_decay=0.0, fusion="transformer")
    model = trainable_model(STUDY, tiny_backbone(), task, options)
    optimizer = make_optimizer(model, [], options)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    images, codes = random_study(3, seed=5)
    targets = torch.tensor([[1.0, 0.0, float("nan")]])
    for _ in range(3):
        loss = classification_loss(task, model(*alone(images, codes)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {name for name, value in model.named_parameters() if not torch.equal(value, before[name])}
    adapters = {name for name, _ in model.named_parameters() if "lora_" in name}
    backbone_weights = {name for name, _ in model.named_parameters() if name.startswith("backbone.") and "lora_" not in name}
    assert any(isinstance(m, LoRALinear) for m in model.backbone.modules())
    assert not changed & backbone_weights, sorted(changed & backbone_weights)[:3]
    assert {name for name in adapters if "lora_B" in name} <= changed
    for prefix in ("head.", "view_embedding.", "fusion.study_token"):
        assert any(name.startswith(prefix) for name in changed), prefix
