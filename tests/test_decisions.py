"""Per-product decision thresholds from held-out TRAINING normals and ``contad predict``.

Uses the 2-product sequence trained once per session (``tracking_support.trained_base``).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components.data.manifest import read_dataset
from components.eval.thresholds import CALIBRATION_FILE, calibrate_method, read_calibration
from components.memory.store import BankStore
from components.methods.loading import load_method
from flows.cli import main
from flows.records import STEPS_DIR
from tests.tracking_support import TrainedBase, tiny_config, trained_base

# Config overrides that rebuild the trained base's method from a bank store.
BASE_OVERRIDES = ["method=patchcore_finetune", "data.image_size=64", "backbone.device=cpu", "patchcore.coreset_size=64"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainedBase:
    return trained_base(tmp_path_factory)


def _final_method_dir(base: TrainedBase) -> Path:
    return sorted((base.work / STEPS_DIR).iterdir())[-1] / "method"


def test_thresholds_come_from_training_normals_only(base: TrainedBase) -> None:
    method_dir = _final_method_dir(base)
    stored = read_calibration(method_dir)
    products = [f.name for f in base.old]
    assert stored is not None and set(stored.tasks) == set(products) and stored.target_fpr == 0.01
    assert all(t.n_images >= 1 for t in stored.tasks.values())
    # the calibration is part of the versioned bank state (content hash) and of metrics.json
    store = BankStore(base.work / "banks")
    assert CALIBRATION_FILE in store.show(store.current())["files"]
    metrics = json.loads((base.work / "metrics.json").read_text())
    assert metrics["thresholds"] == stored.to_dict()
    for key in ("escape_rate", "false_reject_rate"):
        assert set(metrics["final"][key]) == set(products) and all(0.0 <= v <= 1.0 for v in metrics["final"][key].values())

    # ... and MLflow has them per product next to AUROC
    from mlflow.tracking import MlflowClient

    from flows.tracking import metric_key

    uri = f"sqlite:///{base.work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if "mlflow.parentRunId" not in r.data.tags]
    for product in products:
        for key in ("image_auroc", "escape_rate", "false_reject_rate"):
            assert metric_key(key, product) in parent.data.metrics

    cfg = tiny_config(base.work, base.old[0].parent)
    manifest = pd.concat([read_dataset(f.parent, products=[f.name]) for f in base.old], ignore_index=True)
    method = load_method(cfg, method_dir)
    # different test data: no test rows at all, or test rows pointing at other (defective) images
    without_test = manifest[manifest["split"] != "test"]
    defects = manifest[(manifest["split"] == "test") & (manifest["label"] == 1)]["image_path"].tolist()
    other_test = manifest.copy()
    test_rows = other_test["split"] == "test"
    other_test.loc[test_rows, "image_path"] = [defects[i % len(defects)] for i in range(int(test_rows.sum()))]
    for changed in (without_test, other_test):
        recalibrated = calibrate_method(cfg, method, changed)
        assert json.dumps(recalibrated.to_dict()) == json.dumps(stored.to_dict())  # bit-identical
    # but the held-out TRAINING normals do matter
    train_good = (manifest["split"] == "train") & (manifest["label"] == 0)
    shifted = manifest.copy()
    shifted.loc[train_good, "image_path"] = [defects[i % len(defects)] for i in range(int(train_good.sum()))]
    assert calibrate_method(cfg, method, shifted).to_dict() != stored.to_dict()


def test_predict_cli_on_a_synthetic_folder(base: TrainedBase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = json.loads((base.work / "metrics.json").read_text())["tasks"][-1]
    product = next(f for f in base.old if f.name == last)  # patchcore_finetune keeps only the last product
    images = tmp_path / "images"
    shutil.copytree(product / "test", images / "test")
    (images / "notes.txt").write_text("not an image, not an image suffix: ignored in folders")
    good = sorted((images / "test" / "good").glob("*.png"))[0]
    (images / "truncated.png").write_bytes(good.read_bytes()[:200])
    (images / "text.png").write_text("hello")
    out = tmp_path / "out"
    store = base.work / "banks"

    assert main(["predict", str(images), str(product / "train" / "good" / "*.png"), "--bank", str(store), "--out", str(out), *BASE_OVERRIDES]) == 0
    printed = capsys.readouterr()
    assert "truncated.png" in printed.err and "text.png" in printed.err and "2 skipped" in printed.out

    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    jsonl = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    n_test = len(list((images / "test").rglob("*.png")))
    n_train = len(list((product / "train" / "good").glob("*.png")))
    assert len(rows) == len(jsonl) == n_test + n_train
    assert list(rows[0]) == ["path", "product", "score", "threshold", "decision", "overlay", "model_version", "bank_version"]
    calibration = read_calibration(_final_method_dir(base))
    version = BankStore(store).current()
    for row in jsonl:
        assert row["threshold"] == calibration.for_task(row["product"]).image
        assert row["decision"] == ("NG" if row["score"] > row["threshold"] else "OK")
        assert row["bank_version"] == version and row["model_version"] is None
        with Image.open(out / row["overlay"]) as overlay:
            assert overlay.format == "PNG" and overlay.size == (256, 256)
    test_rows = [r for r in jsonl if "/test/" in r["path"]]
    assert sum(r["product"] == product.name for r in test_rows) >= 0.8 * len(test_rows)  # routed by content alone
    defective = [r for r in test_rows if "/good/" not in r["path"]]
    good_scores = [r["score"] for r in test_rows if "/good/" in r["path"]]
    # the ranking works; the threshold of patchcore_finetune's one bank must also pass the forgotten product's
    # held-out normals routed to it (calibrated by routed task), so defects need not be NG here
    assert sum(r["score"] for r in defective) / len(defective) > sum(good_scores) / len(good_scores)
    skipped = (out / "skipped.csv").read_text()
    assert "truncated.png" in skipped and "text.png" in skipped and "notes.txt" not in skipped

    # the same through the registry: the champion's version and bank version on every row
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{base.work / 'mlflow.db'}"
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("contad-detector", "champion")
    via_model = tmp_path / "via_model"
    assert main(["predict", str(images / "test" / "good"), "--model", "models:/contad-detector@champion", "--out", str(via_model),
                 f"tracking.uri={uri}", *BASE_OVERRIDES]) == 0
    registry_rows = [json.loads(line) for line in (via_model / "predictions.jsonl").read_text().splitlines()]
    assert registry_rows and all(r["model_version"] == str(champion.version) and r["bank_version"] == champion.tags["bank_version"] for r in registry_rows)
    by_path = {r["path"]: r for r in jsonl}
    assert all(r["score"] == pytest.approx(by_path[r["path"]]["score"], rel=1e-5) for r in registry_rows)

    # a missing model source or no matching input: clear errors (exit 2)
    assert main(["predict", str(tmp_path / "nothing*.png"), "--bank", str(store), "--out", str(out), *BASE_OVERRIDES]) == 2
    assert "no input files" in capsys.readouterr().err
    assert main(["predict", str(images), "--bank", str(tmp_path), "--out", str(out), *BASE_OVERRIDES]) == 2
    assert "not a bank store" in capsys.readouterr().err


def test_forgetting_of_error_rates_is_their_rise() -> None:
    from components.eval.continual import AccuracyMatrix

    matrix = AccuracyMatrix(["a", "b"], 2)
    matrix.record(0, "a", {"image_auroc": 0.9, "escape_rate": 0.1, "false_reject_rate": 0.2})
    matrix.record(1, "a", {"image_auroc": 0.8, "escape_rate": 0.4, "false_reject_rate": 0.0})
    matrix.record(1, "b", {"image_auroc": 1.0, "escape_rate": 0.0, "false_reject_rate": 0.0})
    forgetting = matrix.forgetting()
    assert forgetting["image_auroc"] == pytest.approx(0.1)
    assert forgetting["escape_rate"] == pytest.approx(0.3) and forgetting["false_reject_rate"] == pytest.approx(-0.2)


def test_predict_deployment_entry_point_writes_decisions(base: TrainedBase, tmp_path: Path) -> None:
    """``flows/deployments.py:predict_from_params`` (the batch-predict deployment of infra/prefect.yaml)."""
    from flows.deployments import predict_from_params

    last = json.loads((base.work / "metrics.json").read_text())["tasks"][-1]
    product = next(f for f in base.old if f.name == last)
    out = tmp_path / "out"
    result = predict_from_params.fn(inputs=[str(product / "test")], out=str(out), bank=str(base.work / "banks"), overrides=list(BASE_OVERRIDES))
    with open(result["predictions"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list((product / "test").rglob("*.png"))) > 0
    assert {row["decision"] for row in rows} <= {"OK", "NG"} and all(row["product"] for row in rows)


def test_predict_refuses_an_override_that_changes_inference_and_takes_the_target_at_load_time(
        base: TrainedBase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = json.loads((base.work / "metrics.json").read_text())["tasks"][-1]
    product = next(f for f in base.old if f.name == last)
    store = str(base.work / "banks")
    # the bank version carries its configuration: the params file's defaults (224 px, tile auto) do not matter
    assert main(["predict", str(product / "test"), "--bank", store, "--out", str(tmp_path / "plain")]) == 0
    code = main(["predict", str(product / "test"), "--bank", store, "--out", str(tmp_path / "bad"), "data.image_size=128"])
    err = capsys.readouterr().err
    assert code == 2 and "data.image_size=128" in err and "trained and calibrated with data.image_size=64" in err
    assert main(["predict", str(product / "test"), "--bank", store, "--out", str(tmp_path / "loose"), "decision.target_fpr=0.5"]) == 0
    strict = {r["path"]: r for r in map(json.loads, (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines())}
    loose = [json.loads(line) for line in (tmp_path / "loose" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["score"] == strict[r["path"]]["score"] and r["threshold"] <= strict[r["path"]]["threshold"] for r in loose)
    summary = json.loads((tmp_path / "loose" / "summary.json").read_text())
    assert summary["target_fpr"] == 0.5 and all(e["promised_fpr"] >= 0.5 for e in summary["routed"].values())


def test_operating_points_are_what_a_detector_loaded_at_that_promise_decides(base: TrainedBase, tmp_path: Path) -> None:
    """``decision.operating_points``: the run records escape / false-reject rates at other promises, and ``contad
    predict --bank ... decision.target_fpr=P`` on the same test images measures the same rates (deployed = evaluated)."""
    from components.eval.operating_points import point_key, promises_in

    metrics = json.loads((base.work / "metrics.json").read_text())
    assert promises_in(metrics["final"]) == [0.01, 0.05, 0.1]
    last = metrics["tasks"][-1]
    product = next(f for f in base.old if f.name == last)
    final = metrics["final"]
    # the deployed promise (1 %) is one of the points: the same thresholds, the same rates
    assert final[point_key("escape_rate", 0.01)][last] == final["escape_rate"][last]
    assert final[point_key("false_reject_rate", 0.01)][last] == final["false_reject_rate"][last]
    for promise in (0.05, 0.1):
        out = tmp_path / f"at{promise}"
        assert main(["predict", str(product / "test"), "--bank", str(base.work / "banks"), "--out", str(out), f"decision.target_fpr={promise}"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        (folder,) = summary["measured"].values()
        assert folder["escape_rate"] == pytest.approx(final[point_key("escape_rate", promise)][last])
        assert folder["false_reject_rate"] == pytest.approx(final[point_key("false_reject_rate", promise)][last])
        # what the detector says it promises there is what the run recorded as promised
        assert summary["routed"][last]["promised_fpr"] == pytest.approx(final[point_key("promised_fpr", promise)][last])
        assert final[point_key("promise_broken", promise)][last] in (0.0, 1.0)
    # a looser promise never lets more defects through
    escapes = [final[point_key("escape_rate", p)][last] for p in (0.01, 0.05, 0.1)]
    assert escapes == sorted(escapes, reverse=True)
