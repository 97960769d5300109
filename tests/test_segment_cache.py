"""Content-addressed mask cache: hits, corruption, PNG encoding, builds (resume, parallel) and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import MasksConfig, load_config
from components.segment.cache import (
    MaskCache,
    build_cache,
    build_command,
    decode_label_png,
    encode_label_png,
    label_maps_for,
)
from components.segment.classical import FelzenszwalbProvider
from components.segment.provider import MaskProvider
from flows.cli import main as cli_main
from tests.segment_support import CountingProvider, object_image, write_png

CFG = MasksConfig(image_size=64, workers=1)


def counting(cfg: MasksConfig = CFG, **kwargs: int) -> CountingProvider:
    return CountingProvider(FelzenszwalbProvider(cfg), **kwargs)


def make_images(root: Path, n: int) -> list[Path]:
    return [write_png(root / f"img_{i}.png", object_image(size=72, seed=i)[0]) for i in range(n)]


def test_get_computes_once_then_hits(tmp_path: Path) -> None:
    (path,) = make_images(tmp_path, 1)
    provider = counting()
    cache = MaskCache(tmp_path / "cache", CFG, provider=provider)
    first = cache.get(path, "p")
    second = MaskCache(tmp_path / "cache", CFG, provider=provider).get(path, "p")
    assert provider.calls == 1
    assert np.array_equal(first, second) and first.shape == (64, 64) and first.dtype == np.int32
    entry = json.loads(next(cache.directory.glob("*.json")).read_text())
    assert entry["provider"] == "felzenszwalb" and entry["labels"] == int(first.max())
    assert entry["config"] == {"felzenszwalb": CFG.felzenszwalb.model_dump(mode="json")}
    assert entry["image_sha256"] == next(cache.directory.glob("*.png")).stem


def test_other_config_is_a_different_key(tmp_path: Path) -> None:
    (path,) = make_images(tmp_path, 1)
    cfg_b = CFG.model_copy(update={"felzenszwalb": CFG.felzenszwalb.model_copy(update={"scale": 20.0})})
    a, b = counting(CFG), counting(cfg_b)
    MaskCache(tmp_path / "cache", CFG, provider=a).get(path, "p")
    MaskCache(tmp_path / "cache", cfg_b, provider=b).get(path, "p")
    assert a.calls == b.calls == 1
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_same_bytes_at_two_paths_share_one_entry(tmp_path: Path) -> None:
    (path,) = make_images(tmp_path, 1)
    copy = tmp_path / "copy.png"
    copy.write_bytes(path.read_bytes())
    provider = counting()
    cache = MaskCache(tmp_path / "cache", CFG, provider=provider)
    cache.get(path, "p")
    cache.get(copy, "p")
    assert provider.calls == 1


@pytest.mark.parametrize("damage", ["truncate_png", "garbage_json", "other_png", "png_only", "wrong_config"])
def test_corrupt_entries_are_detected_and_rebuilt(tmp_path: Path, damage: str) -> None:
    (path,) = make_images(tmp_path, 1)
    provider = counting()
    cache = MaskCache(tmp_path / "cache", CFG, provider=provider)
    good = cache.get(path, "p")
    key = next(cache.directory.glob("*.png")).stem
    png, entry = cache.png_path(key), cache.entry_path(key)
    if damage == "truncate_png":
        png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    elif damage == "garbage_json":
        entry.write_text("{not json")
    elif damage == "other_png":
        png.write_bytes(encode_label_png(np.ones((64, 64), np.int32)))
    elif damage == "png_only":
        entry.unlink()
    else:
        data = json.loads(entry.read_text())
        entry.write_text(json.dumps({**data, "config_hash": "0" * 64}))
    assert cache.status(key).state == "corrupt"
    assert np.array_equal(cache.get(path, "p"), good)
    assert provider.calls == 2
    assert cache.status(key).state == "ok"


def test_png_is_uint16_only_when_needed() -> None:
    small = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 200
    big = np.arange(64 * 64, dtype=np.int32).reshape(64, 64)
    assert Image.open(__import__("io").BytesIO(encode_label_png(small))).mode == "L"
    assert np.array_equal(decode_label_png(encode_label_png(small)), small)
    assert np.array_equal(decode_label_png(encode_label_png(big)), big)
    with pytest.raises(ValueError):
        encode_label_png(np.full((2, 2), 70000))


class ManyLabelsProvider(MaskProvider):
    """Every pixel its own label (> 255 labels)."""

    name = "felzenszwalb"

    def _segment(self, image: np.ndarray, product: str) -> np.ndarray:
        return np.arange(1, image.shape[0] * image.shape[1] + 1).reshape(image.shape[:2])


def test_many_labels_round_trip_through_cache(tmp_path: Path) -> None:
    (path,) = make_images(tmp_path, 1)
    cache = MaskCache(tmp_path / "cache", CFG, provider=ManyLabelsProvider(CFG))
    labels = cache.get(path, "p")
    assert labels.max() == 64 * 64
    assert cache.status(next(cache.directory.glob("*.png")).stem).state == "ok"
    assert np.array_equal(MaskCache(tmp_path / "cache", CFG).get(path, "p"), labels)  # read back, not recomputed


def test_label_maps_for_resizes_nearest(tmp_path: Path) -> None:
    paths = [str(p) for p in make_images(tmp_path, 2)]
    maps = label_maps_for(paths, ["p", "p"], CFG, tmp_path / "cache", image_size=32)
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.int64
    native = MaskCache(tmp_path / "cache", CFG).get(paths[0], "p")
    assert set(maps[0].unique().tolist()) <= set(np.unique(native).tolist())  # ids never interpolated
    assert label_maps_for([], [], CFG, tmp_path / "cache", image_size=32).shape == (0, 32, 32)


def test_build_skips_cached_and_rebuilds_corrupt(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 4)
    items = [(str(p), "p") for p in paths]
    provider = counting()
    cache = MaskCache(tmp_path / "cache", CFG, provider=provider)
    summary = build_cache(cache, items)
    assert summary.as_dict() == {"total": 4, "cached": 0, "built": 4, "rebuilt": 0}
    assert build_cache(cache, items).as_dict() == {"total": 4, "cached": 4, "built": 0, "rebuilt": 0}
    assert provider.calls == 4
    next(cache.directory.glob("*.png")).write_bytes(b"\x89PNG broken")
    assert build_cache(cache, items).as_dict() == {"total": 4, "cached": 3, "built": 0, "rebuilt": 1}
    assert provider.calls == 5
    index = json.loads((cache.directory / "index.json").read_text())
    assert len(index["entries"]) == 4 and index["provider"] == "felzenszwalb"


def test_interrupted_build_keeps_finished_work_and_resumes(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 5)
    items = [(str(p), "p") for p in paths]
    interrupted = counting(interrupt_on_call=3)
    cache = MaskCache(tmp_path / "cache", CFG, provider=interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cache, items)
    assert len(list(cache.directory.glob("*.png"))) == 2
    assert len(json.loads((cache.directory / "index.json").read_text())["entries"]) == 2
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (cache.directory / f".leftover.png.{dead.stdout.strip()}.abc.tmp").write_bytes(b"partial")  # a killed writer's temp file
    resumed = counting()
    summary = build_cache(MaskCache(tmp_path / "cache", CFG, provider=resumed), items)
    assert summary.as_dict() == {"total": 5, "cached": 2, "built": 3, "rebuilt": 0}
    assert resumed.calls == 3
    assert not list(cache.directory.glob(".*.tmp"))


def test_parallel_build_matches_serial(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", 4)
    items = [(str(p), "p") for p in paths]
    cfg = CFG.model_copy(update={"workers": 2})
    summary = build_cache(MaskCache(tmp_path / "parallel", cfg), items, workers=2)
    assert summary.built == 4
    serial = MaskCache(tmp_path / "serial", cfg, provider=FelzenszwalbProvider(cfg))
    parallel = MaskCache(tmp_path / "parallel", cfg, provider=counting(cfg))
    for path in paths:
        assert np.array_equal(parallel.get(path, "p"), serial.get(path, "p"))
    assert parallel.provider.calls == 0  # type: ignore[attr-defined]


def write_mvtec(root: Path, product: str, n_train: int, n_test: int, seed: int = 0) -> None:
    for i in range(n_train):
        write_png(root / product / "train" / "good" / f"{i:03d}.png", object_image(size=72, seed=seed + i)[0])
    for i in range(n_test):
        write_png(root / product / "test" / "good" / f"{i:03d}.png", object_image(size=72, seed=seed + 100 + i)[0])


def test_build_command_caches_training_images_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_mvtec(data, "bolt", n_train=3, n_test=2)
    write_mvtec(data, "nut", n_train=2, n_test=1, seed=50)
    cfg = load_config(None, ["masks.image_size=64", "masks.workers=1"])
    assert build_command(cfg, data_dir=data, cache_dir=tmp_path / "cache") == 0
    cache = MaskCache(tmp_path / "cache", cfg.masks)
    entries = list(cache.entries())
    assert len(entries) == 5 and {e["product"] for e in entries} == {"bolt", "nut"}
    assert all("/train/" in e["image_path"] for e in entries)
    only_nut = load_config(None, ["masks.image_size=64", "masks.workers=1", "data.products=nut", "masks.provider=slic"])
    assert build_command(only_nut, data_dir=data, cache_dir=tmp_path / "cache") == 0
    assert len(list(MaskCache(tmp_path / "cache", only_nut.masks).entries())) == 2


def test_cli_masks_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_mvtec(data, "bolt", n_train=2, n_test=1)
    argv = ["masks", "build", str(data), "masks.image_size=64", "masks.workers=1", "--out", str(tmp_path / "cache")]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0
    assert "2 images, 2 cached, 0 built" in capsys.readouterr().out
    assert cli_main(["masks", "build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "cache")]) == 2
