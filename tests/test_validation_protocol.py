"""The validation protocol for defaults (components/eval/validation.py): training normals only, never test/."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.loading import IMAGENET_MEAN, IMAGENET_STD
from components.eval.validation import build_validation, run_protocol, training_manifest
from tests.methods_support import ToyBackbone, product_images

SIZE = 64
PRODUCTS = ["red", "green"]


def _write_dataset(root: Path) -> None:
    """MVTec layout: 10 train/good PNGs per product, and a test/ + ground_truth/ folder that must not be read."""
    for index, product in enumerate(PRODUCTS):
        images = product_images(product, 10, seed=index, size=SIZE)
        rgb = (images * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
        good = root / product / "train" / "good"
        good.mkdir(parents=True)
        for i, pixels in enumerate(rgb):
            Image.fromarray(np.ascontiguousarray(pixels)).save(good / f"{i:03d}.png")
        for folder in ("test/crack", "ground_truth/crack"):
            (root / product / folder).mkdir(parents=True)
            Image.fromarray(np.ascontiguousarray(rgb[0])).save(root / product / folder / "000.png")


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _write_dataset(root)
    return root


@pytest.fixture()
def touched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened, listed or stat-ed through builtins.open, PIL, pathlib and os during the test."""
    seen: list[str] = []
    real_open, real_image_open = builtins.open, Image.open
    real_iterdir, real_stat, real_scandir, real_listdir = Path.iterdir, Path.stat, os.scandir, os.listdir

    def record(path: object) -> None:
        seen.append(str(path))

    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: (record(file), real_open(file, *a, **k))[1])
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (record(fp), real_image_open(fp, *a, **k))[1])
    monkeypatch.setattr(Path, "iterdir", lambda self: (record(self), real_iterdir(self))[1])
    monkeypatch.setattr(Path, "stat", lambda self, **k: (record(self), real_stat(self, **k))[1])
    monkeypatch.setattr(os, "scandir", lambda path=".": (record(path), real_scandir(path))[1])
    monkeypatch.setattr(os, "listdir", lambda path=".": (record(path), real_listdir(path))[1])
    return seen


def _config(seed: int = 0):
    from tests.methods_support import toy_config

    cfg = toy_config("ucad")
    cfg.seed = seed
    cfg.data.image_size = SIZE
    cfg.data.tile = None
    cfg.ucad.epochs = 0  # training-free prompts: no structure masks
    cfg.ucad.knowledge_size = 96
    cfg.eval.smoothing_sigma = 1.0
    return cfg


def test_protocol_reads_no_test_path_and_detects_pasted_defects(dataset: Path, touched: list[str]) -> None:
    for product in PRODUCTS:  # unreadable where permissions apply (not as root): a read would fail loudly
        os.chmod(dataset / product / "test", 0)
    try:
        vset = build_validation(_config(), dataset, PRODUCTS)
        result = run_protocol(vset, ToyBackbone(SIZE))
    finally:
        for product in PRODUCTS:
            os.chmod(dataset / product / "test", 0o755)
    under = [p[len(str(dataset)):] for p in touched if p.startswith(str(dataset))]
    assert any("/train/good" in p for p in under), "the tracking saw no training image: the protocol was not observed"
    assert not [p for p in under if "/test" in p or "ground_truth" in p]
    assert set(result.per_product) == set(PRODUCTS)
    for product in PRODUCTS:
        metrics = result.per_product[product]
        assert metrics["routing_accuracy"] == 1.0
        assert metrics["image_auroc"] > 0.7, (product, metrics)  # chance is 0.5
        assert metrics["pixel_auroc"] > 0.7, (product, metrics)
    assert set(result.train_seconds) == set(PRODUCTS) and all(b > 0 for b in result.task_bytes.values())


def test_validation_normals_are_held_out_from_fitting_and_seeded(dataset: Path) -> None:
    vset = build_validation(_config(seed=0), dataset, PRODUCTS)
    fit_paths = set(vset.fit["image_path"])
    for product, batch in vset.batches.items():
        normals = [p for p, label in zip(batch.paths, batch.labels.tolist()) if label == 0]
        assert normals and not fit_paths & set(normals)
        counts = vset.counts()[product]
        assert counts == {"fit": 8, "normals": 2, "defects": 6}  # 20 % of 10 held out; 2 rectangles + 1 stroke copy each
        assert batch.masks[batch.labels == 1].flatten(1).any(dim=1).all()  # every defect has a mask
        assert not batch.masks[batch.labels == 0].any()
    again = build_validation(_config(seed=0), dataset, PRODUCTS)
    other = build_validation(_config(seed=1), dataset, PRODUCTS)
    assert all(torch.equal(again.batches[p].images, vset.batches[p].images) for p in PRODUCTS)
    assert any(other.batches[p].paths != vset.batches[p].paths for p in PRODUCTS)


def test_training_manifest_lists_train_good_only(dataset: Path) -> None:
    manifest = training_manifest(dataset, PRODUCTS)
    assert len(manifest) == 20 and set(manifest["split"]) == {"train"} and set(manifest["label"]) == {0}
    assert all("/train/good/" in p for p in manifest["image_path"])


def test_defects_painted_at_a_higher_resolution_keep_normals_and_unmasked_pixels_exact(dataset: Path) -> None:
    same = build_validation(_config(), dataset, PRODUCTS)
    painted = build_validation(_config(), dataset, PRODUCTS, paint_size=2 * SIZE)
    for product in PRODUCTS:
        a, b = same.batches[product], painted.batches[product]
        assert b.images.shape == a.images.shape and b.paths == a.paths and torch.equal(a.labels, b.labels)
        normals = int((b.labels == 0).sum())
        assert torch.equal(a.images[:normals], b.images[:normals])  # normals as the run loads them
        defects, masks = b.images[normals:], b.masks[normals:].bool()
        source = torch.cat([torch.arange(normals).repeat_interleave(2), torch.arange(normals)])
        outside = ~masks[:, None].expand_as(defects)
        assert torch.equal(defects[outside], b.images[source][outside])
        assert masks.flatten(1).any(dim=1).all() and (defects[~outside] != b.images[source][~outside]).any()
