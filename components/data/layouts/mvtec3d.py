"""MVTec 3D-AD layout: RGB images with organised point clouds (``xyz/*.tiff``) and ``gt`` masks.

```
<root>/<product>/train/good/{rgb/NNN.png, xyz/NNN.tiff}
<root>/<product>/validation/good/{rgb, xyz}      (normal images; read as split "train")
<root>/<product>/test/<type>/{rgb, xyz, gt/NNN.png}
```
``depth_path`` is the ``xyz`` TIFF; ``mask_path`` the ``gt`` PNG of defective test images.
"""

from __future__ import annotations

from pathlib import Path

from components.data.image_files import ImageRecord, is_image_file, list_images, read_product_folders, visible_subdirs

GOOD = "good"
SPLITS = (("train", "train"), ("validation", "train"), ("test", "test"))
TRAINING_SPLITS = SPLITS[:2]  # the normals the pipeline trains on (test/ is not listed)


def _is_product(directory: Path) -> bool:
    return (directory / "train" / GOOD / "rgb").is_dir()


def looks_like_mvtec3d(root: Path) -> bool:
    return _is_product(root) or any(_is_product(d) for d in visible_subdirs(root))


def _sibling(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if is_image_file(path):
            return path
    return None


def read_mvtec3d_product(product_dir: Path, name: str, splits: tuple[tuple[str, str], ...] = SPLITS) -> list[ImageRecord]:
    """Records of one product's ``splits`` folders (folder, split it is read as)."""
    records: list[ImageRecord] = []
    for folder, split in splits:
        for type_dir in visible_subdirs(product_dir / folder):
            defect = type_dir.name
            label = int(defect != GOOD)
            for image in list_images(type_dir / "rgb"):
                depth = _sibling(type_dir / "xyz", image.stem, (".tiff", ".tif"))
                mask = _sibling(type_dir / "gt", image.stem, (".png", ".PNG")) if label else None
                records.append(ImageRecord(name, split, label, defect, image, mask_path=mask, depth_path=depth))
    return records


def read_mvtec3d(root: Path) -> list[ImageRecord]:
    """Records of every product folder under ``root`` (or of ``root`` itself when it is one)."""
    return read_product_folders(root, _is_product, read_mvtec3d_product)
