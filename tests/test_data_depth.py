"""Synthetic RGB + xyz products: determinism, MVTec 3D-AD layout, modality-exact defects, xyz validation, loading."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from components.config import SynthConfig
from components.data.loading import load_depth, read_xyz, test_batch
from components.data.manifest import read_dataset
from components.data.synth_depth import DEFECT_MODALITY, depth_product_specs, generate_depth_products, render_rgbd
from components.data.validate import check_images, validate_dataset
from flows.cli import main

SMALL = SynthConfig(image_size=64, train_per_product=2, test_good_per_product=1, test_defect_per_type=1, depth=True)


@pytest.fixture(scope="module")
def rgbd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rgbd")
    generate_depth_products(root, 2, seed=3, cfg=SMALL)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_and_mvtec3d_layout(rgbd_root: Path, tmp_path: Path) -> None:
    generate_depth_products(tmp_path / "again", 2, seed=3, cfg=SMALL)
    assert _hashes(tmp_path / "again") == _hashes(rgbd_root)
    manifest = read_dataset(rgbd_root)
    assert sorted(manifest["product"].unique()) == ["screw", "washer"]
    assert manifest["depth_path"].str.endswith(".tiff").all()
    defective = manifest[manifest["label"] == 1]
    assert sorted(defective["defect_type"].unique()) == sorted(DEFECT_MODALITY)
    assert defective["mask_path"].str.contains("/gt/").all()
    xyz = tifffile.imread(manifest["depth_path"].iloc[0])
    assert xyz.dtype == np.float32 and xyz.shape == (64, 64, 3)
    invalid = (xyz == 0).all(axis=-1)
    assert 0.0 < invalid.mean() < 0.2  # some dropouts, mostly valid


@pytest.mark.parametrize("defect", ["dent", "bump", "cut_edge", "missing_part", "stain", "hole"])
def test_defects_show_exactly_in_their_modality(defect: str) -> None:
    spec = depth_product_specs(3, seed=0)[2]  # bottle cap
    good_rgb, good_xyz, _ = render_rgbd(spec, np.random.default_rng([9, 1]), 96, None)
    rgb, xyz, mask = render_rgbd(spec, np.random.default_rng([9, 1]), 96, defect)
    assert mask is not None and mask.sum() >= 8
    rgb_changed = (rgb != good_rgb).any(axis=-1)
    z_changed = xyz[..., 2] != good_xyz[..., 2]
    near = ndimage.binary_dilation(mask, iterations=2)
    if DEFECT_MODALITY[defect] == "geometry":
        assert not rgb_changed.any()
    else:
        assert rgb_changed[mask].any() and not rgb_changed[~near].any()
    if DEFECT_MODALITY[defect] == "colour":
        assert not z_changed.any()
    else:
        assert z_changed[mask].mean() > 0.5 and not z_changed[~near].any()


def _write_xyz(path: Path, xyz: np.ndarray) -> None:
    tifffile.imwrite(path, xyz)


def test_validation_names_every_bad_xyz(rgbd_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(rgbd_root, root)
    good = root / "washer" / "train" / "good" / "xyz"
    wrong_size, with_nan, all_invalid = good / "000.tiff", good / "001.tiff", root / "screw" / "test" / "good" / "xyz" / "000.tiff"
    _write_xyz(wrong_size, np.full((48, 64, 3), 0.5, np.float32))
    nan = tifffile.imread(with_nan)
    nan[5, 5, 2] = np.nan
    _write_xyz(with_nan, nan)
    _write_xyz(all_invalid, np.zeros((64, 64, 3), np.float32))
    report = validate_dataset(root)
    found = {(f.rule, Path(f.path).resolve()) for f in report.failures}
    assert ("depth_size_mismatch", wrong_size.resolve()) in found
    assert ("depth_not_finite", with_nan.resolve()) in found
    assert ("depth_few_valid", all_invalid.resolve()) in found
    assert len(report.failures) == 3, report.describe()
    assert str(all_invalid.resolve()) in report.describe()


def test_valid_point_floor_is_configurable_and_wrong_format_is_caught(rgbd_root: Path, tmp_path: Path) -> None:
    manifest = read_dataset(rgbd_root)
    assert check_images(manifest, min_valid_fraction=0.05) == []
    strict = check_images(manifest, min_valid_fraction=0.999)
    assert {f.rule for f in strict} == {"depth_few_valid"} and len(strict) == len(manifest)
    bad = tmp_path / "int.tiff"
    _write_xyz(bad, np.ones((64, 64, 3), np.int16))
    rows = manifest.iloc[:1].copy()
    rows["depth_path"] = str(bad)
    assert [(f.rule, f.path) for f in check_images(rows)] == [("depth_format", str(bad))]


def test_test_batch_carries_nearest_resized_xyz(rgbd_root: Path) -> None:
    manifest = read_dataset(rgbd_root)
    batch = test_batch(manifest, "washer", 32)
    assert batch.depth is not None and batch.depth.shape == (len(batch), 3, 32, 32)
    full = read_xyz(manifest[manifest["image_path"] == batch.paths[0]]["depth_path"].iloc[0])
    assert np.array_equal(batch.depth[0].permute(1, 2, 0).numpy(), full[::2, ::2])
    assert load_depth([], 32).shape == (0, 3, 32, 32)


def test_cli_depth_flag(tmp_path: Path) -> None:
    code = main(["data", "synth", "--depth", "--out", str(tmp_path), "--products", "1", "data.synth.image_size=64",
                 "data.synth.train_per_product=2", "data.synth.test_good_per_product=1", "data.synth.test_defect_per_type=1"])
    assert code == 0
    assert (tmp_path / "washer" / "test" / "dent" / "xyz" / "000.tiff").is_file()


def test_overlays_show_depth_next_to_rgb(rgbd_root: Path) -> None:
    import io

    import torch
    from PIL import Image

    from components.eval.figures import overlay_figure
    from components.types import Prediction

    batch = test_batch(read_dataset(rgbd_root), "washer", 32)
    pred = Prediction(image_scores=torch.zeros(len(batch)), anomaly_maps=torch.rand(len(batch), 32, 32))
    with_depth = Image.open(io.BytesIO(overlay_figure("washer", batch, pred)))
    batch.depth = None
    without = Image.open(io.BytesIO(overlay_figure("washer", batch, pred)))
    # one more panel in a row of four (tight bounding box): at least 15 % wider, same height
    assert with_depth.size[0] > without.size[0] * 1.15 and with_depth.size[1] == without.size[1]
