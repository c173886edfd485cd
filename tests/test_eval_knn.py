"""k-NN classifier (upstream's weighting), metrics, few-shot sampling and study-level aggregation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

from dinov2.eval.knn import eval_knn, knn_class_scores, knn_probabilities
from dinov2.eval.metrics import (
    MetricType,
    evaluate_predictions,
    metric_key,
    per_label_ap_auc,
    summarize_tries,
    topk_accuracy,
)
from dinov2.eval.utils import (
    aggregate_by_group,
    aggregate_targets,
    normalize_targets,
    sample_per_class,
    study_ids_of,
)
from dinov2.utils.errors import UserError


def _clusters(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    return features, labels.numpy()


def test_knn_weights_are_softmax_over_max_k_and_not_renormalised():
    # train: two copies of e0, one e1; query e0; T = 1 -> sims (1, 1, 0), weights e/(2e+1), e/(2e+1), 1/(2e+1)
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    votes = F.one_hot(torch.tensor([0, 0, 1]), 2).float()
    scores = knn_class_scores(train, votes, torch.tensor([[2.0, 0.0]]), ks=[1, 3], temperature=1.0)
    e = math.e
    assert scores[1][0].tolist() == pytest.approx([e / (2 * e + 1), 0.0], abs=1e-6)
    assert scores[3][0].tolist() == pytest.approx([2 * e / (2 * e + 1), 1 / (2 * e + 1)], abs=1e-6)


def test_knn_recovers_clusters():
    train, train_labels = _clusters(10, 3, 8, noise=0.3, seed=0)
    queries, query_labels = _clusters(5, 3, 8, noise=0.3, seed=1)
    probabilities = knn_probabilities(train, train_labels, queries, ks=[5], temperature=0.07, num_classes=3)
    assert (probabilities[5].argmax(axis=1) == query_labels).all()
    np.testing.assert_allclose(probabilities[5].sum(axis=1), 1.0, rtol=1e-5)


def _brute_force_upstream(train, labels, queries, ks, temperature, num_classes):
    """Upstream's formula, one query at a time, in float64."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    queries = queries.double() / queries.double().norm(dim=1, keepdim=True)
    max_k = max(ks)
    out = {k: np.zeros((len(queries), num_classes)) for k in ks}
    for q, query in enumerate(queries):
        similarity = (train @ query).numpy()
        order = np.argsort(-similarity)[:max_k]
        logits = similarity[order] / temperature
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        for k in ks:
            for j in range(k):
                out[k][q, labels[order[j]]] += weights[j]
    return out


def test_knn_matches_brute_force_on_random_data():
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(60, 16, generator=generator)
    labels = torch.randint(0, 5, (60,), generator=generator).numpy()
    queries = torch.randn(9, 16, generator=generator)
    ks = [1, 3, 10, 20]
    expected = _brute_force_upstream(train, labels, queries, ks, 0.07, 5)
    scores = knn_class_scores(train, F.one_hot(torch.from_numpy(labels), 5).float(), queries, ks, 0.07)
    for k in ks:
        np.testing.assert_allclose(scores[k].numpy(), expected[k], atol=1e-5)


def test_multilabel_votes_count_only_annotated_neighbours():
    generator = torch.Generator().manual_seed(4)
    train = torch.randn(30, 8, generator=generator)
    labels = (torch.rand(30, 2, generator=generator) > 0.5).float().numpy()
    labels[::3, 1] = np.nan
    queries = torch.randn(4, 8, generator=generator)
    probabilities = knn_probabilities(train, labels, queries, ks=[7], temperature=0.1, num_classes=2)[7]
    for label in range(2):
        column = labels[:, label]
        positive = knn_class_scores(train, torch.from_numpy(np.nan_to_num(column)[:, None]), queries, [7], 0.1)[7]
        annotated = knn_class_scores(train, torch.from_numpy((~np.isnan(column)).astype(np.float32)[:, None]),
                                     queries, [7], 0.1)[7]
        np.testing.assert_allclose(probabilities[:, label], (positive / annotated)[:, 0].numpy(), rtol=1e-5)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_eval_knn_few_shot_averages_tries():
    train, train_labels = _clusters(8, 3, 8, noise=0.3, seed=0)
    val, val_labels = _clusters(4, 3, 8, noise=0.3, seed=1)
    rows, _, _ = eval_knn(train, train_labels, val, val_labels, nb_knn=[1, 5, 10], n_per_class_list=[-1, 2],
                          n_tries=3)
    full = [row for row in rows if row["train"] == "full"]
    few = [row for row in rows if row["train"] == "2 per class"]
    assert [row["k"] for row in full] == [1, 5, 10]
    assert [row["k"] for row in few] == [1, 2]  # upstream: ks <= n, plus n itself
    assert set(few[0]["top-1"]) == {"mean", "std"}
    assert full[0]["top-1"] == 100.0


def test_sample_per_class_takes_n_of_each_and_differs_across_tries():
    targets = np.repeat(np.arange(4), 10)
    first, second = sample_per_class(targets, 3, seed=0), sample_per_class(targets, 3, seed=1)
    assert np.bincount(targets[first]).tolist() == [3, 3, 3, 3]
    assert not np.array_equal(first, second)
    assert np.array_equal(first, sample_per_class(targets, 3, seed=0))
    with pytest.raises(UserError):
        sample_per_class(np.zeros((5, 2), dtype=np.float32), 1, seed=0)


def test_aggregate_by_group_averages_normalised_rows_in_order_of_appearance():
    features = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 5.0], [0.0, 2.0]])
    groups = np.array(["s2", "s1", "s2", "s1"])
    means, ids, inverse = aggregate_by_group(features, groups)
    assert ids.tolist() == ["s2", "s1"]
    assert inverse.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(means, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    labels = np.array([[0, np.nan], [1, 0], [1, np.nan], [0, np.nan]], dtype=np.float32)
    np.testing.assert_array_equal(aggregate_targets(labels, inverse, ids), [[1, np.nan], [1, 0]])
    assert aggregate_targets(np.array([2, 3, -1, 3]), inverse, ids).tolist() == [2, 3]
    with pytest.raises(UserError, match="s2"):
        aggregate_targets(np.array([2, 3, 1, 3]), inverse, ids)


def test_study_level_needs_study_ids():
    with pytest.raises(UserError, match="study ids"):
        study_ids_of(object(), "Synthetic:n=4")


def test_normalize_targets_turns_whole_float_labels_into_classes():
    assert normalize_targets(np.array([0.0, 1.0, np.nan])).tolist() == [0, 1, -1]
    assert normalize_targets(torch.tensor([[1.0, 0.0]])).dtype == np.float32


def test_topk_accuracy_known_answer():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.7, 0.2]])
    targets = torch.tensor([0, 1, 2])
    accuracy = topk_accuracy(scores, targets, ks=(1, 2))
    assert accuracy == pytest.approx({"top-1": 1 / 3, "top-2": 1.0})


def test_ap_auc_match_sklearn_and_skip_single_class_labels():
    scores = np.array([[0.9, 0.2, 0.4], [0.8, 0.6, 0.3], [0.3, 0.1, 0.9], [0.1, 0.7, 0.5], [0.5, 0.4, 0.2]])
    targets = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 1], [0, 1, np.nan], [1, np.nan, 1]], dtype=np.float32)
    rows, skipped = per_label_ap_auc(scores, targets, ["a", "b", "c"])
    assert skipped == ["c"]  # every annotated sample is positive
    for row, j in zip(rows, (0, 1)):
        known = ~np.isnan(targets[:, j])
        assert row["AP"] == pytest.approx(average_precision_score(targets[known, j], scores[known, j]))
        assert row["AUC"] == pytest.approx(roc_auc_score(targets[known, j], scores[known, j]))
    summary, per_label, skipped = evaluate_predictions(scores, targets, ["a", "b", "c"])
    assert summary["macro AP"] == pytest.approx(50 * (rows[0]["AP"] + rows[1]["AP"]))
    assert [row["label"] for row in per_label] == ["a", "b"] and skipped == ["c"]


def test_binary_single_label_reports_ap_auc_of_class_one():
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    targets = np.array([0, 1, 1, -1])
    summary, _, _ = evaluate_predictions(probabilities, targets)
    assert summary["top-1"] == pytest.approx(200 / 3)
    assert summary["AUC"] == pytest.approx(100 * roc_auc_score([0, 1, 1], [0.2, 0.7, 0.4]))
    assert metric_key(MetricType.MACRO_AP, targets) == "AP"
    with pytest.raises(UserError):
        metric_key(MetricType.MACRO_AP, np.array([0, 1, 2]))
    with pytest.raises(UserError):
        metric_key(MetricType.MEAN_ACCURACY, np.zeros((2, 2), dtype=np.float32))


def test_summarize_tries_mean_and_std():
    assert summarize_tries([{"a": 1.0}]) == {"a": 1.0}
    summary = summarize_tries([{"a": 1.0}, {"a": 3.0}])
    assert summary["a"] == {"mean": 2.0, "std": 1.0}
