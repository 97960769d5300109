"""``contad data validate``: a Great Expectations suite on the manifest plus image-level checks.

Every problem becomes one ``ValidationFailure(rule, path, message)`` naming the offending file,
so a failed validation lists every bad file with the rule it broke. Validation never modifies
the data and never writes into it: the JSON report goes to ``OUT/validation_report.json`` (``--out``)
or by default to ``runs/validation/<root name>_validation_report.json``.

Rules:
  layout               the root is not a readable dataset layout
  manifest_schema      GX: manifest columns, non-null values, split/label sets, unique paths, sha256 format
  label_consistency    GX: defect_type is "good" exactly for label 0; train images are all good
  train_test_overlap   GX: an image file (sha256) appears in both train and test
  image_size           GX + decode: width/height outside [MIN_SIDE, MAX_SIDE]
  image_unreadable     the image cannot be fully decoded (e.g. a truncated PNG)
  mask_missing         a defective test image has no mask file
  mask_unreadable      the mask cannot be fully decoded
  mask_size_mismatch   mask and image differ in size
  mask_not_binary      the mask has more than two values
  mask_empty           the mask of a defective image has no foreground pixel
  mask_for_good_image  a good image has a mask (MVTec ``ground_truth/good``)
  orphan_mask          a mask file whose image does not exist
  train_good_empty     a product has no train/good images
Not a failure: a product with only ``train/good`` images (no ``test/``) is valid but flagged
``not_evaluable`` in the report (a new product on a real line arrives with normal images only).
  duplicate_product    two product names differ only by case
  depth_missing        an MVTec 3D-AD rgb image has no xyz TIFF
  depth_unreadable     the xyz TIFF (``depth_path``) cannot be read
  depth_format         the xyz array is not float32 of shape (H, W, 3)
  depth_size_mismatch  xyz and rgb differ in height/width
  depth_not_finite     the xyz array holds NaN or inf values
  depth_few_valid      the share of valid points (not all-zero xyz) is below ``min_valid_fraction``
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from components.atomic import atomic_write_json
from components.data.image_files import IMAGE_SUFFIXES, visible_subdirs
from components.data.manifest import MANIFEST_COLUMNS, detect_layout, read_dataset, untested_products
from components.errors import DataError

log = logging.getLogger(__name__)

REPORT_NAME = "validation_report.json"
FALLBACK_REPORT_DIR = Path("runs") / "validation"
MIN_SIDE = 16
MAX_SIDE = 16384
DECODE_THREADS = 2
EXIT_INVALID = 2  # the exit code of a dataset that fails validation: invalid input (``contad --help``)
DEFAULT_MIN_VALID_FRACTION = 0.05


@dataclass(frozen=True)
class ValidationFailure:
    """One broken rule for one file."""

    rule: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.path}: {self.message}"


@dataclass
class ValidationReport:
    """Outcome of validating one dataset root."""

    root: str
    layout: str = ""
    failures: list[ValidationFailure] = field(default_factory=list)
    products: dict[str, dict[str, int]] = field(default_factory=dict)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    manifest: pd.DataFrame | None = field(default=None, repr=False)
    not_evaluable: list[str] = field(default_factory=list)  # valid products without test images

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "ok": self.ok,
            "layout": self.layout,
            "n_images": 0 if self.manifest is None else int(len(self.manifest)),
            "products": self.products,
            "not_evaluable": self.not_evaluable,
            "n_failures": len(self.failures),
            "failures": [{"rule": f.rule, "path": f.path, "message": f.message} for f in self.failures],
            "expectations": self.expectations,
        }

    def describe(self) -> str:
        """Human-readable summary; lists every failure."""
        if self.ok:
            parts = ", ".join(f"{name} ({c['train']} train, {c['test_good']} good + {c['test_defective']} defective test)" for name, c in self.products.items())
            flag = f"; not evaluable (normal images only, no test images): {', '.join(self.not_evaluable)}" if self.not_evaluable else ""
            return f"dataset {self.root} is valid ({self.layout} layout): {parts}{flag}"
        lines = [f"dataset {self.root} FAILED validation: {len(self.failures)} problem(s)"]
        lines += [f"  {failure}" for failure in self.failures]
        return "\n".join(lines)


# --- Great Expectations suite on the manifest -------------------------------------------------


def _with_derived_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """Manifest plus boolean columns the suite checks row by row."""
    df = manifest.copy()
    df["label_matches_type"] = (df["label"] == 0) == (df["defect_type"] == "good")
    df["train_is_good"] = (df["split"] != "train") | (df["label"] == 0)
    splits_per_hash = df.groupby("sha256")["split"].transform("nunique")
    df["in_one_split"] = splits_per_hash <= 1
    return df


def _expectations() -> list[tuple[str, Any]]:
    """(rule, GX expectation) pairs of the manifest suite."""
    import great_expectations.expectations as gxe

    suite: list[tuple[str, Any]] = [("manifest_schema", gxe.ExpectTableColumnsToMatchSet(column_set=MANIFEST_COLUMNS + ["label_matches_type", "train_is_good", "in_one_split"], exact_match=True))]
    suite += [("manifest_schema", gxe.ExpectColumnValuesToNotBeNull(column=c)) for c in MANIFEST_COLUMNS]
    suite += [
        ("manifest_schema", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "test"])),
        ("manifest_schema", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1])),
        ("manifest_schema", gxe.ExpectColumnValuesToBeUnique(column="image_path")),
        ("manifest_schema", gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$")),
        ("image_size", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=MIN_SIDE, max_value=MAX_SIDE)),
        ("image_size", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=MIN_SIDE, max_value=MAX_SIDE)),
        ("label_consistency", gxe.ExpectColumnValuesToBeInSet(column="label_matches_type", value_set=[True])),
        ("label_consistency", gxe.ExpectColumnValuesToBeInSet(column="train_is_good", value_set=[True])),
        ("train_test_overlap", gxe.ExpectColumnValuesToBeInSet(column="in_one_split", value_set=[True])),
    ]
    return suite


def _gx_context() -> Any:
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    return context


def run_manifest_suite(manifest: pd.DataFrame) -> tuple[list[ValidationFailure], list[dict[str, Any]]]:
    """Validate the manifest with a GX suite; one failure per unexpected row (or per table-level miss)."""
    import great_expectations as gx

    df = _with_derived_columns(manifest).reset_index(drop=True)
    context = _gx_context()
    batch = (
        context.data_sources.add_pandas("contad_manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole_manifest")
        .get_batch(batch_parameters={"dataframe": df})
    )
    rules = _expectations()
    suite = gx.ExpectationSuite(name="contad_manifest_suite")
    for rule, expectation in rules:
        expectation.meta = {"rule": rule}
        suite.add_expectation(expectation)
    suite = context.suites.add(suite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    failures: list[ValidationFailure] = []
    summary: list[dict[str, Any]] = []
    for item in result.results:
        config = item.expectation_config
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        rule = (config.meta or {}).get("rule", config.type)
        summary.append({"expectation": config.type, "kwargs": _jsonable(kwargs), "success": bool(item.success), "rule": rule})
        if item.success:
            continue
        indices = (item.result or {}).get("unexpected_index_list") or []
        if not indices:
            failures.append(ValidationFailure(rule, "<manifest>", f"{config.type} failed for {kwargs}: {_jsonable(item.result)}"))
        for index in indices:
            row = df.iloc[int(index)]
            failures.append(ValidationFailure(rule, str(row["image_path"]), _row_message(config.type, kwargs, row, df)))
    return failures, summary


def _row_message(expectation: str, kwargs: dict[str, Any], row: pd.Series, df: pd.DataFrame) -> str:
    column = kwargs.get("column", "")
    if column == "in_one_split":
        others = df[(df["sha256"] == row["sha256"]) & (df["split"] != row["split"])]["image_path"].tolist()
        return f"identical file (sha256 {str(row['sha256'])[:12]}) is in {row['split']} and in {'test' if row['split'] == 'train' else 'train'}: {others}"
    if column == "label_matches_type":
        return f"label {row['label']} contradicts defect type {row['defect_type']!r}"
    if column == "train_is_good":
        return f"training image with label {row['label']} (training data must be good)"
    if column in ("width", "height"):
        return f"{column} {row[column]} outside [{MIN_SIDE}, {MAX_SIDE}] (0 = unreadable header)"
    return f"{expectation} failed for column {column!r}: value {row.get(column)!r}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --- image-level checks -------------------------------------------------------------------------


def _decode(path: str) -> tuple[np.ndarray | None, str]:
    """Fully decode an image (``load()``), returning (array, "") or (None, error)."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img), ""
    except Exception as exc:  # noqa: BLE001 - any decoder error means unreadable
        return None, f"{type(exc).__name__}: {exc}"


def check_depth(depth_path: str, image: np.ndarray | None, min_valid_fraction: float) -> list[ValidationFailure]:
    """Rules of one organised point cloud: readable, float32 (H, W, 3), rgb size, finite, enough valid points."""
    import tifffile

    try:
        xyz = tifffile.imread(depth_path)
    except Exception as exc:  # noqa: BLE001 - any reader error means unreadable
        return [ValidationFailure("depth_unreadable", depth_path, f"cannot read xyz tiff: {type(exc).__name__}: {exc}")]
    if xyz.dtype != np.float32 or xyz.ndim != 3 or xyz.shape[2] != 3:
        return [ValidationFailure("depth_format", depth_path, f"xyz is {xyz.dtype} of shape {xyz.shape}, expected float32 (H, W, 3)")]
    failures = []
    if image is not None and xyz.shape[:2] != image.shape[:2]:
        failures.append(ValidationFailure("depth_size_mismatch", depth_path, f"xyz is {xyz.shape[1]}x{xyz.shape[0]}, rgb is {image.shape[1]}x{image.shape[0]}"))
    finite = np.isfinite(xyz)
    if not finite.all():
        failures.append(ValidationFailure("depth_not_finite", depth_path, f"{int((~finite).any(axis=-1).sum())} points hold NaN or inf"))
    valid = finite.all(axis=-1) & (xyz != 0).any(axis=-1)
    fraction = float(valid.mean()) if valid.size else 0.0
    if fraction < min_valid_fraction:
        failures.append(ValidationFailure("depth_few_valid", depth_path, f"only {fraction:.1%} of the points are valid (minimum {min_valid_fraction:.1%})"))
    return failures


def _check_row(row: dict[str, Any], min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION) -> list[ValidationFailure]:
    """Decode one image (and its mask and xyz) and check readability, size, mask and depth rules."""
    failures: list[ValidationFailure] = []
    image_path = row["image_path"]
    image, error = _decode(image_path)
    if image is None:
        failures.append(ValidationFailure("image_unreadable", image_path, f"cannot decode image: {error}"))
    else:
        height, width = image.shape[:2]
        if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
            failures.append(ValidationFailure("image_size", image_path, f"decoded size {width}x{height} outside [{MIN_SIDE}, {MAX_SIDE}]"))
    if row.get("depth_path"):
        failures += check_depth(row["depth_path"], image, min_valid_fraction)
    mask_path = row["mask_path"]
    if int(row["label"]) == 1:
        if not mask_path:
            failures.append(ValidationFailure("mask_missing", image_path, f"defective image ({row['defect_type']}) has no mask" + _expected_mask_hint(image_path)))
            return failures
        if not Path(mask_path).is_file():
            failures.append(ValidationFailure("mask_missing", image_path, f"mask file {mask_path} does not exist"))
            return failures
        failures += _check_mask(mask_path, image)
    elif mask_path:
        failures.append(ValidationFailure("mask_for_good_image", mask_path, f"good image {image_path} has a mask"))
    return failures


def _expected_mask_hint(image_path: str) -> str:
    path = Path(image_path)
    if path.parent.parent.name == "test":
        expected = path.parent.parent.parent / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        return f" (expected {expected})"
    return ""


def _check_mask(mask_path: str, image: np.ndarray | None) -> list[ValidationFailure]:
    mask, error = _decode(mask_path)
    if mask is None:
        return [ValidationFailure("mask_unreadable", mask_path, f"cannot decode mask: {error}")]
    failures = []
    if image is not None and mask.shape[:2] != image.shape[:2]:
        failures.append(
            ValidationFailure("mask_size_mismatch", mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {image.shape[1]}x{image.shape[0]}")
        )
    grey = mask if mask.ndim == 2 else mask.max(axis=-1)
    values = np.unique(grey)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        failures.append(ValidationFailure("mask_not_binary", mask_path, f"mask has {len(values)} distinct values {values[:6].tolist()}... (expected 0 and one foreground value)"))
    if not (grey > 0).any():
        failures.append(ValidationFailure("mask_empty", mask_path, "mask of a defective image has no foreground pixel"))
    return failures


def check_images(manifest: pd.DataFrame, min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION) -> list[ValidationFailure]:
    """Decode every image, mask and xyz tiff of the manifest (a few threads) and apply the image rules."""
    rows = manifest[["image_path", "mask_path", "depth_path", "label", "defect_type"]].to_dict("records")
    failures: list[ValidationFailure] = []
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for found in pool.map(functools.partial(_check_row, min_valid_fraction=min_valid_fraction), rows):
            failures.extend(found)
    return failures


# --- product / folder checks ---------------------------------------------------------------------


def _product_dir(manifest: pd.DataFrame, product: str) -> str:
    paths = manifest.loc[manifest["product"] == product, "image_path"].tolist()
    common = Path(os.path.commonpath(paths)) if paths else Path(product)
    for parent in [common, *common.parents]:
        if parent.name == product:
            return str(parent)
    return str(common)


def check_products(manifest: pd.DataFrame) -> list[ValidationFailure]:
    """Every product has train/good images; no two product names differ only by case (see ``untested_products``)."""
    failures: list[ValidationFailure] = []
    by_key: dict[str, list[str]] = {}
    for product in sorted(manifest["product"].unique()):
        by_key.setdefault(product.casefold(), []).append(product)
        rows = manifest[manifest["product"] == product]
        folder = _product_dir(manifest, product)
        if not ((rows["split"] == "train") & (rows["label"] == 0)).any():
            failures.append(ValidationFailure("train_good_empty", str(Path(folder) / "train" / "good"), f"product {product!r} has no train/good images"))
    for names in by_key.values():
        if len(names) > 1:
            for name in names:
                failures.append(ValidationFailure("duplicate_product", _product_dir(manifest, name), f"product names {names} differ only by case"))
    return failures


def _mvtec_product_dirs(root: Path) -> Iterator[Path]:
    from components.data.layouts.mvtec import product_dirs

    yield from product_dirs(root)


def check_mvtec_folders(root: Path, manifest: pd.DataFrame) -> list[ValidationFailure]:
    """MVTec-layout folder rules the manifest cannot show: empty/missing train/good, good masks, orphan masks."""
    failures: list[ValidationFailure] = []
    known_products = set(manifest["product"].unique())
    for product_dir in _mvtec_product_dirs(root):
        if product_dir.name not in known_products:  # a product folder without any image at all
            failures.append(ValidationFailure("train_good_empty", str(product_dir / "train" / "good"), f"product folder {product_dir.name!r} has no images"))
        ground_truth = product_dir / "ground_truth"
        for type_dir in visible_subdirs(ground_truth):
            for mask in sorted(p for p in type_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                if type_dir.name == "good":
                    failures.append(ValidationFailure("mask_for_good_image", str(mask), "masks of good images are not allowed (ground_truth/good)"))
                    continue
                stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
                test_dir = product_dir / "test" / type_dir.name
                if not any((test_dir / f"{stem}{suffix}").is_file() for suffix in _suffix_variants()):
                    failures.append(ValidationFailure("orphan_mask", str(mask), f"no image {stem}.* in {test_dir}"))
    return failures


def _suffix_variants() -> list[str]:
    return sorted(IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES})


# --- entry points -----------------------------------------------------------------------------------


def _counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts = {}
    for product, rows in manifest.groupby("product", sort=True):
        counts[str(product)] = {
            "train": int(((rows["split"] == "train") & (rows["label"] == 0)).sum()),
            "test_good": int(((rows["split"] == "test") & (rows["label"] == 0)).sum()),
            "test_defective": int(((rows["split"] == "test") & (rows["label"] == 1)).sum()),
            "defect_types": int(rows.loc[rows["label"] == 1, "defect_type"].nunique()),
        }
    return counts


def validate_dataset(root: Path, min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION) -> ValidationReport:
    """Validate the dataset at ``root``: GX manifest suite + image, mask, xyz and product checks."""
    root = Path(root)
    report = ValidationReport(root=str(root.resolve()) if root.exists() else str(root))
    try:
        report.layout = detect_layout(root)
        manifest = read_dataset(root, layout=report.layout)
    except DataError as exc:
        report.failures.append(ValidationFailure("layout", str(root), str(exc)))
        return report
    report.manifest = manifest
    report.products = _counts(manifest)
    report.not_evaluable = untested_products(manifest)
    # products, not the folder: add-product validates a temporary one-product view of the user's folder
    log.info("validating %d images of %d product(s): %s", len(manifest), len(report.products), ", ".join(map(str, report.products)))
    gx_failures, report.expectations = run_manifest_suite(manifest)
    failures = gx_failures + check_images(manifest, min_valid_fraction) + check_products(manifest)
    if report.layout == "mvtec":
        failures += check_mvtec_folders(root, manifest)
    if report.layout == "mvtec3d":
        failures += [ValidationFailure("depth_missing", path, "rgb image has no xyz/<stem>.tiff") for path in manifest.loc[manifest["depth_path"] == "", "image_path"]]
    unique = {(f.rule, f.path, f.message): f for f in failures}
    report.failures = sorted(unique.values(), key=lambda f: (f.path, f.rule, f.message))
    return report


def default_report_path(root: Path, out: Path | None = None) -> Path:
    """``OUT/validation_report.json``, or ``runs/validation/<root name>_validation_report.json`` without ``out``."""
    if out is not None:
        return Path(out) / REPORT_NAME
    return FALLBACK_REPORT_DIR / f"{Path(root).resolve().name or 'dataset'}_{REPORT_NAME}"


def write_report(report: ValidationReport, report_path: Path | None) -> Path:
    """Write the JSON report to ``report_path`` (default: ``default_report_path``); never inside the dataset."""
    target = Path(report_path) if report_path is not None else default_report_path(Path(report.root))
    root = Path(report.root).resolve()
    if root.is_dir() and target.resolve().is_relative_to(root):
        raise DataError(f"{target}: the validation report must not be written into the dataset folder {root}; choose --out outside it")
    return atomic_write_json(target, report.to_dict())


def validate_command(root: Path, report_path: Path | None, min_valid_fraction: float = DEFAULT_MIN_VALID_FRACTION) -> int:
    """CLI entry: validate, write the JSON report, print every failure; 0 when valid, else ``EXIT_INVALID`` (2: invalid input)."""
    report = validate_dataset(Path(root), min_valid_fraction)
    written = write_report(report, report_path)
    print(report.describe())
    print(f"validation report: {written.resolve()}")
    return 0 if report.ok else EXIT_INVALID
