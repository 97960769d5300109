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


def _write_rgbd_dataset(root: Path) -> None:
    """MVTec 3D-AD layout: train/good and validation/good with rgb/ + xyz/ (a raised disc, some invalid points),
    and a test/ folder that must not be read."""
    import tifffile

    images = product_images("red", 10, seed=3, size=SIZE)
    rgb = (images * IMAGENET_STD[0] + IMAGENET_MEAN[0]).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    disc = np.hypot(yy - SIZE / 2, xx - SIZE / 2) < SIZE / 3
    for i, pixels in enumerate(rgb):
        folder = root / "part" / ("train" if i < 8 else "validation") / "good"
        xyz = np.stack([xx * 1e-3, yy * 1e-3, 0.65 - 0.01 * disc], axis=-1).astype(np.float32)
        xyz[:, : SIZE // 8] = 0.0  # invalid (dropout) points, all three coordinates 0
        for sub in ("rgb", "xyz"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / "rgb" / f"{i:03d}.png")
        tifffile.imwrite(folder / "xyz" / f"{i:03d}.tiff", xyz)
    for sub in ("rgb", "xyz", "gt"):
        (root / "part" / "test" / "crack" / sub).mkdir(parents=True)
        Image.fromarray(np.ascontiguousarray(rgb[0])).save(root / "part" / "test" / "crack" / sub / "000.png")


def test_rgbd_defects_change_depth_inside_their_masks_only(tmp_path: Path, touched: list[str]) -> None:
    from components.data.loading import load_depth
    from components.errors import DataError

    root = tmp_path / "rgbd"
    _write_rgbd_dataset(root)
    touched.clear()  # the dataset's own writes
    vset = build_validation(_config(), root, ["part"])
    under = [p[len(str(root)):] for p in touched if p.startswith(str(root))]
    assert any("/xyz/" in p for p in under) and not [p for p in under if "/test" in p]
    assert sorted({Path(p).parts[-4] for p in vset.fit["image_path"]}) == ["train", "validation"]  # both normal folders
    batch = vset.batches["part"]
    normals = int((batch.labels == 0).sum())
    assert vset.counts()["part"] == {"fit": 8, "normals": 2, "defects": 6}
    assert batch.depth is not None and batch.depth.shape == (len(batch), 3, SIZE, SIZE)
    held = vset.batches["part"].paths[:normals]
    depth_paths = [str(Path(p).parent.parent / "xyz" / f"{Path(p).stem}.tiff") for p in held]
    assert torch.equal(batch.depth[:normals], load_depth(depth_paths, SIZE))  # normals' clouds as loaded
    source = torch.cat([torch.arange(normals).repeat_interleave(2), torch.arange(normals)])
    before, after, masks = batch.depth[:normals][source], batch.depth[normals:], batch.masks[normals:].bool()
    assert torch.equal(after[:, :2], before[:, :2])  # x, y untouched
    changed = after[:, 2] != before[:, 2]
    assert not (changed & ~masks).any()  # depth changes inside the defect masks only
    invalid = before.abs().sum(dim=1) == 0
    assert torch.equal(after[invalid.unsqueeze(1).expand_as(after)], before[invalid.unsqueeze(1).expand_as(before)])  # dropouts stay 0
    visible = (masks & ~invalid).flatten(1).any(dim=1)
    assert visible.any() and changed.flatten(1).any(dim=1)[visible].all()  # every defect over valid points moves z
    height = 0.01  # the disc; a dent / bump is 0.15-0.5 of the cloud's height range
    assert ((after[:, 2] - before[:, 2]).abs()[changed] <= 0.5 * height + 1e-6).all()
    with pytest.raises(DataError, match="RGB-D"):
        build_validation(_config(), root, ["part"], paint_size=2 * SIZE)


def test_subtle_defects_are_visible_changes_inside_their_masks_read_no_test_path_and_stay_grey(dataset: Path, touched: list[str]) -> None:
    from components.data.synthetic.subtle import PER_NORMAL, SUBTLE_KINDS, VISIBLE, subtle_defects
    from components.errors import DataError

    vset = build_validation(_config(), dataset, PRODUCTS, defects="subtle")
    under = [p[len(str(dataset)):] for p in touched if p.startswith(str(dataset))]
    assert not [p for p in under if "/test" in p or "ground_truth" in p]
    for product, batch in vset.batches.items():
        normals = int((batch.labels == 0).sum())
        assert vset.counts()[product] == {"fit": 8, "normals": 2, "defects": 2 * PER_NORMAL}
        kinds = [p.rsplit("#", 1)[1] for p in batch.paths[normals:]]
        assert kinds == list(SUBTLE_KINDS[: 2 * PER_NORMAL])  # kinds taken in turn
        source = torch.arange(normals).repeat_interleave(PER_NORMAL)
        plain = (batch.images * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)
        moved = (plain[normals:] - plain[:normals][source]).abs().amax(dim=1)
        masks = batch.masks[normals:].bool()
        assert (moved[~masks] < 1e-5).all()  # nothing changes outside a mask
        assert (moved[masks] > VISIBLE - 1e-4).all()  # every masked pixel visibly changed
    grey = torch.full((2, 3, SIZE, SIZE), 0.5)
    grey[:, :, ::4] = 0.2  # a striped grey texture
    images, masks, _, _ = subtle_defects((grey - IMAGENET_MEAN) / IMAGENET_STD, torch.Generator().manual_seed(0), per_normal=len(SUBTLE_KINDS))
    plain = images * IMAGENET_STD + IMAGENET_MEAN
    assert (plain.amax(dim=1) - plain.amin(dim=1)).max() < 1e-5  # a grey image gets grey defects (stains, threads too)
    assert masks.flatten(1).sum(dim=1).min() >= 8
    with pytest.raises(DataError, match="validation defects 'hard'"):
        build_validation(_config(), dataset, PRODUCTS, defects="hard")


def test_trained_prompts_train_on_the_label_maps_a_pipeline_step_makes(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation trains as a pipeline step does: the same structure label maps (provider, cache, input size)."""
    from components.eval.validation import train_sequence
    from components.methods.ucad import UCAD
    from components.segment.task_maps import task_label_maps

    cfg = _config()
    cfg.ucad.epochs = 1  # trained prompts need structure label maps
    cfg.masks.cache_dir = str(tmp_path / "masks")
    assert cfg.masks.image_size != cfg.data.image_size  # the sizes a second implementation could mix up
    vset = build_validation(cfg, dataset, PRODUCTS)
    seen = []
    monkeypatch.setattr(UCAD, "fit_task", lambda self, data: seen.append(data) or {"memory_bytes": 0})
    train_sequence(vset, ToyBackbone(SIZE), cfg)
    assert [d.name for d in seen] == PRODUCTS
    for data in seen:
        assert data.label_maps is not None and data.label_maps.shape[-1] == cfg.data.image_size
        assert torch.equal(torch.cat([data.label_maps, data.heldout_label_maps]), task_label_maps(cfg, vset.fit, data.products))
