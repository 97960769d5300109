"""IB-IUMAD on tiny synthetic RGB-D products: training, label-free scoring, modalities, fusions, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.config import Config, SynthConfig
from components.data.loading import task_data, test_batch
from components.data.manifest import read_dataset
from components.data.synth_depth import generate_depth_products
from components.errors import ContadError
from components.eval.evaluate import predict_batch
from components.methods.ib_iumad import IBIUMAD
from components.methods.ib_iumad_net.depth_image import xyz_to_image
from components.methods.registry import build_method
from tests.methods_support import ToyBackbone

SIZE = 64


def tiny_config(**ib: object) -> Config:
    cfg = Config(method="ib_iumad")
    cfg.data.image_size = SIZE
    cfg.data.heldout_fraction = 0.4  # 2 of 5 normal training images per product: a spread of image scores to calibrate on
    cfg.backbone.pretrained = False
    for key, value in {"hidden": 16, "heads": 2, "encoder_layers": 2, "decoder_layers": 2, "ffn": 32, "batch_size": 8}.items():
        setattr(cfg.reconstruction, key, value)
    for key, value in {"mamba_state": 4, "mamba_expand": 1, "head_hidden": 8, "bottleneck": 8, "fusion_heads": 2, "epochs": 2, "batch_size": 4, "score_pool": 8, "smoothing_sigma": 1.0, **ib}.items():
        setattr(cfg.ib_iumad, key, value)
    return cfg


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("rgbd")
    generate_depth_products(root, 2, seed=1, cfg=SynthConfig(image_size=SIZE, train_per_product=5, test_good_per_product=2, test_defect_per_type=1, depth=True))
    return read_dataset(root)


def _build(cfg: Config) -> IBIUMAD:
    """A fresh method; seeded because the test extractor has random (not packaged) weights."""
    torch.manual_seed(0)
    method = build_method(cfg, ToyBackbone())
    assert isinstance(method, IBIUMAD)
    return method


def _fit(cfg: Config, manifest) -> IBIUMAD:  # type: ignore[no-untyped-def]
    method = _build(cfg)
    assert isinstance(method, IBIUMAD)
    for product in ("washer", "screw"):
        method.fit_task(task_data(manifest, product, [product], cfg, None))
    return method


@pytest.fixture(scope="module")
def trained(manifest) -> IBIUMAD:  # type: ignore[no-untyped-def]
    return _fit(tiny_config(), manifest)


def test_label_free_scores_maps_and_routing(trained: IBIUMAD, manifest) -> None:  # type: ignore[no-untyped-def]
    batch = test_batch(manifest, "screw", SIZE)
    pred = predict_batch(trained, batch, {"washer": "washer", "screw": "screw"}, batch_size=5)
    assert pred.image_scores.shape == (len(batch),) and torch.isfinite(pred.image_scores).all()
    assert pred.anomaly_maps.shape == (len(batch), SIZE, SIZE)
    assert set(pred.routed_tasks) <= {"washer", "screw"}
    assert trained.network.fusion.head_fused.classes == 2
    assert set(trained.map_means) == {"fused", "rgb", "depth"} and all(len(v) == 2 for v in trained.map_means.values())
    assert set(trained.map_stds) == set(trained.map_means) and all(s > 0 for v in trained.map_stds.values() for s in v)
    other_depth = trained.predict(batch.images, depth=torch.flip(batch.depth, dims=[-1]))
    assert not torch.allclose(other_depth.image_scores, pred.image_scores)  # the depth modality matters


def test_a_loaded_state_refuses_relearning_and_other_settings(trained: IBIUMAD, manifest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # identical scores after a round trip: tests/test_methods_contract.py (every method)
    trained.save(tmp_path / "state")
    restored = _build(tiny_config())
    restored.load(tmp_path / "state")
    assert restored.tasks == ["washer", "screw"]
    with pytest.raises(ContadError, match="already learned"):
        restored.fit_task(task_data(manifest, "washer", ["washer"], tiny_config(), None))
    with pytest.raises(Exception, match="other settings"):
        _build(tiny_config(fusion="add")).load(tmp_path / "state")


@pytest.mark.parametrize(("modalities", "fusion", "update"), [("rgb", "concat", "projected"), ("depth", "add", "finetune")])
def test_single_modality_and_other_fusions_train(manifest, modalities: str, fusion: str, update: str) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(modalities=modalities, fusion=fusion, update_strategy=update, epochs=1)
    method = _fit(cfg, manifest)
    batch = test_batch(manifest, "washer", SIZE)
    pred = method.predict(batch.images, depth=batch.depth if modalities == "depth" else None)
    assert torch.isfinite(pred.image_scores).all()
    assert set(method.map_means) == {"fused", modalities}
    if update == "projected":
        assert method.spans  # old-product activation spans for the projected update
    if modalities == "depth":
        with pytest.raises(ContadError, match="ib_iumad.modalities=depth"):
            method.predict(batch.images)


def test_xyz_image_removes_the_background_plane_and_fills_dropouts() -> None:
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    xyz = torch.zeros(2, 3, 16, 16)
    xyz[:, 0], xyz[:, 1] = xx * 1e-3, yy * 1e-3
    xyz[:, 2] = 0.65 + 2e-4 * xx + 1e-4 * yy  # a tilted belt
    xyz[0, 2, 5:11, 5:11] -= 0.01  # a raised square
    xyz[0, :, 7, 7] = 0.0  # a sensor dropout on the square
    xyz[0, :, 0:3, 13:16] = 0.0  # a dropout on the belt corner
    xyz[1] = 0.0  # all invalid
    image = xyz_to_image(xyz)
    assert image.shape == xyz.shape and torch.isfinite(image).all()
    height = image[0, 0]
    belt = torch.ones(16, 16, dtype=torch.bool)
    belt[4:12, 4:12] = False
    assert height[belt].abs().max() < 0.05  # the tilt is gone: the belt is flat at 0
    assert height[6, 6] > 1.0 and height[7, 7] > 0.8 * height[6, 6]  # the dropout is filled from its neighbours (not a hole to 0)
    assert image[0, 2, 8, 4] > 0.5 and image[0, 2, 8, 11] < -0.5  # slopes rise into and fall out of the square
    assert image[1].abs().sum() == 0


def test_tokens_are_standardised_with_the_first_tasks_statistics(trained: IBIUMAD, manifest) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config()
    tokens = trained._tokens(task_data(manifest, "washer", ["washer"], cfg, None).train)
    for modality, t in tokens.items():
        flat = t.reshape(-1, t.shape[-1])
        assert flat.mean(0).abs().max() < 1e-3 and (flat.std(0) - 1).abs().max() < 1e-2  # washer was learned first
        assert set(trained.feature_stats) == {"rgb", "depth"} and trained.feature_stats[modality][0].shape == (t.shape[-1],)
    later = trained._tokens(task_data(manifest, "screw", ["screw"], cfg, None).train)
    assert any(t.reshape(-1, t.shape[-1]).mean(0).abs().max() > 1e-2 for t in later.values())  # frozen, not refitted per task


def test_score_maps_are_standardised_then_maxed_or_summed(trained: IBIUMAD) -> None:
    maps = {k: torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(sorted(trained.map_means))}
    standardised = torch.stack([(m - sum(trained.map_means[k]) / 2) / (sum(trained.map_stds[k]) / 2) for k, m in maps.items()])
    assert trained.config.ib_iumad.combine == "max"  # the default
    assert torch.allclose(trained._combined(maps), standardised.amax(0), atol=1e-5)
    trained.config.ib_iumad.combine = "sum"
    try:
        assert torch.allclose(trained._combined(maps), standardised.sum(0), atol=1e-5)
    finally:
        trained.config.ib_iumad.combine = "max"


@pytest.mark.parametrize("calibration", ["images", "cells"])
def test_calibration_uses_only_the_heldout_training_normals(manifest, calibration: str) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(score_calibration=calibration, epochs=1)
    method = _build(cfg)
    data = task_data(manifest, "washer", ["washer"], cfg, None)
    test_paths = set(test_batch(manifest, "washer", SIZE).paths)
    assert len(data.heldout) == 2 and not set(data.heldout.paths) & (set(data.train.paths) | test_paths)
    method.fit_task(data)
    expected: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for clean, out in method._forward_batches(method._tokens(data.heldout)):  # the held-out normals, and nothing else
            for k, grid_map in method._grid_maps(clean, out).items():
                scores = method._image_scores(grid_map.cpu(), (SIZE, SIZE))
                expected.setdefault(k, []).append(scores if calibration == "images" else grid_map.flatten())
    assert set(expected) == set(method.map_means) == {"fused", "rgb", "depth"}
    for k, chunks in expected.items():
        values = torch.cat(chunks).double()
        assert values.numel() == (2 if calibration == "images" else 2 * method.grid[0] * method.grid[1])
        assert method.map_means[k] == [pytest.approx(float(values.mean()), rel=1e-5)]
        assert method.map_stds[k] == [pytest.approx(float(values.std()), rel=1e-3, abs=1e-5)]  # std of 2 close values: float32 cancellation


def test_early_stopping_stops_and_restores_the_best_heldout_epoch(manifest, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(epochs=10, early_stopping_patience=2)
    method = _build(cfg)
    scripted = iter([1.0, 0.5, 0.7, 0.6, 0.4])  # best after epoch 2, then 2 epochs without improvement: stop after epoch 4
    seen: list[dict[str, torch.Tensor]] = []
    real_loss = method._stopping_loss
    heldout_inputs: list[set[int]] = []

    def scripted_loss(tokens: dict[str, torch.Tensor]) -> float:
        real_loss(tokens)  # the real criterion runs (on the held-out tokens) ...
        heldout_inputs.append({t.shape[0] for t in tokens.values()})
        seen.append({k: v.detach().clone() for k, v in method.network.state_dict().items()})
        return next(scripted)  # ... but the test decides which epoch is best

    monkeypatch.setattr(method, "_stopping_loss", scripted_loss)
    history = method.fit_task(task_data(manifest, "washer", ["washer"], cfg, None))
    assert history["heldout_losses"] == [1.0, 0.5, 0.7, 0.6] and history["best_epoch"] == 2 and history["epochs_run"] == 4
    assert all(len(v) == 4 for v in history["epoch_losses"].values())
    assert heldout_inputs == [{2}] * 4  # the 2 held-out training normals
    restored = method.network.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in seen[1].items())
    assert not all(torch.equal(restored[k], v) for k, v in seen[3].items())  # the last epoch's weights were dropped


def test_without_patience_the_epochs_are_fixed(manifest) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(epochs=2, early_stopping_patience=0)
    history = _build(cfg).fit_task(task_data(manifest, "washer", ["washer"], cfg, None))
    assert history["heldout_losses"] == [] and history["best_epoch"] == history["epochs_run"] == 2
