"""Generic folder layout: a folder of normal images, one of abnormal images, one of masks.

```
<product>/normal/*.png           (also: good, ok)
<product>/normal_test/*.png      (optional: normal test images; see below)
<product>/abnormal/*.png         (also: anomaly, defect, defective, bad, ng; sub-folders = defect types)
<product>/mask/<stem>[_mask].png (also: masks, ground_truth, gt; may mirror abnormal sub-folders)
```
``root`` is one product (named after the folder) or a folder of such products. Without
``normal_test/``, every fifth normal image (chosen by a hash of its file name, so the choice is
stable when files are added) becomes a good *test* image; the rest are training images.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from components.data.image_files import ImageRecord, is_image_file, list_images, read_product_folders, visible_subdirs

NORMAL_DIRS = ("normal", "good", "ok")
ABNORMAL_DIRS = ("abnormal", "anomaly", "anomalous", "defect", "defective", "bad", "ng")
MASK_DIRS = ("mask", "masks", "ground_truth", "gt")
NORMAL_TEST_DIR = "normal_test"
TEST_EVERY = 5
ABNORMAL_TYPE = "abnormal"


def _first_dir(product: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (product / name).is_dir():
            return product / name
    return None


def _is_product(directory: Path) -> bool:
    return _first_dir(directory, NORMAL_DIRS) is not None


def looks_like_folder(root: Path) -> bool:
    return _is_product(root) or any(_is_product(d) for d in visible_subdirs(root))


def _find_mask(mask_dir: Path | None, defect: str, stem: str) -> Path | None:
    if mask_dir is None:
        return None
    for folder in (mask_dir / defect, mask_dir):
        for candidate in (f"{stem}_mask", stem):
            for suffix in (".png", ".PNG", ".bmp", ".jpg", ".tif", ".tiff"):
                if is_image_file(folder / f"{candidate}{suffix}"):
                    return folder / f"{candidate}{suffix}"
    return None


def _held_for_test(path: Path) -> bool:
    return zlib.crc32(path.name.encode()) % TEST_EVERY == 0


def read_folder_product(product: Path, name: str) -> list[ImageRecord]:
    normal_dir = _first_dir(product, NORMAL_DIRS)
    normals = list_images(normal_dir) if normal_dir else []
    normal_test = list_images(product / NORMAL_TEST_DIR)
    if not normal_test:
        normal_test = [p for p in normals if _held_for_test(p)]
        if not normal_test and len(normals) >= 2:
            normal_test = [normals[-1]]
        held = set(normal_test)
        normals = [p for p in normals if p not in held]
    records = [ImageRecord(name, "train", 0, "good", p) for p in normals]
    records += [ImageRecord(name, "test", 0, "good", p) for p in normal_test]
    abnormal_dir = _first_dir(product, ABNORMAL_DIRS)
    mask_dir = _first_dir(product, MASK_DIRS)
    if abnormal_dir is not None:
        groups = [(ABNORMAL_TYPE, list_images(abnormal_dir))] + [(d.name, list_images(d)) for d in visible_subdirs(abnormal_dir)]
        for defect, images in groups:
            for image in images:
                records.append(ImageRecord(name, "test", 1, defect, image, mask_path=_find_mask(mask_dir, defect, image.stem)))
    return records


def read_folder(root: Path) -> list[ImageRecord]:
    """Records of every product folder under ``root`` (or of ``root`` itself when it is one)."""
    return read_product_folders(root, _is_product, read_folder_product)
