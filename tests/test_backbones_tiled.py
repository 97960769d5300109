"""Tiled scoring: overlapping tiles at native resolution stitched onto one patch grid."""

from __future__ import annotations

import pytest
import torch

from components.backbones.registry import build_backbone
from components.backbones.tiled import TiledBackbone, tile_starts, tiled_backbone
from components.config import BackboneConfig, ConfigError
from components.methods.patchcore import PatchCoreOracle
from tests.methods_support import toy_config, toy_task


@pytest.fixture(scope="module")
def inner():  # noqa: ANN201 - random-weight Lite0 built for 64 px tiles
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name="efficientnet_lite0", device="cpu", pretrained=False), 64)


def test_tile_starts_overlap_and_end_flush() -> None:
    assert tile_starts(128, 64, 16, 8) == [0, 48, 64]
    assert tile_starts(64, 64, 16, 8) == [0] and tile_starts(40, 64, 16, 8) == [0]
    assert all(s % 8 == 0 for s in tile_starts(512, 224, 32, 8)) and tile_starts(512, 224, 32, 8)[-1] == 288


def test_a_tile_covering_the_image_gives_the_single_pass_features_and_map(inner) -> None:  # noqa: ANN001
    tiled = TiledBackbone(inner, tile=64, overlap=16)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(tiled.features(images), inner.features(images))
    assert tiled.grid_size(64) == inner.grid_size(64)
    assert tiled_backbone(inner, 64, 64, 16) is inner and tiled_backbone(inner, 64, None, 16) is inner
    # the same through a method: identical anomaly maps and image scores
    cfg = toy_config("patchcore_oracle")
    cfg.data.image_size = 64
    task = toy_task("red", n_train=3, n_heldout=1)
    big = torch.nn.functional.interpolate(task.train.images, size=(64, 64))
    task.train.images, task.heldout.images = big, big[:1]
    plain, tiled_method = PatchCoreOracle(cfg, inner), PatchCoreOracle(cfg, tiled)
    plain.fit_task(task)
    tiled_method.fit_task(task)
    a, b = plain.predict(images, ["red", "red"]), tiled_method.predict(images, ["red", "red"])
    assert torch.equal(a.anomaly_maps, b.anomaly_maps) and torch.equal(a.image_scores, b.image_scores)


def test_larger_images_are_stitched_onto_the_native_grid(inner) -> None:  # noqa: ANN001
    tiled = TiledBackbone(inner, tile=64, overlap=16)
    images = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        feats = tiled.features(images)
        first_tile = inner.features(images[:, :, :64, :64])
    assert tiled.grid_size(128) == (16, 16) and feats.shape == (1, 256, inner.feature_dim)
    grid = feats.reshape(1, 16, 16, -1)
    # cells covered by the first tile only (rows/cols 0..5) equal that tile's own features
    assert torch.allclose(grid[0, :6, :6], first_tile.reshape(1, 8, 8, -1)[0, :6, :6], atol=1e-6)
    assert tiled.key_features(images).shape == inner.key_features(torch.randn(1, 3, 64, 64)).shape
    with pytest.raises(ConfigError, match="data.tile_overlap"):
        TiledBackbone(inner, tile=64, overlap=64)


def test_overlapping_tiles_weigh_each_cell_by_its_distance_from_the_cut(inner) -> None:  # noqa: ANN001
    tiled = TiledBackbone(inner, tile=64, overlap=16)  # 128 px: tiles at 0, 48, 64 (8 cells each, stride 8)
    images = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        grid = tiled.features(images).reshape(16, 16, -1)
        tiles = {s: inner.features(images[:, :, :64, s : s + 64]).reshape(8, 8, -1) for s in (0, 48, 64)}
    # row 0, column 7 (px 56..63): tile 0 sees it at its cut edge (distance 0), tile 48 one cell in (1), tile 64 not at all
    expected = (1 * tiles[0][0, 7] + 2 * tiles[48][0, 1]) / 3
    assert torch.allclose(grid[0, 7], expected, atol=1e-5)
    # column 9 (px 72..79): tile 48 sees it 3 cells in (weight 4), tile 64 one cell in (weight 2)
    assert torch.allclose(grid[0, 9], (4 * tiles[48][0, 3] + 2 * tiles[64][0, 1]) / 6, atol=1e-5)
    assert not torch.allclose(grid[0, 7], (tiles[0][0, 7] + tiles[48][0, 1]) / 2, atol=1e-5)  # not the plain mean


def test_tiles_without_overlap_are_copied_as_they_are(inner) -> None:  # noqa: ANN001
    tiled = TiledBackbone(inner, tile=64, overlap=0)
    images = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        grid = tiled.features(images).reshape(16, 16, -1)
        right = inner.features(images[:, :, 64:, 64:]).reshape(8, 8, -1)
    assert torch.equal(grid[8:, 8:], right)


def test_a_flush_last_tile_is_weighted_even_without_overlap(inner) -> None:  # noqa: ANN001
    """96 px in 64 px tiles with overlap 0: tiles at 0 and 32 still overlap by 32 px (4 cells); the seam is weighted away."""
    tiled = TiledBackbone(inner, tile=64, overlap=0)
    images = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        grid = tiled.features(images).reshape(12, 12, -1)
        tiles = {s: inner.features(images[:, :, :64, s : s + 64]).reshape(8, 8, -1) for s in (0, 32)}
    # row 0, column 7 (px 56..63): tile 0 at its cut edge (weight 1), tile 32 three cells past its cut (weight 4)
    assert torch.allclose(grid[0, 7], (1 * tiles[0][0, 7] + 4 * tiles[32][0, 3]) / 5, atol=1e-5)
    assert torch.allclose(grid[0, 0], tiles[0][0, 0], atol=1e-6)  # covered by one tile only


def test_the_weighted_stitching_exports_to_onnx_as_evaluated(inner, tmp_path) -> None:  # noqa: ANN001
    ort = pytest.importorskip("onnxruntime")
    from components.export.onnx_export import PatchFeatures, _export_graph

    tiled = TiledBackbone(inner, tile=64, overlap=16)  # 96 px: tiles at 0 and 32 per side, overlapping by 32
    images = torch.randn(1, 3, 96, 96)
    _export_graph(PatchFeatures(tiled, None), torch.zeros(1, 3, 96, 96), tmp_path / "features.onnx", "images", "features")
    session = ort.InferenceSession(str(tmp_path / "features.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"images": images.numpy()})[0]
    with torch.inference_mode():
        assert torch.allclose(torch.from_numpy(exported), tiled.features(images), atol=1e-4)


@pytest.mark.parametrize("overlap", [0, 16])
def test_features_of_views_share_one_pass_and_equal_the_separate_features(inner, overlap) -> None:  # noqa: ANN001
    """UCAD's feature choice encodes the training images once for both candidates: bit-identical to one pass each
    while the prompts are untrained, and separate passes (still equal) once a prompt changes the features."""
    tiled = TiledBackbone(inner, tile=64, overlap=overlap)
    fine = tiled.with_features(2, None, None)
    images = torch.randn(2, 3, 128, 128)
    prompts = [tiled.new_prompt(), fine.new_prompt()]
    calls = []
    original = type(inner)._pyramid
    with torch.inference_mode():
        separate = [tiled.features(images, prompts[0]), fine.features(images, prompts[1])]
        type(inner)._pyramid = lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw)
        try:
            joint = tiled.features_of_views(images, [(tiled, prompts[0]), (fine, prompts[1])])
            shared_passes = len(calls)
            calls.clear()
            with torch.no_grad():
                next(prompts[1].parameters()).add_(0.5)  # a trained prompt: its features change
            changed = [tiled.features(images, prompts[0]), fine.features(images, prompts[1])]
            calls.clear()
            apart = tiled.features_of_views(images, [(tiled, prompts[0]), (fine, prompts[1])])
            separate_passes = len(calls)
        finally:
            type(inner)._pyramid = original
    tiles = len(tile_starts(128, 64, overlap, tiled.stride)) ** 2
    assert [f.shape for f in joint] == [(2, tiled.grid_size(128)[0] ** 2, tiled.feature_dim), (2, fine.grid_size(128)[0] ** 2, fine.feature_dim)]
    assert all(torch.equal(a, b) for a, b in zip(joint, separate)) and shared_passes == tiles
    assert all(torch.equal(a, b) for a, b in zip(apart, changed)) and separate_passes == 2 * tiles
    assert not torch.equal(changed[1], separate[1])
