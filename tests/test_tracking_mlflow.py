"""MLflow tracking (local sqlite store), the registered pyfunc detector and the promotion gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from components.config import Config, PromotionConfig, flatten_config
from flows.promotion import promotion_gate
from flows.tracking import NullTracker, Tracker, champion_version, experiment_name, make_tracker, sequence_artifacts

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for the module (creating its tables takes seconds); tests use distinct names."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def _config(db: Path, prefix: str = "contad", **tracking: object) -> Config:
    return Config.model_validate(
        {
            "method": "patchcore_finetune",
            "data": {"image_size": IMAGE_SIZE},
            "backbone": {"device": "cpu"},
            "patchcore": {"coreset_size": 40},
            "tracking": {"uri": f"sqlite:///{db}", "experiment_prefix": prefix, "registered_model": f"{prefix}-model", **tracking},
        }
    )


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "overlays").mkdir(parents=True)
    (run / "method").mkdir()
    (run / "matrix_image_auroc.csv").write_text("step,a,b\n0,0.9,\n1,0.85,0.95\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(run / "heatmap_image_auroc.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(run / "overlays" / "a_0.png")
    (run / "report.md").write_text("# report\n")
    (run / "method" / "model.safetensors").write_bytes(b"x" * 10)
    (run / "method" / "model.json").write_text("{}")
    return run


def test_sequence_artifacts_skip_method_state(tmp_path: Path) -> None:
    names = sorted(p.relative_to(tmp_path / "run").as_posix() for p in sequence_artifacts(_run_dir(tmp_path)))
    assert names == ["heatmap_image_auroc.png", "matrix_image_auroc.csv", "overlays/a_0.png", "report.md"]


def test_tracker_logs_parent_nested_runs_metrics_and_artifacts(tmp_path: Path, store: Path) -> None:
    cfg = _config(store, "seq")
    metrics = [{"a": {"image_auroc": 0.9, "pixel_auroc": 0.8}}, {"a": {"image_auroc": 0.85, "pixel_auroc": float("nan")}, "b+c": {"image_auroc": 0.95}}]
    with Tracker(cfg.tracking, "sequential", run_name="seq") as tracker:
        tracker.log_config(cfg)
        for step, (task, values) in enumerate(zip(["a", "b+c"], metrics)):
            with tracker.step(step, task):
                tracker.log_step_metrics(step, values)
        metrics_json = {"tasks": ["a", "b+c"], "average": {"image_auroc": 0.9}, "forgetting": {"image_auroc": 0.05}, "routing_accuracy": 1.0}
        tracker.log_sequence(metrics_json, _run_dir(tmp_path))
        parent_id = tracker.run_id

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(experiment_name(cfg.tracking, "sequential"))
    assert experiment is not None and experiment.name == "seq-sequential"
    assert experiment.artifact_location == (store.parent / "mlartifacts" / "seq-sequential").as_uri()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {k: str(v) for k, v in flatten_config(cfg).items()}
    assert parent.data.metrics["forgetting/image_auroc"] == pytest.approx(0.05)
    assert parent.data.metrics["average/image_auroc"] == pytest.approx(0.9)
    history = client.get_metric_history(parent_id, "image_auroc/a")
    assert [(m.step, round(m.value, 4)) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.9), (1, 0.85)]
    assert "pixel_auroc/a" in parent.data.metrics  # the NaN of step 1 was skipped, step 0 kept
    assert "image_auroc/b_c" in parent.data.metrics  # '+' is not a valid MLflow key character
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["contad.task"] for r in children) == ["a", "b+c"]
    assert all(r.info.status == "FINISHED" for r in children)
    step1 = next(r for r in children if r.data.tags["contad.step"] == "1")
    assert step1.data.metrics["image_auroc/b_c"] == pytest.approx(0.95)
    top = {a.path for a in client.list_artifacts(parent_id)}
    assert {"metrics.json", "report.md", "matrix_image_auroc.csv", "heatmap_image_auroc.png", "overlays"} <= top
    assert "method" not in top
    assert [a.path for a in client.list_artifacts(parent_id, "overlays")] == ["overlays/a_0.png"]


def test_failed_step_marks_runs_failed(store: Path) -> None:
    cfg = _config(store, "failing")
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(cfg.tracking, "sequential") as tracker:
            with tracker.step(0, "a") as step_run:
                raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    assert client.get_run(step_run).info.status == "FAILED"
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_disabled_tracking_is_a_null_tracker(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "mlflow.db", enabled=False)
    tracker = make_tracker(cfg)
    assert isinstance(tracker, NullTracker)
    with tracker:
        tracker.log_config(cfg)
        with tracker.step(0, "a"):
            tracker.log_step_metrics(0, {"a": {"image_auroc": 1.0}})
        assert tracker.register_step_model(tmp_path, "v", 0) is None
        tracker.promote(None)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture(scope="module")
def trained_method_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config]:
    """A tiny PatchCore (packaged EfficientNet-Lite0 weights, 64 px) trained on one task of random images, saved."""
    from components.backbones.registry import build_backbone
    from components.methods.registry import build_method
    from components.eval.thresholds import calibrate_heldout, write_calibration
    from components.types import ImageBatch, TaskData

    root = tmp_path_factory.mktemp("method")
    cfg = _config(root / "unused.db", "registry")
    torch.manual_seed(0)
    method = build_method(cfg, build_backbone(cfg.backbone, IMAGE_SIZE))
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = ImageBatch(images=images, products=["a"] * 4, paths=[""] * 4)
    method.fit_task(TaskData(name="a", products=["a"], train=batch, heldout=batch))
    method_dir = method.save(root / "method")
    heldout = ImageBatch(images=torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE), products=["a"] * 3, paths=[""] * 3)
    write_calibration(method_dir, calibrate_heldout(method, heldout, cfg))
    return method_dir, cfg


def test_registered_detector_versions_alias_and_prediction(tmp_path: Path, store: Path, trained_method_dir: tuple[Path, Config]) -> None:
    from components.backbones.registry import build_backbone
    from components.data.loading import load_images
    from components.methods.registry import build_method
    from flows.model_registry import load_detector

    method_dir, cfg = trained_method_dir
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri = f"sqlite:///{store}"
    with Tracker(cfg.tracking, "sequential") as tracker:
        tracker.log_config(cfg)
        with tracker.step(0, "a"):
            v1 = tracker.register_step_model(method_dir, "bank-aaa", 0, manifest={"products": {"a": "/x"}})
        tracker.promote(v1)
        with tracker.step(1, "a"):
            v2 = tracker.register_step_model(method_dir, "bank-bbb", 1)
        assert tracker.champion() == (v1, "bank-aaa")

    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    assert (v1, v2) == ("1", "2")
    assert client.get_model_version("registry-model", v2).tags["bank_version"] == "bank-bbb"
    assert champion_version(client, "registry-model") == ("1", "bank-aaa")
    assert champion_version(client, "no-such-model") is None

    # Decisions of the registered champion equal the method's own scores against the calibrated threshold,
    # for image bytes and image paths.
    paths = []
    for i in range(2):
        rgb = (np.random.default_rng(i).random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"img{i}.png")
        paths.append(str(tmp_path / f"img{i}.png"))
    images = load_images(paths, IMAGE_SIZE)
    reference = build_method(cfg, build_backbone(cfg.backbone, IMAGE_SIZE))
    reference.load(method_dir)
    expected = reference.predict(images)

    from components.eval.thresholds import read_calibration

    threshold = read_calibration(method_dir).for_task("a").image
    import os

    from mlflow.tracking._model_registry import utils as registry_utils

    before = (os.environ.get("MLFLOW_REGISTRY_URI"), os.environ.get("MLFLOW_TRACKING_URI"), registry_utils._registry_uri)
    detector = load_detector(cfg.tracking.uri, "registry-model", "champion")
    # nothing process-wide left behind: a later client or child process (mlflow models serve) would use this store's registry
    assert (os.environ.get("MLFLOW_REGISTRY_URI"), os.environ.get("MLFLOW_TRACKING_URI"), registry_utils._registry_uri) == before
    from_paths = detector.predict(pd.DataFrame({"image_path": paths}))
    from_bytes = detector.predict(pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]}), params={"mask": True})
    for out in (from_paths, from_bytes):
        assert list(out["product"]) == ["a", "a"] and list(out["threshold"]) == [threshold, threshold]
        np.testing.assert_allclose(out["score"], expected.image_scores.numpy(), rtol=1e-4, atol=1e-4)
        assert list(out["decision"]) == ["NG" if s > threshold else "OK" for s in out["score"]]
    masks = [m.split("\n") for m in from_bytes["mask"]]
    assert all(len(m) == 32 and all(len(row) == 32 and set(row) <= {"0", "1"} for row in m) for m in masks)
    with pytest.raises(Exception, match="row 0: not a supported image"):
        detector.predict(pd.DataFrame({"image": [b"not an image"]}))
    assert detector.metadata.get_input_schema().input_names() == ["image", "image_path", "depth", "depth_path"]


def test_promotion_gate_thresholds() -> None:
    cfg = PromotionConfig(min_new_image_auroc=0.8, max_forgetting=0.02)
    before = {"a": {"image_auroc": 0.95}, "b": {"image_auroc": 0.90}}
    ok = promotion_gate(cfg, ["c"], {"a": {"image_auroc": 0.94}, "b": {"image_auroc": 0.91}, "c": {"image_auroc": 0.85}}, before)
    assert ok.passed and ok.reasons == [] and ok.drops["a"] == pytest.approx(0.01)
    weak_new = promotion_gate(cfg, ["c"], {"a": {"image_auroc": 0.95}, "b": {"image_auroc": 0.9}, "c": {"image_auroc": 0.7}}, before)
    assert not weak_new.passed and "min_new_image_auroc" in weak_new.message()
    forgot = promotion_gate(cfg, ["c"], {"a": {"image_auroc": 0.90}, "b": {"image_auroc": 0.9}, "c": {"image_auroc": 0.9}}, before)
    assert not forgot.passed and len(forgot.reasons) == 1 and "'a'" in forgot.reasons[0] and "max_forgetting" in forgot.reasons[0]
    missing = promotion_gate(cfg, ["c"], {"a": {"image_auroc": 0.95}, "c": {"image_auroc": 0.9}}, before)
    assert not missing.passed and "'b'" in missing.message()


def test_step_summary_is_the_final_definition_applied_after_each_step() -> None:
    import math

    from components.eval.continual import AccuracyMatrix
    from flows.tracking import step_summary

    matrix = AccuracyMatrix(["a", "b", "c"], 3)
    rows = [{"a": 0.9}, {"a": 0.8, "b": 0.95}, {"a": 0.85, "b": 0.7, "c": 1.0}]
    for step, row in enumerate(rows):
        for product, value in row.items():
            matrix.record(step, product, {"image_auroc": value})
    first, second, third = (step_summary(matrix, k) for k in range(3))
    assert first["average"]["image_auroc"] == pytest.approx(0.9)
    assert math.isnan(first["forgetting"]["image_auroc"]) and math.isnan(first["bwt"]["image_auroc"])  # no old product yet
    assert second["average"]["image_auroc"] == pytest.approx(0.875)
    assert second["forgetting"]["image_auroc"] == pytest.approx(0.1) and second["bwt"]["image_auroc"] == pytest.approx(-0.1)
    assert third["forgetting"]["image_auroc"] == pytest.approx((0.05 + 0.25) / 2)  # a: max(.9, .8) - .85; b: .95 - .7
    assert third["forgetting"]["image_auroc"] == pytest.approx(matrix.forgetting()["image_auroc"])
    assert third["bwt"]["image_auroc"] == pytest.approx(matrix.bwt()["image_auroc"])


def test_epoch_losses_become_metrics_with_epoch_steps(tmp_path: Path, store: Path) -> None:
    import json

    from flows.pipeline import log_train_losses

    cfg = _config(store, "losses")
    ucad_like = {"epoch_losses": [1.0, 0.5, 0.25], "heldout_losses": [2.0, 1.0, 0.8, 0.7], "best_epoch": 3}  # held-out loss before epoch 1 too
    (tmp_path / "train_log.json").write_text(json.dumps({"task": "a", "log": ucad_like}))
    iuf_like = {"epoch_losses": {"recon": [0.3, 0.2], "ce": [1.0, float("nan")]}, "heldout_losses": [0.5, 0.4]}
    with Tracker(cfg.tracking, "sequential") as tracker:
        tracker.log_config(cfg)
        with tracker.step(0, "a") as run_a:
            log_train_losses(tracker, 0, "a", tmp_path)  # what the pipeline does after training a step
        with tracker.step(1, "b+c") as run_b:
            tracker.log_train_losses(1, "b+c", iuf_like)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)

    def curve(run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, round(m.value, 4)) for m in client.get_metric_history(run_id, key))

    assert curve(run_a, "loss/train") == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert curve(run_a, "loss/heldout") == [(0, 2.0), (1, 1.0), (2, 0.8), (3, 0.7)]
    assert curve(tracker.run_id, "loss/train/a") == curve(run_a, "loss/train")
    assert curve(run_b, "loss/recon") == [(1, 0.3), (2, 0.2)] and curve(run_b, "loss/heldout") == [(1, 0.5), (2, 0.4)]
    assert curve(run_b, "loss/ce") == [(1, 1.0)]  # the NaN epoch is skipped
    assert curve(tracker.run_id, "loss/recon/b_c") == [(1, 0.3), (2, 0.2)]
