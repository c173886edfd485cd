"""Linear heads on cached tokens (upstream's grid and inputs, exact resume) and logistic regression."""
import numpy as np
import pytest
import torch

from dinov2.eval.linear_heads import (
    CachedBatches,
    batch_indices,
    best_head,
    evaluate_heads,
    intermediate_tokens,
    linear_input,
    setup_linear_classifiers,
)
from dinov2.eval.linear_training import train_linear_heads
from dinov2.eval.log_regression import c_grid, eval_log_regression
from dinov2.eval.metrics import MetricType
from dinov2.models.vision_transformer import DinoVisionTransformer


pytestmark = pytest.mark.usefixtures("one_thread")


def _token_set(n: int, classes: int, dim: int, seed: int):
    """Tokens [n, 5, dim] whose last-block cls token carries the class; other tokens are noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    tokens = torch.randn(n, 5, dim, generator=generator)
    tokens[:, 3, :classes] += 4 * torch.eye(classes)[labels]
    return tokens, labels.numpy()


def test_linear_input_layout_matches_upstream_inputs():
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2, block_chunks=0)
    model.eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        layers = model.get_intermediate_layers(images, n=4, return_class_token=True)
        tokens = intermediate_tokens(model, images, 4)
    last_cls = layers[-1][1]
    four_cls = torch.cat([cls for _, cls in layers], dim=1)
    mean_patch = layers[-1][0].mean(dim=1)
    torch.testing.assert_close(linear_input(tokens, 1, False), last_cls)
    torch.testing.assert_close(linear_input(tokens, 1, True), torch.cat((last_cls, mean_patch), dim=1))
    torch.testing.assert_close(linear_input(tokens, 4, True), torch.cat((four_cls, mean_patch), dim=1))


def test_head_grid_names_lrs_and_init():
    heads, groups = setup_linear_classifiers(8, [1, 4], [1e-3, 0.1], batch_size=512, num_outputs=3)
    assert len(heads) == 8
    assert "classifier_4_blocks_avgpool_True_lr_0_20000" in heads  # 0.1 * 512 / 256
    assert sorted(group["lr"] for group in groups)[::2] == pytest.approx([0.002, 0.002, 0.2, 0.2])
    head = heads["classifier_4_blocks_avgpool_True_lr_0_20000"].linear
    assert head.in_features == 8 * 5 and (head.bias == 0).all()


def test_batch_indices_cover_every_sample_once_per_pass():
    stream = torch.cat([batch_indices(it, 7, 20, seed=1) for it in range(20)])  # 140 = 7 passes
    for start in range(0, 140, 20):
        assert sorted(stream[start : start + 20].tolist()) == list(range(20))
    assert torch.equal(batch_indices(5, 7, 20, seed=1), batch_indices(5, 7, 20, seed=1))
    assert not torch.equal(stream[:20], stream[20:40])


def _train(tmp_path, tokens, targets, max_iter, resume=True, stop_at=None):
    torch.manual_seed(0)
    heads, groups = setup_linear_classifiers(16, [1, 4], [0.01, 0.1], batch_size=32, num_outputs=3)
    cached = CachedBatches(tokens, targets, 32)

    def batches(iteration):
        if iteration == stop_at:
            raise KeyboardInterrupt
        return cached(iteration)

    train_linear_heads(heads, groups, lambda start: batches, max_iter=max_iter, output_dir=tmp_path,
                       resume=resume, checkpoint_period=10)
    return heads


def test_linear_heads_learn_a_separable_problem(tmp_path):
    train_tokens, train_labels = _token_set(240, 3, 16, seed=0)
    val_tokens, val_labels = _token_set(90, 3, 16, seed=1)
    heads = _train(tmp_path, train_tokens, train_labels, max_iter=60)
    results = evaluate_heads(heads, val_tokens, val_labels)
    best = best_head(results, "top-1")
    assert results[best][0]["top-1"] >= 95.0
    assert (tmp_path / "running_checkpoint_linear_eval.pth").is_file()


def test_linear_resume_is_exact(tmp_path):
    tokens, labels = _token_set(100, 3, 16, seed=0)
    straight = _train(tmp_path / "a", tokens, labels, max_iter=30)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", tokens, labels, max_iter=30, stop_at=25)  # last checkpoint after iteration 19
    resumed = _train(tmp_path / "b", tokens, labels, max_iter=30)
    for name, head in straight.items():
        torch.testing.assert_close(head.linear.weight, resumed[name].linear.weight, rtol=0, atol=1e-6)


def test_linear_multilabel_uses_annotated_entries(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(200, 5, 16, generator=generator)
    labels = (torch.rand(200, 2, generator=generator) > 0.5).float()
    tokens[:, 3, :2] += 3 * (2 * labels - 1)
    labels = labels.numpy()
    labels[::4, 0] = np.nan
    heads, groups = setup_linear_classifiers(16, [1, 4], [0.1], batch_size=32, num_outputs=2)
    cached = CachedBatches(tokens[:150], labels[:150], 32)
    train_linear_heads(heads, groups, lambda start: cached, max_iter=60, output_dir=tmp_path)
    results = evaluate_heads(heads, tokens[150:], labels[150:], ["a", "b"])
    summary, per_label, _ = results[best_head(results, "macro AP")]
    assert summary["macro AP"] >= 95.0 and [row["label"] for row in per_label] == ["a", "b"]


def _blobs(n: int, dim: int, seed: int, majority: float = 0.7):
    """Binary, imbalanced, separable along feature 0 with a margin; other features are noise."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) > majority).astype(np.int64)
    features = rng.normal(size=(n, dim))
    features[:, 0] = np.where(labels == 1, 2.0, -2.0) + 0.3 * rng.normal(size=n)
    return features, labels


def test_log_regression_accuracy_and_sensible_c():
    train, val = _blobs(200, 10, seed=0), _blobs(100, 10, seed=1)
    rows, _, _, sweep = eval_log_regression(train, val, grid=tuple(c_grid(12)), metric=MetricType.MEAN_ACCURACY)
    full = rows[0]
    assert full["top-1"] >= 95.0 and full["AUC"] >= 95.0
    # a tiny C shrinks the weights to nothing and predicts the majority class: it must not be chosen
    scores = {row["C"]: row["top-1"] for row in sweep}
    assert scores[min(scores)] < 80.0
    assert full["C"] > 1e-4 and scores[full["C"]] == max(scores.values())


def test_log_regression_multilabel_one_vs_rest_and_few_shot():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 6))
    labels = np.stack([(features[:, 0] > 0), (features[:, 1] > 0.5), np.ones(120)], axis=1).astype(np.float32)
    labels[::5, 1] = np.nan
    rows, per_label, skipped, _ = eval_log_regression(
        (features[:80], labels[:80]), (features[80:], labels[80:]), grid=(0.1, 10.0), label_names=["a", "b", "c"]
    )
    assert skipped == ["c"] and [row["label"] for row in per_label] == ["a", "b"]
    assert rows[0]["macro AP"] >= 90.0
    classes = (features[:, 0] > 0).astype(np.int64)
    rows, _, _, _ = eval_log_regression(
        (features[:80], classes[:80]), (features[80:], classes[80:]), grid=(1.0,), n_per_class_list=[-1, 3],
        n_tries=3,
    )
    assert rows[1]["train"] == "3 per class" and set(rows[1]["top-1"]) == {"mean", "std"}
