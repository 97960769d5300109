"""The anomalib peer benchmark's argument parsing, table and metric plumbing, on fake results (no anomalib)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest

import torch

from benchmarks.peer_anomalib import (
    MATCHED,
    backbone_tiling,
    cut_tiles,
    matched_ratio,
    parse_args,
    peer_layers,
    raw_metrics,
    stitch_tiles,
    tile_boxes,
)
from components.errors import ContadError
from components.eval.peer import ProductResult, SystemResult, peer_markdown, read_peer_results, results_from_json, results_table
from components.backbones.tiled import TiledBackbone
from tests.methods_support import ToyBackbone


def _result(product: str, contad_s: tuple[float, float], peer_s: tuple[float, float], pixel: float = 0.9) -> ProductResult:
    return ProductResult(
        product=product, train_images=20, test_images=10, load=(3.0, 2.0, 1.0),
        contad=SystemResult(image_auroc=0.8, pixel_auroc=pixel, train_s=contad_s[0], test_s=contad_s[1], bank_rows=100),
        peer=SystemResult(image_auroc=0.6, pixel_auroc=pixel, train_s=peer_s[0], test_s=peer_s[1], bank_rows=90),
    )


def test_parse_args_defaults_products_and_overrides() -> None:
    args = parse_args(["--products", "grid,pcb", "data.image_size=256"])
    assert args.products == ["grid", "pcb"]
    assert args.overrides == ["data.image_size=256"]
    assert (args.peer_ratio, args.peer_neighbors, args.peer_normalise) == (MATCHED, 9, "weights")  # same memory as contad, anomalib's k
    assert parse_args(["--peer-ratio", "0.01"]).peer_ratio == 0.01


@pytest.mark.parametrize("argv", [["--peer-ratio", "0"], ["--peer-ratio", "1.5"], ["--peer-ratio", "most"], ["--peer-neighbors", "0"], ["--products", ","], ["notakeyvalue"]])
def test_parse_args_rejects_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_table_ratio_per_product_and_total() -> None:
    results = [_result("grid", (2.0, 2.0), (10.0, 2.0)), _result("pcb", (4.0, 4.0), (20.0, 4.0), pixel=math.nan)]
    assert results[0].ratio == pytest.approx(3.0)
    table = results_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 + 1  # header, rule, two products, average/total
    assert "| grid | 20 / 10 | 0.800 | 0.600 | 0.900 | 0.900 | 2.0 + 2.0 | 10.0 + 2.0 | 3.0x | 100 / 90 | 3.0 |" in lines
    assert "| – | – |" in lines[3]  # undefined pixel AUROC shown as a dash, not nan
    assert lines[-1].startswith("| **average / total** | | 0.800 | 0.600 | 0.900 | 0.900 | 12.0 | 36.0 | 3.0x |")


def test_results_json_round_trip() -> None:
    results = [_result("grid", (1.0, 1.0), (5.0, 1.0))]
    back = results_from_json(json.loads(json.dumps([asdict(r) for r in results])))
    assert results_table(back) == results_table(results)


def test_peer_section_names_what_has_not_run_and_bad_files_are_named(tmp_path) -> None:  # noqa: ANN001
    results = [_result("grid", (1.0, 1.0), (5.0, 1.0))]
    section = peer_markdown(results, ["grid", "pcb"])
    assert "| grid | 20 / 10 | 0.800 | 0.600 |" in section and "Not run yet: pcb." in section
    assert "Not run yet" not in peer_markdown(results, ["grid"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps([asdict(r) for r in results]))
    assert read_peer_results(path) == results
    path.write_text('[{"product": "grid"}]')
    with pytest.raises(ContadError, match="results.json: not a peer results file"):
        read_peer_results(path)


def test_raw_metrics_use_raw_scores_and_skip_pixel_without_masks() -> None:
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 2, 2), dtype=np.uint8)
    maps = np.zeros((4, 2, 2), dtype=np.float32)
    image, pixel = raw_metrics(labels, masks, np.array([0.1, 0.2, 0.3, 0.4]), maps)
    assert image == 1.0 and math.isnan(pixel)
    masks[2, 0, 0] = 1
    maps[2, 0, 0] = 5.0
    assert raw_metrics(labels, masks, np.array([0.4, 0.3, 0.2, 0.1]), maps) == (0.0, 1.0)  # never flipped


def test_peer_layers_are_contads_two_feature_levels() -> None:
    assert peer_layers(None) == ["blocks.2", "blocks.4"]  # default feature_layer 3: stride 8 + 16
    assert peer_layers(2) == ["blocks.1", "blocks.2"]


class _RecordingBackbone(ToyBackbone):
    """The toy backbone, keeping every input contad's tiled wrapper hands it."""

    def __init__(self) -> None:
        super().__init__(image_size=16)
        self.seen: list[torch.Tensor] = []

    def features(self, images, prompt=None):  # noqa: ANN001, ANN201 - ToyBackbone's signature
        self.seen.append(images.clone())
        return super().features(images, prompt)


def test_anomalib_gets_the_very_tiles_contads_tiled_backbone_encodes() -> None:
    inner = _RecordingBackbone()
    tiled = TiledBackbone(inner, tile=16, overlap=8)  # stride 8: tiles at 0, 8, 16 per side of a 32 px image
    images = torch.randn(2, 3, 32, 32)
    tile, overlap, stride = backbone_tiling(tiled, 32)
    boxes = tile_boxes(32, 32, tile, overlap, stride)
    assert (tile, overlap, stride) == (16, 8, 8) and len(boxes) == 9 and boxes[1] == (0, 8)
    with torch.no_grad():
        tiled.features(images)
    tiles = cut_tiles(images, boxes, tile).reshape(2, len(boxes), 3, 16, 16)  # image-major
    assert len(inner.seen) == len(boxes)
    for t, seen in enumerate(inner.seen):
        assert torch.equal(tiles[:, t], seen)
    assert backbone_tiling(inner, 32) == (32, 0, 1) and tile_boxes(32, 32, 32, 0, 1) == [(0, 0)]  # one pass: one tile
    assert backbone_tiling(tiled, 16) == (16, 0, 1)  # an image no larger than a tile is one pass in contad too


def test_stitched_tiles_give_back_the_image_map_and_the_max_tile_score() -> None:
    maps = torch.rand(2, 32, 32)
    boxes = tile_boxes(32, 32, 16, 8, 8)
    tile_maps = cut_tiles(maps[:, None], boxes, 16)[:, 0]  # (2 * 9, 16, 16): overlapping cells carry equal values
    tile_scores = torch.arange(18, dtype=torch.float32).flip(0)  # image 0's best tile is its first, image 1's its first too
    stitched, scores = stitch_tiles(tile_maps, tile_scores, boxes, (32, 32))
    assert torch.allclose(stitched, maps) and scores.tolist() == [17.0, 8.0]
    # overlaps are averaged: a tile raised by 9 raises its own cells by 9 / (tiles covering them)
    tile_maps[0] += 9.0
    raised = stitch_tiles(tile_maps, tile_scores, boxes, (32, 32))[0] - maps
    assert raised[0, 0, 0] == pytest.approx(9.0) and raised[0, 10, 10] == pytest.approx(9.0 / 4) and raised[1].abs().max() < 1e-6
    with pytest.raises(ValueError, match="not a multiple of 9 tiles"):
        stitch_tiles(tile_maps[:-1], tile_scores[:-1], boxes, (32, 32))
    with pytest.raises(ValueError, match="do not cover"):
        stitch_tiles(tile_maps[:2], tile_scores[:2], boxes[:1], (32, 32))


@pytest.mark.parametrize(("rows", "patches"), [(1804, 18032), (3449, 564480), (3449, 3449), (1, 784), (7, 9)])
def test_matched_ratio_keeps_exactly_contads_rows(rows: int, patches: int) -> None:
    ratio = matched_ratio(rows, patches)
    assert 0.0 < ratio <= 1.0 and int(patches * ratio) == rows  # anomalib's KCenterGreedy: int(n * sampling_ratio)
    with pytest.raises(ValueError, match="rows out of"):
        matched_ratio(patches + 1, patches)
