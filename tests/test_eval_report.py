"""End to end at component level: a toy two-task continual sequence -> metrics.json -> report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from components.config import Config
from components.errors import ContadError
from components.data.protocol import task_of_product, task_sequence
from components.eval.continual import AccuracyMatrix, validate_metrics_json
from components.eval.evaluate import evaluate_tasks
from components.eval.report import report_command, write_report
from components.eval.thresholds import Calibration, calibrate_heldout, decision_metrics, quantile_threshold
from components.methods.base import ContinualMethod
from components.types import ImageBatch, Prediction, TaskData

SIZE = 16
COLOURS = {"alpha": (1.5, -1.0, -1.0), "beta": (-1.0, -1.0, 1.5)}


class MeanImageDistance(ContinualMethod):
    """Toy detector: one mean image per task; routes to the nearest mean, scores |x - mean|."""

    name = "mean_distance"

    def __init__(self, config: Config, oracle: bool = False) -> None:
        super().__init__(config, backbone=None)  # type: ignore[arg-type]
        self.means: list[torch.Tensor] = []
        self.calls: list[tuple[int, list[str] | None]] = []
        type(self).uses_task_labels = oracle

    def fit_task(self, data: TaskData) -> dict[str, Any]:
        self.means.append(data.train.images.mean(0))
        self.tasks.append(data.name)
        return {"n": len(data.train)}

    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        self.calls.append((len(images), true_tasks))
        means = torch.stack(self.means)
        dists = ((images[:, None] - means[None]) ** 2).mean(dim=(2, 3, 4))
        routed = dists.argmin(1)
        maps = (images - means[routed]).abs().mean(1)
        return Prediction(maps.amax(dim=(1, 2)), maps, [self.tasks[i] for i in routed.tolist()])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"mean_{i}": m for i, m in enumerate(self.means)}

    def state_meta(self) -> dict[str, Any]:
        return {"tasks": self.tasks}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tasks = list(meta["tasks"])
        self.means = [tensors[f"mean_{i}"] for i in range(len(self.tasks))]


def _images(product: str, n: int, gen: torch.Generator) -> torch.Tensor:
    base = torch.tensor(COLOURS[product]).view(1, 3, 1, 1)
    return base + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=gen)


def _test_batch(product: str, gen: torch.Generator, n_good: int = 4, n_bad: int = 4) -> ImageBatch:
    images = _images(product, n_good + n_bad, gen)
    masks = torch.zeros(n_good + n_bad, SIZE, SIZE, dtype=torch.uint8)
    for k in range(n_bad):
        i, y, x = n_good + k, 2 + 3 * k, 3 + 2 * k
        masks[i, y : y + 4, x : x + 3] = 1
        if k % 2:
            masks[i, 12:14, 1:3] = 1  # a second defect region
    images = images + 2.0 * masks[:, None].float()
    labels = torch.tensor([0] * n_good + [1] * n_bad)
    return ImageBatch(images, [product] * len(labels), [f"{product}/{i}.png" for i in range(len(labels))], labels, masks)


def _task(product: str, gen: torch.Generator) -> TaskData:
    train = ImageBatch(_images(product, 6, gen), [product] * 6, [f"{product}/train{i}.png" for i in range(6)])
    heldout = ImageBatch(_images(product, 3, gen), [product] * 3, [f"{product}/held{i}.png" for i in range(3)])
    return TaskData(name=product, products=[product], train=train, heldout=heldout)


def _run_sequence(out: Path, cfg: Config, method_name: str = "mean_distance") -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    products = ["alpha", "beta"]
    steps = task_sequence(products, cfg.protocol.base_tasks, cfg.protocol.step_tasks)
    tasks = task_of_product(steps)
    method = MeanImageDistance(cfg)
    tests = {p: _test_batch(p, gen) for p in products}
    matrix = AccuracyMatrix(products, len(steps), steps=steps)
    heldouts = []
    predictions: dict[str, Prediction] = {}
    for step, group in enumerate(steps):
        data = _task(group[0], gen)
        method.fit_task(data)
        heldouts.append(data.heldout)
        seen = {p: tests[p] for g in steps[: step + 1] for p in g}
        metrics, predictions = evaluate_tasks(method, seen, tasks, cfg)
        for product, values in metrics.items():
            matrix.record(step, product, values)
    assert all(n <= cfg.eval.batch_size for n, _ in method.calls)  # mini-batched
    assert all(true is None for _, true in method.calls)  # no product labels given
    heldout = ImageBatch(torch.cat([h.images for h in heldouts]), sum((h.products for h in heldouts), []), [])
    calibration = calibrate_heldout(method, heldout, cfg)
    doc = matrix.to_metrics_json(method_name, cfg.protocol.name)
    doc["thresholds"] = calibration.to_dict()
    overlays = {p: (tests[p], predictions[p]) for p in predictions}  # whole test batches (the pipeline picks a few: overlay_examples)
    write_report(out, doc, overlays)
    return doc


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_two_task_sequence_end_to_end(tmp_path: Path) -> None:
    cfg = Config()
    cfg.eval.batch_size = 3
    run = tmp_path / "run"
    doc = _run_sequence(run, cfg)

    saved = json.loads((run / "metrics.json").read_text())
    validate_metrics_json(saved)
    assert saved["tasks"] == ["alpha", "beta"] and saved["protocol"] == "sequential"
    assert saved["matrix"]["image_auroc"][0] == [1.0, None]  # beta not learned at step 0
    assert saved["final"]["image_auroc"] == {"alpha": 1.0, "beta": 1.0}  # the toy detector is perfect
    assert saved["forgetting"]["image_auroc"] == pytest.approx(0.0)
    assert saved["routing_accuracy"] == pytest.approx(1.0)
    assert 0.9 < saved["average"]["aupro"] <= 1.0
    assert saved == json.loads(json.dumps(doc))

    report = (run / "report.md").read_text()
    # one table + one heatmap figure per metric family, not one per metric
    assert report.count("| metric | alpha | beta | Average | FM | BWT |") == 2  # (no per-step decision rates here)
    assert [line for line in report.splitlines() if line.startswith("## ")][:4] == [
        "## Glossary", "## Run", "## Image-level detection", "## Pixel-level localisation"]
    families = ["family_image-level_detection.png", "family_pixel-level_localisation.png"]
    assert all(f"figures/{name}" in report for name in families) and "figures/overlay_alpha.png" in report
    assert "matrix_" not in report and "every value is in %" in report
    pngs = sorted((run / "figures").glob("*.png"))
    assert {p.name for p in pngs} >= {*families, "image_auroc_steps.png", "overlay_alpha.png", "overlay_beta.png"}
    for png in pngs:
        _assert_png(png)
    assert not list(run.rglob("*.tmp"))  # atomic writes leave no temporaries

    # side-by-side comparison of two runs
    other = tmp_path / "other"
    other.mkdir()
    worse = json.loads(json.dumps(doc))
    worse["method"] = "patchcore_finetune"
    worse["final"]["image_auroc"]["alpha"] = 0.5
    (other / "metrics.json").write_text(json.dumps(worse))
    assert report_command([run, other], out=tmp_path / "compare") == 0
    comparison = (tmp_path / "compare" / "comparison.md").read_text()
    assert comparison.count("| metric | method | alpha | beta | Average | FM |") == 2  # one table per family
    assert "| Image AUROC | mean_distance | 100.0 | 100.0 | 100.0 | 0.0 |" in comparison
    assert "| Image AUROC | patchcore_finetune | 50.0 | 100.0 |" in comparison
    _assert_png(tmp_path / "compare" / "figures" / "comparison_image_auroc.png")
    _assert_png(tmp_path / "compare" / "figures" / "comparison_forgetting_image_auroc.png")
    assert "figures/comparison_forgetting_image_auroc.png" in comparison


def _captured_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    from components.eval import figures

    captured: list[Any] = []
    monkeypatch.setattr(figures, "to_png", lambda fig, dpi=110: captured.append((fig, dpi)) or b"")
    return captured


def _forgetting_doc() -> dict[str, Any]:
    matrix = AccuracyMatrix(["alpha", "beta", "gamma"], 3)
    cells = {(0, "alpha"): 0.98, (1, "alpha"): 0.97, (1, "beta"): 0.9, (2, "alpha"): 0.7, (2, "beta"): 0.92, (2, "gamma"): 0.95}
    for (step, product), value in cells.items():
        matrix.record(step, product, {"image_auroc": value, "image_ap": value, "image_f1max": value, "pixel_auroc": None})
    return matrix.to_metrics_json("patchcore_finetune", "sequential")


def test_family_heatmaps_show_percent_forgetting_and_legible_titles(monkeypatch: pytest.MonkeyPatch) -> None:
    from components.eval.figures import comparison_matrices, family_heatmaps, forgetting_matrix

    doc = _forgetting_doc()
    forgetting = forgetting_matrix(doc, "image_auroc")
    assert forgetting[0] == [None, None, None] and forgetting[2][0] == pytest.approx(0.28)
    assert forgetting[2][1] == pytest.approx(-0.02) and forgetting[2][2] is None  # improved beta; gamma just learned
    captured = _captured_figures(monkeypatch)
    family_heatmaps(doc, "Image-level detection", ["image_auroc", "image_ap", "image_f1max"])
    comparison_matrices([("a", doc), ("b", doc)], "image_auroc")
    for fig, dpi in captured:
        images = [ax for ax in fig.axes if ax.images]
        titles = [ax.title for ax in images]
        assert any(t.get_text().startswith(("Forgetting", "b: forgetting")) for t in titles)
        assert min(t.get_fontsize() for t in titles) * dpi / 72 >= 12  # >= 12 px
        accuracy = [ax.images[0] for ax in images if "orgetting" not in ax.title.get_text()]
        assert all(im.get_clim() == (0.0, 100.0) for im in accuracy)  # % scale, like the cell labels
        colorbars = [ax for ax in fig.axes if not ax.images and ax.get_label() == "<colorbar>"]
        assert colorbars and all(max(*ax.get_xlim(), *ax.get_ylim()) > 1.0 for ax in colorbars)  # % scale, not 0-1
        cell_texts = {t.get_text() for ax in images for t in ax.texts}
        assert "28.0" in cell_texts and "70.0" in cell_texts  # forgetting of alpha and its final value, in %


def test_report_command_names_the_bad_run(tmp_path: Path) -> None:
    with pytest.raises(ContadError, match=r"empty/metrics.json"):
        report_command([tmp_path / "empty"], out=tmp_path / "cmp")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(ContadError, match=r"bad/metrics.json.*not readable JSON"):
        report_command([bad])
    (bad / "metrics.json").write_text(json.dumps({"method": "x"}))
    with pytest.raises(ContadError, match=r"bad/metrics.json.*missing key 'tasks'"):
        report_command([bad])


def test_oracle_gets_task_labels_and_thresholds_use_normals_only() -> None:
    cfg = Config()
    gen = torch.Generator().manual_seed(1)
    oracle = MeanImageDistance(cfg, oracle=True)
    try:
        for product in ("alpha", "beta"):
            oracle.fit_task(_task(product, gen))
        evaluate_tasks(oracle, {"beta": _test_batch("beta", gen)}, {"alpha": "alpha", "beta": "beta"}, cfg)
        assert oracle.calls[-1][1] == ["beta"] * 8
    finally:
        MeanImageDistance.uses_task_labels = False
    with pytest.raises(ContadError, match="no task"):
        evaluate_tasks(oracle, {"gamma": _test_batch("beta", gen)}, {"beta": "beta"}, cfg)

    method = MeanImageDistance(cfg)
    method.fit_task(_task("alpha", gen))
    with pytest.raises(ContadError, match="defective labels"):
        calibrate_heldout(method, _test_batch("alpha", gen), cfg)
    heldout = _task("alpha", gen).heldout
    calibration = calibrate_heldout(method, heldout, cfg)
    threshold = calibration.for_product("alpha")
    assert threshold.n_images == 3 and calibration.target_fpr == cfg.decision.target_fpr
    # 3 normals, target 1 %: the threshold is their maximum (no held-out normal is rejected)
    assert threshold.image == pytest.approx(float(method.predict(heldout.images).image_scores.max()))
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    test = _test_batch("alpha", gen)
    pred = method.predict(test.images)
    rates = decision_metrics(pred, test, calibration)
    decided_ng = pred.image_scores.numpy() > threshold.image
    assert rates["escape_rate"] == pytest.approx(float((~decided_ng[4:]).mean()))
    assert rates["false_reject_rate"] == pytest.approx(float(decided_ng[:4].mean()))
    # at most target_fpr of the normals strictly above the threshold (order statistic, not interpolated)
    scores = torch.arange(200, dtype=torch.float32)
    assert quantile_threshold(scores, 0.01) == 198.0 and int((scores > 198.0).sum()) <= 2
    assert quantile_threshold(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), 0.5) == pytest.approx(2.0)
    with pytest.raises(ContadError, match="decision.target_fpr"):
        quantile_threshold(torch.ones(3), 1.5)


def test_report_names_the_feature_settings_each_task_chose(tmp_path: Path) -> None:
    from components.eval.report import run_markdown
    from flows.records import TRAIN_LOG, feature_settings, step_dir

    logs = {
        "alpha": {"features": "backbone", "feature_choice": {"skipped": "2 held-out normals (< 4)"}},
        "beta": {"features": "feature_layer=2", "feature_choice": {"image_auroc": {"backbone": 0.78, "feature_layer=2": 0.93},
                                                                  "chosen": "feature_layer=2", "margin": 0.02}},
        "gamma": {"features": "backbone"},  # trained without feature choices: nothing to report
    }
    for index, (task, log) in enumerate(logs.items()):
        step_dir(tmp_path, index, task).mkdir(parents=True)
        (step_dir(tmp_path, index, task) / TRAIN_LOG).write_text(json.dumps({"task": task, "log": log}))
    doc = _forgetting_doc()
    doc["feature_settings"] = feature_settings(tmp_path, ["alpha", "beta", "gamma"])
    assert set(doc["feature_settings"]) == {"alpha", "beta"}
    text = run_markdown(doc, {})
    assert "- `alpha`: **backbone** (no choice: 2 held-out normals (< 4))" in text
    assert "- `beta`: **feature_layer=2** (held-out synthetic image AUROC backbone 78.0, feature_layer=2 93.0; margin 2.0)" in text
    assert "`gamma`" not in text.split("## Image-level")[0]
    assert "feature settings per task" not in run_markdown(_forgetting_doc(), {})
    (step_dir(tmp_path, 1, "beta") / TRAIN_LOG).write_text("{not json")
    with pytest.raises(ContadError, match=r"01-beta/train_log.json: unreadable training log"):
        feature_settings(tmp_path, ["alpha", "beta"])
    from types import SimpleNamespace

    from flows.pipeline import log_train_losses  # the tracker's loss curves read the same log: the same error

    with pytest.raises(ContadError, match=r"01-beta/train_log.json: unreadable training log"):
        log_train_losses(SimpleNamespace(log_train_losses=lambda *args: None), 1, "beta", step_dir(tmp_path, 1, "beta"))
