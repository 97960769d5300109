"""Operating-point metric keys and the rates at other promises (``components/eval/operating_points.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from components.eval.continual import AccuracyMatrix, lower_is_better
from components.eval.operating_points import operating_point_metrics, parse_point_key, percent_label, point_key, promises_in
from components.eval.thresholds import Calibration, TaskSample
from components.types import ImageBatch, Prediction


def test_keys_round_trip_and_are_error_rates() -> None:
    assert percent_label(0.05) == "5" and percent_label(0.005) == "0.5" and percent_label(0.1) == "10"
    assert point_key("escape_rate", 0.05) == "escape_rate_at_5pct"
    assert parse_point_key("false_reject_rate_at_0.5pct") == ("false_reject_rate", pytest.approx(0.005))
    assert parse_point_key("escape_rate") is None and parse_point_key("image_auroc_at_5pct") is None
    assert promises_in(["escape_rate_at_10pct", "escape_rate_at_1pct", "false_reject_rate_at_1pct", "image_auroc"]) == [0.01, 0.1]
    assert lower_is_better("escape_rate_at_5pct") and not lower_is_better("image_auroc")
    assert parse_point_key("promise_broken_at_5pct") == ("promise_broken", pytest.approx(0.05))
    assert parse_point_key("promised_fpr_at_10pct") == ("promised_fpr", pytest.approx(0.1))
    with pytest.raises(ValueError, match="operating-point reading"):
        point_key("image_auroc", 0.05)
    # forgetting of a rate at another promise is its rise, like the deployed rates'
    matrix = AccuracyMatrix(["a", "b"], 2)
    matrix.record(0, "a", {"image_auroc": 0.9, "escape_rate_at_5pct": 0.1})
    matrix.record(1, "a", {"image_auroc": 0.9, "escape_rate_at_5pct": 0.3})
    matrix.record(1, "b", {"image_auroc": 0.9, "escape_rate_at_5pct": 0.0})
    assert matrix.forgetting()["escape_rate_at_5pct"] == pytest.approx(0.2)


def test_rates_at_each_promise_come_from_the_same_calibration_sample() -> None:
    # 100 calibration normals scored 0.00 .. 0.99: the 1 % threshold is 0.99, 5 % 0.95, 10 % 0.90 (order statistics)
    sample = TaskSample(heldout=tuple(i / 100 for i in range(100)), leave_out=(), pixel=1.0)
    calibration = Calibration(0.01, 0.001, {"t": sample}, {"p": "t"})
    scores = torch.tensor([0.5, 0.96, 0.92, 0.999, 0.93, 0.97, 0.5, 0.2])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    batch = ImageBatch(images=torch.zeros(8, 3, 4, 4), products=["p"] * 8, paths=[f"{i}.png" for i in range(8)], labels=labels)
    prediction = Prediction(image_scores=scores, anomaly_maps=torch.zeros(8, 4, 4), routed_tasks=["t"] * 8)
    rates = operating_point_metrics(prediction, batch, calibration, [0.01, 0.05, 0.1])
    assert rates["escape_rate_at_1pct"] == pytest.approx(4 / 5) and rates["false_reject_rate_at_1pct"] == 0.0
    assert rates["escape_rate_at_5pct"] == pytest.approx(3 / 5) and rates["false_reject_rate_at_5pct"] == pytest.approx(1 / 3)
    assert rates["escape_rate_at_10pct"] == pytest.approx(2 / 5) and rates["false_reject_rate_at_10pct"] == pytest.approx(2 / 3)
    normals_only = ImageBatch(images=batch.images[:3], products=["p"] * 3, paths=batch.paths[:3], labels=labels[:3])
    only = operating_point_metrics(Prediction(scores[:3], torch.zeros(3, 4, 4), ["t"] * 3), normals_only, calibration, [0.05])
    assert math.isnan(only["escape_rate_at_5pct"]) and only["false_reject_rate_at_5pct"] == pytest.approx(1 / 3)
    # a calibration written before score samples were stored: its own promise only, the others undefined (not an error)
    fixed = Calibration(0.01, 0.001, {"t": TaskSample(heldout=(), leave_out=(), pixel=1.0, fixed_image=0.95)}, {"p": "t"})
    old = operating_point_metrics(prediction, batch, fixed, [0.01, 0.05])
    assert old["escape_rate_at_1pct"] == pytest.approx(3 / 5) and math.isnan(old["escape_rate_at_5pct"])


def test_each_promise_records_what_was_promised_and_whether_the_test_split_broke_it() -> None:
    # 8 good test parts, 3 of them above every calibration normal: the same measured false-reject rate (3/8)
    scores = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.25, 2.0, 2.0, 2.0, 3.0])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1])
    batch = ImageBatch(images=torch.zeros(9, 3, 4, 4), products=["p"] * 9, paths=[f"{i}.png" for i in range(9)], labels=labels)
    prediction = Prediction(image_scores=scores, anomaly_maps=torch.zeros(9, 4, 4), routed_tasks=["t"] * 9)
    # 4 calibration normals: no promise below 1/4 can be made, and 3 of 8 rejected is consistent with 25 % (bound 4/8)
    few = Calibration(0.01, 0.001, {"t": TaskSample(heldout=(0.1, 0.2, 0.3, 0.4), leave_out=(), pixel=1.0)}, {"p": "t"})
    readings = operating_point_metrics(prediction, batch, few, [0.05, 0.5])
    assert readings["false_reject_rate_at_5pct"] == pytest.approx(3 / 8)
    assert readings["promised_fpr_at_5pct"] == pytest.approx(0.25) and readings["promise_broken_at_5pct"] == 0.0
    assert readings["promised_fpr_at_50pct"] == pytest.approx(0.5)
    # 100 calibration normals promise 5 %: 3 of 8 rejected is more than 5 % allows on 8 parts (bound 2/8), a broken promise
    many = Calibration(0.01, 0.001, {"t": TaskSample(heldout=tuple(i / 100 for i in range(100)), leave_out=(), pixel=1.0)}, {"p": "t"})
    readings = operating_point_metrics(prediction, batch, many, [0.05])
    assert readings["false_reject_rate_at_5pct"] == pytest.approx(3 / 8)
    assert readings["promised_fpr_at_5pct"] == pytest.approx(0.05) and readings["promise_broken_at_5pct"] == 1.0
    # no good test part: nothing to break
    defects = ImageBatch(images=batch.images[8:], products=["p"], paths=batch.paths[8:], labels=labels[8:])
    none = operating_point_metrics(Prediction(scores[8:], torch.zeros(1, 4, 4), ["t"]), defects, many, [0.05])
    assert math.isnan(none["promise_broken_at_5pct"]) and none["escape_rate_at_5pct"] == 0.0


def test_a_product_routed_to_another_task_is_held_to_that_tasks_promise() -> None:
    # every good part of product "a" goes to task "b" (a forgetting baseline's single bank): b's threshold decides them,
    # so b's promise (100 normals: 5 %) is the one they were held to, not a's own (4 normals: 25 %)
    own = TaskSample(heldout=(0.1, 0.2, 0.3, 0.4), leave_out=(), pixel=1.0)
    other = TaskSample(heldout=tuple(i / 100 for i in range(100)), leave_out=(), pixel=1.0)
    calibration = Calibration(0.01, 0.001, {"a": own, "b": other}, {"a": "a", "b": "b"})
    scores = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.25, 2.0, 2.0, 2.0])
    batch = ImageBatch(images=torch.zeros(8, 3, 4, 4), products=["a"] * 8, paths=[f"{i}.png" for i in range(8)], labels=torch.zeros(8, dtype=torch.long))
    routed_away = operating_point_metrics(Prediction(scores, torch.zeros(8, 4, 4), ["b"] * 8), batch, calibration, [0.05])
    assert routed_away["promised_fpr_at_5pct"] == pytest.approx(0.05) and routed_away["promise_broken_at_5pct"] == 1.0
    at_home = operating_point_metrics(Prediction(scores, torch.zeros(8, 4, 4), ["a"] * 8), batch, calibration, [0.05])
    assert at_home["promised_fpr_at_5pct"] == pytest.approx(0.25) and at_home["promise_broken_at_5pct"] == 0.0
    half = operating_point_metrics(Prediction(scores, torch.zeros(8, 4, 4), ["a", "b"] * 4), batch, calibration, [0.05])
    assert half["promised_fpr_at_5pct"] == pytest.approx((0.25 + 0.05) / 2)


def test_operating_points_config_is_validated() -> None:
    from components.config import ConfigError, load_config

    assert load_config("params.yaml", ["decision.operating_points=0.1,0.02,0.1"]).decision.operating_points == [0.02, 0.1]
    with pytest.raises(ConfigError, match="operating_points"):
        load_config("params.yaml", ["decision.operating_points=0.05,1.5"])
