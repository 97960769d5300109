"""Loading, held-out splits, task data and task protocols."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import Config
from components.data.loading import load_images, load_masks, task_data, task_image_paths, test_batch, train_split
from components.data.manifest import read_dataset
from components.data.protocol import ordered_products, task_name, task_of_product, task_products, task_sequence
from components.errors import DataError


def _dataset(root: Path, n_train: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for product, size in (("alpha", (40, 30)), ("beta", (33, 50))):
        d = root / product
        for sub, n in (("train/good", n_train), ("test/good", 2), ("test/hole", 2)):
            (d / sub).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)
                Image.fromarray(arr, mode="L").save(d / sub / f"{i:03d}.png")
        (d / "ground_truth" / "hole").mkdir(parents=True)
        for i in range(2):
            m = np.zeros((size[1], size[0]), dtype=np.uint8)
            m[5:10, 5:15] = 255
            Image.fromarray(m, mode="L").save(d / "ground_truth" / "hole" / f"{i:03d}_mask.png")
    return root


def test_load_images_and_masks(tmp_path: Path) -> None:
    df = read_dataset(_dataset(tmp_path))
    paths = df["image_path"].tolist()[:3]
    images = load_images(paths, 32)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert torch.allclose(images[:, 0] * 0.229 + 0.485, images[:, 1] * 0.224 + 0.456, atol=1e-5)  # grey -> RGB
    masks = load_masks(["", df[df["label"] == 1]["mask_path"].iloc[0]], 32)
    assert masks.dtype == torch.uint8 and masks.shape == (2, 32, 32)
    assert masks[0].sum() == 0 and set(masks[1].unique().tolist()) == {0, 1}
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_images([str(bad)], 32)


def test_test_batch(tmp_path: Path) -> None:
    df = read_dataset(_dataset(tmp_path))
    batch = test_batch(df, "beta", 24)
    assert len(batch) == 4 and batch.products == ["beta"] * 4
    assert batch.labels.tolist() == [1, 1, 0, 0] or sorted(batch.labels.tolist()) == [0, 0, 1, 1]
    for label, mask in zip(batch.labels.tolist(), batch.masks):
        assert (mask.sum() > 0) == bool(label)
    with pytest.raises(DataError, match="gamma"):
        test_batch(df, "gamma", 24)


def test_train_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    df = read_dataset(_dataset(tmp_path, n_train=10))
    train, held = train_split(df, ["alpha", "beta"], 0.2, seed=3)
    assert len(held) == 4 and len(train) == 16
    assert not set(train["image_path"]) & set(held["image_path"])
    assert (train["split"] == "train").all() and (held["label"] == 0).all()
    again_train, again_held = train_split(df, ["alpha", "beta"], 0.2, seed=3)
    assert train.equals(again_train) and held.equals(again_held)
    # a product's split does not depend on which other products are in the task
    alone = train_split(df, ["beta"], 0.2, seed=3)[1]
    assert alone["image_path"].tolist() == held[held["product"] == "beta"]["image_path"].tolist()
    other = train_split(df, ["alpha", "beta"], 0.2, seed=4)[1]
    assert set(other["image_path"]) != set(held["image_path"])
    # at least one held-out image whenever there are >= 2 training images
    small = read_dataset(_dataset(tmp_path / "small", n_train=2))
    tr, he = train_split(small, ["alpha"], 0.01, seed=0)
    assert len(tr) == 1 and len(he) == 1


def test_task_data_with_label_maps(tmp_path: Path) -> None:
    df = read_dataset(_dataset(tmp_path))
    cfg = Config()
    cfg.data.image_size = 16
    paths = task_image_paths(df, ["alpha", "beta"], cfg)
    maps = torch.arange(len(paths)).view(-1, 1, 1).expand(-1, 16, 16).clone()
    task = task_data(df, "alpha+beta", ["alpha", "beta"], cfg, maps)
    n_train = len(task.train)
    assert n_train + len(task.heldout) == len(paths) == 20
    assert task.train.paths + task.heldout.paths == paths
    assert task.label_maps[:, 0, 0].tolist() == list(range(n_train))
    assert task.heldout_label_maps[:, 0, 0].tolist() == list(range(n_train, len(paths)))
    assert task.train.images.shape[1:] == (3, 16, 16) and task.train.labels is None
    assert task_data(df, "alpha", ["alpha"], cfg, None).label_maps is None
    with pytest.raises(DataError, match="label_maps"):
        task_data(df, "alpha", ["alpha"], cfg, maps)


def test_protocols(tmp_path: Path) -> None:
    products = ["a", "b", "c", "d", "e"]
    assert task_sequence(products, 1, 1) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert task_sequence(products, 3, 1) == [["a", "b", "c"], ["d"], ["e"]]
    assert task_sequence(products, 2, 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert task_of_product(task_sequence(products, 2, 2))["d"] == "c+d"
    assert task_name(["c", "d"]) == "c+d" and task_name(["e"]) == "e"
    assert all(task_products(task_name(t)) == t for t in task_sequence(products, 2, 2))
    with pytest.raises(DataError):
        task_sequence(products, 6, 1)
    df = read_dataset(_dataset(tmp_path))
    cfg = Config()
    assert ordered_products(df, cfg) == ["alpha", "beta"]
    cfg.data.products = ["beta", "alpha"]
    assert ordered_products(df, cfg) == ["beta", "alpha"]
    cfg.data.products = ["beta", "zeta"]
    with pytest.raises(DataError, match="zeta"):
        ordered_products(df, cfg)


def test_reserved_normals_only_for_products_without_test_images(tmp_path: Path) -> None:
    """Reserved normals: a seeded share of train/good of untested products, disjoint from what training sees."""
    import shutil

    from components.data.loading import reserve_normals, reserved_count

    root = _dataset(tmp_path, n_train=10)
    shutil.rmtree(root / "beta" / "test")
    shutil.rmtree(root / "beta" / "ground_truth")
    df = read_dataset(root)
    kept, reserved = reserve_normals(df, 0.3, seed=1)
    assert set(reserved["product"]) == {"beta"} and len(reserved) == reserved_count(10, 0.3) == 3
    assert (reserved["split"] == "train").all() and (reserved["label"] == 0).all()
    assert len(kept) + len(reserved) == len(df) and not set(kept["image_path"]) & set(reserved["image_path"])
    assert kept[kept["product"] == "alpha"].equals(df[df["product"] == "alpha"])  # a product with a test set is untouched
    train, held = train_split(kept, ["beta"], 0.2, seed=1)  # training and thresholds only see the rest
    assert not (set(train["image_path"]) | set(held["image_path"])) & set(reserved["image_path"])
    assert reserve_normals(df, 0.3, seed=1)[1].equals(reserved)  # deterministic
    assert not reserve_normals(df, 0.3, seed=2)[1]["image_path"].equals(reserved["image_path"])
    assert [reserved_count(n, 0.5) for n in (2, 3, 4, 10)] == [0, 1, 2, 5]  # always leaves one to train, one held out
    with pytest.raises(DataError, match="reserved_normals_fraction"):
        reserve_normals(df, 1.0, seed=1)
