"""Eyecandies layout: RGB (several lightings) + depth per sample, flat ``data/`` folders.

```
<root>/<Product>/train/data/NNN_image_0..5.png, NNN_depth.png, NNN_normals.png
<root>/<Product>/val/data/...                      (normal; read as split "train")
<root>/<Product>/test_public/data/... + NNN_mask.png, NNN_metadata.yaml (anomalous: 0|1)
```
The image is ``NNN_image_5.png`` (all lights) when present, else the lowest-numbered one.
A test sample is defective when its metadata says ``anomalous: 1`` (or, without metadata,
when its mask has any foreground pixel).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from components.data.image_files import ImageRecord, read_product_folders, visible_subdirs
from components.errors import DataError

SPLITS = (("train", "train"), ("val", "train"), ("test_public", "test"))
IMAGE_RE = re.compile(r"^(?P<sid>.+)_image_(?P<light>\d+)\.png$")
PREFERRED_LIGHT = 5


def _is_product(directory: Path) -> bool:
    data = directory / "train" / "data"
    return data.is_dir() and any(IMAGE_RE.match(p.name) for p in data.iterdir())


def looks_like_eyecandies(root: Path) -> bool:
    return _is_product(root) or any(_is_product(d) for d in visible_subdirs(root))


def _samples(data: Path) -> dict[str, Path]:
    """Sample id -> chosen image path."""
    lights: dict[str, dict[int, Path]] = {}
    for path in sorted(data.iterdir()):
        match = IMAGE_RE.match(path.name)
        if match:
            lights.setdefault(match["sid"], {})[int(match["light"])] = path
    return {sid: by_light.get(PREFERRED_LIGHT, by_light[min(by_light)]) for sid, by_light in sorted(lights.items())}


def _is_anomalous(data: Path, sid: str) -> bool:
    meta = data / f"{sid}_metadata.yaml"
    if meta.is_file():
        try:
            content = yaml.safe_load(meta.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{meta}: not valid YAML: {exc}") from exc
        return bool(int(content.get("anomalous", 0)))
    mask = data / f"{sid}_mask.png"
    if not mask.is_file():
        return False
    with Image.open(mask) as img:
        return bool(np.asarray(img).any())


def read_eyecandies_product(product_dir: Path, name: str) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    for folder, split in SPLITS:
        data = product_dir / folder / "data"
        if not data.is_dir():
            continue
        for sid, image in _samples(data).items():
            depth = data / f"{sid}_depth.png"
            depth_path = depth if depth.is_file() else None
            label = int(split == "test" and _is_anomalous(data, sid))
            mask = data / f"{sid}_mask.png" if label else None
            records.append(ImageRecord(name, split, label, "anomalous" if label else "good", image, mask_path=mask, depth_path=depth_path))
    return records


def read_eyecandies(root: Path) -> list[ImageRecord]:
    """Records of every product folder under ``root`` (or of ``root`` itself when it is one)."""
    return read_product_folders(root, _is_product, read_eyecandies_product)
