"""Accuracy matrix, forgetting, BWT and the metrics.json schema on hand-computed matrices."""

from __future__ import annotations

import json
import math

import pytest

from components.data.protocol import task_of_product, task_sequence
from components.errors import ContadError
from components.eval.continual import (
    AccuracyMatrix,
    MetricsSchemaError,
    metrics_json_problems,
    validate_metrics_json,
)
from components.eval.metrics import METRIC_KEYS

NAN = float("nan")


def _fill(matrix: AccuracyMatrix, metric: str, rows: list[dict[str, float]]) -> None:
    for step, row in enumerate(rows):
        for product, value in row.items():
            matrix.record(step, product, {metric: value, "routing_accuracy": 1.0 if product != "a" else 0.5})


def test_sequential_final_average_forgetting_bwt() -> None:
    m = AccuracyMatrix(["a", "b", "c"], 3)
    _fill(m, "image_auroc", [{"a": 0.9}, {"a": 0.8, "b": 0.95}, {"a": 0.85, "b": 0.7, "c": 0.99}])
    assert m.matrix("image_auroc") == [[0.9, None, None], [0.8, 0.95, None], [0.85, 0.7, 0.99]]
    assert m.final()["image_auroc"] == {"a": 0.85, "b": 0.7, "c": 0.99}
    assert m.average()["image_auroc"] == pytest.approx((0.85 + 0.7 + 0.99) / 3)
    # FM: a -> max(0.9, 0.8) - 0.85 = 0.05; b -> 0.95 - 0.7 = 0.25; c learned last: excluded
    assert m.forgetting()["image_auroc"] == pytest.approx(0.15)
    # BWT: a -> 0.85 - 0.9; b -> 0.7 - 0.95
    assert m.bwt()["image_auroc"] == pytest.approx(-0.15)
    assert m.routing_accuracy() == pytest.approx((0.5 + 1 + 1) / 3)
    assert math.isnan(m.average()["pixel_auroc"])  # never recorded -> undefined


def test_undefined_cells_are_skipped() -> None:
    m = AccuracyMatrix(["a", "b", "c"], 3)
    _fill(m, "pixel_auroc", [{"a": NAN}, {"a": 0.6, "b": 0.9}, {"a": 0.5, "b": NAN, "c": 0.8}])
    assert m.average()["pixel_auroc"] == pytest.approx(0.65)
    # a: best defined earlier value 0.6 - 0.5; b: undefined now -> skipped
    assert m.forgetting()["pixel_auroc"] == pytest.approx(0.1)
    # a: undefined when learned; b: undefined now -> no term at all
    assert math.isnan(m.bwt()["pixel_auroc"])
    doc = m.to_metrics_json("toy", "sequential")
    assert doc["matrix"]["pixel_auroc"] == [[None, None, None], [0.6, 0.9, None], [0.5, None, 0.8]]
    assert doc["bwt"]["pixel_auroc"] is None
    back = AccuracyMatrix.from_metrics_json(json.loads(json.dumps(doc)))
    assert math.isnan(back.value(0, "a", "pixel_auroc"))  # learned but undefined: NaN, not None
    assert back.value(0, "b", "pixel_auroc") is None  # not learned yet
    assert back.forgetting()["pixel_auroc"] == pytest.approx(0.1)


def test_iuf_x_y_protocol() -> None:
    steps = task_sequence(["a", "b", "c", "d"], base_tasks=2, step_tasks=1)
    assert steps == [["a", "b"], ["c"], ["d"]]
    assert task_of_product(steps) == {"a": "a+b", "b": "a+b", "c": "c", "d": "d"}
    assert task_sequence(list("abcdef"), 3, 2) == [["a", "b", "c"], ["d", "e"], ["f"]]
    m = AccuracyMatrix(["a", "b", "c", "d"], 3, steps=steps)
    _fill(m, "image_auroc", [
        {"a": 0.9, "b": 0.8},
        {"a": 0.85, "b": 0.82, "c": 0.7},
        {"a": 0.8, "b": 0.6, "c": 0.75, "d": 0.9},
    ])
    assert m.forgetting()["image_auroc"] == pytest.approx((0.1 + 0.22 - 0.05) / 3)
    assert m.bwt()["image_auroc"] == pytest.approx((-0.1 - 0.2 + 0.05) / 3)
    with pytest.raises(ContadError, match="learned at step 2"):
        m.record(1, "d", {"image_auroc": 0.5})
    doc = m.to_metrics_json("toy", "2-1")
    assert doc["steps"] == steps
    validate_metrics_json(doc)
    assert AccuracyMatrix.from_metrics_json(doc).forgetting()["image_auroc"] == pytest.approx(0.09)


def test_single_step_has_no_forgetting_and_partial_runs_use_last_row() -> None:
    m = AccuracyMatrix(["a", "b"], 2)
    m.record(0, "a", {k: 0.7 for k in METRIC_KEYS})
    assert math.isnan(m.forgetting()["image_auroc"])
    assert m.average()["image_auroc"] == pytest.approx(0.7)  # last evaluated row is step 0
    doc = m.to_metrics_json("toy", "sequential", routing_accuracy=1.0)
    assert doc["forgetting"]["image_auroc"] is None and doc["routing_accuracy"] == 1.0
    validate_metrics_json(doc)


def test_schema_exact_keys_and_validator_rejects_bad_documents() -> None:
    m = AccuracyMatrix(["a", "b"], 2)
    _fill(m, "image_auroc", [{"a": 0.9}, {"a": 0.8, "b": 0.7}])
    doc = m.to_metrics_json("ucad", "sequential")
    for key in ("method", "protocol", "tasks", "matrix", "final", "average", "forgetting", "routing_accuracy"):
        assert key in doc
    assert doc["tasks"] == ["a", "b"] and set(METRIC_KEYS) <= set(doc["matrix"])
    assert doc["final"]["image_auroc"] == {"a": 0.8, "b": 0.7}
    assert doc["forgetting"]["image_auroc"] == pytest.approx(0.1)
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN anywhere
    assert metrics_json_problems(doc) == []

    bad = json.loads(json.dumps(doc))
    del bad["forgetting"]
    with pytest.raises(MetricsSchemaError, match="run1/metrics.json.*missing key 'forgetting'"):
        validate_metrics_json(bad, "run1/metrics.json")
    bad = json.loads(json.dumps(doc))
    bad["matrix"]["aupro"] = [[0.5]]
    assert any("aupro" in p for p in metrics_json_problems(bad))
    bad = json.loads(json.dumps(doc))
    bad["final"]["image_ap"] = {"a": "high", "b": 0.1}
    assert any("final['image_ap']" in p for p in metrics_json_problems(bad))
    bad = json.loads(json.dumps(doc))
    bad["steps"] = [["b"], ["a"]]
    assert any("partition" in p for p in metrics_json_problems(bad))
    assert metrics_json_problems([1, 2]) == ["top level is not an object"]


def test_bad_construction_and_recording() -> None:
    with pytest.raises(ContadError):
        AccuracyMatrix(["a", "a"], 2)
    with pytest.raises(ContadError, match="partition"):
        AccuracyMatrix(["a", "b"], 2, steps=[["b"], ["a"]])
    m = AccuracyMatrix(["a", "b"], 2)
    with pytest.raises(ContadError, match="unknown product"):
        m.record(0, "z", {})
    with pytest.raises(ContadError, match="outside"):
        m.record(5, "a", {})
    with pytest.raises(ContadError, match="base_tasks"):
        task_sequence(["a"], base_tasks=2, step_tasks=1)
