"""Image/pixel curve metrics against scikit-learn, and per-product task metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from components.config import EvalConfig
from components.eval.metrics import (
    TASK_METRIC_KEYS,
    auroc,
    average_precision,
    f1_max,
    pixel_metrics,
    routing_accuracy,
    task_metrics,
)
from components.eval.ranking import rank_scores
from components.types import ImageBatch, Prediction


def _sklearn_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


@pytest.mark.parametrize("seed", range(12))
def test_curve_metrics_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    # coarse quantisation forces many ties, also across classes
    scores = np.round(rng.normal(size=n) + 0.8 * labels, decimals=int(rng.integers(0, 3)))
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert f1_max(labels, scores) == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-9)


def test_float32_fast_ranking_matches_argsort() -> None:
    rng = np.random.default_rng(7)
    scores = np.round(rng.normal(size=5000), 1).astype(np.float32)
    scores[:3] = [-0.0, 0.0, np.float32(-1e-30)]
    ranked = rank_scores(scores)
    reference = rank_scores(scores.astype(np.float64))  # argsort path
    np.testing.assert_array_equal(ranked.thresholds, reference.thresholds.astype(np.float32))
    np.testing.assert_array_equal(ranked.block_ends, reference.block_ends)
    assert np.all(np.diff(scores[ranked.order]) <= 0)
    labels = rng.integers(0, 2, scores.size)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_curve_metrics_extremes() -> None:
    labels = np.array([0, 0, 1, 1])
    assert auroc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(labels, np.full(4, 0.5)) == 0.5  # all tied: chance
    assert average_precision(labels, np.full(4, 0.5)) == 0.5
    assert math.isnan(auroc(np.zeros(4), np.arange(4.0)))  # single class -> undefined
    assert math.isnan(average_precision(np.ones(4), np.arange(4.0)))


def test_pixel_metrics_match_sklearn_on_pooled_pixels() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[2, 8:14, 3:5] = 1
    maps = (rng.random((4, 16, 16)) + masks * 0.5).astype(np.float32)
    got = pixel_metrics(maps, masks, fpr_limit=0.3)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert 0.0 < got["aupro"] < 1.0


def _batch(labels: list[int], products: list[str], size: int = 8) -> ImageBatch:
    n = len(labels)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i, label in enumerate(labels):
        if label:
            masks[i, 2:5, 2:5] = 1
    return ImageBatch(
        images=torch.zeros(n, 3, size, size),
        products=products,
        paths=[f"img{i}.png" for i in range(n)],
        labels=torch.tensor(labels),
        masks=masks,
    )


def test_task_metrics_perfect_detector_and_routing() -> None:
    batch = _batch([0, 1, 0, 1], ["a"] * 4)
    maps = batch.masks.float() + 0.01 * torch.rand(4, 8, 8)
    pred = Prediction(
        image_scores=torch.tensor([0.1, 0.9, 0.2, 0.8]),
        anomaly_maps=maps,
        routed_tasks=["a", "a", "b", "a"],
    )
    got = task_metrics(pred, batch, {"a": "a", "b": "b"}, EvalConfig())
    assert set(got) == set(TASK_METRIC_KEYS)
    for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
        assert got[key] == pytest.approx(1.0), key
    assert got["routing_accuracy"] == pytest.approx(0.75)


def test_task_metrics_pixel_resolution_and_undefined_cases() -> None:
    good_only = _batch([0, 0, 0], ["c"] * 3)
    pred = Prediction(image_scores=torch.rand(3), anomaly_maps=torch.rand(3, 8, 8), routed_tasks=[])
    got = task_metrics(pred, good_only, {"c": "c"}, EvalConfig(pixel_resolution=4))
    assert all(math.isnan(v) for v in got.values())  # one class everywhere, nothing routed

    batch = _batch([0, 1], ["a", "a"])
    pred = Prediction(image_scores=torch.tensor([0.0, 1.0]), anomaly_maps=batch.masks.float(), routed_tasks=["a", "a"])
    got = task_metrics(pred, batch, {"a": "a"}, EvalConfig(pixel_resolution=16))
    assert got["pixel_auroc"] == pytest.approx(1.0) and got["aupro"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="covers 1 images"):
        task_metrics(Prediction(torch.zeros(1), torch.zeros(1, 8, 8)), batch, {"a": "a"}, EvalConfig())


def test_routing_accuracy_counts_task_membership() -> None:
    task_of_product = {"a": "a+b", "b": "a+b", "c": "c"}
    assert routing_accuracy(["a+b", "c", "c"], ["a", "b", "c"], task_of_product) == pytest.approx(2 / 3)
    assert math.isnan(routing_accuracy([], ["a"], task_of_product))
