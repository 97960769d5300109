"""The anomalib peer benchmark's argument parsing, table and metric plumbing, on fake results (no anomalib)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest

from benchmarks.peer_anomalib import ProductResult, SystemResult, parse_args, peer_layers, raw_metrics, results_from_json, results_table


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
    assert (args.peer_ratio, args.peer_neighbors, args.peer_normalise) == (0.1, 9, "weights")  # anomalib's defaults


@pytest.mark.parametrize("argv", [["--peer-ratio", "0"], ["--peer-ratio", "1.5"], ["--peer-neighbors", "0"], ["--products", ","], ["notakeyvalue"]])
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
