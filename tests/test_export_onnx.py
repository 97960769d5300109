"""ONNX export: the exported detector (graphs + data files + the standalone runner) decides like the torch one.

Each exportable method learns two products through the pipeline's own ``train_task`` (tiled inputs:
the routing keys' anti-aliased resize is exported as matrix products), is exported, and the
reference runner (onnxruntime + NumPy) scores the products' test images: scores within 1e-4
relative of the evaluation's, the same routed product and the same OK/NG decisions; thresholds
re-derived at another target rate equal the calibration's. The same on real images (skipped
without ../shared/data/real-ad).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import Config, SynthConfig, load_config
from components.data.loading import test_batch
from components.data.manifest import read_dataset
from components.errors import ContadError
from components.eval.evaluate import predict_batch
from components.eval.thresholds import read_calibration
from components.export import runner
from components.export.onnx_export import MANIFEST, export_method_dir
from components.methods.loading import load_method
from flows import pipeline

REAL_AD = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ad"
SMALL = ["data.image_size=64", "data.tile=32", "data.heldout_fraction=0.25", "backbone.device=cpu", "eval.overlays_per_task=0",
         "tracking.enabled=false", "ucad.key_size=16", "patchcore.coreset_size=64"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from components.data.synth import generate_products

    root = tmp_path_factory.mktemp("export") / "data"
    generate_products(root, 2, 0, SynthConfig(image_size=64, train_per_product=8, test_good_per_product=2, test_defect_per_type=1))
    return root


def _train(method: str, root: Path, work: Path, products: list[str] | None = None, extra: list[str] | None = None,
           max_train: int | None = None) -> tuple[Config, Path, pd.DataFrame]:
    """``method`` trained on ``products`` (default: all of ``root``) in order, on at most ``max_train`` training
    images each (parity needs a detector, not a good one); (config, last method dir, manifest)."""
    cfg = load_config(None, [f"method={method}", f"data.root={root}", f"banks.store_dir={work / 'banks'}", *SMALL, *(extra or [])])
    manifest = read_dataset(root)
    if max_train is not None:
        train = manifest[manifest["split"] == "train"].sort_values("image_path").groupby("product").head(max_train)
        manifest = pd.concat([train, manifest[manifest["split"] != "train"]]).reset_index(drop=True)
    method_dir = None
    for step, product in enumerate(products or sorted(manifest["product"].unique())):
        method_dir = pipeline.train_task.fn(cfg, method_dir, product, [product], manifest, work / f"s{step}" / "method")
    assert method_dir is not None
    return cfg, method_dir, manifest


def _check_parity(cfg: Config, method_dir: Path, manifest: pd.DataFrame, out: Path, per_product: int | None = None) -> None:
    method = load_method(cfg, method_dir)
    calibration = read_calibration(method_dir)
    export_method_dir(method_dir, cfg, out)
    onnx = runner.OnnxDetector(out)
    for product in method.tasks:
        rows = manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path")
        rows = rows.iloc[:per_product] if per_product else rows
        evaluated = predict_batch(method, test_batch(rows, product, cfg.data.image_size), {t: t for t in method.tasks}, cfg.eval.batch_size)
        given = product if method.uses_task_labels else None
        decided = [runner.decide(onnx, path, given) for path in rows["image_path"]]
        reference = evaluated.image_scores.numpy()
        scores = np.array([d["score"] for d in decided])
        np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=0, err_msg=f"{method.name} {product}")
        assert [d["product"] for d in decided] == evaluated.routed_tasks
        assert [d["decision"] for d in decided] == [calibration.decide(float(s), t) for s, t in zip(reference, evaluated.routed_tasks)]


@pytest.mark.parametrize("method", ["ucad", "patchcore_finetune", "patchcore_oracle"])
def test_exported_detector_scores_like_torch(method: str, synth_root: Path, tmp_path: Path) -> None:
    cfg, method_dir, manifest = _train(method, synth_root, tmp_path)
    _check_parity(cfg, method_dir, manifest, tmp_path / "onnx")
    doc = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert doc["method"] == method and {t["name"] for t in doc["tasks"]} == set(manifest["product"])

    # thresholds stay changeable: re-derived from the stored samples exactly as the calibration does
    calibration = read_calibration(method_dir)
    looser = runner.OnnxDetector(tmp_path / "onnx", target_fpr=0.3).thresholds
    assert looser == pytest.approx({t: v.image for t, v in calibration.at_target(0.3).tasks.items()})


def test_tasks_with_their_own_feature_settings_export_and_deploy_as_evaluated(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ucad.feature_choices``: the first product takes feature layer 2 (stride-4 patches), the second keeps
    the backbone's layer 3; the ONNX runner and the deployed ``Detector`` score exactly what evaluation scores."""
    from components.decision import Detector, normalise
    from components.methods import feature_choice

    verdicts = iter([0.5, 0.9, 0.9, 0.5])  # held-out synthetic AUROC per (task, candidate): task 0 -> layer 2, task 1 -> configured
    monkeypatch.setattr(feature_choice, "auroc", lambda labels, scores: next(verdicts))
    cfg, method_dir, manifest = _train("ucad", synth_root, tmp_path, extra=["ucad.feature_choices=[{feature_layer: 2}]", "data.heldout_fraction=0.5"])
    method = load_method(cfg, method_dir)
    assert [c and c.feature_layer for c in method.feature_settings] == [2, None]
    assert [k.shape[1] for k in method.knowledge] == [method.task_backbone(0).feature_dim, method.backbone.feature_dim]
    _check_parity(cfg, method_dir, manifest, tmp_path / "onnx")
    doc = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert doc["tasks"][0]["grid"] == [16, 16] and doc["grid"] == [8, 8] and "maps" not in doc["tasks"][1]

    detector = Detector.from_method_dir(method_dir, cfg)
    rows = manifest[manifest["split"] == "test"].sort_values("image_path")
    rgbs = [np.asarray(Image.open(path).convert("RGB")) for path in rows["image_path"]]
    evaluated = method.predict(normalise(rgbs, cfg.data.image_size))
    deployed = detector.decide(rgbs)
    assert [v.score for v in deployed] == pytest.approx(evaluated.image_scores.tolist(), rel=1e-6)
    assert all(np.array_equal(v.anomaly_map, m) for v, m in zip(deployed, evaluated.anomaly_maps.numpy()))


def test_oracle_tasks_with_their_own_feature_settings_export_as_evaluated(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``patchcore.feature_choices``: the oracle's first product takes feature layer 2 (its own feature graph, grid and
    map graph), the second keeps the shared graph; the ONNX runner scores exactly what evaluation scores."""
    from components.methods import feature_choice

    verdicts = iter([0.5, 0.9, 0.9, 0.5])  # held-out synthetic AUROC per (task, candidate): task 0 -> layer 2, task 1 -> configured
    monkeypatch.setattr(feature_choice, "auroc", lambda labels, scores: next(verdicts))
    cfg, method_dir, manifest = _train("patchcore_oracle", synth_root, tmp_path,
                                       extra=["patchcore.feature_choices=[{feature_layer: 2}]", "data.heldout_fraction=0.5"])
    method = load_method(cfg, method_dir)
    assert [c and c.feature_layer for c in method.feature_settings] == [2, None]
    assert [b.features.shape[1] for b in method.banks] == [method.task_backbone(0).feature_dim, method.backbone.feature_dim]
    _check_parity(cfg, method_dir, manifest, tmp_path / "onnx")
    doc = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    assert doc["tasks"][0]["graph"] == "features_0.onnx" and doc["tasks"][0]["grid"] == [16, 16] and doc["grid"] == [8, 8]
    assert doc["tasks"][1]["graph"] == "features.onnx" and "maps" not in doc["tasks"][1]


def test_runner_is_standalone_and_refuses_what_it_cannot_export(synth_root: Path, tmp_path: Path) -> None:
    cfg, method_dir, manifest = _train("ucad", synth_root, tmp_path)
    out = tmp_path / "onnx"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "export", "--method-dir", str(method_dir), "--out", str(out), *SMALL],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    source = (out / "run_onnx.py").read_text()
    assert "components" not in source and "torch" not in source  # onnxruntime + numpy + pillow only
    image = str(manifest[manifest["split"] == "test"].sort_values("image_path")["image_path"].iloc[0])
    ran = subprocess.run([sys.executable, str(out / "run_onnx.py"), str(out), image], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    line = json.loads(ran.stdout.splitlines()[0])
    assert line["decision"] in ("OK", "NG") and line["product"] in set(manifest["product"])

    again = subprocess.run([sys.executable, "-m", "flows.cli", "export", "--method-dir", str(method_dir), "--out", str(tmp_path)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 2 and "is not an exported detector" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    lemo_cfg = load_config(None, ["method=lemo"])
    with pytest.raises(ContadError, match="'lemo' cannot be exported"):
        from components.export.onnx_export import export_onnx

        export_onnx(load_method(lemo_cfg, None), read_calibration(method_dir), lemo_cfg, tmp_path / "lemo")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_AD.is_dir(), reason="real data absent (../shared/data/real-ad)")
@pytest.mark.parametrize("method", ["ucad", "patchcore_oracle"])
def test_exported_detector_on_real_images(method: str, tmp_path: Path) -> None:
    products = sorted(p.name for p in REAL_AD.iterdir() if (p / "train").is_dir())
    cfg, method_dir, manifest = _train(method, REAL_AD, tmp_path, products, ["data.tile=null", "patchcore.coreset_size=256"], max_train=24)
    _check_parity(cfg, method_dir, manifest, tmp_path / "onnx", per_product=6)
