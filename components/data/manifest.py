"""The dataset manifest: one table row per image, whatever the on-disk layout.

Columns (``MANIFEST_COLUMNS``): ``product, split (train|test), label (0 good / 1 defective),
defect_type ("good" for good images), image_path, mask_path, depth_path (absolute str, "" when
absent), sha256 (of the image file), width, height`` (from the image header; 0 when unreadable,
which ``validate`` reports).

``read_dataset`` auto-detects the layout (MVTec AD / MPDD / real-ad, VisA, MVTec 3D-AD,
Eyecandies, generic folder) and dispatches to the readers in ``components/data/layouts/``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
from PIL import Image

from components.data.image_files import ImageRecord
from components.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["product", "split", "label", "defect_type", "image_path", "mask_path", "depth_path", "sha256", "width", "height"]
LAYOUTS = ("mvtec", "visa", "mvtec3d", "eyecandies", "folder")
def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header; (0, 0) when the header cannot be read."""
    try:
        with Image.open(path) as img:
            return int(img.size[0]), int(img.size[1])
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
        log.warning("cannot read image header of %s: %s", path, exc)
        return 0, 0


def records_to_manifest(records: Iterable[ImageRecord]) -> pd.DataFrame:
    """Hash and probe every record's image and build the manifest table (sorted, stable order)."""
    rows = []
    for rec in records:
        width, height = image_size(rec.image_path)
        rows.append(
            {
                "product": rec.product,
                "split": rec.split,
                "label": int(rec.label),
                "defect_type": rec.defect_type,
                "image_path": str(rec.image_path.resolve()),
                "mask_path": str(rec.mask_path.resolve()) if rec.mask_path else "",
                "depth_path": str(rec.depth_path.resolve()) if rec.depth_path else "",
                "sha256": file_sha256(rec.image_path),
                "width": width,
                "height": height,
            }
        )
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    df["label"] = df["label"].astype("int64")
    df["width"] = df["width"].astype("int64")
    df["height"] = df["height"].astype("int64")
    split_order = df["split"].map({"train": 0, "test": 1})
    df = df.assign(_s=split_order).sort_values(["product", "_s", "defect_type", "image_path"], kind="stable")
    return df.drop(columns="_s").reset_index(drop=True)


def empty_manifest() -> pd.DataFrame:
    """A manifest with the right columns and no rows."""
    return records_to_manifest([])


def _readers() -> dict[str, Callable[[Path], list[ImageRecord]]]:
    from components.data.layouts import eyecandies, folder, mvtec, mvtec3d, visa

    return {
        "visa": visa.read_visa,
        "mvtec3d": mvtec3d.read_mvtec3d,
        "mvtec": mvtec.read_mvtec,
        "eyecandies": eyecandies.read_eyecandies,
        "folder": folder.read_folder,
    }


def detect_layout(root: Path) -> str:
    """Name of the layout of ``root`` (one of ``LAYOUTS``); ``DataError`` when none matches."""
    from components.data.layouts import eyecandies, folder, mvtec, mvtec3d, visa

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory")
    for name, probe in (
        ("visa", visa.looks_like_visa),
        ("mvtec3d", mvtec3d.looks_like_mvtec3d),
        ("mvtec", mvtec.looks_like_mvtec),
        ("eyecandies", eyecandies.looks_like_eyecandies),
        ("folder", folder.looks_like_folder),
    ):
        if probe(root):
            return name
    raise DataError(
        f"{root}: unknown dataset layout. Expected one of: MVTec AD (<product>/train/good, test/<defect>, "
        "ground_truth/<defect>), VisA (split_csv/1cls.csv), MVTec 3D-AD (<product>/train/good/rgb + xyz), "
        "Eyecandies (<product>/train/data/*_image_0.png), or a folder layout (normal/, abnormal/, mask/)"
    )


def read_dataset(root: Path, layout: str = "auto", products: list[str] | None = None) -> pd.DataFrame:
    """Read every image of the dataset at ``root`` into one manifest (optionally only ``products``)."""
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown dataset layout {layout!r} for {root}; choose one of {', '.join(LAYOUTS)} or auto")
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory")
    records = _readers()[layout](root)
    if not records:
        raise DataError(f"{root}: no images found for layout {layout!r}")
    if products is not None:
        available = sorted({r.product for r in records})
        unknown = [p for p in products if p not in available]
        if unknown:
            raise DataError(f"{root}: unknown product(s) {unknown}; available: {available}")
        wanted = set(products)
        records = [r for r in records if r.product in wanted]
    log.info("reading %d images (%s layout) from %s", len(records), layout, root)
    return records_to_manifest(records)


def read_product(product_dir: Path, name: str) -> pd.DataFrame:
    """Manifest of one MVTec-layout product folder (``train/good``, ``test/*``, ``ground_truth/*``)."""
    from components.data.layouts.mvtec import read_mvtec_product

    product_dir = Path(product_dir)
    if not (product_dir / "train").is_dir():
        raise DataError(f"{product_dir}: not an MVTec-layout product folder (no train/ directory)")
    records = read_mvtec_product(product_dir, name)
    if not records:
        raise DataError(f"{product_dir}: no images found")
    return records_to_manifest(records)


def count_test_images(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """``{product: {"good": n, "defective": n}}`` of the test split (products without test images left out):
    how many images every test metric of a product rests on (``components.eval.chance``)."""
    test = manifest[manifest["split"] == "test"]
    return {str(product): {"good": int((rows["label"] == 0).sum()), "defective": int((rows["label"] == 1).sum())}
            for product, rows in test.groupby("product", sort=True)}


def untested_products(manifest: pd.DataFrame) -> list[str]:
    """Products with no test images: valid (normal images only) but not evaluable by AUROC."""
    tested = set(manifest.loc[manifest["split"] == "test", "product"])
    return sorted(set(manifest["product"]) - tested)
