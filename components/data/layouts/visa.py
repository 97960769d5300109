"""VisA in its original layout, driven by ``split_csv/1cls.csv``.

The CSV has columns ``object, split, label, image, mask``; ``label`` is ``normal`` or ``anomaly``;
``image``/``mask`` are relative to the dataset root. (VisA converted to per-class MVTec folders
is read by the MVTec reader: its ``ground_truth/bad/<stem>.png`` masks are found there too.)
"""

from __future__ import annotations

import csv
from pathlib import Path

from components.data.image_files import ImageRecord
from components.errors import DataError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
REQUIRED_COLUMNS = ("object", "split", "label", "image", "mask")
DEFECT_TYPE = "bad"


def looks_like_visa(root: Path) -> bool:
    return (root / SPLIT_CSV).is_file()


def _record(root: Path, csv_path: Path, line: int, row: dict[str, str]) -> ImageRecord:
    split = row["split"].strip().lower()
    label_text = row["label"].strip().lower()
    if split not in ("train", "test"):
        raise DataError(f"{csv_path}:{line}: split must be train or test, got {row['split']!r}")
    if label_text not in ("normal", "anomaly"):
        raise DataError(f"{csv_path}:{line}: label must be normal or anomaly, got {row['label']!r}")
    label = int(label_text == "anomaly")
    mask = (row.get("mask") or "").strip()
    return ImageRecord(
        product=row["object"].strip(),
        split=split,
        label=label,
        defect_type=DEFECT_TYPE if label else "good",
        image_path=root / row["image"].strip(),
        mask_path=(root / mask) if (label and mask) else None,
    )


def read_visa(root: Path) -> list[ImageRecord]:
    """Records of every row of ``split_csv/1cls.csv``."""
    csv_path = root / SPLIT_CSV
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")
        records = [_record(root, csv_path, i + 2, row) for i, row in enumerate(reader)]
    for rec in records:
        if not rec.image_path.is_file():
            raise DataError(f"{csv_path}: image {rec.image_path} listed for {rec.product} does not exist")
    return records
