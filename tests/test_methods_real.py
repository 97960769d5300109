"""UCAD with the real EfficientNet-Lite0 on real industrial images (small and fast: 96 px, few images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import Config
from components.types import ImageBatch, TaskData

pytestmark = pytest.mark.realdata

PRODUCTS = ("hazelnut_toy", "pcb")
SIZE = 96


def _task(manifest, product: str, cfg: Config, n_train: int) -> tuple[TaskData, ImageBatch]:
    from components.data.loading import load_images, read_rgb
    from components.segment.registry import make_provider

    rows = manifest[(manifest["product"] == product) & (manifest["split"] == "train")].sort_values("image_path")
    paths = rows["image_path"].tolist()[: n_train + 2]
    provider = make_provider(cfg.masks)
    maps = torch.from_numpy(np.stack([provider.label_map(read_rgb(p), product) for p in paths])).long()
    images = load_images(paths, SIZE)
    train = ImageBatch(images[:n_train], [product] * n_train, paths[:n_train])
    held = ImageBatch(images[n_train:], [product] * 2, paths[n_train:])
    test_rows = manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path")
    test_paths = test_rows[test_rows["label"] == 0]["image_path"].tolist()[:2] + test_rows[test_rows["label"] == 1]["image_path"].tolist()[:2]
    test = ImageBatch(load_images(test_paths, SIZE), [product] * len(test_paths), test_paths)
    return TaskData(product, [product], train, held, maps[:n_train], maps[n_train:]), test


def test_ucad_routes_real_products_with_efficientnet_lite0(real_ad: Path, tmp_path: Path) -> None:
    from components.backbones.registry import build_backbone
    from components.data.manifest import read_dataset
    from components.errors import WeightsError
    from components.methods.ucad import UCAD

    cfg = Config(method="ucad")
    cfg.backbone.device = "cpu"
    cfg.data.image_size = SIZE
    cfg.masks.image_size = SIZE
    cfg.ucad.epochs = 1
    cfg.ucad.batch_size = 6
    cfg.ucad.key_size = 32
    cfg.ucad.knowledge_size = 64
    try:
        backbone = build_backbone(cfg.backbone, SIZE)
    except WeightsError as exc:
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {exc}")
    manifest = read_dataset(real_ad, products=list(PRODUCTS))
    method = UCAD(cfg, backbone)
    tests = []
    for product in PRODUCTS:
        data, test = _task(manifest, product, cfg, n_train=6)
        log = method.fit_task(data)
        assert log["prompt_trained"] and len(log["epoch_losses"]) == 1 and np.isfinite(log["epoch_losses"][0])
        tests.append(test)
    assert [k.shape for k in method.keys] == [(32, backbone.key_dim)] * 2
    assert [k.shape for k in method.knowledge] == [(64, backbone.feature_dim)] * 2
    images = torch.cat([t.images for t in tests])
    pred = method.predict(images)
    assert pred.routed_tasks == [p for t in tests for p in t.products]
    assert pred.anomaly_maps.shape == (len(images), SIZE, SIZE)
    restored = UCAD(cfg, backbone)
    restored.load(method.save(tmp_path / "ucad"))
    assert torch.equal(restored.predict(images).image_scores, pred.image_scores)
