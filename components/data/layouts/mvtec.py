"""MVTec AD layout (also MPDD, the real-ad sets, and VisA converted to per-class folders).

```
<root>/<product>/train/good/*.png
<root>/<product>/test/good/*.png
<root>/<product>/test/<defect>/*.png
<root>/<product>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png, as in converted VisA)
```
``root`` may also be a single product folder. Hidden folders (``.synth_meta``) and folders with
neither ``train/`` nor ``test/`` are not products.
"""

from __future__ import annotations

import logging
from pathlib import Path

from components.data.image_files import ImageRecord, is_image_file, list_images, visible_subdirs

log = logging.getLogger(__name__)

GOOD = "good"


def is_mvtec_product(directory: Path) -> bool:
    """A folder with ``train/`` or ``test/`` holding image sub-folders of the MVTec kind."""
    train_good = directory / "train" / GOOD
    if train_good.is_dir() and not (train_good / "rgb").is_dir():
        return True
    test = directory / "test"
    return test.is_dir() and any(list_images(d) for d in visible_subdirs(test))


def product_dirs(root: Path) -> list[Path]:
    """The product folders under ``root`` (``[root]`` when root itself is one product)."""
    if (root / "train" / GOOD).is_dir() and is_mvtec_product(root):
        return [root]
    return [d for d in visible_subdirs(root) if is_mvtec_product(d)]


def looks_like_mvtec(root: Path) -> bool:
    return bool(product_dirs(root))


def find_mask(ground_truth: Path, defect: str, stem: str) -> Path | None:
    """The mask of image ``stem``: ``<stem>_mask.*`` or ``<stem>.*`` under ``ground_truth/<defect>``."""
    folder = ground_truth / defect
    for candidate_stem in (f"{stem}_mask", stem):
        for suffix in (".png", ".PNG", ".bmp", ".jpg", ".tif", ".tiff"):
            path = folder / f"{candidate_stem}{suffix}"
            if is_image_file(path):
                return path
    return None


def read_mvtec_product(product_dir: Path, name: str) -> list[ImageRecord]:
    """Records of one product folder: train/good, then test/<type>, masks from ground_truth/."""
    records = [ImageRecord(name, "train", 0, GOOD, p) for p in list_images(product_dir / "train" / GOOD)]
    ground_truth = product_dir / "ground_truth"
    for type_dir in visible_subdirs(product_dir / "test"):
        defect = type_dir.name
        for image in list_images(type_dir):
            if defect == GOOD:
                records.append(ImageRecord(name, "test", 0, GOOD, image))
            else:
                records.append(ImageRecord(name, "test", 1, defect, image, mask_path=find_mask(ground_truth, defect, image.stem)))
    return records


def read_mvtec(root: Path) -> list[ImageRecord]:
    """Records of every product folder under ``root``."""
    records: list[ImageRecord] = []
    for product_dir in product_dirs(root):
        records.extend(read_mvtec_product(product_dir, product_dir.name))
    return records
