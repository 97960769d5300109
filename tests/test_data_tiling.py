"""``data.tile: auto``: high-resolution products are tiled at the input size, others get one pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import Config, ConfigError, load_config
from components.data.tiling import auto_tiling, effective_tile, native_short_sides, resolve_tiling

REPO_ROOT = Path(__file__).resolve().parents[1]


def _manifest(tmp_path: Path, sizes: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    rows = []
    for product, whs in sizes.items():
        for i, (w, h) in enumerate(whs):
            path = tmp_path / product / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
            rows.append({"product": product, "split": "train", "label": 0, "image_path": str(path)})
        rows.append({"product": product, "split": "test", "label": 1, "image_path": "/nonexistent/never-read.png"})
    return pd.DataFrame(rows)


def test_auto_tiling_rule() -> None:
    assert auto_tiling(224, {"board": 512.0, "tile": 209.0}) == (448, 224)  # one high-resolution product is enough
    assert auto_tiling(224, {"a": 447.0}) == (224, None)
    assert auto_tiling(224, {"a": 448.0}) == (448, 224)
    assert auto_tiling(224, {}) == (224, None)


def test_native_short_sides_are_medians_of_training_images(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, {"big": [(140, 130), (150, 200), (300, 140)], "small": [(100, 60)]})
    assert native_short_sides(manifest, ["big", "small"]) == {"big": 140.0, "small": 60.0}


def test_resolve_tiling_per_method_and_explicit_values(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, {"big": [(128, 128), (130, 140)], "small": [(64, 64)]})
    cfg = Config()
    cfg.data.image_size = 64
    assert cfg.data.tile == "auto" and effective_tile(cfg.data) is None  # unresolved auto = one pass
    for method in ("ucad", "mtrmb", "patchcore_oracle"):
        cfg.method = method
        resolved = resolve_tiling(cfg, manifest, ["big", "small"])
        assert (resolved.data.image_size, resolved.data.tile, effective_tile(resolved.data)) == (128, 64, 64)
        assert cfg.data.tile == "auto" and cfg.data.image_size == 64  # the input config is not changed
    assert (resolve_tiling(cfg, manifest, ["small"]).data.image_size, resolve_tiling(cfg, manifest, ["small"]).data.tile) == (64, None)
    cfg.method = "iuf"  # methods with their own extractor never tile
    assert (resolve_tiling(cfg, manifest, ["big"]).data.image_size, resolve_tiling(cfg, manifest, ["big"]).data.tile) == (64, None)
    cfg.method, cfg.data.tile = "ucad", None
    assert resolve_tiling(cfg, manifest, ["big"]).data.tile is None  # explicit values are kept
    cfg.data.tile = 32
    assert resolve_tiling(cfg, manifest, ["big"]).data == cfg.data


def test_tile_config_values() -> None:
    assert load_config(REPO_ROOT / "params.yaml").data.tile == "auto"
    assert load_config(REPO_ROOT / "params.yaml", ["data.tile=224"]).data.tile == 224
    assert load_config(REPO_ROOT / "params.yaml", ["data.tile=null"]).data.tile is None
    with pytest.raises(ConfigError, match="data.tile"):
        load_config(REPO_ROOT / "params.yaml", ["data.tile=16"])
    with pytest.raises(ConfigError, match="data.tile"):
        load_config(REPO_ROOT / "params.yaml", ["data.tile=big"])
