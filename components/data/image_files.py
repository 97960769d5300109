"""Image files of a dataset folder as layout readers find them: ``ImageRecord`` and the folder helpers every
layout reader shares (``components.data.layouts``); ``components.data.manifest`` turns records into a manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class ImageRecord:
    """One image as found by a layout reader, before hashing and size probing."""

    product: str
    split: str
    label: int
    defect_type: str
    image_path: Path
    mask_path: Path | None = None
    depth_path: Path | None = None


def is_image_file(path: Path) -> bool:
    """A visible regular file with an image suffix."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name ([] when it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if is_image_file(p))


def visible_subdirs(directory: Path) -> list[Path]:
    """Sub-directories whose name does not start with a dot or underscore, sorted."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def read_product_folders(
    root: Path, is_product: Callable[[Path], bool], read_product: Callable[[Path, str], list[ImageRecord]]
) -> list[ImageRecord]:
    """Records of ``root`` when it is one product folder, else of every product folder directly under it."""
    products = [root] if is_product(root) else [d for d in visible_subdirs(root) if is_product(d)]
    return [record for product in products for record in read_product(product, product.name)]
